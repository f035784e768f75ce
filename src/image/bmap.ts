/**
 * bmap files in bmaptool's format (version 2.0, 4 KiB blocks, sha256 per range), so
 * `bmaptool copy --bmap H.img.bmap H.img /dev/sdX` writes only the used blocks and checks each.
 * Written by mkoverlay, not by `bmaptool create`: that would be a Python run-time dependency
 * that reads and hashes the whole image for every device. Here a device's bmap is derived from
 * its base's: only the 1 MiB chunks that debugfs wrote are read and hashed again, so a
 * per-device bmap costs milliseconds whatever the image's size. `bmaptool copy` checks the
 * result in the tests.
 *
 * Ranges never cross a 1 MiB chunk boundary (bmaptool accepts adjacent ranges): a changed block
 * then costs one chunk's hash, not its whole extent's.
 */
import { createHash } from "node:crypto";
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { BLOCK, dataRanges, normalize, type BlockRange } from "./extents.js";

const CHUNK_BLOCKS = 256;

interface BmapRange {
  first: number;
  last: number;
  sha256: string;
}

export interface Bmap {
  imageSize: number;
  ranges: BmapRange[];
}

/** Splits block ranges at chunk boundaries. */
function chunked(ranges: readonly BlockRange[]): BlockRange[] {
  const out: BlockRange[] = [];
  for (const [a, b] of ranges) {
    for (let s = a; s <= b; ) {
      const e = Math.min(b, (Math.floor(s / CHUNK_BLOCKS) + 1) * CHUNK_BLOCKS - 1);
      out.push([s, e]);
      s = e + 1;
    }
  }
  return out;
}

function hashRanges(fd: number, size: number, pieces: readonly BlockRange[]): BmapRange[] {
  const buf = Buffer.allocUnsafe(CHUNK_BLOCKS * BLOCK);
  return pieces.map(([a, b]) => {
    const h = createHash("sha256");
    let pos = a * BLOCK;
    // The last block may be partial: like bmaptool, hash the bytes that are there.
    const end = Math.min((b + 1) * BLOCK, size);
    while (pos < end) {
      const n = readSync(fd, buf, 0, end - pos, pos);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
      pos += n;
    }
    return { first: a, last: b, sha256: h.digest("hex") };
  });
}

/** The bmap of an image from scratch: its data ranges, every byte hashed (once per base). */
export async function scanBmap(path: string): Promise<Bmap> {
  const fd = openSync(path, "r");
  try {
    const size = fstatSync(fd).size;
    const ranges = await dataRanges(path, size);
    return { imageSize: size, ranges: hashRanges(fd, size, chunked(ranges)) };
  } finally {
    closeSync(fd);
  }
}

/**
 * The bmap of an image that is `base`'s image plus writes to `changed` blocks (from debugfs's
 * undo log): the chunks holding a changed block are re-read from `path` and re-hashed, with
 * the changed blocks added to the mapped set (debugfs may have written into a hole).
 */
export function updateBmap(base: Bmap, path: string, changed: readonly BlockRange[]): Bmap {
  const fd = openSync(path, "r");
  try {
    const size = fstatSync(fd).size;
    if (size !== base.imageSize) throw new Error(`${path}: ${size} bytes, but its base had ${base.imageSize}`);
    const blocks = Math.ceil(size / BLOCK);
    const ch = normalize(changed).filter(([a]) => a < blocks).map(([a, b]): BlockRange => [a, Math.min(b, blocks - 1)]);
    const dirty = new Set<number>();
    for (const [a, b] of ch) for (let c = Math.floor(a / CHUNK_BLOCKS); c <= Math.floor(b / CHUNK_BLOCKS); c++) dirty.add(c);
    const keep = base.ranges.filter((r) => !dirty.has(Math.floor(r.first / CHUNK_BLOCKS)));
    const redo = chunked(normalize([...base.ranges.filter((r) => dirty.has(Math.floor(r.first / CHUNK_BLOCKS))).map((r): BlockRange => [r.first, r.last]), ...ch]));
    const ranges = [...keep, ...hashRanges(fd, size, redo)].sort((x, y) => x.first - y.first);
    return { imageSize: size, ranges };
  } finally {
    closeSync(fd);
  }
}

/** bmaptool's XML (format 2.0). BmapFileChecksum is the sha256 of the file with that field all zeros. */
export function renderBmap(b: Bmap): string {
  const blocks = Math.ceil(b.imageSize / BLOCK);
  const mapped = b.ranges.reduce((n, r) => n + r.last - r.first + 1, 0);
  const zeros = "0".repeat(64);
  const xml = [
    '<?xml version="1.0" ?>',
    "<!-- Block map of a disk image written by mkoverlay: only the listed blocks hold data. -->",
    '<bmap version="2.0">',
    `    <ImageSize> ${b.imageSize} </ImageSize>`,
    `    <BlockSize> ${BLOCK} </BlockSize>`,
    `    <BlocksCount> ${blocks} </BlocksCount>`,
    `    <MappedBlocksCount> ${mapped} </MappedBlocksCount>`,
    "    <ChecksumType> sha256 </ChecksumType>",
    `    <BmapFileChecksum> ${zeros} </BmapFileChecksum>`,
    "    <BlockMap>",
    ...b.ranges.map((r) => `        <Range chksum="${r.sha256}"> ${r.first === r.last ? r.first : `${r.first}-${r.last}`} </Range>`),
    "    </BlockMap>",
    "</bmap>",
    "",
  ].join("\n");
  return xml.replace(zeros, createHash("sha256").update(xml).digest("hex"));
}

/** Reads a bmap written by renderBmap (or bmaptool): used to cache a base's map beside it. */
export function parseBmap(xml: string): Bmap | undefined {
  const size = /<ImageSize>\s*(\d+)\s*<\/ImageSize>/.exec(xml);
  const bs = /<BlockSize>\s*(\d+)\s*<\/BlockSize>/.exec(xml);
  if (!size || bs?.[1] !== String(BLOCK) || !/<ChecksumType>\s*sha256\s*</.test(xml)) return undefined;
  const ranges: BmapRange[] = [];
  for (const m of xml.matchAll(/<Range chksum="([0-9a-f]{64})">\s*(\d+)(?:-(\d+))?\s*<\/Range>/g)) {
    ranges.push({ first: Number(m[2]), last: Number(m[3] ?? m[2]), sha256: m[1]! });
  }
  // A cached map must use our chunking, or updateBmap would re-hash the wrong extents.
  if (ranges.some((r) => Math.floor(r.first / CHUNK_BLOCKS) !== Math.floor(r.last / CHUNK_BLOCKS))) return undefined;
  return { imageSize: Number(size[1]), ranges };
}
