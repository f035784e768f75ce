/**
 * Which parts of an image file hold data: the bmap maps those, the flash writes only those.
 * The ranges come from the FIEMAP ioctl through `filefrag -v` (e2fsprogs, already a
 * dependency): Node has no SEEK_DATA/SEEK_HOLE or ioctl binding, and FIEMAP is also what
 * bmaptool itself uses first, so our map matches the reference implementation's (allocated
 * extents, unwritten ones included; holes are "don't care" when flashing).
 *
 * Where FIEMAP is not supported (tmpfs, some network file systems) the whole file counts as
 * mapped: the bmap is then correct but saves nothing.
 */
import { findTool, runTool } from "./debugfs.js";

export const BLOCK = 4096;

/** Inclusive block ranges [first, last], sorted, adjacent ones merged. */
export type BlockRange = [number, number];

function parseFilefrag(out: string): BlockRange[] {
  const ranges: BlockRange[] = [];
  for (const line of out.split("\n")) {
    const m = /^\s*\d+:\s+(\d+)\.\.\s*(\d+):/.exec(line);
    if (!m) continue;
    ranges.push([Number(m[1]), Number(m[2])]);
  }
  return normalize(ranges);
}

/** Sorts, merges overlapping and adjacent ranges. */
export function normalize(ranges: readonly BlockRange[]): BlockRange[] {
  const sorted = [...ranges].sort((x, y) => x[0] - y[0]);
  const out: BlockRange[] = [];
  for (const [a, b] of sorted) {
    const last = out[out.length - 1];
    if (last && a <= last[1] + 1) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

/** Data ranges of a file of `size` bytes in 4 KiB blocks, clipped to its end. */
export async function dataRanges(path: string, size: number): Promise<BlockRange[]> {
  const blocks = Math.ceil(size / BLOCK);
  if (blocks === 0) return [];
  const r = await runTool(findTool("filefrag"), ["-v", `-b${BLOCK}`, path], { env: { LC_ALL: "C" } });
  if (r.code !== 0 || !/extents? found/.test(r.stdout.toString())) return [[0, blocks - 1]];
  return parseFilefrag(r.stdout.toString())
    .filter(([a]) => a < blocks)
    .map(([a, b]): BlockRange => [a, Math.min(b, blocks - 1)]);
}

/** Blocks covering the byte ranges [start, end). */
export function blocksOfBytes(spans: readonly { start: number; end: number }[]): BlockRange[] {
  return normalize(spans.filter((s) => s.end > s.start).map((s): BlockRange => [Math.floor(s.start / BLOCK), Math.floor((s.end - 1) / BLOCK)]));
}
