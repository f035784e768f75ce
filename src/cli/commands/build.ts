/**
 * `mkoverlay [build] --board B --bastion eu[,us]`: one device end to end. Everything the user
 * can get wrong is checked first; then the station's device flow (station.ts) reserves the
 * port, writes the overlay atomically and activates the device.
 */
import { configPath, loadFleet } from "../../config/load.js";
import { checkHostnameFlag, loadOrGenerateKey, resolveBastions } from "../../device/inputs.js";
import { UserError } from "../../util/errors.js";
import { out, stderrLog, type Log } from "../../util/log.js";
import { archiveEpoch } from "../../overlay/archive.js";
import { loadProfiles, resolveBoardOs } from "../../config/profiles.js";
import { openRegistry } from "../../registry/open.js";
import { buildDevice, interruptible, withOutDir, withStation, type BuildResult, type OutputOptions } from "../../device/station.js";
import { attributeQuery, findDevice, parseAttrFlags } from "../../device/lookup.js";

export interface BuildOptions extends OutputOptions {
  board: string;
  bastion?: string;
  os?: string;
  hostname?: string;
  hostKey?: string;
  /** `KEY=VALUE` factory data (--attr, repeatable). */
  attr?: string[];
  config?: string;
  json?: boolean;
  quiet?: boolean;
}

export async function runBuild(opts: BuildOptions, log: Log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json)), stop?: AbortSignal): Promise<BuildResult> {
  const now = new Date();
  const fleet = await loadFleet(configPath(opts.config), now);
  const { board, os } = resolveBoardOs(await loadProfiles(), opts.board, opts.os);
  const bastions = resolveBastions(fleet, opts.bastion, now);
  // `--hostname serial=SN0042` names a registered device (a re-flash), looked up below.
  const byAttribute = opts.hostname !== undefined && attributeQuery(opts.hostname, "--hostname") !== undefined;
  let hostname = byAttribute ? undefined : checkHostnameFlag(opts.hostname);
  const attributes = parseAttrFlags(opts.attr);
  const dk = loadOrGenerateKey(opts.hostKey);
  if (byAttribute && !dk.imported) {
    throw new UserError(`--hostname ${opts.hostname}: names a registered device, and a new build needs a new name`, {
      hint: "re-flash it with its key (--host-key FILE), or give it a new key with 'mkoverlay rotate " + opts.hostname + "'",
    });
  }
  const epoch = archiveEpoch();
  return withOutDir(opts, (outDir, form) =>
    withStation(fleet, { outDir, form, epoch }, log, now, () => openRegistry(fleet.registry), async (st) => {
      if (byAttribute) hostname = (await findDevice(st.registry, opts.hostname!, "--hostname", ["active"])).hostname;
      return buildDevice(st, { board, os, bastions, hostname, dk, attributes });
    }, stop, { forceConfigChange: Boolean(opts.forceConfigChange) }),
  );
}

export function buildCommand(opts: BuildOptions): Promise<void> {
  return interruptible(async (stop) => {
    const r = await runBuild(opts, undefined, stop);
    const { authorizedKeysText, ...json } = r;
    out(opts.json ? JSON.stringify(json) : authorizedKeysText);
    return `${r.hostname} was built and registered`;
  });
}
