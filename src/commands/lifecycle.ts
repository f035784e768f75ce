/**
 * Device lifecycle: `revoke` (out of every export; ports quarantined), `registry release`
 * (a revoked device's ports go back to the pool), `rotate` (a new key, same name and ports,
 * a new overlay; exports follow).
 */
import { withFleetRegistry } from "../context.js";
import { loadOrGenerateKey } from "../device.js";
import { UserError } from "../errors.js";
import { publicKeyLine } from "../keys/ed25519.js";
import { out, stderrLog } from "../output.js";
import { archiveEpoch } from "../overlay/archive.js";
import { deviceBastions, deviceProfiles, emitDevice } from "../pipeline.js";
import { loadProfiles } from "../profiles.js";
import type { DeviceRecord, Registry } from "../registry/types.js";
import { withOutDir, type OutputOptions } from "./build.js";

async function device(registry: Registry, hostname: string, verb: string): Promise<DeviceRecord> {
  const d = await registry.get(hostname);
  if (!d) throw new UserError(`${verb} ${hostname}: no such device in the registry`, { hint: "see 'mkoverlay registry list'" });
  return d;
}

export async function revokeCommand(hostname: string, opts: { config?: string }): Promise<void> {
  await withFleetRegistry(opts.config, async (_f, registry) => {
    const d = await device(registry, hostname, "revoke");
    if (d.status === "revoked") throw new UserError(`revoke ${hostname}: already revoked`);
    await registry.revoke(hostname);
    const ports = [d.port, ...Object.values(d.services)].join(", ");
    process.stderr.write(
      `mkoverlay: revoked ${hostname}; port(s) ${ports} quarantined until 'mkoverlay registry release ${hostname}'.\n` +
        "mkoverlay: bastion agents lock it out within seconds; re-export the authorized_keys of bastions without one.\n",
    );
  });
}

export async function releaseCommand(hostname: string, opts: { config?: string }): Promise<void> {
  await withFleetRegistry(opts.config, async (_f, registry) => {
    const d = await device(registry, hostname, "release");
    if (d.status !== "revoked") throw new UserError(`release ${hostname}: the device is ${d.status}; revoke it first`);
    await registry.release(hostname);
    process.stderr.write(`mkoverlay: released ${hostname}; its port(s) can be handed out again\n`);
  });
}

/**
 * `--grace`: how long bastions keep accepting the replaced key, so a device in the field is not
 * locked out before its new overlay arrives. `0` drops it at once.
 */
export function parseGrace(value: string): number {
  const m = /^(\d{1,6})([hdw])$/.exec(value);
  if (value === "0") return 0;
  if (!m) throw new UserError(`--grace ${JSON.stringify(value)}: not a duration`, { hint: "use e.g. 12h, 7d, 2w, or 0 to drop the old key at once" });
  return Number(m[1]) * { h: 3_600_000, d: 86_400_000, w: 604_800_000 }[m[2] as "h" | "d" | "w"];
}

export async function rotateCommand(hostname: string, opts: OutputOptions & { config?: string; hostKey?: string; json?: boolean; quiet?: boolean; grace?: string }): Promise<void> {
  const log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json));
  const graceMs = parseGrace(opts.grace ?? "7d");
  const dk = loadOrGenerateKey(opts.hostKey);
  const epoch = archiveEpoch();
  const profiles = await loadProfiles();
  const result = await withOutDir(opts, (outDir, form) =>
    withFleetRegistry(opts.config, async (fleet, registry) => {
      const d = await device(registry, hostname, "rotate");
      if (d.status !== "active") throw new UserError(`rotate ${hostname}: the device is ${d.status}`);
      if (dk.fingerprint === d.fingerprint) throw new UserError(`rotate ${hostname}: that is already its key`);
      const other = await registry.getByFingerprint(dk.fingerprint);
      if (other) throw new UserError(`rotate ${hostname}: the new key is registered to ${other.hostname}`);
      const { board, os } = deviceProfiles(profiles, d);
      const bastions = deviceBastions(fleet, d);
      const e = await emitDevice({ outDir, form, epoch }, d, dk.key, board, os, bastions, fleet);
      // Only after the new overlay exists does the registry (and so every export) switch keys.
      const graceUntil = graceMs > 0 ? new Date(Date.now() + graceMs).toISOString() : undefined;
      await registry.rotate(hostname, publicKeyLine(dk.key.pub), dk.fingerprint, e.overlay, graceUntil);
      log.info(`rotated ${hostname}: new key ${dk.fingerprint}, port ${d.port} kept; wrote ${e.overlay}`);
      log.info(
        graceUntil
          ? `the old key ${d.fingerprint} stays accepted until ${graceUntil}, or until a bastion agent sees the new key log in`
          : "the old key is dropped at once (bastion agents follow; re-export the authorized_keys of bastions without one)",
      );
      return { hostname, port: d.port, fingerprint: dk.fingerprint, previousFingerprint: d.fingerprint, graceUntil: graceUntil ?? null, overlay: e.overlay, authorizedKeys: e.lines, text: e.text };
    }),
  );
  const { text, ...json } = result;
  out(opts.json ? JSON.stringify(json) : text);
}
