/**
 * One device's image, end to end: what `mkoverlay image` and `batch --image` run per device
 * once the device is registered and its tree built. Refusals come first (base not a disk
 * image, root not writable or too small), then: copy the base 0600 under a temp name in the
 * output directory, lay the tree with debugfs (undo log in a private temp dir), read it back,
 * write the bmap (derived from the base's, see bmap.ts), optionally compress, rename into place.
 * On any failure the temp files are removed and nothing appears under the final names.
 *
 * `writeIntoImage` is `write OVERLAY --image IMG`: the same laying, in place, on an image that is
 * not in use; a debugfs failure half-way is rolled back with e2undo.
 */
import { createHash } from "node:crypto";
import { closeSync, existsSync, fsyncSync, mkdtempSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { UserError } from "../errors.js";
import { tempNameFor, writeFileAtomic } from "../fsutil.js";
import type { Entry } from "../overlay/tree.js";
import { parseBmap, renderBmap, scanBmap, updateBmap, type Bmap } from "./bmap.js";
import { checkNotInUse } from "./busy.js";
import { compressZstd } from "./compress.js";
import { copyImage, type CopyMethod } from "./copy.js";
import { findTool, runTool } from "./debugfs.js";
import { blocksOfBytes } from "./extents.js";
import { layTree, preflight, type LayResult } from "./lay.js";
import { findRoot, type RootFs } from "./root.js";
import { SUPERBLOCK_OFFSET } from "./superblock.js";
import { readUndoSpans } from "./undo.js";

export interface ImageJob {
  base: string;
  /** Final path of the image, e.g. out/gw-0042.img; `.bmap` (and `.zst`) are put beside it. */
  image: string;
  entries: readonly Entry[];
  epoch: number;
  rootPartition?: number;
  /** The base's bmap (baseBmap): without it the whole image is hashed for its bmap. */
  baseMap?: Bmap;
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

export async function buildImage(job: ImageJob): Promise<ImageResult> {
  const baseRoot = findRoot(job.base, rootOpt(job.rootPartition));
  preflight(baseRoot, job.entries);
  const tmp = tempNameFor(job.image);
  const priv = mkdtempSync(join(tmpdir(), "mkoverlay-image-"));
  const ms = { copy: 0, lay: 0, bmap: 0, compress: 0 };
  let t = performance.now();
  const lap = (k: keyof typeof ms): void => {
    const now = performance.now();
    ms[k] = Math.round(now - t);
    t = now;
  };
  try {
    const copy = await copyImage(job.base, tmp);
    lap("copy");
    const root: RootFs = { ...baseRoot, path: tmp, where: baseRoot.partition ? `${job.image} partition ${baseRoot.partition.number}` : job.image };
    const undo = join(priv, "undo.e2undo");
    const laid = await layTree(root, job.entries, job.epoch, { undo });
    lap("lay");
    const spans = job.baseMap ? readUndoSpans(undo) : undefined;
    const map = job.baseMap && spans ? updateBmap(job.baseMap, tmp, blocksOfBytes(spans)) : await scanBmap(tmp);
    lap("bmap");
    const bmapPath = `${job.image}.bmap`;
    let final = job.image;
    if (job.compress === "zstd") {
      final = `${job.image}.zst`;
      await compressZstd(tmp, final);
      rmSync(tmp, { force: true });
      lap("compress");
    } else {
      renameSync(tmp, job.image);
    }
    // 0600 like the image: it is derived from blocks that hold the key.
    writeFileAtomic(bmapPath, renderBmap(map), { mode: 0o600 });
    return { image: final, bmap: bmapPath, root: { ...root, path: job.image }, copy, laid, ms };
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  } finally {
    rmSync(priv, { recursive: true, force: true });
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
export async function writeIntoImage(opts: { image: string; entries: readonly Entry[]; epoch: number; rootPartition?: number }): Promise<LayResult> {
  checkNotInUse(opts.image);
  const root = findRoot(opts.image, rootOpt(opts.rootPartition));
  preflight(root, opts.entries);
  const sbAt = root.offset + SUPERBLOCK_OFFSET;
  const savedSb = readBytes(opts.image, sbAt, 1024);
  const priv = mkdtempSync(join(tmpdir(), "mkoverlay-write-"));
  const undo = join(priv, "undo.e2undo");
  try {
    return await layTree(root, opts.entries, opts.epoch, { undo });
  } catch (e) {
    // Refusals happen before debugfs writes (no undo log then); anything later may have left
    // half a tree.
    if (!existsSync(undo) || statSync(undo).size === 0) throw e;
    // e2undo reads the offset from the log's header; it does not take `IMG?offset=`.
    const r = await runTool(findTool("e2undo"), [undo, root.path]).catch(() => undefined);
    let rolled = false;
    if (r?.code === 0) {
      writeBytes(opts.image, sbAt, savedSb);
      rolled = true;
    }
    const note = rolled ? " (changes rolled back with e2undo)" : " (the image may be half-written: restore it from the base)";
    if (e instanceof UserError) throw new UserError(e.message + note, { exitCode: e.exitCode, ...(e.hint ? { hint: e.hint } : {}) });
    throw e;
  } finally {
    rmSync(priv, { recursive: true, force: true });
  }
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

function writeBytes(path: string, pos: number, data: Buffer): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, data, 0, data.length, pos);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
