/**
 * `--compress zstd`: H.img.zst through the zstd program, streamed (the image is never held in
 * memory), written 0600 under a temp name and renamed. zstd rather than xz: 21 s against 910 s
 * for a 3.25 GiB image on two cores, for 30 % more bytes (IMAGES.md), and bmaptool reads .zst
 * directly with the uncompressed image's bmap.
 */
import { spawn } from "node:child_process";
import { closeSync, fsyncSync, ftruncateSync, openSync, readSync, renameSync, rmSync, statfsSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import { tempNameFor } from "../util/fsutil.js";
import { UserError } from "../util/errors.js";
import { findTool } from "./debugfs.js";
import { track } from "./temps.js";

export async function compressZstd(src: string, dst: string, opts: { level?: number } = {}): Promise<void> {
  const zstd = findTool("zstd", "zstd");
  const tmp = tempNameFor(dst);
  const out = openSync(tmp, "wx", 0o600);
  const untrack = track(tmp);
  try {
    const stderr: Buffer[] = [];
    const code = await new Promise<number>((resolve, reject) => {
      // -T0: all cores; --no-progress and -q: nothing on a terminal; stdout is our 0600 file.
      const child = spawn(zstd, ["-q", "--no-progress", "-T0", `-${opts.level ?? 3}`, "-c", "--", src], { stdio: ["ignore", out, "pipe"] });
      child.stderr!.on("data", (c: Buffer) => stderr.push(c));
      child.on("error", reject);
      child.on("close", (c) => resolve(c ?? -1));
    });
    if (code !== 0) throw new UserError(`zstd failed on ${src}: ${Buffer.concat(stderr).toString().trim().split("\n")[0] ?? `exit ${code}`}`);
    fsyncSync(out);
    closeSync(out);
    renameSync(tmp, dst);
    untrack();
  } catch (e) {
    try {
      closeSync(out);
    } catch {
      // already closed
    }
    rmSync(tmp, { force: true });
    untrack();
    throw e;
  }
}

/** No disk image mkoverlay reads is larger: a .zst that says or turns out otherwise is refused. */
const MAX_IMAGE_BYTES = 64 * 2 ** 30;
/** Kept free in $TMPDIR while decompressing (other programs need it too). */
const TMP_RESERVE_BYTES = 512 * 2 ** 20;

/**
 * The content size a zstd frame header declares (Frame_Content_Size), or undefined when the
 * frame does not carry one (zstd writes it when it compresses a file; a stream has none).
 */
function zstdDeclaredSize(head: Buffer): number | undefined {
  if (head.length < 6 || head.readUInt32LE(0) !== 0xfd2fb528) return undefined;
  const fhd = head[4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const did = [0, 1, 2, 4][fhd & 3]!;
  const fcsSize = fcsFlag === 0 ? (single ? 1 : 0) : [0, 2, 4, 8][fcsFlag]!;
  if (fcsSize === 0) return undefined;
  const at = 5 + (single ? 0 : 1) + did;
  if (head.length < at + fcsSize) return undefined;
  if (fcsSize === 1) return head[at]!;
  if (fcsSize === 2) return head.readUInt16LE(at) + 256;
  if (fcsSize === 4) return head.readUInt32LE(at);
  return Number(head.readBigUInt64LE(at));
}

/**
 * `zstd -dc SRC` into `dst` (created 0600), bounded: the decompressed size may not pass
 * `maxBytes`, and the bytes actually stored may not leave less than `reserve` free where `dst`
 * is. Runs of zeros are not written (the file stays sparse, as `zstd -d` would leave it), so a
 * multi-GiB image that is mostly empty costs only its data. Streamed: memory stays small.
 * A refusal kills zstd, removes `dst` and names the limit.
 */
export async function decompressZstdBounded(src: string, dst: string, opts: { maxBytes?: number; reserve?: number } = {}): Promise<{ size: number; stored: number }> {
  const maxBytes = opts.maxBytes ?? MAX_IMAGE_BYTES;
  const reserve = opts.reserve ?? TMP_RESERVE_BYTES;
  const GiB = (n: number): string => `${(n / 2 ** 30).toFixed(n < 2 ** 30 ? 2 : 0)} GiB`;
  const hint = "decompress it where there is room (zstd -d) and give the .img";
  const head = Buffer.alloc(18);
  const hfd = openSync(src, "r");
  try {
    readSync(hfd, head, 0, head.length, 0);
  } finally {
    closeSync(hfd);
  }
  const declared = zstdDeclaredSize(head);
  if (declared !== undefined && declared > maxBytes) throw new UserError(`${src}: decompresses to ${GiB(declared)} (its zstd header says so), more than the ${GiB(maxBytes)} a disk image may be`, { hint });
  const out = openSync(dst, "wx", 0o600);
  const fs = statfsSync(dirname(dst));
  const budget = fs.bavail * fs.bsize - reserve;
  let size = 0;
  let stored = 0;
  let refused: UserError | undefined;
  const child = spawn(findTool("zstd", "zstd"), ["-dc", "-q", "--no-progress", "--", src], { stdio: ["ignore", "pipe", "pipe"] });
  const stderr: Buffer[] = [];
  child.stderr!.on("data", (c: Buffer) => stderr.push(c));
  const closed = new Promise<number>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (c) => resolve(c ?? -1));
  });
  const zeros = Buffer.alloc(1 << 16);
  try {
    for await (const chunk of child.stdout! as AsyncIterable<Buffer>) {
      if (size + chunk.length > maxBytes) {
        refused = new UserError(`${src}: decompresses to more than ${GiB(maxBytes)}, more than a disk image may be; stopped there`, { hint });
        break;
      }
      // Skip what is all zeros, 64 KiB at a time: the holes of a sparse image stay holes.
      for (let off = 0; off < chunk.length; off += zeros.length) {
        const piece = chunk.subarray(off, off + zeros.length);
        if (piece.equals(zeros.subarray(0, piece.length))) continue;
        if (stored + piece.length > budget) {
          refused = new UserError(`${src}: decompressing it would leave less than ${GiB(reserve)} free in ${dirname(dst)} (${GiB(Math.max(0, budget + reserve))} were free); stopped after ${GiB(stored)}`, {
            hint: `${hint}, or set TMPDIR to a folder with more room`,
          });
          break;
        }
        let w = 0;
        while (w < piece.length) w += writeSync(out, piece, w, piece.length - w, size + off + w);
        stored += piece.length;
      }
      if (refused) break;
      size += chunk.length;
    }
    if (refused) {
      child.kill("SIGKILL");
      await closed;
      throw refused;
    }
    const code = await closed;
    if (code !== 0) throw new UserError(`${src}: zstd could not decompress it: ${Buffer.concat(stderr).toString().trim().split("\n")[0] || `exit ${code}`}`);
    ftruncateSync(out, size);
    return { size, stored };
  } catch (e) {
    child.kill("SIGKILL");
    rmSync(dst, { force: true });
    throw e;
  } finally {
    closeSync(out);
  }
}
