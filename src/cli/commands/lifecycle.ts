/**
 * Device lifecycle: `revoke` (out of every export; ports quarantined), `registry release`
 * (a revoked device's ports go back to the pool), `rotate` (a new key, same name and ports,
 * a new overlay; the old key stays valid for a grace period), `registry remove-bastion` (a
 * bastion taken off every registered device).
 */
import { withFleetRegistry } from "../context.js";
import { loadOrGenerateKey } from "../../device/inputs.js";
import { UserError } from "../../util/errors.js";
import { publicKeyLine } from "../../keys/ed25519.js";
import { out, stderrLog } from "../../util/log.js";
import { archiveEpoch } from "../../overlay/archive.js";
import { deviceBastions, deviceProfiles, overlayPath, renderDevice } from "../../device/pipeline.js";
import { loadProfiles } from "../../config/profiles.js";
import { dialsJson } from "../../config/compat.js";
import { contextOf, interruptible, Interrupted, place, unplace, withOutDir, withStation, type OutputOptions } from "../../device/station.js";
import { openRegistry } from "../../registry/open.js";
import { configPath, loadFleet } from "../../config/load.js";
import { ReservationLost } from "../../registry/rows.js";
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
 * A rotation in two phases, like a build: the new key is recorded as pending (a second
 * rotation of the same device is refused meanwhile), the new overlay is written, and only
 * then does the registry — and so every export — switch keys, keeping the old one valid for
 * the grace period so the device in the field is not locked out before its new overlay lands.
 */
export function rotateCommand(arg: string, opts: RotateOptions): Promise<void> {
  return interruptible(async (stop) => {
    await rotate(arg, opts, stop);
    return "the rotation was complete";
  });
}

export async function rotate(arg: string, opts: RotateOptions, stop: AbortSignal): Promise<void> {
  const log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json));
  const graceMs = parseGrace(opts.grace ?? "7d");
  const dk = loadOrGenerateKey(opts.hostKey);
  const epoch = archiveEpoch();
  const profiles = await loadProfiles();
  const now = new Date();
  const fleet = await loadFleet(configPath(opts.config), now);
  const result = await withOutDir(opts, (outDir, form) =>
    withStation(fleet, { outDir, form, epoch }, log, now, () => openRegistry(fleet.registry), async (st) => {
      const { registry } = st;
      const d = await findDevice(registry, arg, "rotate", ["active"]);
      const hostname = d.hostname;
      if (d.status !== "active") throw new UserError(`rotate ${hostname}: the device is ${d.status}`);
      if (dk.fingerprint === d.fingerprint) throw new UserError(`rotate ${hostname}: that is already its key`);
      const { board, os } = deviceProfiles(profiles, d);
      const bastions = deviceBastions(fleet, d);
      const publicKey = publicKeyLine(dk.key.pub);
      const stopped = st.stopRequested();
      if (stopped) throw new Interrupted(stopped, `interrupted by ${stopped}: ${hostname} was not rotated`);
      await registry.beginRotate(hostname, d.fingerprint, publicKey, dk.fingerprint, overlayPath(st.emit, hostname), dialsJson(fleet, bastions, d.dials));
      st.leases.add(hostname);
      let placed = false;
      try {
        const r = await renderDevice(contextOf(st, { ...d, publicKey, fingerprint: dk.fingerprint }, { board, os, bastions, dk }));
        // Stopping before the new overlay is in place leaves the device as it was.
        await place(st, hostname, r, true, (why) => new Interrupted(why, `interrupted by ${why}: ${hostname} was not rotated (it keeps its key)`));
        placed = true;
        const graceUntil = graceMs > 0 ? new Date(Date.now() + graceMs) : undefined;
        try {
          await registry.commitRotate(hostname, dk.fingerprint, graceUntil);
        } catch (e) {
          if (e instanceof ReservationLost) unplace(r, st.emit.form);
          throw e;
        }
        log.info(`rotated ${hostname}: new key ${dk.fingerprint}, port ${d.port} kept; wrote ${r.overlay}`);
        log.info(graceUntil ? `the old key stays valid until ${graceUntil.toISOString()} (or until a bastion agent sees the new one)` : "the old key is no longer valid");
        return {
          hostname,
          port: d.port,
          fingerprint: dk.fingerprint,
          previousFingerprint: d.fingerprint,
          graceUntil: graceUntil?.toISOString() ?? null,
          overlay: r.overlay,
          authorizedKeys: r.lines,
          text: r.text,
        };
      } catch (e) {
        // The new overlay in place replaced the old one: dropping the new key now would lock the
        // device out. The rotation stays pending; the doctor finishes it once its lease runs out.
        if (placed && !(e instanceof ReservationLost)) log.warn(`${hostname}: the new overlay was written but the rotation not recorded; 'mkoverlay registry doctor --fix' finishes it`);
        else await registry.abortRotate(hostname, dk.fingerprint).catch(() => undefined);
        throw e;
      } finally {
        st.leases.delete(hostname);
      }
    }, stop, { forceConfigChange: Boolean(opts.forceConfigChange) }),
  );
  const { text, ...json } = result;
  out(opts.json ? JSON.stringify(json) : text);
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
