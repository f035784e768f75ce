/**
 * One device's image, end to end: what `mkoverlay image` and `batch --image` run per device
 * once the device is registered and its tree built. Refusals come first (base not a disk
 * image, root not writable or too small), then: copy the base 0600 under a temp name in the
 * output directory, lay the tree with debugfs (undo log in a private temp dir), read it back,
 * write the bmap (derived from the base's, see bmap.ts), optionally compress — all synced, all
 * under temp names (`stageImage`) — then rename into place (`commit()`; the station does that
 * only once the registry confirmed the reservation). On any failure the temp files are removed
 * and nothing appears under the final names.
 *
 * `writeIntoImage` is `write OVERLAY --image IMG`: the same laying, in place, on an image that is
 * not in use; a debugfs failure half-way is rolled back with e2undo; an existing IMG.bmap is
 * brought up to date.
 */
import { createHash } from "node:crypto";
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { UserError } from "../util/errors.js";
import { fsyncDir, pathError, tempNameFor, writeFileAtomic } from "../util/fsutil.js";
import type { Entry } from "../overlay/tree.js";
import { parseBmap, renderBmap, scanBmap, updateBmap, type Bmap } from "./bmap.js";
import { checkNotInUse } from "./busy.js";
import { compressZstd } from "./compress.js";
import { copyImage, type CopyMethod } from "./copy.js";
import { blocksOfBytes } from "./extents.js";
import { layTree, OutsideExtent, preflight, type LayResult, type Listing } from "./lay.js";
import { findRoot, type RootFs } from "./root.js";
import { SUPERBLOCK_OFFSET } from "./superblock.js";
import { privateDir, track } from "./temps.js";
import { readUndoSpans, rollBack } from "./undo.js";

export interface ImageJob {
  base: string;
  /** Final path of the image, e.g. out/gw-0042.img; `.bmap` (and `.zst`) are put beside it. */
  image: string;
  entries: readonly Entry[];
  epoch: number;
  rootPartition?: number;
  /** The base's bmap (baseBmap): without it the whole image is hashed for its bmap. */
  baseMap?: Bmap;
  /** The base's listing of the overlay's directories, if already made (lay.ts checkConflicts). */
  baseListing?: Listing;
  compress?: "zstd";
}

export interface ImageResult {
  /** What was written: the image (or its .zst) and its bmap. */
  image: string;
  bmap: string;
  root: RootFs;
  copy: CopyMethod;
  laid: LayResult;
  /** Milliseconds per phase, for progress lines and the benchmark. */
  ms: { copy: number; lay: number; bmap: number; compress: number };
}

function rootOpt(n: number | undefined): { rootPartition?: number } {
  return n === undefined ? {} : { rootPartition: n };
}

/** An image written under temp names: nothing is under its final names until `commit()`. */
export interface StagedImage {
  result: ImageResult;
  /** Renames the image (or .zst), then its bmap, into place; on failure nothing stays renamed. */
  commit(): void;
  /** Removes whatever was not committed (safe to call always). */
  discard(): void;
}

/**
 * Everything of buildImage but the renames: the copy, the lay, the read-back, the bmap and the
 * compression happen under temp names in the output directory, all synced. The station renames
 * them only after the registry confirmed the reservation is still its own (station.ts).
 */
export async function stageImage(job: ImageJob): Promise<StagedImage> {
  const baseRoot = findRoot(job.base, rootOpt(job.rootPartition));
  preflight(baseRoot, job.entries);
  const tmp = tempNameFor(job.image);
  const privDir = privateDir("mkoverlay-image-");
  const priv = privDir.path;
  const ms = { copy: 0, lay: 0, bmap: 0, compress: 0 };
  let t = performance.now();
  const lap = (k: keyof typeof ms): void => {
    const now = performance.now();
    ms[k] = Math.round(now - t);
    t = now;
  };
  const final = job.compress === "zstd" ? `${job.image}.zst` : job.image;
  const bmapPath = `${job.image}.bmap`;
  const tmpFinal = job.compress === "zstd" ? tempNameFor(final) : tmp;
  const tmpBmap = tempNameFor(bmapPath);
  const temps = [tmp, tmpFinal, tmpBmap];
  const untrack = temps.map(track);
  const forget = (): void => untrack.forEach((u) => u());
  try {
    const copy = await copyImage(job.base, tmp);
    lap("copy");
    const root: RootFs = { ...baseRoot, path: tmp, where: baseRoot.partition ? `${job.image} partition ${baseRoot.partition.number}` : job.image };
    const undo = join(priv, "undo.e2undo");
    const laid = await layTree(root, job.entries, job.epoch, { undo, listFrom: baseRoot, ...(job.baseListing ? { listed: job.baseListing } : {}) });
    // debugfs fsyncs the image when it closes it; syncing here again costs nothing then, and
    // keeps "a final name holds synced data" from resting on e2fsprogs' internals.
    fsyncFile(tmp);
    lap("lay");
    const spans = job.baseMap ? readUndoSpans(undo) : undefined;
    const map = job.baseMap && spans ? updateBmap(job.baseMap, tmp, blocksOfBytes(spans)) : await scanBmap(tmp);
    lap("bmap");
    if (job.compress === "zstd") {
      await compressZstd(tmp, tmpFinal);
      rmSync(tmp, { force: true });
      lap("compress");
    }
    // 0600 like the image: it is derived from blocks that hold the key.
    writeFileAtomic(tmpBmap, renderBmap(map), { mode: 0o600 });
    const result: ImageResult = { image: final, bmap: bmapPath, root: { ...root, path: final }, copy, laid, ms };
    let committed = false;
    return {
      result,
      commit() {
        const done: string[] = [];
        try {
          renameSync(tmpFinal, final);
          done.push(final);
          renameSync(tmpBmap, bmapPath);
          done.push(bmapPath);
          fsyncDir(dirname(final));
          committed = true;
          forget();
        } catch (e) {
          for (const p of done) rmSync(p, { force: true });
          throw pathError(e, done.length === 0 ? final : bmapPath);
        }
      },
      discard() {
        if (!committed) for (const p of temps) rmSync(p, { force: true });
        forget();
      },
    };
  } catch (e) {
    for (const p of temps) rmSync(p, { force: true });
    forget();
    throw e;
  } finally {
    privDir.remove();
  }
}

/** stageImage + commit: the image and its bmap under their final names, or nothing. */
export async function buildImage(job: ImageJob): Promise<ImageResult> {
  const staged = await stageImage(job);
  try {
    staged.commit();
    return staged.result;
  } finally {
    staged.discard();
  }
}

function fsyncFile(path: string): void {
  const fd = openSync(path, "r+");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}


/**
 * The base's bmap, computed once (every data byte hashed) and cached as `CACHE/<key>.bmap`,
 * the key naming the base's path, size, inode and mtime: a changed base gets a new map.
 * Without a cache dir it is computed every time (a batch keeps it in memory).
 */
export async function baseBmap(base: string, cacheDir?: string): Promise<Bmap> {
  const st = statSync(base);
  const key = createHash("sha256").update(JSON.stringify([base, st.size, st.dev, st.ino, st.mtimeMs, st.ctimeMs])).digest("hex").slice(0, 32);
  const cached = cacheDir ? join(cacheDir, `base-${key}.bmap`) : undefined;
  if (cached) {
    try {
      const m = parseBmap(readFileSync(cached, "utf8"));
      if (m && m.imageSize === st.size) return m;
    } catch {
      // not cached yet
    }
  }
  const map = await scanBmap(base);
  if (cached) {
    try {
      mkdirSync(cacheDir!, { recursive: true, mode: 0o700 });
      writeFileAtomic(cached, renderBmap(map), { mode: 0o644, durable: false });
    } catch {
      // a cache that cannot be written only costs time
    }
  }
  return map;
}

/**
 * `write OVERLAY --image IMG`: lays the tree into an existing image in place. If debugfs fails
 * half-way, its undo log is replayed with e2undo. e2fsprogs 1.47.0 logs the primary superblock
 * at the wrong place when the file system sits at an offset (undo.ts), so e2undo cannot restore
 * it: its 1024 bytes are saved here first and written back after the replay.
 */
export async function writeIntoImage(opts: { image: string; entries: readonly Entry[]; epoch: number; rootPartition?: number; check?: (root: RootFs) => Promise<void> }): Promise<LayResult & { bmap?: string }> {
  checkNotInUse(opts.image);
  const root = findRoot(opts.image, rootOpt(opts.rootPartition));
  preflight(root, opts.entries);
  await opts.check?.(root);
  const sbAt = root.offset + SUPERBLOCK_OFFSET;
  const savedSb = readBytes(opts.image, sbAt, 1024);
  const privDir = privateDir("mkoverlay-write-");
  const undo = join(privDir.path, "undo.e2undo");
  try {
    let laid: LayResult;
    try {
      laid = await layTree(root, opts.entries, opts.epoch, { undo });
    } catch (e) {
      // Refusals happen before debugfs writes (no undo log then); anything later may have left
      // half a tree.
      // layTree rolled an out-of-partition write back itself.
      if (e instanceof OutsideExtent || !existsSync(undo) || statSync(undo).size === 0) throw e;
      const rolled = await rollBack(root.path, undo, sbAt, savedSb);
      const note = rolled ? " (changes rolled back with e2undo)" : " (the image may be half-written: restore it from the base)";
      if (e instanceof UserError) throw new UserError(e.message + note, { exitCode: e.exitCode, ...(e.hint ? { hint: e.hint } : {}) });
      throw e;
    }
    return { ...laid, ...(await refreshBmap(opts.image, undo)) };
  } finally {
    privDir.remove();
  }
}

/**
 * An image's existing bmap (IMG.bmap) no longer matches once the overlay is laid in place:
 * it is derived again, re-hashing only the chunks the undo log names (a bmap of another
 * layout, e.g. from `bmaptool create`, is rebuilt from scratch). No bmap: one is made.
 */
async function refreshBmap(image: string, undo: string): Promise<{ bmap?: string }> {
  const path = `${image}.bmap`;
  let old: Bmap | undefined;
  try {
    old = parseBmap(readFileSync(path, "utf8"));
  } catch {
    // None yet (or unreadable): one is made from scratch; bmaptool needs it to write only the
    // used blocks.
  }
  const spans = old ? readUndoSpans(undo) : undefined;
  const size = statSync(image).size;
  const map = old && spans && old.imageSize === size ? updateBmap(old, image, blocksOfBytes(spans)) : await scanBmap(image);
  writeFileAtomic(path, renderBmap(map), { mode: 0o600 });
  return { bmap: path };
}

function readBytes(path: string, pos: number, len: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, pos);
    return b;
  } finally {
    closeSync(fd);
  }
}
