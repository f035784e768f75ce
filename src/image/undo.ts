/**
 * Which blocks debugfs wrote, from the undo log it keeps with `-z FILE` (e2fsprogs' E2UNDO02
 * format: a header block, a copy of the superblock, then key blocks, each listing the extents
 * whose old contents follow it). We read only the keys: they name every byte range debugfs
 * overwrote, which is what a device's bmap must re-hash. The log also lets a failed in-place
 * write be rolled back with e2undo. It holds the *old* contents, never the overlay's.
 *
 * Anything unexpected in the log returns undefined and the caller falls back to hashing the
 * whole image: slower, never wrong.
 */
import { closeSync, fstatSync, fsyncSync, openSync, writeSync } from "node:fs";
import { readAt } from "../util/fsutil.js";
import { findTool, runTool } from "./debugfs.js";

const MAGIC = "E2UNDO02";
const KEYBLOCK_MAGIC = 0xcadecade;
const STATE_FINISHED = 0x1;

export interface Span {
  /** Byte offsets in the image or device (the file system's offset included). */
  start: number;
  end: number;
}


export function readUndoSpans(path: string): Span[] | undefined {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return undefined;
  }
  try {
    const fileSize = fstatSync(fd).size;
    if (fileSize === 0) return []; // nothing was written
    const h = readAt(fd, 0, 512);
    if (h.length < 512 || h.toString("latin1", 0, 8) !== MAGIC) return undefined;
    const numKeys = Number(h.readBigUInt64LE(8));
    const keyOffset = Number(h.readBigUInt64LE(24));
    const blockSize = h.readUInt32LE(32);
    const fsBlockSize = h.readUInt32LE(36);
    const state = h.readUInt32LE(44);
    const fsOffset = Number(h.readBigUInt64LE(64));
    if (!(state & STATE_FINISHED) || blockSize < 1024 || blockSize > 1 << 20 || fsBlockSize < 1024 || fsBlockSize > 1 << 16) return undefined;
    const perBlock = blockSize / 16 - 1;
    const spans: Span[] = [];
    let lblk = keyOffset;
    for (let i = 0; i < numKeys; i += perBlock) {
      if ((lblk + 1) * blockSize > fileSize) return undefined;
      const kb = readAt(fd, lblk * blockSize, blockSize);
      if (kb.readUInt32LE(0) !== KEYBLOCK_MAGIC) return undefined;
      lblk++;
      for (let j = 0; j < perBlock && i + j < numKeys; j++) {
        const at = 16 + j * 16;
        const fsblk = Number(kb.readBigUInt64LE(at));
        const size = kb.readUInt32LE(at + 12);
        if (size === 0) return undefined;
        const start = fsOffset + fsblk * fsBlockSize;
        spans.push({ start, end: start + size });
        lblk += Math.ceil(size / blockSize);
      }
    }
    // e2fsprogs 1.47.0 logs the primary superblock (written with write_byte) at the wrong place
    // when the file system sits at an offset (the offset is added twice), so that key cannot be
    // trusted: the superblock is always counted as written. (A misplaced key only costs a
    // needless re-hash.)
    spans.push({ start: fsOffset + 1024, end: fsOffset + 2048 });
    return spans;
  } finally {
    closeSync(fd);
  }
}

/**
 * Replays the undo log with e2undo onto `target` (it reads the offset from the log's header; it
 * does not take `IMG?offset=`), then puts back the primary superblock saved before the write
 * (`savedSb` at `sbAt`), which e2fsprogs 1.47.0 logs at the wrong place. True when it worked.
 */
export async function rollBack(target: string, undo: string, sbAt: number, savedSb: Buffer): Promise<boolean> {
  const r = await runTool(findTool("e2undo"), [undo, target]).catch(() => undefined);
  if (r?.code !== 0) return false;
  const fd = openSync(target, "r+");
  try {
    writeSync(fd, savedSb, 0, savedSb.length, sbAt);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return true;
}
