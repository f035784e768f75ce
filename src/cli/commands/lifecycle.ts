/**
 * Device lifecycle: `revoke` (out of every export; ports quarantined), `registry release`
 * (a revoked device's ports go back to the pool), `rotate` (a new key, same name and ports,
 * a new overlay; the old key stays valid for a grace period), `registry remove-bastion` (a
 * bastion taken off every registered device).
 */
import { withFleetRegistry } from "../context.js";
import { loadOrGenerateKey } from "../../device/inputs.js";
import { rotateDevice, type RotateResult } from "../../device/flow.js";
import type { RotateRequest } from "../../device/requests.js";
import { UserError } from "../../util/errors.js";
import { out, stderrLog, type Log } from "../../util/log.js";
import { archiveEpoch } from "../../overlay/archive.js";
import { deviceBastions, deviceProfiles } from "../../device/pipeline.js";
import { loadProfiles } from "../../config/profiles.js";
import { interruptible, withOutDir, withStation, type OutputOptions } from "../../device/station.js";
import { configPath, loadFleet } from "../../config/load.js";
import { nameProblem } from "../../util/validate.js";
import { findDevice } from "../../device/lookup.js";
import { durationFlag } from "../../util/duration.js";

export async function revokeCommand(arg: string, opts: { config?: string; json?: boolean }): Promise<void> {
  const log = stderrLog(Boolean(opts.json));
  await withFleetRegistry(opts.config, async (_f, registry) => {
    const d = await findDevice(registry, arg, "revoke", ["active", "pending"]);
    const hostname = d.hostname;
    if (d.status === "revoked") throw new UserError(`revoke ${hostname}: already revoked`);
    await registry.revoke(hostname);
    const ports = [d.port, ...Object.values(d.services)];
    if (opts.json) out(JSON.stringify({ hostname, status: "revoked", quarantinedPorts: ports, attributes: d.attributes }));
    log.info(`revoked ${hostname}; port(s) ${ports.join(", ")} quarantined until 'mkoverlay registry release ${hostname}'`);
    log.info("bastions running 'mkoverlay bastion agent' lock it out now; re-export the others' authorized_keys (mkoverlay bastion authorized-keys --write)");
  });
}

export async function releaseCommand(arg: string, opts: { config?: string; json?: boolean }): Promise<void> {
  await withFleetRegistry(opts.config, async (_f, registry) => {
    const d = await findDevice(registry, arg, "release", ["revoked"]);
    const hostname = d.hostname;
    if (d.status !== "revoked") throw new UserError(`release ${hostname}: the device is ${d.status}; revoke it first`);
    await registry.release(hostname);
    const ports = [d.port, ...Object.values(d.services)];
    if (opts.json) out(JSON.stringify({ hostname, status: "released", releasedPorts: ports, attributes: d.attributes }));
    stderrLog(Boolean(opts.json)).info(`released ${hostname}; its port(s) ${ports.join(", ")} can be handed out again`);
  });
}

/** `--grace`: how long a rotated-out key stays valid: a duration (src/util/duration.ts), or 0. */
export function parseGrace(v: string): number {
  return durationFlag("--grace", v, { zero: true, examples: "12h, 7d, 2w", zeroMeans: "0 to stop accepting the old key at once" });
}

export interface RotateOptions extends OutputOptions {
  config?: string;
  hostKey?: string;
  grace?: string;
  json?: boolean;
  quiet?: boolean;
}

/**
 * `rotate DEVICE`: the flags parsed into the typed request; the rotation itself is the device
 * flow's (device/flow.ts `rotateDevice`): the new key pending, the new overlay placed, then the
 * registry switches keys, keeping the old one valid for the grace period so the device in the
 * field is not locked out before its new overlay lands.
 */
export function rotateCommand(arg: string, opts: RotateOptions): Promise<void> {
  return interruptible(async (stop) => {
    const req: RotateRequest = { config: opts.config, device: arg, hostKey: opts.hostKey, graceMs: parseGrace(opts.grace ?? "7d"), output: opts, forceConfigChange: Boolean(opts.forceConfigChange) };
    const { text, ...json } = await runRotate(req, stderrLog(Boolean(opts.quiet) || Boolean(opts.json)), stop);
    out(opts.json ? JSON.stringify(json) : text);
    return "the rotation was complete";
  });
}

export async function runRotate(req: RotateRequest, log: Log, stop?: AbortSignal): Promise<RotateResult> {
  const dk = loadOrGenerateKey(req.hostKey);
  const epoch = archiveEpoch();
  const profiles = await loadProfiles();
  const now = new Date();
  const fleet = await loadFleet(configPath(req.config), now);
  return withOutDir(req.output, (outDir, form) =>
    withStation({ fleet, emit: { outDir, form, epoch }, log, now, stop, forceConfigChange: req.forceConfigChange }, async (st) => {
      const d = await findDevice(st.registry, req.device, "rotate", ["active"]);
      if (d.status !== "active") throw new UserError(`rotate ${d.hostname}: the device is ${d.status}`);
      if (dk.fingerprint === d.fingerprint) throw new UserError(`rotate ${d.hostname}: that is already its key`);
      return rotateDevice(st, d, { ...deviceProfiles(profiles, d), bastions: deviceBastions(fleet, d), dk }, req.graceMs);
    }),
  );
}

/** `registry remove-bastion NAME`: a retired bastion comes off every registered device. */
export async function removeBastionCommand(name: string, opts: { config?: string; json?: boolean }): Promise<void> {
  const p = nameProblem(name);
  if (p) throw new UserError(`remove-bastion ${JSON.stringify(name)}: a bastion name ${p}`);
  const log = stderrLog(Boolean(opts.json));
  await withFleetRegistry(opts.config, async (fleet, registry) => {
    const changed = await registry.removeBastion(name);
    const left = (await registry.list()).filter((d) => changed.includes(d.hostname) && d.bastions.length === 0).map((d) => d.hostname);
    if (opts.json) out(JSON.stringify({ bastion: name, devices: changed, withoutBastion: left }));
    else out(changed.length === 0 ? `no device tunnels to '${name}'` : `took '${name}' off ${changed.length} device(s): ${changed.join(", ")}`);
    if (fleet.bastions.has(name)) log.warn(`'${name}' is still in ${fleet.file}: new devices can still be built for it`);
    if (left.length > 0) log.warn(`${left.length} device(s) now tunnel to no bastion: ${left.slice(0, 10).join(", ")}${left.length > 10 ? ", …" : ""}`);
    if (changed.length > 0) log.info("their overlays still dial it: rebuild them (--host-key) at the next re-flash");
  });
}
