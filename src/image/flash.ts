/**
 * One card of `mkoverlay flash`: the base's mapped blocks (its bmap's ranges) written to the
 * card, read back from the card and compared with the base, the device's overlay laid
 * into the root partition with debugfs, and the overlay read back from the card. The card is
 * opened O_EXCL (device.ts) and held to the end, so nothing mounts it while we work.
 *
 * Many cards are flashed at once: each card's copy and check loops run in a worker thread of
 * their own (synchronous reads and writes there), so a slow card blocks neither the event loop
 * (progress, the other cards' debugfs runs) nor another card. The main thread does what is
 * quick: opening, the partition table, debugfs, bookkeeping.
 *
 * "Read back from the card": the card's pages are dropped from the page cache before each
 * read-back (`dd iflag=nocache count=0`: POSIX_FADV_DONTNEED on the device, which needs no
 * privilege beyond opening it), so what is checked is what the card returns, not what we wrote
 * into memory. Dirty pages cannot be dropped: the copy ends with an fsync.
 *
 * A card that is pulled (or fails) mid-write surfaces as EIO/ENODEV/ENXIO from a write or an
 * fsync (the copy syncs every SYNC_EVERY bytes, 4 MiB, so a failure is seen while writing, not at the
 * end); `CardFailed` carries the phase and the errno for the caller's message.
 */
import { closeSync } from "node:fs";
import { Worker } from "node:worker_threads";
import { errnoCode, UserError } from "../util/errors.js";
import type { Entry } from "../overlay/tree.js";
import { BLOCK } from "./extents.js";
import type { Bmap } from "./bmap.js";
import { findTool, runTool } from "./debugfs.js";
import { openExclusive } from "./device.js";
import { layTree, verifyLaid, type Listing } from "./lay.js";
import { diskSize } from "./partitions.js";
import { ImageTreeView } from "./reader.js";
import { findRoot } from "./root.js";

/** fsync after this many bytes: progress that is the card's, and a pulled card seen at once. */
const SYNC_EVERY = 4 << 20;
const IO_CHUNK = 1 << 20;

export type CardPhase = "base" | "check" | "overlay" | "verify" | "done";

export interface CardProgress {
  phase: CardPhase;
  /** Bytes of this phase done, and in all (0 for the debugfs phases). */
  done: number;
  total: number;
}

export interface CardPlan {
  base: string;
  map: Bmap;
  /** The base's listing of the overlay's directories (the image preflight's): the card's, once written. */
  listed?: Listing;
  rootPartition?: number;
  epoch: number;
}

export interface CardResult {
  device: string;
  baseBytes: number;
  created: number;
  replaced: number;
  kept: number;
  ms: Record<Exclude<CardPhase, "done">, number>;
}

/** A card that failed while it was written or read back (exit 1): the card, not the input. */
export class CardFailed extends UserError {
  constructor(
    readonly device: string,
    readonly phase: CardPhase,
    message: string,
    readonly code: string | undefined,
  ) {
    super(`${device}: ${message}`, { exitCode: 1, hint: code && GONE.has(code) ? "the card was pulled or has failed: try another card" : undefined });
    this.name = "CardFailed";
  }
}

const GONE = new Set(["EIO", "ENODEV", "ENXIO", "ENOSPC", "EROFS"]);

/** The byte ranges of a bmap (its last block may be partial). */
function byteRanges(map: Bmap): [number, number][] {
  return map.ranges.map((r) => [r.first * BLOCK, Math.min((r.last + 1) * BLOCK, map.imageSize)]);
}

export const mappedBytes = (map: Bmap): number => byteRanges(map).reduce((n, [a, b]) => n + b - a, 0);

/**
 * The copy and check loops, run in a worker thread per card (plain JavaScript: a worker from a
 * string needs no file of its own in the bundle). `fd` is the card, opened by the main thread.
 * The check compares the card's bytes with the base's (the base's pages are in the page cache,
 * the card's were dropped): as strong as the bmap's hashes, which are the base's, at a fraction
 * of hashing's CPU.
 */
const WORKER = `
const { parentPort, workerData: w } = require("node:worker_threads");
const fs = require("node:fs");
const buf = Buffer.allocUnsafe(w.chunk);
const card = w.op === "check" ? Buffer.allocUnsafe(w.chunk) : undefined;
let done = 0, unsynced = 0, last = 0;
const tell = () => { const now = Date.now(); if (now - last >= 100) { last = now; parentPort.postMessage({ done }); } };
const readFull = (fd, b, len, pos, what) => {
  let got = 0;
  while (got < len) {
    const n = fs.readSync(fd, b, got, len - got, pos + got);
    if (n === 0) throw Object.assign(new Error("read " + len + " bytes at " + pos + ": end of " + what), { code: "ESHORT" });
    got += n;
  }
};
const src = fs.openSync(w.base, "r");
try {
  for (const [a, b] of w.ranges) {
    for (let pos = a; pos < b; ) {
      const len = Math.min(buf.length, b - pos);
      readFull(src, buf, len, pos, "the base");
      if (card) {
        readFull(w.fd, card, len, pos, "the card");
        if (!card.subarray(0, len).equals(buf.subarray(0, len))) { parentPort.postMessage({ mismatch: [pos, pos + len] }); process.exit(0); }
      } else {
        for (let off = 0; off < len; ) off += fs.writeSync(w.fd, buf, off, len - off, pos + off);
        unsynced += len;
        if (unsynced >= w.syncEvery) { fs.fsyncSync(w.fd); unsynced = 0; }
      }
      pos += len;
      done += len;
      tell();
    }
  }
  if (!card) fs.fsyncSync(w.fd);
  parentPort.postMessage({ finished: done });
} catch (e) {
  parentPort.postMessage({ error: String(e && e.message), code: e && e.code });
} finally {
  fs.closeSync(src);
}
`;

interface WorkerOutcome {
  bytes: number;
  mismatch?: [number, number];
}

function runLoop(op: "copy" | "check", device: string, fd: number, base: string, ranges: [number, number][], progress: (done: number) => void, stopped: () => Error | undefined): Promise<WorkerOutcome> {
  return new Promise((resolve, reject) => {
    const w = new Worker(WORKER, { eval: true, workerData: { op, fd, base, ranges, chunk: IO_CHUNK, syncEvery: SYNC_EVERY } });
    let settled = false;
    const settle = (f: () => void) => {
      if (settled) return;
      settled = true;
      f();
    };
    w.on("message", (m: { done?: number; finished?: number; mismatch?: [number, number]; error?: string; code?: string }) => {
      if (m.done !== undefined) {
        progress(m.done);
        const stop = stopped();
        // Asked to stop: the card is left half-written (a write in flight finishes first).
        if (stop) settle(() => void w.terminate().finally(() => reject(stop)));
      }
      else if (m.finished !== undefined) settle(() => resolve({ bytes: m.finished! }));
      else if (m.mismatch) settle(() => resolve({ bytes: 0, mismatch: m.mismatch }));
      else if (m.error !== undefined) {
        const phase = op === "copy" ? "base" : "check";
        const what = op === "copy" ? "writing the base" : "reading the base back";
        settle(() => reject(new CardFailed(device, phase, `${what} failed: ${m.error}`, m.code)));
      }
    });
    w.on("error", (e) => settle(() => reject(e)));
    w.on("exit", (code) => settle(() => reject(new Error(`${device}: the ${op} worker exited (${code}) without a result`))));
  });
}

/** Drops the card's clean pages from the page cache, so the next reads come from the card. */
async function dropCached(device: string): Promise<void> {
  const r = await runTool(findTool("dd", "coreutils"), [`if=${device}`, "iflag=nocache", "count=0", "status=none"]);
  if (r.code !== 0) throw new CardFailed(device, "check", `dropping its cached pages before the read-back failed: ${r.stderr.trim()}`, undefined);
}

/**
 * Flashes one card (already resolved and checked by the caller: a whole disk, not in use, not
 * the station's). `stopped` is asked between phases: a stop leaves the card half-written and
 * throws what it returns.
 */
export async function flashCard(device: string, plan: CardPlan, entries: readonly Entry[], on: (p: CardProgress) => void, stopped: () => Error | undefined = () => undefined): Promise<CardResult> {
  const ms = { base: 0, check: 0, overlay: 0, verify: 0 };
  const ranges = byteRanges(plan.map);
  const total = mappedBytes(plan.map);
  const fd = openExclusive(device);
  const rp = plan.rootPartition === undefined ? {} : { rootPartition: plan.rootPartition };
  const between = () => {
    const e = stopped();
    if (e) throw e;
  };
  const timed = async <T>(phase: keyof typeof ms, f: () => Promise<T>): Promise<T> => {
    const t = performance.now();
    try {
      return await f();
    } catch (e) {
      if (e instanceof UserError || !errnoCode(e)) throw e;
      // debugfs and the readers see a pulled card as an I/O error too.
      throw new CardFailed(device, phase, `${phase === "overlay" ? "laying the overlay" : "reading it back"} failed: ${(e as Error).message}`, errnoCode(e));
    } finally {
      ms[phase] = Math.round(performance.now() - t);
    }
  };
  try {
    const room = diskSize(fd, device);
    if (plan.map.imageSize > room) throw new UserError(`${device}: ${plan.map.imageSize} bytes of ${plan.base} do not fit (the card has ${room})`, { hint: "use a larger card" });
    on({ phase: "base", done: 0, total });
    const wrote = await timed("base", () => runLoop("copy", device, fd, plan.base, ranges, (done) => on({ phase: "base", done, total }), stopped));
    between();
    on({ phase: "check", done: 0, total });
    await timed("check", async () => {
      await dropCached(device);
      const r = await runLoop("check", device, fd, plan.base, ranges, (done) => on({ phase: "check", done, total }), stopped);
      if (r.mismatch) throw new CardFailed(device, "check", `read-back: bytes ${r.mismatch[0]}–${r.mismatch[1]} of the card differ from ${plan.base} (a fake-capacity or failing card?)`, undefined);
    });
    between();
    on({ phase: "overlay", done: 0, total: 0 });
    let verifyStart = 0;
    const laid = await timed("overlay", async () => {
      const root = findRoot(device, rp);
      // The overlay is read back once, from the card: its cached pages dropped first.
      const readBack = async (keptDirs: ReadonlySet<string>): Promise<void> => {
        verifyStart = performance.now();
        on({ phase: "verify", done: 0, total: 0 });
        await dropCached(device);
        await verifyLaid(new ImageTreeView(root), root, entries, keptDirs);
      };
      return { root, r: await layTree(root, entries, plan.epoch, { readBack, ...(plan.listed ? { listed: plan.listed } : {}) }) };
    });
    // The read-back ran inside the lay: its share of the time is the verify phase's.
    if (verifyStart > 0) {
      ms.verify = Math.round(performance.now() - verifyStart);
      ms.overlay -= ms.verify;
    }
    between();
    on({ phase: "done", done: total, total });
    return { device, baseBytes: wrote.bytes, created: laid.r.created, replaced: laid.r.replaced, kept: laid.r.kept, ms };
  } finally {
    closeSync(fd);
  }
}
