/**
 * Batches of images (`batch --image`) without paying each image's writeback on its own.
 *
 * A durable image costs a copy of the base and writing it back to disk. Made one at a time,
 * debugfs's fsync on close makes each image wait for its whole writeback (half a second and more
 * for a 2.5 GiB base here). Instead, debugfs works on a scratch copy of the base made once per
 * batch; each device's image is a plain copy of the base with the blocks debugfs changed (its
 * undo log names them) copied in from the scratch; then the scratch gets those blocks back from
 * the base, ready for the next device. The batch makes a whole chunk durable with one syncfs
 * before any of its images takes its final name, as it does for archives, so one image's
 * writeback overlaps the next one's copy. Same bytes as the one-at-a-time path.
 *
 * What is checked: the overlay is read back from the scratch (every entry, as layTree does);
 * the copied blocks are read back from the image and compared byte for byte; and after each
 * chunk the scratch is compared with the base in full (`cmp`), so an undo log that missed a
 * block can never carry one device's data (its key) into the next device's image: the chunk's
 * devices fail and the scratch is made again.
 */
import { closeSync, existsSync, fsyncSync, mkdtempSync, openSync, readSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import { join } from "node:path";
import { UserError } from "../errors.js";
import { tempNameFor, writeFileAtomic } from "../fsutil.js";
import type { Entry } from "../overlay/tree.js";
import { renderBmap, scanBmap, updateBmap, type Bmap } from "./bmap.js";
import type { ImageResult, StagedImage } from "./build.js";
import { compressZstd } from "./compress.js";
import { copyImage } from "./copy.js";
import { findTool, runTool } from "./debugfs.js";
import { blocksOfBytes } from "./extents.js";
import { layTree } from "./lay.js";
import { findRoot, type RootFs } from "./root.js";
import { privateDir, track } from "./temps.js";
import { readUndoSpans, type Span } from "./undo.js";

function copySpans(from: string, to: string, spans: readonly Span[], check: boolean): void {
  const src = openSync(from, "r");
  const dst = openSync(to, "r+");
  try {
    for (const s of spans) {
      const len = s.end - s.start;
      const buf = Buffer.alloc(len);
      if (readSync(src, buf, 0, len, s.start) !== len) throw new Error(`${from}: short read at byte ${s.start}`);
      let off = 0;
      while (off < len) off += writeSync(dst, buf, off, len - off, s.start + off);
      if (check) {
        const back = Buffer.alloc(len);
        if (readSync(dst, back, 0, len, s.start) !== len || !back.equals(buf)) {
          throw new UserError(`${to}: the blocks copied in at byte ${s.start} do not read back as written`, { exitCode: 1 });
        }
      }
    }
  } finally {
    closeSync(src);
    closeSync(dst);
  }
}

export interface ScratchJob {
  /** Final image path (without .zst). */
  image: string;
  entries: readonly Entry[];
  epoch: number;
  baseMap?: Bmap;
  compress?: "zstd";
}

export class Scratch {
  private dirty = true;
  private readonly dir: string;
  private readonly path: string;
  private readonly untrack: () => void;
  private root: RootFs | undefined;

  /** `outDir`: the scratch lives beside the images (a RAM-backed $TMPDIR could not hold it). */
  constructor(
    private readonly base: string,
    private readonly baseRoot: RootFs,
    outDir: string,
  ) {
    this.dir = mkdtempSync(join(outDir, ".mkoverlay-scratch-"));
    this.untrack = track(this.dir);
    this.path = join(this.dir, "scratch.img");
  }

  private async rebuild(): Promise<RootFs> {
    rmSync(this.path, { force: true });
    await copyImage(this.base, this.path);
    const p = this.baseRoot.partition;
    this.root = { ...findRoot(this.path, p ? { rootPartition: p.number } : {}), where: this.baseRoot.where };
    this.dirty = false;
    return this.root;
  }

  /** The image of one device under temp names, not synced (the caller syncs the chunk). */
  async stage(job: ScratchJob): Promise<StagedImage> {
    const root = this.dirty || !this.root ? await this.rebuild() : this.root;
    const priv = privateDir("mkoverlay-image-");
    const undo = join(priv.path, "undo.e2undo");
    const final = job.compress === "zstd" ? `${job.image}.zst` : job.image;
    const bmapPath = `${job.image}.bmap`;
    const tmp = tempNameFor(job.image);
    const tmpFinal = job.compress === "zstd" ? tempNameFor(final) : tmp;
    const tmpBmap = tempNameFor(bmapPath);
    const temps = [tmp, tmpFinal, tmpBmap];
    const untrack = temps.map(track);
    const forget = (): void => untrack.forEach((u) => u());
    const ms = { copy: 0, lay: 0, bmap: 0, compress: 0 };
    let t = performance.now();
    const lap = (k: keyof typeof ms): void => {
      const now = performance.now();
      ms[k] = Math.round(now - t);
      t = now;
    };
    try {
      let spans: Span[] | undefined;
      let laid;
      try {
        laid = await layTree(root, job.entries, job.epoch, { undo, listFrom: this.baseRoot });
        spans = readUndoSpans(undo);
      } finally {
        // Whatever happened, the scratch must be the base again before the next device.
        if (!spans) this.dirty = existsSync(undo) && statSync(undo).size > 0;
      }
      if (!spans) throw new UserError(`${job.image}: debugfs's undo log could not be read (no blocks to copy)`, { exitCode: 1 });
      lap("lay");
      try {
        await copyImage(this.base, tmp);
        lap("copy");
        copySpans(this.path, tmp, spans, true);
      } finally {
        try {
          copySpans(this.base, this.path, spans, false);
          const fd = openSync(this.path, "r+");
          try {
            fsyncSync(fd);
          } finally {
            closeSync(fd);
          }
        } catch {
          this.dirty = true;
        }
      }
      const map = job.baseMap ? updateBmap(job.baseMap, tmp, blocksOfBytes(spans)) : await scanBmap(tmp);
      lap("bmap");
      if (job.compress === "zstd") {
        await compressZstd(tmp, tmpFinal);
        rmSync(tmp, { force: true });
        lap("compress");
      }
      writeFileAtomic(tmpBmap, renderBmap(map), { mode: 0o600, durable: false });
      const result: ImageResult = { image: final, bmap: bmapPath, root: { ...root, path: final, where: final }, copy: "sparse-copy", laid, ms };
      let committed = false;
      return {
        result,
        files: [tmpFinal, tmpBmap],
        commit() {
          const done: string[] = [];
          try {
            renameSync(tmpFinal, final);
            done.push(final);
            renameSync(tmpBmap, bmapPath);
            done.push(bmapPath);
            committed = true;
            forget();
          } catch (e) {
            for (const p of done) rmSync(p, { force: true });
            throw e;
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
      priv.remove();
    }
  }

  /** After a chunk: is the scratch the base again, byte for byte? If not, it is made again. */
  async isClean(): Promise<boolean> {
    if (this.dirty || !this.root) return true; // will be rebuilt before it is used
    const r = await runTool(findTool("cmp", "diffutils"), ["-s", "--", this.base, this.path]);
    if (r.code === 0) return true;
    this.dirty = true;
    return false;
  }

  remove(): void {
    rmSync(this.dir, { recursive: true, force: true });
    this.untrack();
  }
}
