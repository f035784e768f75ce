/**
 * Finds the root file system of a disk image or card: `--root-partition N`, else the partition
 * typed and labelled as a root (GPT root type, or Linux type with name/label `rootfs`/`root`, as
 * pi-gen and most board images do), else the last Linux partition holding ext2/3/4.
 *
 * A file that is itself an ext2/3/4 file system (no partition table) is accepted as a
 * partition-less image at offset 0: the boot harness and image builders (genimage, `mke2fs -d`)
 * produce those, and refusing them would buy nothing. Anything else is "not a disk image".
 */
import { closeSync, openSync } from "node:fs";
import { errnoCode, UserError } from "../util/errors.js";
import { isLinuxType, isRootType, NotADiskImage, readDiskLayout, type DiskLayout, type Partition } from "./partitions.js";
import { parseSuperblock, SUPERBLOCK_OFFSET, type Superblock } from "./superblock.js";
import { readAt } from "../util/fsutil.js";

export interface RootFs {
  /** The image file or block device. */
  path: string;
  layout: DiskLayout;
  /** undefined for a partition-less image. */
  partition: Partition | undefined;
  /** Byte offset of the file system: what e2fsprogs gets as `?offset=`. */
  offset: number;
  size: number;
  /** undefined when the chosen partition holds no ext* (checkWritable then says so). */
  sb: Superblock | undefined;
  /** "disk.img partition 2" or "disk.img": how messages name it. */
  where: string;
}

const ROOT_NAMES = new Set(["rootfs", "root"]);


/** `e2fsprogs` spelling of a file system inside a disk: `IMG?offset=BYTES`. */
export function e2Spec(root: Pick<RootFs, "path" | "offset">): string {
  return root.offset === 0 ? root.path : `${root.path}?offset=${root.offset}`;
}

export function findRoot(path: string, opts: { rootPartition?: number } = {}): RootFs {
  // e2fsprogs reads everything after a "?" as io options (that is how `?offset=` works).
  if (path.includes("?")) throw new UserError(`${path}: e2fsprogs cannot open a path with a "?" in it`, { hint: "rename the file, or give a symbolic link to it without one" });
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (e) {
    const code = errnoCode(e);
    throw new UserError(`${path}: ${code === "ENOENT" ? "no such file" : code === "EACCES" ? "permission denied" : (e as Error).message}`, {
      hint: code === "EACCES" ? "a card needs membership of group `disk`; an image file must be readable by you" : undefined,
    });
  }
  try {
    const { layout, size } = readDiskLayout(path, fd);
    const sbAt = (offset: number): Superblock | undefined => parseSuperblock(readAt(fd, offset + SUPERBLOCK_OFFSET, 1024));
    if (layout instanceof NotADiskImage) {
      const sb = sbAt(0);
      if (sb && opts.rootPartition === undefined) {
        checkFits(sb, path, "the file", size);
        return { path, layout: { scheme: "none", diskId: "", sectorSize: 512, partitions: [] }, partition: undefined, offset: 0, size, sb, where: path };
      }
      throw new UserError(`${path}: not a disk image (${layout.message})`, {
        hint: sb ? "it is a bare ext file system: drop --root-partition" : "give a whole-disk image (MBR or GPT), such as a Raspberry Pi OS .img",
      });
    }
    for (const p of layout.partitions) {
      if (p.offset + p.size > size) {
        throw new UserError(`${path}: partition ${p.number} ends at byte ${p.offset + p.size}, beyond the end of the ${size}-byte ${layout.scheme === "gpt" ? "GPT" : "MBR"} disk`, {
          hint: "the image is truncated, or was cut short while downloading or decompressing",
        });
      }
    }
    checkOverlaps(path, layout);
    const part = choose(path, layout, sbAt, opts.rootPartition);
    const where = `${path} partition ${part.number}`;
    const sb = sbAt(part.offset);
    checkFits(sb, where, `partition ${part.number}`, part.size);
    return { path, layout, partition: part, offset: part.offset, size: part.size, sb, where };
  } finally {
    closeSync(fd);
  }
}

function choose(path: string, layout: DiskLayout, sbAt: (o: number) => Superblock | undefined, wanted?: number): Partition {
  const parts = layout.partitions;
  const list = parts.map((p) => `${p.number} (${p.type}${p.name ? ` "${p.name}"` : ""})`).join(", ");
  if (wanted !== undefined) {
    const p = parts.find((x) => x.number === wanted);
    if (!p) throw new UserError(`--root-partition ${wanted}: ${path} has no partition ${wanted}`, { hint: `its partitions: ${list || "none"}` });
    return p;
  }
  const linux = parts.filter(isLinuxType);
  const labelled = linux.filter((p) => {
    if (isRootType(p)) return true;
    const label = p.name || sbAt(p.offset)?.label || "";
    return ROOT_NAMES.has(label.toLowerCase());
  });
  if (labelled.length === 1) return labelled[0]!;
  if (labelled.length > 1) {
    throw new UserError(`${path}: more than one root partition (${labelled.map((p) => p.number).join(", ")})`, { hint: "choose one with --root-partition N" });
  }
  const withExt = linux.filter((p) => sbAt(p.offset) !== undefined);
  const last = withExt[withExt.length - 1];
  if (last) return last;
  throw new UserError(`${path}: no Linux partition holding an ext2/3/4 file system`, { hint: `its partitions: ${list || "none"}; choose one with --root-partition N` });
}

/**
 * Two partitions that share bytes: writing one writes the other (the overlay, private key
 * included, would land in both). Real tables never overlap; sfdisk refuses to make one that does.
 */
function checkOverlaps(path: string, layout: DiskLayout): void {
  const parts = [...layout.partitions].sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < parts.length; i++) {
    const a = parts[i - 1]!;
    const b = parts[i]!;
    if (a.offset + a.size > b.offset) {
      throw new UserError(`${path}: partitions ${a.number} (bytes ${a.offset}–${a.offset + a.size}) and ${b.number} (from byte ${b.offset}) overlap`, {
        hint: "the partition table is damaged; check it with `sfdisk --verify`",
      });
    }
  }
}

/**
 * A file system that says it is larger than the partition holding it: e2fsprogs believes the
 * superblock, so debugfs would allocate (and write the overlay into) blocks of the next
 * partition, or past the end of the disk. Refused for reading and writing alike.
 */
function checkFits(sb: Superblock | undefined, where: string, what: string, room: number): void {
  if (!sb || sb.blockSize === 0) return; // checkWritable names these
  const claims = sb.blocksCount * sb.blockSize;
  if (claims > room) {
    throw new UserError(`${where}: the ext file system claims ${claims} bytes (${sb.blocksCount} blocks of ${sb.blockSize}), more than the ${room} bytes of ${what}`, {
      hint: "the partition table or the file system is wrong: grow the partition, or shrink the file system to fit it (resize2fs)",
    });
  }
}
