/**
 * `mkoverlay [build] --board B --bastion eu[,us]`: one device end to end. Everything the user
 * can get wrong is checked first; then the port is reserved (pending), the overlay written
 * atomically, and the device activated. A failure after the reservation gives the port back.
 */
import { resolve } from "node:path";
import type { Bastion, Fleet } from "../config/fleet.js";
import { configPath, loadFleet } from "../config/load.js";
import { checkHostnameFlag, loadOrGenerateKey, resolveBastions, type DeviceKey } from "../device.js";
import { UserError } from "../errors.js";
import { serviceNames } from "../forwards.js";
import { prepareOutDir, removeIfEmpty } from "../fsutil.js";
import { publicKeyLine } from "../keys/ed25519.js";
import { out, stderrLog, type Log } from "../output.js";
import { archiveEpoch } from "../overlay/archive.js";
import { emitDevice, overlayPath, type Emit, type Emitted, type OutputForm } from "../pipeline.js";
import { loadProfiles, resolveBoardOs, type Board, type OsProfile } from "../profiles.js";
import { openRegistry } from "../registry/open.js";
import type { DeviceRecord, Registry, ReserveRequest } from "../registry/types.js";

export interface OutputOptions {
  out?: string;
  format?: string;
  apply?: string;
}

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

/** What a build reports (and `--json` prints): the registered device plus its outputs. */
export interface BuildResult extends Pick<DeviceRecord, "hostname" | "board" | "os" | "bastions" | "port" | "services" | "fingerprint"> {
  /** The public key line with the hostname as its comment. */
  publicKey: string;
  overlay: string;
  authorizedKeysFile: string;
  authorizedKeys: Record<string, string>;
  /** The paste-able fragment printed and written to authorizedKeysFile (not in --json). */
  authorizedKeysText: string;
  rebuilt: boolean;
}

/** --format tar|dir and --apply ROOT → where and how the overlay is written. */
export function outputForm(o: OutputOptions): OutputForm {
  if (o.apply !== undefined) {
    if (o.format !== undefined && o.format !== "apply") throw new UserError("--apply and --format cannot be combined");
    return { kind: "apply", root: resolve(o.apply) };
  }
  const f = o.format ?? "tar";
  if (f !== "tar" && f !== "dir") throw new UserError(`--format ${JSON.stringify(f)}: use tar (a .overlay.tar.gz) or dir (a folder); --apply ROOT lays it over a root file system`);
  return { kind: f };
}

/** The parts of a build every device of a run shares: config, profiles, output. */
export interface Station {
  fleet: Fleet;
  emit: Emit;
  log: Log;
  now: Date;
}

export interface DeviceRequest {
  board: Board;
  os: OsProfile;
  bastions: Bastion[];
  hostname: string | undefined;
  dk: DeviceKey;
}

export function reserveRequest(st: Station, req: DeviceRequest): ReserveRequest {
  return {
    hostname: req.hostname,
    hostnameTemplate: st.fleet.hostnameTemplate,
    range: st.fleet.ports.ssh,
    services: serviceNames(st.fleet),
    serviceRange: st.fleet.ports.services,
    board: req.board.id,
    os: req.os.id,
    bastions: req.bastions.map((b) => b.name),
    publicKey: publicKeyLine(req.dk.key.pub),
    fingerprint: req.dk.fingerprint,
    overlayPath: (h) => overlayPath(st.emit, h),
    now: st.now,
  };
}

export function buildResult(device: DeviceRecord, dk: DeviceKey, e: Emitted, rebuilt: boolean): BuildResult {
  return {
    hostname: device.hostname,
    board: device.board,
    os: device.os,
    bastions: device.bastions,
    port: device.port,
    services: device.services,
    fingerprint: dk.fingerprint,
    publicKey: publicKeyLine(dk.key.pub, device.hostname),
    overlay: e.overlay,
    authorizedKeysFile: e.authorizedKeysFile,
    authorizedKeys: e.lines,
    authorizedKeysText: e.text,
    rebuilt,
  };
}

/** Reserve (or find, for a re-flash), write, activate. The registry is the caller's. */
export async function buildDevice(st: Station, registry: Registry, req: DeviceRequest): Promise<BuildResult> {
  const { fleet, emit, log } = st;
  const { board, os, bastions, dk } = req;
  // A registered key means a re-flash: same device, same name and ports, a fresh overlay.
  let device: DeviceRecord | undefined = dk.imported ? await registry.getByFingerprint(dk.fingerprint) : undefined;
  const rebuilt = device !== undefined;
  if (device) {
    if (device.status !== "active") throw new UserError(`--host-key: the key belongs to ${device.hostname}, which is ${device.status}`);
    if (req.hostname !== undefined && req.hostname !== device.hostname) {
      throw new UserError(`--host-key: the key is registered to ${device.hostname}, not ${req.hostname}`, { hint: "drop --hostname to rebuild that device's overlay" });
    }
    log.info(`${device.hostname} is registered with this key: rebuilding its overlay (port ${device.port})`);
    device = { ...device, board: board.id, os: os.id, bastions: bastions.map((b) => b.name) };
  } else {
    device = await registry.reserve(reserveRequest(st, req));
    log.info(`reserved port ${device.port} for ${device.hostname}`);
  }
  const hostname = device.hostname;
  try {
    const e = await emitDevice(emit, device, dk.key, board, os, bastions, fleet);
    if (rebuilt) await registry.updateDevice(hostname, { board: board.id, os: os.id, bastions: device.bastions, overlay: e.overlay });
    else await registry.activate(hostname);
    log.info(`wrote ${e.overlay}`);
    return buildResult(device, dk, e, rebuilt);
  } catch (err) {
    if (!rebuilt) await registry.abandon(hostname);
    throw err;
  }
}

/** Checks --out (creating it 0700) before anything is reserved; undoes it if the run fails. */
export async function withOutDir<T>(o: OutputOptions, fn: (outDir: string, form: OutputForm) => Promise<T>): Promise<T> {
  const form = outputForm(o);
  const outDir = resolve(o.out ?? "out");
  const { created } = prepareOutDir(outDir);
  try {
    return await fn(outDir, form);
  } catch (e) {
    if (created) removeIfEmpty(outDir);
    throw e;
  }
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
  return withOutDir(opts, async (outDir, form) => {
    const registry = await openRegistry(fleet.registry);
    try {
      return await buildDevice({ fleet, emit: { outDir, form, epoch }, log, now }, registry, { board, os, bastions, hostname, dk });
    } finally {
      await registry.close();
    }
  });
}

export async function buildCommand(opts: BuildOptions): Promise<void> {
  const r = await runBuild(opts);
  const { authorizedKeysText, ...json } = r;
  out(opts.json ? JSON.stringify(json) : authorizedKeysText);
}
