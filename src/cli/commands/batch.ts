/**
 * `mkoverlay batch`: a factory shift. Config, profiles and the registry are opened once;
 * devices go through in chunks (one transaction for the chunk's reservations, one sync for its
 * archives, one for its activations), and each device succeeds or fails on its own: a failing
 * device reserves nothing and the others stand. Devices stream through: nothing of the batch
 * is kept in memory but counts and failures.
 */
import { existsSync, unlinkSync } from "node:fs";
import { basename, extname, join } from "node:path";
import { setFlagsFromString } from "node:v8";
import { configPath, loadFleet } from "../../config/load.js";
import { checkAttributes, parseAttrFlags } from "../../device/lookup.js";
import { bastionNames, loadOrGenerateKey, resolveBastions } from "../../device/inputs.js";
import { buildDevice, buildResult, contextOf, lostAfterPlacing, preflightImageForm, provisionalEntries, reservedClaim, reserveRequest, settle, type BuildResult, type Claim, type DeviceRequest } from "../../device/flow.js";
import { outputOf } from "../../device/outputs/index.js";
import { pendingFiles } from "../../device/outputs/tar.js";
import type { BatchRequest } from "../../device/requests.js";
import { isUserError, UserError } from "../../util/errors.js";
import { StagedGroups, writeFileAtomic } from "../../util/fsutil.js";
import { readHostRows, type HostRow } from "../../device/hosts-file.js";
import { out, Progress, stderrLog, type Log } from "../../util/log.js";
import { archiveEpoch } from "../../overlay/archive.js";
import { overlayPath, renderDevice, type Rendered } from "../../device/pipeline.js";
import { loadProfiles, resolveBoardOs } from "../../config/profiles.js";
import { PortsExhausted, ReservationLost } from "../../registry/rows.js";
import type { DeviceState } from "../../registry/types.js";
import { Interrupted, watchSignals, withOutDir, withStation, type OutputOptions, type Station } from "../../device/station.js";
import { hostnameProblem } from "../../util/validate.js";

export interface BatchOptions extends OutputOptions {
  board: string;
  bastion?: string;
  os?: string;
  count?: string;
  hosts?: string;
  config?: string;
  /** `KEY=VALUE` factory data for every device (--attr). */
  attr?: string[];
  json?: boolean;
  quiet?: boolean;
  /** false with --no-progress. */
  progress?: boolean;
}

/** The most devices one batch builds. */
const MAX_COUNT = 100_000;

/** batch's flags → the typed request the API takes too. */
export function batchRequest(opts: BatchOptions): BatchRequest {
  let count: number | undefined;
  if (opts.count !== undefined) {
    if (!/^\d+$/.test(opts.count)) throw new UserError(`--count ${opts.count}: a whole number from 1 to ${MAX_COUNT}`);
    count = Number(opts.count);
  }
  const { out: o, format, apply, image, rootPartition, compress, force } = opts;
  return {
    config: opts.config,
    board: opts.board,
    os: opts.os,
    bastions: bastionNames(opts.bastion),
    count,
    hosts: opts.hosts,
    attributes: parseAttrFlags(opts.attr),
    output: { out: o, format, apply, image, rootPartition, compress, force },
    forceConfigChange: Boolean(opts.forceConfigChange),
  };
}

/** Devices reserved, written and activated together: one sync of each kind per chunk. */
const CHUNK = 64;

function checkName(wanted: string | undefined): void {
  if (wanted === undefined) return;
  const p = hostnameProblem(wanted);
  if (p) throw new UserError(`hostname ${JSON.stringify(wanted)} ${p}`);
}

interface ChunkItem {
  wanted: string | undefined;
  label: string;
  /** Factory data from the hosts file's other columns. */
  attributes: Record<string, string>;
}

interface Outcomes {
  succeed(r: BuildResult): void;
  fail(item: ChunkItem, e: UserError): void;
  /** Not built because the run was asked to stop (nothing is reserved for it). */
  notBuilt(item: ChunkItem): void;
  /** A device's overlay is rendered (progress moves before its chunk is written). */
  work(hostname: string): void;
}

/** In place of an outcome: the run stopped before this device was finished. */
const NOT_BUILT = Symbol("not built");

/**
 * Lets the event loop turn once. A chunk's work is synchronous or microtasks only, and Node
 * delivers a signal (and runs timers) only between turns: without this, Ctrl-C would be seen
 * when the whole batch was over.
 */
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/**
 * One chunk of a tar-form batch: reserve all (one transaction, a savepoint each), render all,
 * write all archives under temp names (synced together), confirm the reservations are still
 * this station's, rename device by device, activate all. Each device is a claim of the device
 * flow (device/flow.ts) and a device that fails at any step is settled by its rule (`settle`:
 * before its rename, the reservation is given back) and reported; the others stand. Asked to
 * stop (SIGINT, SIGTERM) before the first rename, the chunk gives every reservation back (its
 * devices are "not built"); from the first rename on it is finished. Killed midway (SIGKILL),
 * the pending devices are finished or reclaimed by `registry doctor`. Returns why the run
 * stops: asked to, or a port range is full (every later device would fail the same way).
 */
// Long on purpose (~100 lines): its steps share the chunk's outcomes, the claims in flight and
// the one point of no return (the first rename); split, each part would pass most of them on.
async function chunked(st: Station, chunk: ChunkItem[], common: Omit<DeviceRequest, "hostname" | "dk">, report: Outcomes): Promise<"stopped" | PortsExhausted | undefined> {
  const { registry } = st;
  const output = outputOf(st.emit);
  const outcome: (BuildResult | UserError | typeof NOT_BUILT)[] = new Array(chunk.length);
  await turn();
  let stopped = st.stopRequested() !== undefined;
  let full: PortsExhausted | undefined;
  const asked: { i: number; req: DeviceRequest }[] = [];
  chunk.forEach(({ wanted, attributes }, i) => {
    if (stopped) {
      outcome[i] = NOT_BUILT;
      return;
    }
    try {
      checkName(wanted);
      asked.push({ i, req: { ...common, hostname: wanted, dk: loadOrGenerateKey(undefined), attributes } });
    } catch (e) {
      if (!isUserError(e)) throw e;
      outcome[i] = e;
    }
  });
  const reserved = asked.length > 0 ? await registry.reserveMany(asked.map((a) => reserveRequest(st, a.req))) : [];
  type Flying = { i: number; claim: Claim; req: DeviceRequest };
  const flying: Flying[] = [];
  const ready: (Flying & { r: Rendered })[] = [];
  /** The device-flow rule for a device of the chunk that failed (or was stopped) before its rename. */
  const fail = async (x: Flying, e: unknown) => {
    const err = await settle(st, x.claim, e, false);
    if (err instanceof Interrupted) outcome[x.i] = NOT_BUILT;
    else if (isUserError(err)) outcome[x.i] = err;
    else throw err;
  };
  const stopNow = (): boolean => (stopped ||= st.stopRequested() !== undefined);
  const notDone = (x: Flying) => x.claim.notDone(st.stopRequested() ?? "stop");
  try {
    for (const [k, res] of reserved.entries()) {
      const { i, req } = asked[k]!;
      if (res instanceof UserError) {
        // The first device that finds a range full fails with it; the rest of the chunk is not built.
        if (res instanceof PortsExhausted) full ??= res;
        outcome[i] = full && full !== res ? NOT_BUILT : res;
        continue;
      }
      const x = { i, req, claim: reservedClaim(st, res) };
      flying.push(x);
      st.leases.add(res.hostname);
      if (stopNow()) {
        await fail(x, notDone(x));
        continue;
      }
      try {
        ready.push({ ...x, r: await renderDevice(contextOf(st, res, req)) });
        report.work(res.hostname);
        if (ready.length % 16 === 0) await turn();
      } catch (e) {
        await fail(x, e);
      }
    }
    if (stopNow()) for (const x of ready.splice(0)) await fail(x, notDone(x));
    let staged: StagedGroups;
    try {
      staged = new StagedGroups(ready.map((x) => pendingFiles(x.r)));
    } catch (e) {
      // Nothing of the chunk reached a final name (a full disk, say): give every port back.
      for (const x of ready) await settle(st, x.claim, e, false);
      throw e;
    }
    const placed: typeof ready = [];
    try {
      // The point of no return is the first rename: stopping before it leaves nothing behind.
      await turn();
      if (ready.length > 0 && stopNow()) for (const x of ready.splice(0)) await fail(x, notDone(x));
      const held = await registry.confirm(ready.map((x) => x.claim.device.hostname));
      for (const [k, x] of ready.entries()) {
        const hostname = x.claim.device.hostname;
        if (!held.has(hostname)) {
          staged.discard(k);
          await fail(x, new ReservationLost(hostname));
          continue;
        }
        const err = staged.commit(k);
        if (err === undefined) placed.push(x);
        else await fail(x, err);
      }
      // One directory sync for the chunk's new names (before they count as activated).
      staged.finish();
    } finally {
      staged.discardRest();
    }
    const lost = new Set(await registry.activateMany(placed.map((x) => x.claim.device.hostname)));
    for (const x of placed) {
      const hostname = x.claim.device.hostname;
      if (lost.has(hostname)) outcome[x.i] = lostAfterPlacing(output, x.r, new ReservationLost(hostname));
      else outcome[x.i] = buildResult(x.claim.device, x.req.dk, x.r, false);
    }
  } finally {
    for (const x of flying) st.leases.delete(x.claim.device.hostname);
  }
  outcome.forEach((o, i) => (o === NOT_BUILT ? report.notBuilt(chunk[i]!) : o instanceof UserError ? report.fail(chunk[i]!, o) : report.succeed(o)));
  return stopped || st.stopRequested() !== undefined ? "stopped" : full;
}

/**
 * A chunk of a batch in the image or folder form: device after device through the device
 * flow's `buildDevice`. Returns why the run stops, as `chunked` does.
 */
async function oneByOne(st: Station, chunk: ChunkItem[], common: Omit<DeviceRequest, "hostname" | "dk">, report: Outcomes): Promise<"stopped" | PortsExhausted | undefined> {
  let why: "stopped" | PortsExhausted | undefined;
  for (const item of chunk) {
    await turn();
    if (why !== undefined || st.stopRequested()) {
      why ??= "stopped";
      report.notBuilt(item);
      continue;
    }
    try {
      checkName(item.wanted);
      report.succeed(await buildDevice(st, { ...common, hostname: item.wanted, dk: loadOrGenerateKey(undefined), attributes: item.attributes }));
    } catch (e) {
      if (e instanceof Interrupted) {
        why = "stopped";
        report.notBuilt(item);
        continue;
      }
      if (!isUserError(e)) throw e;
      if (e instanceof PortsExhausted) why = e;
      report.fail(item, e);
    }
  }
  return why;
}

export interface BatchSummary {
  total: number;
  built: number;
  /** Rows of a --hosts file already built by an earlier run, their output in place (a resumed shift). */
  skipped: { hostname: string; port: number; overlay: string }[];
  failed: { hostname: string | null; label: string; error: string }[];
  /** Not built because the run stopped (nothing reserved for them); hostnames where known. */
  notBuilt: { count: number; hostnames: string[] };
  /** Why the run stopped early (SIGINT, SIGTERM, an abort), or null. */
  stopped: string | null;
  /** A port range ran full: the batch stopped at once (the rest not built), or null. */
  full: UserError | null;
  /**
   * --hosts: the rows not built (stopped or failed), written next to the outputs with the same
   * columns, to be fed back as --hosts; null when every row is built.
   */
  remaining: string | null;
  /** A remaining-rows file of an earlier run of this shift, removed because the shift is now complete. */
  completed: string | null;
}

export interface BatchHooks {
  built(r: BuildResult): void;
  failed(f: BatchSummary["failed"][number]): void;
  /** A row already built by an earlier run of the shift (its output in place): not built again. */
  skipped?(s: BatchSummary["skipped"][number]): void;
  /** A device was rendered: progress (the bar names the device its count has reached). */
  work?(hostname: string): void;
  /** Called once the inputs are checked, before anything is reserved. */
  starting?(total: number): void;
  /** Where the device flow's notes go (default: stderr, quiet). */
  log?: Log;
}

/**
 * The batch without printing (the CLI and the API): inputs checked before anything is
 * reserved, then chunk after chunk until done or asked to stop (`stop`).
 */
export async function runBatch(req: BatchRequest, hooks: BatchHooks, stop?: AbortSignal): Promise<BatchSummary> {
  if ((req.count === undefined) === (req.hosts === undefined)) throw new UserError("batch needs exactly one of --count N or --hosts FILE");
  if (req.count !== undefined && !(Number.isInteger(req.count) && req.count >= 1 && req.count <= MAX_COUNT)) throw new UserError(`--count ${req.count}: a whole number from 1 to ${MAX_COUNT}`);
  const now = new Date();
  const fleet = await loadFleet(configPath(req.config), now);
  const { board, os } = resolveBoardOs(await loadProfiles(), req.board, req.os);
  const bastions = resolveBastions(fleet, req.bastions, now);
  const common = checkAttributes(req.attributes);
  let names: { hostname: string | undefined; attributes: Record<string, string> }[];
  let rows: HostRow[] = [];
  if (req.count !== undefined) {
    names = Array.from({ length: req.count }, () => ({ hostname: undefined, attributes: common }));
  } else {
    rows = readHostRows(req.hosts!);
    const clash = rows.find((r) => Object.keys(common).some((k) => k in r.fields && r.fields[k] !== common[k]));
    if (clash) {
      const k = Object.keys(common).find((x) => x in clash.fields)!;
      throw new UserError(`--attr ${k}=${common[k]}: ${req.hosts}:${clash.line} gives ${k} = ${JSON.stringify(clash.fields[k])}`, { hint: `drop --attr ${k}, or the '${k}' column` });
    }
    names = rows.map((r) => ({ hostname: r.hostname, attributes: { ...common, ...r.fields } }));
    if (names.length === 0) throw new UserError(`--hosts ${req.hosts}: no hostnames in it`);
  }
  const epoch = archiveEpoch();
  const summary: BatchSummary = { total: names.length, built: 0, skipped: [], failed: [], notBuilt: { count: 0, hostnames: [] }, stopped: null, full: null, remaining: null, completed: null };
  const builtNames = new Set<string>();
  const notBuilt = (wanted: string | undefined) => {
    summary.notBuilt.count++;
    if (wanted !== undefined) summary.notBuilt.hostnames.push(wanted);
  };
  const report: Outcomes = {
    succeed(r) {
      summary.built++;
      builtNames.add(r.hostname);
      hooks.built(r);
    },
    fail(item, e) {
      const f = { hostname: item.wanted ?? null, label: item.label, error: e.message };
      summary.failed.push(f);
      hooks.failed(f);
    },
    notBuilt: (item) => notBuilt(item.wanted),
    work: (h) => hooks.work?.(h),
  };
  await withOutDir(req.output, async (outDir, form) => {
    // --image: the base is checked (and its bmap computed, once for the batch) before anything
    // is reserved; every device brings a new key, so any identity in the base is another's.
    if (form.kind === "image") await preflightImageForm(form, provisionalEntries(fleet, { board, os, bastions, hostname: undefined, dk: loadOrGenerateKey(undefined) }, now), undefined, [], outDir);
    await withStation({ fleet, emit: { outDir, form, epoch }, log: hooks.log ?? stderrLog(true), now, stop, forceConfigChange: req.forceConfigChange }, async (st) => {
      if (req.hosts !== undefined) names = await resumeShift(st, names, summary, report, hooks);
      hooks.starting?.(names.length);
      for (let start = 0; start < names.length; start += CHUNK) {
        if (st.stopRequested()) {
          for (const n of names.slice(start)) notBuilt(n.hostname);
          break;
        }
        const chunk = names.slice(start, start + CHUNK).map((n, j) => ({ wanted: n.hostname, attributes: n.attributes, label: n.hostname ?? `device ${start + j + 1}` }));
        const why = form.kind === "tar" ? await chunked(st, chunk, { board, os, bastions }, report) : await oneByOne(st, chunk, { board, os, bastions }, report);
        if (why === undefined) continue;
        // Stopped, or a port range is full: the rest is not built (nothing reserved for it).
        if (why instanceof PortsExhausted) summary.full = why;
        for (const n of names.slice(start + CHUNK)) notBuilt(n.hostname);
        break;
      }
      summary.stopped = st.stopRequested() ?? null;
    });
    const hosts = req.hosts;
    if (hosts !== undefined) writeRemaining(hosts, outDir, rows, builtNames, summary);
  });
  return summary;
}

/**
 * A resumed shift: rows of the hosts file that an earlier run already built, whose output is in
 * place in this run's --out, are skipped (reported once, not as failures); a row registered without its output
 * cannot be rebuilt here (its private key existed only in that output) and fails with the way
 * out; a row still pending is another station's or a dead one's (the doctor's). Returns the rows
 * to build.
 */
async function resumeShift(st: Station, names: { hostname: string | undefined; attributes: Record<string, string> }[], summary: BatchSummary, report: Outcomes, hooks: BatchHooks): Promise<typeof names> {
  const states = await st.registry.states(names.flatMap((n) => (n.hostname === undefined ? [] : [n.hostname])));
  if (states.size === 0) return names;
  const todo: typeof names = [];
  for (const n of names) {
    const state: DeviceState | undefined = n.hostname === undefined ? undefined : states.get(n.hostname);
    if (state === undefined) {
      todo.push(n);
      continue;
    }
    const name = n.hostname!;
    const item = { wanted: name, attributes: n.attributes, label: name };
    const expected = overlayPath(st.emit, name);
    // The same name with other factory data is another device, not this one built already.
    const clash = Object.entries(n.attributes).find(([k, v]) => state.attributes[k] !== v);
    if (clash) {
      const [k, v] = clash;
      const had = state.attributes[k];
      report.fail(item, new UserError(`hostname ${name} is already registered (${state.status}), with other factory data: ${k} is ${had === undefined ? "not set" : JSON.stringify(had)} there, ${JSON.stringify(v)} in this row`));
    } else if (state.status === "active" && state.overlay === expected && existsSync(expected)) {
      const s = { hostname: name, port: state.port, overlay: state.overlay };
      summary.skipped.push(s);
      hooks.skipped?.(s);
    } else if (state.status === "active" && state.overlay !== null && state.overlay !== expected && existsSync(state.overlay)) {
      report.fail(item, new UserError(`hostname ${name} is already registered (active); its output is ${state.overlay}, not in this run's --out`));
    } else if (state.status === "active") {
      report.fail(
        item,
        new UserError(
          `${name} is registered (port ${state.port}) but its output ${state.overlay ?? expected} is missing, and its private key was only there: restore the output, or build it anew with a new key (same name and port) with 'mkoverlay rotate ${name} --grace 0'`,
        ),
      );
    } else if (state.status === "pending") {
      report.fail(item, new UserError(`${name} is being built by another station, or by one that died ('mkoverlay registry doctor' finishes or gives back a dead station's work)`));
    } else {
      report.fail(item, new UserError(`${name} is revoked (its port ${state.port} is quarantined; 'mkoverlay registry release ${name}' frees the name for a new build)`));
    }
  }
  return todo;
}

/** RFC 4180: a field with a comma, quote or line break is quoted, quotes doubled. */
const csvField = (v: string): string => (/[",\r\n]/.test(v) || v !== v.trim() ? `"${v.replace(/"/g, '""')}"` : v);

/**
 * Writes the rows not built (stopped or failed) next to the outputs as `<hosts>.remaining.csv`
 * (the hosts file's columns, hostname first) and records its path; a shift that is complete
 * removes the file an earlier run of it left.
 */
function writeRemaining(hosts: string, outDir: string, rows: HostRow[], built: Set<string>, summary: BatchSummary): void {
  const skipped = new Set(summary.skipped.map((s) => s.hostname));
  const left = rows.filter((r) => !built.has(r.hostname) && !skipped.has(r.hostname));
  const stem = basename(hosts, extname(hosts)).replace(/\.remaining$/, "");
  const file = join(outDir, `${stem}.remaining.csv`);
  if (left.length === 0) {
    if (existsSync(file)) {
      unlinkSync(file);
      summary.completed = file;
    }
    return;
  }
  const columns = ["hostname", ...new Set(rows.flatMap((r) => Object.keys(r.fields)))];
  const lines = [columns.join(","), ...left.map((r) => columns.map((c) => csvField(c === "hostname" ? r.hostname : (r.fields[c] ?? ""))).join(","))];
  writeFileAtomic(file, lines.join("\n") + "\n", { mode: 0o644 });
  summary.remaining = file;
}

/** `a, b, c, … (N)`: a list that may be long. */
function some(names: string[], n: number): string {
  return names.length === 0 ? "" : `: ${names.slice(0, 10).join(", ")}${n > 10 ? `, … (${n})` : ""}`;
}

export async function batchCommand(opts: BatchOptions): Promise<void> {
  // A batch streams thousands of short-lived trees and buffers. Left alone, V8 grows its young
  // generation to the maximum and peak memory with it (measured: ~155 MB for 10,000 devices);
  // not growing it keeps a batch near 90 MB at no measurable cost in time. Set here, not as a
  // node flag, because any flag on the command line costs every single build ~9 ms of start-up.
  setFlagsFromString("--semi-space-growth-factor=1");
  const log = stderrLog(Boolean(opts.quiet));
  let progress: Progress | undefined;
  let first: string | undefined;
  let last: string | undefined;
  const signals = watchSignals((sig) => {
    const note = () => log.info(`${sig}: finishing or giving back the devices in flight (${sig === "SIGINT" ? "Ctrl-C" : sig} again stops at once)`);
    if (progress) progress.message(note);
    else note();
  });
  let summary: BatchSummary;
  try {
    summary = await runBatch(
      batchRequest(opts),
      {
        starting(total) {
          const tty = Boolean(process.stderr.isTTY);
          progress = new Progress({ total, bar: tty && opts.progress !== false, color: !process.env.NO_COLOR, silent: Boolean(opts.quiet) });
          progress.start();
        },
        work: (h) => progress?.work(h),
        built(r) {
          first ??= r.hostname;
          last = r.hostname;
          const { authorizedKeysText, ...json } = r;
          out(opts.json ? JSON.stringify(json) : authorizedKeysText);
          progress?.result(`${r.hostname} port ${r.port}`);
        },
        skipped(x) {
          if (opts.json) out(JSON.stringify({ hostname: x.hostname, port: x.port, overlay: x.overlay, skipped: "already built" }));
        },
        failed(f) {
          if (opts.json) out(JSON.stringify({ hostname: f.hostname, error: f.error }));
          // A resumed shift's refusals come before the bar starts.
          const say = () => log.error(`${f.label}: ${f.error}`);
          if (progress) progress.message(say);
          else say();
          progress?.result(`${f.label} FAILED`);
        },
      },
      signals.signal,
    );
  } finally {
    progress?.stop();
    signals.dispose();
  }
  const { built, failed, notBuilt, stopped, total, skipped, remaining } = summary;
  const resume = remaining ? `the rows not built are in ${remaining}: run the same command with --hosts ${remaining} to finish the shift` : undefined;
  const already = skipped.length > 0 ? `, ${skipped.length} already built (skipped)` : "";
  if (stopped) {
    const lines = [
      `interrupted by ${stopped}: ${built} of ${total} device(s) built and registered${built > 0 ? ` (${first}${built > 1 ? ` … ${last}` : ""})` : ""}${already}`,
      `${notBuilt.count} not built, nothing reserved for them${some(notBuilt.hostnames, notBuilt.count)}`,
      ...(failed.length > 0 ? [`${failed.length} failed (see above)`] : []),
      resume ?? (opts.count !== undefined ? `to build the rest: the same command with --count ${notBuilt.count + failed.length}` : ""),
    ].filter(Boolean);
    throw new Interrupted(stopped, lines.join("\n"));
  }
  log.info(`batch done: ${built} built${already}, ${failed.length} failed${summary.completed ? `; shift complete (removed ${summary.completed})` : ""}`);
  const builtOf = `${built} of ${total} device(s) built and registered${built > 0 ? ` (${first}${built > 1 ? ` … ${last}` : ""})` : ""}`;
  if (summary.full) {
    const rest = notBuilt.count > 0 ? `, ${notBuilt.count} not built (nothing reserved for them)` : "";
    const more = failed.length > 1 ? `, ${failed.length - 1} other(s) failed (see above)` : "";
    throw new UserError(`${summary.full.message}: the batch stopped there; ${builtOf}${already}${rest}${more}${resume ? `; ${resume}` : ""}`, { exitCode: 1, ...(summary.full.hint ? { hint: summary.full.hint } : {}) });
  }
  const others = built === 0 ? "none was built" : built + failed.length + skipped.length === total ? "the others are built and registered" : builtOf;
  if (failed.length > 0) throw new UserError(`${failed.length} of ${total} device(s) failed (see above); ${others}${resume ? `; ${resume}` : ""}`, { exitCode: 1 });
}
