/**
 * `mkoverlay batch`: a factory shift. Config, profiles and the registry are opened once;
 * devices go through in chunks (one transaction for the chunk's reservations, one sync for its
 * archives, one for its activations), and each device succeeds or fails on its own: a failing
 * device reserves nothing and the others stand. Devices stream through: nothing of the batch
 * is kept in memory but counts and failures.
 */
import { setFlagsFromString } from "node:v8";
import { configPath, loadFleet } from "../config/load.js";
import { loadOrGenerateKey, resolveBastions } from "../device.js";
import { isUserError, UserError } from "../errors.js";
import { StagedGroups } from "../fsutil.js";
import { readHostRows } from "../hosts-file.js";
import { out, stderrLog, type Log } from "../output.js";
import { archiveEpoch } from "../overlay/archive.js";
import { pendingFiles, renderDevice, type Rendered } from "../pipeline.js";
import { loadProfiles, resolveBoardOs } from "../profiles.js";
import { openRegistry } from "../registry/open.js";
import { ReservationLost } from "../registry/rows.js";
import type { DeviceRecord } from "../registry/types.js";
import { buildDevice, buildResult, contextOf, preflightImageForm, provisionalEntries, reserveRequest, unplace, withOutDir, withStation, type BuildResult, type DeviceRequest, type OutputOptions, type Station } from "../station.js";
import { hostnameProblem } from "../validate.js";

export interface BatchOptions extends OutputOptions {
  board: string;
  bastion?: string;
  os?: string;
  count?: string;
  hosts?: string;
  config?: string;
  json?: boolean;
  quiet?: boolean;
}

class Progress {
  private readonly tty = Boolean(process.stderr.isTTY) && !process.env.NO_COLOR;
  constructor(
    private readonly total: number,
    private readonly log: Log,
  ) {}
  step(done: number, label: string): void {
    if (this.tty) {
      const width = 30;
      const filled = Math.round((done / this.total) * width);
      this.log.progress(`\r[${"#".repeat(filled)}${" ".repeat(width - filled)}] ${done}/${this.total} ${label.padEnd(24)}`);
      if (done === this.total) this.log.progress("\n");
    } else {
      this.log.progress(`mkoverlay: [${done}/${this.total}] ${label}\n`);
    }
  }
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
}

/**
 * One chunk of a tar-form batch: reserve all (one transaction, a savepoint each), render all,
 * write all archives under temp names (synced together), confirm the reservations are still
 * this station's, rename device by device, activate all. A device that fails at any step gives
 * its reservation back and is reported; the others stand. Killed midway, the pending devices
 * are finished or reclaimed by `registry doctor`.
 */
async function chunked(st: Station, chunk: ChunkItem[], common: Omit<DeviceRequest, "hostname" | "dk">, report: Outcomes): Promise<void> {
  const { registry } = st;
  const outcome: (BuildResult | UserError)[] = new Array(chunk.length);
  const asked: { i: number; req: DeviceRequest }[] = [];
  chunk.forEach(({ wanted, attributes }, i) => {
    try {
      checkName(wanted);
      asked.push({ i, req: { ...common, hostname: wanted, dk: loadOrGenerateKey(undefined), attributes } });
    } catch (e) {
      if (!isUserError(e)) throw e;
      outcome[i] = e;
    }
  });
  const reserved = await registry.reserveMany(asked.map((a) => reserveRequest(st, a.req)));
  const ready: { i: number; device: DeviceRecord; req: DeviceRequest; r: Rendered }[] = [];
  try {
    for (const [k, res] of reserved.entries()) {
      const { i, req } = asked[k]!;
      if (res instanceof UserError) {
        outcome[i] = res;
        continue;
      }
      st.leases.add(res.hostname);
      try {
        ready.push({ i, device: res, req, r: await renderDevice(contextOf(st, res, req)) });
      } catch (e) {
        await registry.abandon(res.hostname);
        if (!isUserError(e)) throw e;
        outcome[i] = e;
      }
    }
    let staged: StagedGroups;
    try {
      staged = new StagedGroups(ready.map((x) => pendingFiles(x.r)));
    } catch (e) {
      // Nothing of the chunk reached a final name (a full disk, say): give every port back.
      for (const x of ready) await registry.abandon(x.device.hostname);
      throw e;
    }
    const placed: typeof ready = [];
    try {
      const held = await registry.confirm(ready.map((x) => x.device.hostname));
      for (const [k, x] of ready.entries()) {
        if (!held.has(x.device.hostname)) {
          staged.discard(k);
          outcome[x.i] = new ReservationLost(x.device.hostname);
          continue;
        }
        const err = staged.commit(k);
        if (err === undefined) placed.push(x);
        else {
          if (!isUserError(err)) throw err;
          outcome[x.i] = err;
          await registry.abandon(x.device.hostname);
        }
      }
    } finally {
      staged.discardRest();
    }
    const lost = new Set(await registry.activateMany(placed.map((x) => x.device.hostname)));
    for (const x of placed) {
      if (lost.has(x.device.hostname)) {
        unplace(x.r, st.emit.form);
        outcome[x.i] = new ReservationLost(x.device.hostname);
      } else outcome[x.i] = buildResult(x.device, x.req.dk, x.r, false);
    }
  } finally {
    for (const x of reserved) if (!(x instanceof UserError)) st.leases.delete(x.hostname);
  }
  outcome.forEach((o, i) => (o instanceof UserError ? report.fail(chunk[i]!, o) : report.succeed(o)));
}

export async function batchCommand(opts: BatchOptions): Promise<void> {
  // A batch streams thousands of short-lived trees and buffers. Left alone, V8 grows its young
  // generation to the maximum and peak memory with it (measured: ~155 MB for 10,000 devices);
  // not growing it keeps a batch near 90 MB at no measurable cost in time. Set here, not as a
  // node flag, because any flag on the command line costs every single build ~9 ms of start-up.
  setFlagsFromString("--semi-space-growth-factor=1");
  if ((opts.count === undefined) === (opts.hosts === undefined)) throw new UserError("batch needs exactly one of --count N or --hosts FILE");
  const now = new Date();
  const fleet = await loadFleet(configPath(opts.config), now);
  const { board, os } = resolveBoardOs(await loadProfiles(), opts.board, opts.os);
  const bastions = resolveBastions(fleet, opts.bastion, now);
  let names: { hostname: string | undefined; attributes: Record<string, string> }[];
  if (opts.count !== undefined) {
    const n = Number(opts.count);
    if (!/^\d+$/.test(opts.count) || n < 1 || n > 100_000) throw new UserError(`--count ${opts.count}: a whole number from 1 to 100000`);
    names = Array.from({ length: n }, () => ({ hostname: undefined, attributes: {} }));
  } else {
    names = readHostRows(opts.hosts!).map((r) => ({ hostname: r.hostname, attributes: r.fields }));
    if (names.length === 0) throw new UserError(`--hosts ${opts.hosts}: no hostnames in it`);
  }
  const epoch = archiveEpoch();
  const log = stderrLog(Boolean(opts.quiet));
  const progress = new Progress(names.length, log);
  const failures: string[] = [];
  let built = 0;
  let done = 0;
  const report: Outcomes = {
    succeed(r) {
      built++;
      const { authorizedKeysText, ...json } = r;
      out(opts.json ? JSON.stringify(json) : authorizedKeysText);
      progress.step(++done, `${r.hostname} port ${r.port}`);
    },
    fail(item, e) {
      const msg = `${item.label}: ${e.message}`;
      failures.push(msg);
      if (opts.json) out(JSON.stringify({ hostname: item.wanted ?? null, error: e.message }));
      if (process.stderr.isTTY) log.progress("\n");
      log.error(msg);
      progress.step(++done, `${item.label} FAILED`);
    },
  };
  await withOutDir(opts, async (outDir, form) => {
    // --image: the base is checked (and its bmap computed, once for the batch) before anything
    // is reserved; every device brings a new key, so any identity in the base is another's.
    if (form.kind === "image") await preflightImageForm(form, provisionalEntries(fleet, { board, os, bastions, hostname: undefined, dk: loadOrGenerateKey(undefined) }, now), undefined, [], outDir);
    return withStation(fleet, { outDir, form, epoch }, stderrLog(true), now, () => openRegistry(fleet.registry), async (st) => {
      for (let start = 0; start < names.length; start += CHUNK) {
        const chunk = names.slice(start, start + CHUNK).map((n, j) => ({ wanted: n.hostname, attributes: n.attributes, label: n.hostname ?? `device ${start + j + 1}` }));
        if (form.kind === "tar") {
          await chunked(st, chunk, { board, os, bastions }, report);
          continue;
        }
        for (const item of chunk) {
          try {
            checkName(item.wanted);
            report.succeed(await buildDevice(st, { board, os, bastions, hostname: item.wanted, dk: loadOrGenerateKey(undefined), attributes: item.attributes }));
          } catch (e) {
            if (!isUserError(e)) throw e;
            report.fail(item, e);
          }
        }
      }
    });
  });
  log.info(`batch done: ${built} built, ${failures.length} failed`);
  if (failures.length > 0) throw new UserError(`${failures.length} of ${names.length} device(s) failed (see above); the others are built and registered`, { exitCode: 1 });
}
