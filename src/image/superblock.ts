/**
 * The ext2/3/4 superblock at a partition's offset: enough to say whether debugfs may write
 * there. Refused before anything is copied or written: not ext*, a journal still to replay
 * (debugfs ignores the journal, so replaying it later would undo or corrupt our writes), errors
 * recorded by the kernel, features e2fsprogs 1.47 cannot write, and too little room.
 */
import { UserError } from "../util/errors.js";

const EXT_MAGIC = 0xef53;
export const SUPERBLOCK_OFFSET = 1024;

const COMPAT = { hasJournal: 0x4, extAttr: 0x8, resizeInode: 0x10, dirIndex: 0x20, orphanFile: 0x1000 } as const;
export const INCOMPAT = {
  compression: 0x1,
  filetype: 0x2,
  recover: 0x4,
  journalDev: 0x8,
  metaBg: 0x10,
  extents: 0x40,
  bit64: 0x80,
  mmp: 0x100,
  flexBg: 0x200,
  eaInode: 0x400,
  dirdata: 0x1000,
  csumSeed: 0x2000,
  largedir: 0x4000,
  inlineData: 0x8000,
  encrypt: 0x10000,
  casefold: 0x20000,
} as const;
export const RO_COMPAT = {
  sparseSuper: 0x1,
  largeFile: 0x2,
  hugeFile: 0x8,
  gdtCsum: 0x10,
  dirNlink: 0x20,
  extraIsize: 0x40,
  quota: 0x100,
  bigalloc: 0x200,
  metadataCsum: 0x400,
  readonly: 0x1000,
  project: 0x2000,
  sharedBlocks: 0x4000,
  verity: 0x8000,
  orphanPresent: 0x10000,
} as const;

/** What e2fsprogs 1.47.0 reads and writes (lib/ext2fs's *_SUPP masks, less what it only reads). */
const INCOMPAT_OK = Object.values(INCOMPAT).reduce((a, b) => a | b, 0) & ~(INCOMPAT.compression | INCOMPAT.dirdata | INCOMPAT.journalDev | INCOMPAT.recover);
const RO_COMPAT_OK = Object.values(RO_COMPAT).reduce((a, b) => a | b, 0) & ~(RO_COMPAT.readonly | RO_COMPAT.sharedBlocks | RO_COMPAT.orphanPresent);

export interface Superblock {
  blockSize: number;
  blocksCount: number;
  freeBlocks: number;
  reservedBlocks: number;
  inodesCount: number;
  freeInodes: number;
  inodeSize: number;
  state: number;
  compat: number;
  incompat: number;
  roCompat: number;
  uuid: string;
  label: string;
  /** ext2, ext3 or ext4, as blkid would name it. */
  kind: "ext2" | "ext3" | "ext4";
}

/** Parses 1024 bytes read at partition offset + 1024; undefined when the magic is not there. */
export function parseSuperblock(b: Buffer): Superblock | undefined {
  if (b.length < 1024 || b.readUInt16LE(56) !== EXT_MAGIC) return undefined;
  const incompat = b.readUInt32LE(96);
  const roCompat = b.readUInt32LE(100);
  const is64 = (incompat & INCOMPAT.bit64) !== 0;
  const hi = (at: number): number => (is64 ? b.readUInt32LE(at) * 2 ** 32 : 0);
  const logBlock = b.readUInt32LE(24);
  const compat = b.readUInt32LE(92);
  const ext4ish = (incompat & ~(INCOMPAT.filetype | INCOMPAT.recover | INCOMPAT.metaBg)) !== 0 || (roCompat & ~(RO_COMPAT.sparseSuper | RO_COMPAT.largeFile)) !== 0;
  const revLevel = b.readUInt32LE(76);
  const uuid = b.subarray(104, 120).toString("hex");
  return {
    blockSize: logBlock <= 6 ? 1024 << logBlock : 0,
    blocksCount: b.readUInt32LE(4) + hi(0x150),
    reservedBlocks: b.readUInt32LE(8) + hi(0x154),
    freeBlocks: b.readUInt32LE(12) + hi(0x158),
    inodesCount: b.readUInt32LE(0),
    freeInodes: b.readUInt32LE(16),
    inodeSize: revLevel === 0 ? 128 : b.readUInt16LE(88),
    state: b.readUInt16LE(58),
    compat,
    incompat,
    roCompat,
    uuid: `${uuid.slice(0, 8)}-${uuid.slice(8, 12)}-${uuid.slice(12, 16)}-${uuid.slice(16, 20)}-${uuid.slice(20)}`,
    label: b.toString("latin1", 120, 136).replace(/\0.*$/s, ""),
    kind: ext4ish ? "ext4" : compat & COMPAT.hasJournal ? "ext3" : "ext2",
  };
}

export interface Room {
  blocks: number;
  inodes: number;
}

/**
 * Blocks and inodes a set of entries needs at most: each file's data blocks, plus one for each
 * directory and long symlink, plus one extent/index block per 64 data blocks of big files.
 * Replacing a file frees its old blocks, which is not counted: the estimate stays on the safe side.
 */
export function roomFor(entries: readonly { type: string; size: number }[], blockSize: number): Room {
  let blocks = 0;
  for (const e of entries) {
    const data = Math.ceil(e.size / blockSize);
    blocks += e.type === "file" ? data + (data > 4 ? Math.ceil(data / 340) : 0) : e.type === "symlink" ? (e.size >= 60 ? 1 : 0) : 1;
  }
  return { blocks, inodes: entries.length };
}

/** Kept free on top of the estimate: debugfs may split a directory or grow the htree. */
const MARGIN = { blocks: 256, inodes: 16 };

/**
 * Refuses what debugfs must not write. `where` names the partition for the message
 * ("disk.img partition 2"). Throws UserError (exit 2) with a hint.
 */
export function checkWritable(sb: Superblock | undefined, where: string, need?: Room): asserts sb is Superblock {
  if (!sb) throw new UserError(`${where}: not an ext2/3/4 file system (no superblock magic 0xEF53)`, { hint: "choose the root partition with --root-partition N" });
  if (sb.incompat & INCOMPAT.journalDev) throw new UserError(`${where}: is an external ext4 journal, not a file system`);
  if (sb.incompat & INCOMPAT.recover) {
    throw new UserError(`${where}: the ext4 journal needs recovery (the file system was not cleanly unmounted)`, {
      hint: "replay the journal first: e2fsck -fy on that partition (or mount and unmount it once)",
    });
  }
  if (sb.roCompat & RO_COMPAT.orphanPresent) throw new UserError(`${where}: has orphan inodes still to process`, { hint: "run e2fsck -fy on that partition first" });
  if (sb.state & 0x2) throw new UserError(`${where}: the kernel recorded errors in this file system`, { hint: "run e2fsck -fy on that partition first" });
  if (sb.blockSize === 0) throw new UserError(`${where}: invalid block size in the superblock`);
  const badIn = sb.incompat & ~INCOMPAT_OK;
  const badRo = sb.roCompat & ~RO_COMPAT_OK;
  if (badIn || badRo) {
    const names = [
      ...Object.entries(INCOMPAT).filter(([, v]) => badIn & v).map(([k]) => k),
      ...Object.entries(RO_COMPAT).filter(([, v]) => badRo & v).map(([k]) => k),
    ];
    const unknown = (badIn & ~Object.values(INCOMPAT).reduce((a, b) => a | b, 0)) | (badRo & ~Object.values(RO_COMPAT).reduce((a, b) => a | b, 0));
    if (unknown) names.push(`unknown 0x${unknown.toString(16)}`);
    throw new UserError(`${where}: file system features e2fsprogs cannot write: ${names.join(", ")}`);
  }
  if (need) {
    if (sb.freeBlocks < need.blocks + MARGIN.blocks) {
      throw new UserError(
        `${where}: not enough room: ${sb.freeBlocks} free blocks of ${sb.blockSize} bytes, the overlay needs about ${need.blocks} (+${MARGIN.blocks} kept free)`,
        { hint: "enlarge the root partition of the base image (e.g. resize2fs after growing it)" },
      );
    }
    if (sb.freeInodes < need.inodes + MARGIN.inodes) {
      throw new UserError(`${where}: not enough free inodes: ${sb.freeInodes}, the overlay needs ${need.inodes} (+${MARGIN.inodes} kept free)`);
    }
  }
}
