/**
 * `mkoverlay [build] --board B --bastion eu[,us]`: one device end to end. Everything the user
 * can get wrong is checked first; then the station's device flow (station.ts) reserves the
 * port, writes the overlay atomically and activates the device.
 */
import { configPath, loadFleet } from "../config/load.js";
import { checkHostnameFlag, loadOrGenerateKey, resolveBastions } from "../device.js";
import { out, stderrLog } from "../output.js";
import { archiveEpoch } from "../overlay/archive.js";
import { loadProfiles, resolveBoardOs } from "../profiles.js";
import { openRegistry } from "../registry/open.js";
import { buildDevice, withOutDir, withStation, type BuildResult, type OutputOptions } from "../station.js";

export interface BuildOptions extends OutputOptions {
  board: string;
  bastion?: string;
  os?: string;
  hostname?: string;
  hostKey?: string;
  config?: string;
  json?: boolean;
  quiet?: boolean;
}

export async function runBuild(opts: BuildOptions): Promise<BuildResult> {
  const log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json));
  const now = new Date();
  const fleet = await loadFleet(configPath(opts.config), now);
  const { board, os } = resolveBoardOs(await loadProfiles(), opts.board, opts.os);
  const bastions = resolveBastions(fleet, opts.bastion, now);
  const hostname = checkHostnameFlag(opts.hostname);
  const dk = loadOrGenerateKey(opts.hostKey);
  const epoch = archiveEpoch();
  return withOutDir(opts, (outDir, form) =>
    withStation(fleet, { outDir, form, epoch }, log, now, () => openRegistry(fleet.registry), (st) => buildDevice(st, { board, os, bastions, hostname, dk })),
  );
}

export async function buildCommand(opts: BuildOptions): Promise<void> {
  const r = await runBuild(opts);
  const { authorizedKeysText, ...json } = r;
  out(opts.json ? JSON.stringify(json) : authorizedKeysText);
}
