/**
 * What every device-building command shares (build, image, batch, rotate, the API): the
 * station — config, output form, registry and the leases on its unfinished work — opened once
 * around a run, the output options checked before anything is reserved, and stopping on
 * request (signals, an AbortSignal). The device flow itself is device/flow.ts.
 */
import { resolve } from "node:path";
import { dialsJson, fieldWhere, forcedNote, lockoutError, lockoutLines, lockouts } from "../config/compat.js";
import type { Fleet } from "../config/fleet.js";
import { UserError } from "../util/errors.js";
import { prepareOutDir, removeIfEmpty } from "../util/fsutil.js";
import { stderrLog, type Log } from "../util/log.js";
import type { Emit, OutputForm } from "./pipeline.js";
import { leaseMs } from "../registry/core.js";
import { openRegistry } from "../registry/open.js";
import type { Registry } from "../registry/types.js";

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

/** What a station is opened with. */
export interface StationSpec {
  fleet: Fleet;
  emit: Emit;
  log: Log;
  now: Date;
  /** The registry to work on (default: the config's). */
  open?: () => Promise<Registry>;
  /** An abort asks the run to stop (SIGINT, SIGTERM, an API caller's signal). */
  stop?: AbortSignal | undefined;
  /** Build even though the config would lock out registered devices (compat.ts). */
  forceConfigChange?: boolean | undefined;
}

/** Opens the station (registry, leases, the config-change check), runs `fn`, always closes. */
export async function withStation<T>(spec: StationSpec, fn: (st: Station) => Promise<T>): Promise<T> {
  const { fleet, emit, log, now, stop } = spec;
  // Before a port is handed out: what the config allows but will likely hurt (config/rules.ts).
  for (const w of fleet.warnings ?? []) log.warn(w);
  const registry = await (spec.open ? spec.open() : openRegistry(fleet.registry));
  const leases = new Leases(registry);
  const stopRequested = () => (stop?.aborted ? String(stop.reason ?? "aborted") : undefined);
  try {
    await checkConfigChange(fleet, registry, log, now, Boolean(spec.forceConfigChange));
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
