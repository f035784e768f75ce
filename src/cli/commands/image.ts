/**
 * `mkoverlay image --base BASE.img --board B --bastion eu`: one device, built and registered
 * exactly as `build` does it (same checks, same reservation, lease, confirm and activation in
 * station.ts), written as a disk image: DIR/H.img (0600, in a 0700 folder), the base with the
 * overlay laid into its root partition by debugfs, and DIR/H.img.bmap for bmaptool. Everything
 * the base can be refused for is checked before a port is reserved.
 */
import { configPath, loadFleet } from "../../config/load.js";
import { checkHostnameFlag, loadOrGenerateKey, resolveBastions } from "../../device/inputs.js";
import { publicKeyLine } from "../../keys/ed25519.js";
import { out, stderrLog } from "../../util/log.js";
import { archiveEpoch } from "../../overlay/archive.js";
import { overlayPath } from "../../device/pipeline.js";
import { loadProfiles, resolveBoardOs } from "../../config/profiles.js";
import { openRegistry } from "../../registry/open.js";
import { buildDevice, interruptible, preflightImageForm, provisionalEntries, withOutDir, withStation, type OutputOptions } from "../../device/station.js";

export interface ImageOptions extends Omit<OutputOptions, "image" | "format" | "apply"> {
  base: string;
  board: string;
  bastion?: string;
  os?: string;
  hostname?: string;
  hostKey?: string;
  config?: string;
  json?: boolean;
  quiet?: boolean;
}

export function imageCommand(opts: ImageOptions): Promise<void> {
  return interruptible((stop) => runImage(opts, stop));
}

async function runImage(opts: ImageOptions, stop: AbortSignal): Promise<string> {
  const log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json));
  const now = new Date();
  const fleet = await loadFleet(configPath(opts.config), now);
  const { board, os } = resolveBoardOs(await loadProfiles(), opts.board, opts.os);
  const bastions = resolveBastions(fleet, opts.bastion, now);
  const hostname = checkHostnameFlag(opts.hostname);
  const dk = loadOrGenerateKey(opts.hostKey);
  const epoch = archiveEpoch();
  const req = { board, os, bastions, hostname, dk };
  const { base, ...rest } = opts;
  const r = await withOutDir(
    { ...rest, image: base },
    async (outDir, form) => {
      const emit = { outDir, form, epoch };
      await preflightImageForm(form, provisionalEntries(fleet, req, now), publicKeyLine(dk.key.pub), hostname ? [overlayPath(emit, hostname)] : [], outDir);
      return withStation(fleet, emit, log, now, () => openRegistry(fleet.registry), (st) => buildDevice(st, req), stop, { forceConfigChange: Boolean(opts.forceConfigChange) });
    },
    "--base",
  );
  const { authorizedKeysText, ...json } = r;
  const bmap = `${r.overlay.replace(/\.zst$/, "")}.bmap`;
  // `image` names what this command makes; `overlay` (the same path) keeps build's shape.
  out(opts.json ? JSON.stringify({ ...json, image: r.overlay, bmap }) : authorizedKeysText);
  return `${r.hostname} was built and registered`;
}
