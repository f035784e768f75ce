/**
 * `mkoverlay [build] --board B --bastion eu[,us]`: one device end to end. The flags are parsed
 * into the typed request the API takes too (device/requests.ts); `runBuild` checks everything
 * the user can get wrong first, then the device flow (device/flow.ts) reserves the port (or
 * finds the device, for a re-flash), writes the output atomically and registers it. `image`
 * is the same build with an image output.
 */
import { configPath, loadFleet } from "../../config/load.js";
import { attributeQuery, checkAttributes, findDevice, parseAttrFlags } from "../../device/lookup.js";
import { bastionNames, checkHostnameFlag, loadOrGenerateKey, resolveBastions } from "../../device/inputs.js";
import { buildDevice, preflightImageForm, provisionalEntries, type BuildResult } from "../../device/flow.js";
import type { BuildRequest } from "../../device/requests.js";
import { UserError } from "../../util/errors.js";
import { publicKeyLine } from "../../keys/ed25519.js";
import { out, stderrLog, type Log } from "../../util/log.js";
import { archiveEpoch } from "../../overlay/archive.js";
import { overlayPath } from "../../device/pipeline.js";
import { loadProfiles, resolveBoardOs } from "../../config/profiles.js";
import { interruptible, withOutDir, withStation, type OutputOptions } from "../../device/station.js";

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

/** build's (and image's) flags → the typed request. */
export function buildRequest(opts: BuildOptions, output: OutputOptions = opts): BuildRequest {
  return {
    config: opts.config,
    board: opts.board,
    os: opts.os,
    bastions: bastionNames(opts.bastion),
    hostname: opts.hostname,
    hostKey: opts.hostKey,
    attributes: parseAttrFlags(opts.attr),
    output,
    forceConfigChange: Boolean(opts.forceConfigChange),
  };
}

export interface RunOptions {
  log?: Log;
  stop?: AbortSignal | undefined;
  /** How the output's image option is spelt in messages (`--base` for `mkoverlay image`). */
  imageFlag?: string;
}

export async function runBuild(req: BuildRequest, run: RunOptions = {}): Promise<BuildResult> {
  const log = run.log ?? stderrLog(true);
  const now = new Date();
  const fleet = await loadFleet(configPath(req.config), now);
  const { board, os } = resolveBoardOs(await loadProfiles(), req.board, req.os);
  const bastions = resolveBastions(fleet, req.bastions, now);
  // `--hostname serial=SN0042` names a registered device (a re-flash), looked up below.
  const byAttribute = req.hostname !== undefined && attributeQuery(req.hostname, "--hostname") !== undefined;
  const hostname = byAttribute ? undefined : checkHostnameFlag(req.hostname);
  const attributes = checkAttributes(req.attributes);
  const dk = loadOrGenerateKey(req.hostKey);
  if (byAttribute && !dk.imported) {
    throw new UserError(`--hostname ${req.hostname}: names a registered device, and a new build needs a new name`, {
      hint: "re-flash it with its key (--host-key FILE), or give it a new key with 'mkoverlay rotate " + req.hostname + "'",
    });
  }
  const epoch = archiveEpoch();
  return withOutDir(
    req.output,
    async (outDir, form) => {
      const emit = { outDir, form, epoch };
      // An image: everything its base can be refused for is checked before a port is reserved.
      if (form.kind === "image") await preflightImageForm(form, provisionalEntries(fleet, { board, os, bastions, hostname, dk, attributes }, now), publicKeyLine(dk.key.pub), hostname ? [overlayPath(emit, hostname)] : [], outDir);
      return withStation({ fleet, emit, log, now, stop: run.stop, forceConfigChange: req.forceConfigChange }, async (st) => {
        const name = byAttribute ? (await findDevice(st.registry, req.hostname!, "--hostname", ["active"])).hostname : hostname;
        return buildDevice(st, { board, os, bastions, hostname: name, dk, attributes });
      });
    },
    run.imageFlag,
  );
}

export function buildCommand(opts: BuildOptions): Promise<void> {
  return interruptible(async (stop) => {
    const r = await runBuild(buildRequest(opts), { log: stderrLog(Boolean(opts.quiet) || Boolean(opts.json)), stop });
    const { authorizedKeysText, ...json } = r;
    out(opts.json ? JSON.stringify(json) : authorizedKeysText);
    return `${r.hostname} was built and registered`;
  });
}
