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
        "mkoverlay: re-export each bastion's authorized_keys (mkoverlay bastion authorized-keys --write) to lock it out.\n",
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

export async function rotateCommand(hostname: string, opts: OutputOptions & { config?: string; hostKey?: string; json?: boolean; quiet?: boolean }): Promise<void> {
  const log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json));
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
      await registry.rotate(hostname, publicKeyLine(dk.key.pub), dk.fingerprint, e.overlay);
      log.info(`rotated ${hostname}: new key ${dk.fingerprint}, port ${d.port} kept; wrote ${e.overlay}`);
      log.info("re-export each bastion's authorized_keys so the old key stops working");
      return { hostname, port: d.port, fingerprint: dk.fingerprint, previousFingerprint: d.fingerprint, overlay: e.overlay, authorizedKeys: e.lines, text: e.text };
    }),
  );
  const { text, ...json } = result;
  out(opts.json ? JSON.stringify(json) : text);
}
