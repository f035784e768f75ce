/**
 * Partition tables, parsed by mkoverlay itself: MBR (with logical partitions) and GPT
 * (protective MBR, header and entry-array CRCs, the backup header when the primary is bad).
 * Pure functions over the first sectors of a disk; `readDiskLayout` is the I/O edge.
 * sfdisk is not needed at run time: both formats are small and fixed, and parsing them here
 * lets the errors name exactly what is wrong with a base image.
 */
import { closeSync, fstatSync, openSync, readFileSync, readSync, realpathSync } from "node:fs";
import { crc32 } from "node:zlib";
import { UserError } from "../util/errors.js";

const SECTOR = 512;

export interface Partition {
  /** 1-based, as the kernel numbers them (MBR logical partitions start at 5). */
  number: number;
  /** Byte offset of the partition in the disk. */
  offset: number;
  /** Size in bytes. */
  size: number;
  /** MBR: "0x83"; GPT: the type GUID, upper case. */
  type: string;
  /** GPT partition name (UTF-16 in the table); "" on MBR. */
  name: string;
  /** What the kernel calls PARTUUID: "<disk id>-<NN>" on MBR, the unique GUID on GPT. */
  partuuid: string;
}

export interface DiskLayout {
  scheme: "mbr" | "gpt" | "none";
  /** MBR disk signature as 8 hex digits, the GPT disk GUID, or "" for a bare file system. */
  diskId: string;
  /** Logical sector size the table was found with (GPT may use 4096 on 4Kn devices). */
  sectorSize: number;
  partitions: Partition[];
}

export const GPT_TYPES = {
  linuxData: "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
  // Discoverable Partitions Specification root types: a root by definition.
  rootX86_64: "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
  rootArm64: "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
  rootArm: "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3",
  rootX86: "44479540-F297-41B2-9AF7-D131D5F0458A",
  rootRiscv64: "72EC70A6-CF74-40E6-BD49-4BDA08E8F224",
  esp: "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
  basicData: "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
} as const;

const ROOT_GUIDS = new Set<string>([GPT_TYPES.rootX86_64, GPT_TYPES.rootArm64, GPT_TYPES.rootArm, GPT_TYPES.rootX86, GPT_TYPES.rootRiscv64]);

/** A type that may hold a Linux file system (MBR 0x83, GPT Linux data or a root type). */
export function isLinuxType(p: Partition): boolean {
  return p.type === "0x83" || p.type === GPT_TYPES.linuxData || ROOT_GUIDS.has(p.type);
}

export function isRootType(p: Partition): boolean {
  return ROOT_GUIDS.has(p.type);
}

/** Why the bytes are not a partition table; the caller decides whether a bare file system is fine. */
export class NotADiskImage extends Error {}

const EXTENDED = new Set([0x05, 0x0f, 0x85]);

/** GUIDs are stored with their first three fields little-endian. */
function guidString(b: Buffer, at: number): string {
  const hex = (from: number, to: number, rev: boolean): string => {
    const s = b.subarray(at + from, at + to);
    return Buffer.from(rev ? [...s].reverse() : s).toString("hex");
  };
  return `${hex(0, 4, true)}-${hex(4, 6, true)}-${hex(6, 8, true)}-${hex(8, 10, false)}-${hex(10, 16, false)}`.toUpperCase();
}

function u64(b: Buffer, at: number): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new NotADiskImage(`a 64-bit field at byte ${at} is out of range`);
  return Number(v);
}

interface MbrEntry {
  slot: number;
  type: number;
  lbaStart: number;
  sectors: number;
}

function mbrEntries(sector: Buffer): MbrEntry[] {
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const at = 446 + i * 16;
    const status = sector[at]!;
    const type = sector[at + 4]!;
    const lbaStart = sector.readUInt32LE(at + 8);
    const sectors = sector.readUInt32LE(at + 12);
    if (type === 0) continue;
    // A boot flag is 0x00 or 0x80; anything else means these bytes are not a partition table
    // (a FAT or NTFS boot sector also ends in 55 AA).
    if (status !== 0 && status !== 0x80) throw new NotADiskImage(`MBR entry ${i + 1} has boot flag 0x${status.toString(16)}`);
    out.push({ slot: i + 1, type, lbaStart, sectors });
  }
  return out;
}

function hasMbrSignature(sector0: Buffer): boolean {
  return sector0.length >= 512 && sector0[510] === 0x55 && sector0[511] === 0xaa;
}

/** Reads `len` bytes at `pos` of the disk (short reads come back shorter). */
export type ReadAt = (pos: number, len: number) => Buffer;

/**
 * Parses the partition table of a disk of `diskSize` bytes. Throws NotADiskImage when there is
 * none, UserError-worthy messages otherwise (the caller adds the file name).
 */
export function parseDiskLayout(read: ReadAt, diskSize: number): DiskLayout {
  const s0 = read(0, SECTOR);
  if (!hasMbrSignature(s0)) throw new NotADiskImage("no MBR signature (55 AA) in the first sector");
  const entries = mbrEntries(s0);
  if (entries.length === 0) throw new NotADiskImage("the MBR has no partitions");
  if (entries.some((e) => e.type === 0xee)) {
    for (const ss of [SECTOR, 4096]) {
      const layout = parseGpt(read, diskSize, ss);
      if (layout) {
        checkHybrid(entries, layout);
        return layout;
      }
    }
    throw new Error("protective MBR (type 0xEE) but no GPT header (\"EFI PART\") at LBA 1");
  }
  for (const e of entries) {
    // LBA 0 is the MBR itself: a partition there would be written over the table.
    if (e.lbaStart === 0 && e.sectors > 0) throw new Error(`MBR partition ${e.slot} starts at sector 0, on the partition table itself`);
  }
  const diskId = s0.readUInt32LE(440).toString(16).padStart(8, "0");
  const parts: Partition[] = [];
  const mk = (number: number, type: number, lba: number, sectors: number): Partition => ({
    number,
    offset: lba * SECTOR,
    size: sectors * SECTOR,
    type: `0x${type.toString(16).padStart(2, "0")}`,
    name: "",
    partuuid: `${diskId}-${number.toString().padStart(2, "0")}`,
  });
  for (const e of entries) {
    if (EXTENDED.has(e.type)) parts.push(...logicalPartitions(read, e, mk));
    else parts.push(mk(e.slot, e.type, e.lbaStart, e.sectors));
  }
  return { scheme: "mbr", diskId, sectorSize: SECTOR, partitions: parts.sort((a, b) => a.number - b.number) };
}

/**
 * A GPT disk's MBR should hold only the protective 0xEE entry. A hybrid MBR also lists some
 * partitions (old boot firmware reads only the MBR): each must be exactly one of the GPT's, or
 * the firmware and mkoverlay would not see the same disk.
 */
function checkHybrid(entries: readonly MbrEntry[], gpt: DiskLayout): void {
  for (const e of entries) {
    if (e.type === 0xee) continue;
    const off = e.lbaStart * SECTOR;
    const size = e.sectors * SECTOR;
    if (!gpt.partitions.some((p) => p.offset === off && p.size === size)) {
      throw new Error(`the MBR's partition ${e.slot} (bytes ${off}–${off + size}) is not one of the GPT's partitions: the MBR and the GPT disagree`);
    }
  }
}

/** Logical partitions: a chain of EBRs, each with one partition and a link to the next. */
function logicalPartitions(read: ReadAt, ext: MbrEntry, mk: (n: number, t: number, lba: number, s: number) => Partition): Partition[] {
  const out: Partition[] = [];
  let ebr = ext.lbaStart;
  const seen = new Set<number>();
  // A loop in the chain would never end; real disks have a handful of logical partitions.
  while (out.length < 128 && !seen.has(ebr)) {
    seen.add(ebr);
    const s = read(ebr * SECTOR, SECTOR);
    if (!hasMbrSignature(s)) throw new Error(`extended partition ${ext.slot}: no EBR signature at sector ${ebr}`);
    const [first, link] = mbrEntries(s);
    if (first) out.push(mk(5 + out.length, first.type, ebr + first.lbaStart, first.sectors));
    if (!link || !EXTENDED.has(link.type)) break;
    ebr = ext.lbaStart + link.lbaStart;
  }
  return out;
}

interface GptHeader {
  diskGuid: string;
  entriesLba: number;
  numEntries: number;
  entrySize: number;
  entriesCrc: number;
  firstUsable: number;
  lastUsable: number;
}

function gptHeaderAt(read: ReadAt, lba: number, ss: number): GptHeader | string {
  const h = read(lba * ss, ss);
  if (h.length < 92 || h.toString("latin1", 0, 8) !== "EFI PART") return "no \"EFI PART\" signature";
  const size = h.readUInt32LE(12);
  if (size < 92 || size > ss) return `header size ${size} is invalid`;
  const copy = Buffer.from(h.subarray(0, size));
  const stored = copy.readUInt32LE(16);
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== stored) return "header CRC32 mismatch";
  const entrySize = h.readUInt32LE(84);
  const numEntries = h.readUInt32LE(80);
  if (entrySize < 128 || entrySize % 8 !== 0 || numEntries > 4096) return `entry array (${numEntries} × ${entrySize} bytes) is invalid`;
  return {
    diskGuid: guidString(h, 56),
    entriesLba: u64(h, 72),
    numEntries,
    entrySize,
    entriesCrc: h.readUInt32LE(88),
    firstUsable: u64(h, 40),
    lastUsable: u64(h, 48),
  };
}

/** The primary header at LBA 1, else the backup at the disk's last LBA (both CRC-checked). */
function parseGpt(read: ReadAt, diskSize: number, ss: number): DiskLayout | undefined {
  const primary = gptHeaderAt(read, 1, ss);
  if (primary === "no \"EFI PART\" signature" && ss !== SECTOR) return undefined;
  let hdr = primary;
  if (typeof hdr === "string") {
    const backup = gptHeaderAt(read, Math.floor(diskSize / ss) - 1, ss);
    if (typeof backup === "string") {
      if (primary === "no \"EFI PART\" signature" && ss === SECTOR) return undefined;
      throw new Error(`GPT: primary header: ${primary}; backup header: ${backup}`);
    }
    hdr = backup;
  }
  const arr = read(hdr.entriesLba * ss, hdr.numEntries * hdr.entrySize);
  if (arr.length !== hdr.numEntries * hdr.entrySize) throw new Error("GPT: the partition entry array lies beyond the end of the file");
  if (crc32(arr) !== hdr.entriesCrc) throw new Error("GPT: partition entry array CRC32 mismatch");
  const parts: Partition[] = [];
  for (let i = 0; i < hdr.numEntries; i++) {
    const at = i * hdr.entrySize;
    const type = guidString(arr, at);
    if (type === "00000000-0000-0000-0000-000000000000") continue;
    const first = u64(arr, at + 32);
    const last = u64(arr, at + 40);
    if (last < first) throw new Error(`GPT: partition ${i + 1} ends (LBA ${last}) before it starts (LBA ${first})`);
    // The header's usable area is itself data from the disk: the partition must also miss the
    // protective MBR, the header and the entry array the header points to.
    const arrFirst = hdr.entriesLba;
    const arrLast = hdr.entriesLba + Math.ceil((hdr.numEntries * hdr.entrySize) / ss) - 1;
    if (first < 2 || (first <= arrLast && last >= arrFirst)) {
      throw new Error(`GPT: partition ${i + 1} (LBA ${first}–${last}) lies over the partition table (LBA 0–1 and ${arrFirst}–${arrLast})`);
    }
    if (first < hdr.firstUsable || last > hdr.lastUsable) {
      throw new Error(`GPT: partition ${i + 1} (LBA ${first}–${last}) lies outside the usable area (LBA ${hdr.firstUsable}–${hdr.lastUsable})`);
    }
    parts.push({
      number: i + 1,
      offset: first * ss,
      size: (last - first + 1) * ss,
      type,
      name: arr.toString("utf16le", at + 56, at + 128).replace(/\0.*$/s, ""),
      partuuid: guidString(arr, at + 16),
    });
  }
  return { scheme: "gpt", diskId: hdr.diskGuid, sectorSize: ss, partitions: parts };
}

/** Opens the file or device and parses its table; the bytes past EOF read as nothing. */
export function readDiskLayout(path: string, fd?: number): { layout: DiskLayout | NotADiskImage; size: number } {
  const own = fd === undefined;
  const f = fd ?? openSync(path, "r");
  try {
    const size = diskSize(f, path);
    const read: ReadAt = (pos, len) => {
      if (pos >= size) return Buffer.alloc(0);
      const b = Buffer.alloc(Math.min(len, size - pos));
      let got = 0;
      while (got < b.length) {
        const n = readSync(f, b, got, b.length - got, pos + got);
        if (n === 0) break;
        got += n;
      }
      return b.subarray(0, got);
    };
    try {
      return { layout: parseDiskLayout(read, size), size };
    } catch (e) {
      if (e instanceof NotADiskImage) return { layout: e, size };
      throw new UserError(`${path}: ${(e as Error).message}`, { hint: "the partition table is damaged; check it with `sfdisk --verify`" });
    }
  } finally {
    if (own) closeSync(f);
  }
}

/** st_size for files; for block devices (size 0 in stat) the end found by seeking to it. */
export function diskSize(fd: number, path: string): number {
  const st = fstatSync(fd);
  if (st.isFile()) return st.size;
  if (st.isBlockDevice()) return blockDeviceSize(path);
  throw new UserError(`${path}: not a regular file or block device`);
}

function blockDeviceSize(path: string): number {
  // /sys/class/block/NAME/size counts 512-byte sectors whatever the device's sector size.
  const name = realpathSync(path).replace(/^\/dev\//, "");
  try {
    return Number(readFileSync(`/sys/class/block/${name}/size`, "utf8").trim()) * 512;
  } catch {
    throw new UserError(`${path}: cannot read its size from /sys/class/block/${name}/size`);
  }
}
