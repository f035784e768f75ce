/**
 * What every device-building command shares (build, batch, rotate): the station — config,
 * profiles, output form, registry and the leases on its unfinished work — and the one device
 * flow: reserve (or find, for a re-flash), render, write under temp names, confirm the
 * reservation is still this station's, rename into place, activate; any failure gives the
 * reservation back.
 */
import { rmSync } from "node:fs";
import { resolve } from "node:path";
import { dialsJson, fieldWhere, forcedNote, lockoutError, lockoutLines, lockouts } from "./config/compat.js";
import type { Bastion, Fleet } from "./config/fleet.js";
import type { DeviceKey } from "./device.js";
import { UserError } from "./errors.js";
import { serviceNames } from "./forwards.js";
import { prepareOutDir, removeFiles, removeIfEmpty, StagedGroups, writeFileAtomic } from "./fsutil.js";
import { publicKeyLine } from "./keys/ed25519.js";
import { stderrLog, type Log } from "./output.js";
import { writeTreeTo } from "./overlay/apply.js";
import { buildOverlay } from "./overlay/steps.js";
import type { Entry } from "./overlay/tree.js";
import { deviceSpec, overlayPath, pendingFiles, renderDevice, type DeviceContext, type Emit, type Emitted, type OutputForm, type Rendered } from "./pipeline.js";
import type { Board, OsProfile } from "./profiles.js";
import { leaseMs } from "./registry/core.js";
import { ReservationLost } from "./registry/rows.js";
import type { DeviceRecord, Registry, ReserveRequest } from "./registry/types.js";

export interface OutputOptions {
  out?: string;
  format?: string;
  apply?: string;
  /** A base disk image: one image per device (`mkoverlay image --base`, `batch --image`). */
  image?: string;
  rootPartition?: string;
  compress?: string;
  force?: boolean;
  /** Build even though the config would lock out registered devices (compat.ts). */
  forceConfigChange?: boolean;
}

/** `--root-partition N`: a partition number as the kernel counts them. */
export function rootPartitionFlag(v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  if (!/^\d{1,3}$/.test(v) || Number(v) < 1 || Number(v) > 128) throw new UserError(`--root-partition ${JSON.stringify(v)}: a partition number from 1 to 128`, { hint: "Raspberry Pi OS images: 2" });
  return Number(v);
}

function imageForm(o: OutputOptions, flag: string): OutputForm {
  if (o.format !== undefined || o.apply !== undefined) throw new UserError(`${flag} cannot be combined with --format or --apply`);
  if (o.compress !== undefined && o.compress !== "zstd") throw new UserError(`--compress ${JSON.stringify(o.compress)}: only zstd is supported`);
  if (o.image === "") throw new UserError(`${flag}: give the base image's path`);
  return { kind: "image", base: resolve(o.image!), rootPartition: rootPartitionFlag(o.rootPartition), compress: o.compress === "zstd" ? "zstd" : undefined, force: Boolean(o.force) };
}

/** --format tar|dir, --apply ROOT or a base image → where and how the overlay is written. */
function outputForm(o: OutputOptions, imageFlag = "--image"): OutputForm {
  if (o.image !== undefined) return imageForm(o, imageFlag);
  if (o.compress !== undefined || o.rootPartition !== undefined) throw new UserError(`--compress and --root-partition only apply to images (${imageFlag} BASE.img)`);
  if (o.apply !== undefined) {
    if (o.format !== undefined && o.format !== "apply") throw new UserError("--apply and --format cannot be combined");
    return { kind: "apply", root: resolve(o.apply) };
  }
  const f = o.format ?? "tar";
  if (f !== "tar" && f !== "dir") throw new UserError(`--format ${JSON.stringify(f)}: use tar (a .overlay.tar.gz) or dir (a folder); --apply ROOT lays it over a root file system`);
  // A folder written by an ordinary user holds files owned by that user, not root: an image
  // builder copying it would ship them so (sshd refuses a host key it does not own), and
  // verify fails. The archive carries root:root and the modes whoever extracts it; builders
  // extract it as root or under fakeroot (docs/image-builders.md).
  if (f === "dir" && process.getuid?.() !== 0) {
    throw new UserError("--format dir needs root: as another user the files would be owned by you, not root:root", {
      hint: "use the archive (the default, --format tar) and extract it with `tar --same-owner` as root or under fakeroot; see docs/image-builders.md",
    });
  }
  return { kind: f };
}

/** Checks --out (creating it 0700) before anything is reserved; undoes it if the run fails. */
export async function withOutDir<T>(o: OutputOptions, fn: (outDir: string, form: OutputForm) => Promise<T>, imageFlag?: string): Promise<T> {
  const form = outputForm(o, imageFlag);
  const outDir = resolve(o.out ?? "out");
  const { created } = prepareOutDir(outDir);
  try {
    return await fn(outDir, form);
  } catch (e) {
    if (created) removeIfEmpty(outDir);
    throw e;
  }
}

/**
 * Keeps this station's unfinished work its own: renews the leases of the devices in flight
 * while the station works (a timer that never holds the process open).
 */
class Leases {
  private readonly held = new Set<string>();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly registry: Registry) {}

  add(hostname: string): void {
    this.held.add(hostname);
    if (!this.timer) {
      this.timer = setInterval(() => {
        // A failed renewal is noticed where it matters: confirm() before anything is renamed.
        if (this.held.size > 0) this.registry.renew([...this.held]).catch(() => undefined);
      }, leaseMs() / 4);
      this.timer.unref();
    }
  }

  delete(hostname: string): void {
    this.held.delete(hostname);
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }
}

/** The parts of a run every device shares. */
export interface Station {
  fleet: Fleet;
  emit: Emit;
  log: Log;
  now: Date;
  registry: Registry;
  leases: Leases;
  /** Why the run was asked to stop (SIGINT, SIGTERM, an API caller's abort), if it was. */
  stopRequested(): string | undefined;
}

export async function withStation<T>(
  fleet: Fleet,
  emit: Emit,
  log: Log,
  now: Date,
  open: () => Promise<Registry>,
  fn: (st: Station) => Promise<T>,
  stop?: AbortSignal,
  opts: { forceConfigChange?: boolean } = {},
): Promise<T> {
  const registry = await open();
  const leases = new Leases(registry);
  const stopRequested = () => (stop?.aborted ? String(stop.reason ?? "aborted") : undefined);
  try {
    await checkConfigChange(fleet, registry, log, now, Boolean(opts.forceConfigChange));
    return await fn({ fleet, emit, log, now, registry, leases, stopRequested });
  } finally {
    leases.stop();
    await registry.close();
  }
}

/**
 * Before anything is reserved: refuses a config that would lock out registered devices (the
 * field, the old value and the count named) unless forced (`--force-config-change`); rows from
 * before schema 6 first get the config in use as what they dial (compat.ts).
 */
async function checkConfigChange(fleet: Fleet, registry: Registry, log: Log, now: Date, force: boolean): Promise<void> {
  let groups = await registry.dialGroups(fleet.ports.ssh, fleet.ports.services, now);
  const unknown = groups.filter((g) => g.dials === null);
  if (unknown.length > 0) {
    const fill: { hostname: string; dials: string }[] = [];
    for (const d of await registry.list()) {
      if (d.dials !== undefined || d.status === "revoked") continue;
      fill.push({ hostname: d.hostname, dials: dialsJson(fleet, d.bastions.flatMap((n) => fleet.bastions.get(n) ?? [])) });
    }
    const n = await registry.backfillDials(fill);
    if (n > 0) log.info(`recorded what ${n} device(s) from before this mkoverlay dial: the settings of ${fleet.file} (docs/bastion.md, "Changing a fleet's settings")`);
    groups = await registry.dialGroups(fleet.ports.ssh, fleet.ports.services, now);
  }
  const found = lockouts(fleet, groups);
  if (found.length === 0) return;
  const where = await fieldWhere(fleet.file);
  if (!force) throw lockoutError(fleet, found, where);
  lockoutLines(fleet, found, where).forEach((line, k) => log.warn(line + forcedNote(found[k]!)));
}

/** The exit code of a run stopped by `reason`: 128 + the signal's number, as shells report it. */
function stopExitCode(reason: string): number {
  return reason === "SIGTERM" ? 143 : reason === "SIGHUP" ? 129 : 130;
}

/** A run that stopped on request; `message` says what was done and what was not. */
export class Interrupted extends UserError {
  constructor(
    readonly reason: string,
    message: string,
  ) {
    super(message, { exitCode: stopExitCode(reason) });
    this.name = "Interrupted";
  }
}

/**
 * SIGINT and SIGTERM ask the run to stop (an AbortSignal the device flow checks at its safe
 * points): devices not past their point of no return give their reservation back, those past
 * it are finished, so nothing is left `pending`. A second signal stops at once (the doctor
 * then finishes or reclaims what was in flight). SIGKILL cannot be caught: that stays the
 * doctor's job. Only commands install this; the programmatic API takes the caller's signal.
 */
export function watchSignals(onFirst?: (signal: string) => void): { signal: AbortSignal; dispose(): void } {
  const ac = new AbortController();
  const handler = (sig: NodeJS.Signals): void => {
    if (ac.signal.aborted) {
      const log = stderrLog(false);
      log.progress("\n");
      log.warn(`${sig} again: stopping now; devices in flight stay pending until 'mkoverlay registry doctor --fix'`);
      process.exit(stopExitCode(sig));
    }
    ac.abort(sig);
    onFirst?.(sig);
  };
  process.on("SIGINT", handler);
  process.on("SIGTERM", handler);
  return {
    signal: ac.signal,
    dispose: () => {
      process.off("SIGINT", handler);
      process.off("SIGTERM", handler);
    },
  };
}

/**
 * Runs a command under watchSignals. `run` returns what it finished; a stop that came after
 * its point of no return still exits 130/143, saying that.
 */
export async function interruptible(run: (stop: AbortSignal) => Promise<string>): Promise<void> {
  const signals = watchSignals();
  try {
    const finished = await run(signals.signal);
    if (signals.signal.aborted) {
      const why = String(signals.signal.reason);
      throw new Interrupted(why, `interrupted by ${why} after ${finished}`);
    }
  } finally {
    signals.dispose();
  }
}

export interface DeviceRequest {
  board: Board;
  os: OsProfile;
  bastions: Bastion[];
  hostname: string | undefined;
  dk: DeviceKey;
  /** Factory data recorded with the device (serial number, MAC, site…). */
  attributes?: Record<string, string>;
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
    attributes: req.attributes ?? {},
    dials: dialsJson(st.fleet, req.bastions),
  };
}

export function contextOf(st: Station, device: DeviceRecord, req: Omit<DeviceRequest, "hostname">): DeviceContext {
  return { fleet: st.fleet, device, key: req.dk.key, board: req.board, os: req.os, bastions: req.bastions, emit: st.emit };
}

/** What a build reports (and `--json` prints): the registered device plus its outputs. */
export interface BuildResult extends Pick<DeviceRecord, "hostname" | "board" | "os" | "bastions" | "port" | "services" | "fingerprint" | "attributes"> {
  /** The public key line with the hostname as its comment. */
  publicKey: string;
  overlay: string;
  authorizedKeysFile: string;
  authorizedKeys: Record<string, string>;
  /** The paste-able fragment printed and written to authorizedKeysFile (not in --json). */
  authorizedKeysText: string;
  rebuilt: boolean;
}

export function buildResult(device: DeviceRecord, dk: DeviceKey, e: Emitted, rebuilt: boolean): BuildResult {
  return {
    hostname: device.hostname,
    board: device.board,
    os: device.os,
    bastions: device.bastions,
    port: device.port,
    services: device.services,
    attributes: device.attributes,
    fingerprint: dk.fingerprint,
    publicKey: publicKeyLine(dk.key.pub, device.hostname),
    overlay: e.overlay,
    authorizedKeysFile: e.authorizedKeysFile,
    authorizedKeys: e.lines,
    authorizedKeysText: e.text,
    rebuilt,
  };
}

/**
 * The overlay a device request will get, built before its port is reserved, so that an image
 * base can be checked for room (and names debugfs cannot take) with nothing reserved yet. The
 * port numbers are placeholders; they do not change the tree's size.
 */
export function provisionalEntries(fleet: Fleet, req: DeviceRequest, now: Date): Entry[] {
  const device: DeviceRecord = {
    hostname: req.hostname ?? "provisional",
    board: req.board.id,
    os: req.os.id,
    bastions: req.bastions.map((b) => b.name),
    port: fleet.ports.ssh.lo,
    services: Object.fromEntries(serviceNames(fleet).map((n) => [n, fleet.ports.services.lo])),
    publicKey: publicKeyLine(req.dk.key.pub),
    fingerprint: req.dk.fingerprint,
    status: "pending",
    overlay: null,
    station: "",
    created: now.toISOString(),
    updated: now.toISOString(),
    attributes: req.attributes ?? {},
  };
  return buildOverlay(deviceSpec({ fleet, device, key: req.dk.key, board: req.board, os: req.os, bastions: req.bastions })).list();
}

/**
 * Everything an image output can be refused for, checked before a port is reserved (and before
 * the registry is opened): see image/output.ts. `mine` is the device's key for a single build;
 * a batch passes undefined (each device brings a new key).
 */
export async function preflightImageForm(form: OutputForm, entries: readonly Entry[], mine: string | undefined, targets: string[] = [], outDir?: string): Promise<void> {
  if (form.kind !== "image") return;
  const { preflightImage } = await import("./image/output.js");
  await preflightImage(form, entries, mine, targets, outDir);
}

/** Removes what a device whose reservation was lost had already put in place. */
export function unplace(r: Rendered, form: OutputForm): void {
  if (form.kind === "image") removeFiles([r.overlay, `${r.overlay.replace(/\.zst$/, "")}.bmap`, r.authorizedKeysFile]);
  else if (form.kind === "tar") removeFiles([r.overlay, r.authorizedKeysFile]);
  else if (form.kind === "dir") {
    rmSync(r.overlay, { recursive: true, force: true });
    removeFiles([r.authorizedKeysFile]);
  }
}

/**
 * Writes one rendered device: temp names first, then (for work the registry leases) a check
 * that the work is still this station's, then the final names.
 */
/**
 * Puts a device's output in place. The point of no return is just before it takes its final
 * name: a stop asked for until then (staging an image takes seconds) throws `stopped(why)` and
 * leaves nothing; and the reservation must still be this station's.
 */
export async function place(st: Station, hostname: string, r: Rendered, leased: boolean, stopped: (why: string) => Interrupted): Promise<void> {
  const still = async () => {
    const why = st.stopRequested();
    if (why) throw stopped(why);
    if (leased && !(await st.registry.confirm([hostname])).has(hostname)) throw new ReservationLost(hostname);
  };
  if (r.archive) {
    const staged = new StagedGroups([pendingFiles(r)]);
    try {
      await still();
      const err = staged.commit(0);
      if (err) throw err;
      staged.finish();
    } finally {
      staged.discardRest();
    }
    return;
  }
  const form = st.emit.form;
  if (form.kind === "image") {
    // Loaded only for images: a plain build does not pay for the image code.
    const { stageDeviceImage } = await import("./image/output.js");
    const staged = await stageDeviceImage(form, r.overlay, r.tree.list(), st.emit.epoch);
    try {
      await still();
      staged.commit();
    } finally {
      staged.discard();
    }
    writeFileAtomic(r.authorizedKeysFile, r.text, { mode: 0o644 });
    return;
  }
  await still();
  writeTreeTo(r.tree, r.overlay, { epoch: st.emit.epoch, replaceWhole: form.kind === "dir" });
  writeFileAtomic(r.authorizedKeysFile, r.text, { mode: 0o644, durable: false });
}

/** Reserve (or find, for a re-flash), write, activate. */
export async function buildDevice(st: Station, req: DeviceRequest): Promise<BuildResult> {
  const { registry, log } = st;
  const { board, os, bastions, dk } = req;
  // A registered key means a re-flash: same device, same name and ports, a fresh overlay.
  let device: DeviceRecord | undefined = dk.imported ? await registry.getByFingerprint(dk.fingerprint) : undefined;
  const rebuilt = device !== undefined;
  if (device) {
    if (device.status !== "active") throw new UserError(`--host-key: the key belongs to ${device.hostname}, which is ${device.status}`);
    if (req.hostname !== undefined && req.hostname !== device.hostname) {
      throw new UserError(`--host-key: the key is registered to ${device.hostname}, not ${req.hostname}`, { hint: "drop --hostname to rebuild that device's overlay" });
    }
    if (Object.keys(req.attributes ?? {}).length > 0) throw new UserError(`--attr: ${device.hostname} is registered; a re-flash keeps the factory data it was registered with`);
    log.info(`${device.hostname} is registered with this key: rebuilding its overlay (port ${device.port})`);
    device = { ...device, board: board.id, os: os.id, bastions: bastions.map((b) => b.name) };
  } else {
    const why = st.stopRequested();
    if (why) throw new Interrupted(why, `interrupted by ${why} before anything was reserved`);
    device = await registry.reserve(reserveRequest(st, req));
    st.leases.add(device.hostname);
    log.info(`reserved port ${device.port} for ${device.hostname}`);
  }
  const hostname = device.hostname;
  const notBuilt = (why: string) => new Interrupted(why, `interrupted by ${why}: ${hostname} was not built${rebuilt ? "" : "; its reservation was given back"}`);
  let placed = false;
  try {
    const r = await renderDevice(contextOf(st, device, req));
    await place(st, hostname, r, !rebuilt, notBuilt);
    placed = true;
    if (rebuilt) await registry.updateDevice(hostname, { board: board.id, os: os.id, bastions: device.bastions, overlay: r.overlay, dials: dialsJson(st.fleet, bastions, device.dials) });
    else {
      try {
        await registry.activate(hostname);
      } catch (e) {
        if (e instanceof ReservationLost) unplace(r, st.emit.form);
        throw e;
      }
    }
    log.info(`wrote ${r.overlay}`);
    return buildResult(device, dk, r, rebuilt);
  } catch (err) {
    if (placed && !(err instanceof ReservationLost)) {
      // The output is in place with this port and key: giving the port back would let the
      // next device take it. The row stays pending; its lease runs out and the doctor
      // finishes it (the output is complete).
      log.warn(`${hostname} was written but not registered as built; 'mkoverlay registry doctor --fix' finishes it`);
      throw err;
    }
    // (abandon gives back only this station's pending row.) One that fails leaves the row to
    // the doctor and must not hide what went wrong.
    if (!rebuilt) await registry.abandon(hostname).catch(() => undefined);
    // A Ctrl-C in a terminal reaches the tools an image is made with (cp, debugfs) too: their
    // failure is the interruption.
    const why = st.stopRequested();
    if (why && !(err instanceof Interrupted) && !(err instanceof ReservationLost)) throw notBuilt(why);
    throw err;
  } finally {
    st.leases.delete(hostname);
  }
}
