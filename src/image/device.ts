/**
 * Writing a card (`write --device /dev/sdX [--base BASE.img]`): the device is opened O_EXCL
 * and kept open to the end, so the kernel refuses a mount (or another exclusive writer) while we
 * work; its mounts are checked first for a clear message. With a base, only the base's data
 * ranges are written (what its bmap would map), then the overlay is laid with debugfs on the
 * device at the root partition's offset, and read back.
 */
import { closeSync, constants, fstatSync, fsyncSync, lstatSync, openSync, readSync, realpathSync, statSync, writeSync } from "node:fs";
import { errnoCode, UserError } from "../util/errors.js";
import type { Entry } from "../overlay/tree.js";
import { checkNotInUse, majMinOf, wholeDiskOf } from "./busy.js";
import { BLOCK, dataRanges } from "./extents.js";
import { layTree, preflight, type LayResult } from "./lay.js";
import { diskSize } from "./partitions.js";
import { findRoot, type RootFs } from "./root.js";

/**
 * What `--device` names, checked before anything else: a symbolic link (/dev/disk/by-id/…) is
 * followed to the real device, which every later step and message uses; it must be a block
 * device and a whole disk (a card's table and its root partition's offset are those of the
 * disk: laying a base on a partition would put a partition table inside a partition).
 */
export function resolveDevice(device: string): string {
  let real: string;
  try {
    real = realpathSync(device);
  } catch (e) {
    const code = errnoCode(e);
    throw new UserError(`--device ${device}: ${code === "ENOENT" ? "no such device" : (e as Error).message}`, code === "ENOENT" && lstatOk(device) ? { hint: "it is a symbolic link to nothing" } : {});
  }
  const via = real === device ? "" : ` (a symbolic link to ${real})`;
  const st = statSync(real);
  if (!st.isBlockDevice()) throw new UserError(`--device ${device}${via}: not a block device`, { hint: "for an image file use --image" });
  const disk = wholeDiskOf(majMinOf(st.rdev));
  if (disk) throw new UserError(`--device ${device}${via}: a partition, not a whole disk`, { hint: `give the whole disk: --device /dev/${disk}` });
  return real;
}

function lstatOk(p: string): boolean {
  try {
    lstatSync(p);
    return true;
  } catch {
    return false;
  }
}

/** O_EXCL on a block device: EBUSY when mounted, or opened exclusively by someone else. */
export function openExclusive(device: string): number {
  try {
    const fd = openSync(device, constants.O_RDWR | constants.O_EXCL);
    if (!fstatSync(fd).isBlockDevice()) {
      closeSync(fd);
      throw new UserError(`--device ${device}: not a block device`, { hint: "for an image file use --image" });
    }
    return fd;
  } catch (e) {
    if (e instanceof UserError) throw e;
    const code = errnoCode(e);
    if (code === "EBUSY") throw new UserError(`--device ${device}: in use (mounted, or opened exclusively by another program)`, { hint: "unmount all its partitions first" });
    if (code === "EACCES" || code === "EPERM") throw new UserError(`--device ${device}: permission denied`, { hint: "add yourself to group `disk` (then log in again), or run as root" });
    if (code === "ENOENT") throw new UserError(`--device ${device}: no such device`);
    throw new UserError(`--device ${device}: ${(e as Error).message}`);
  }
}

/** Copies the data ranges of `base` to the device at the same offsets; returns bytes written. */
async function writeBase(base: string, fd: number, device: string): Promise<number> {
  const src = openSync(base, "r");
  try {
    const size = fstatSync(src).size;
    const room = diskSize(fd, device);
    if (size > room) throw new UserError(`--base ${base}: ${size} bytes does not fit on ${device} (${room} bytes)`);
    const buf = Buffer.allocUnsafe(8 << 20);
    let written = 0;
    for (const [a, b] of await dataRanges(base, size)) {
      let pos = a * BLOCK;
      const end = Math.min((b + 1) * BLOCK, size);
      while (pos < end) {
        const n = readSync(src, buf, 0, Math.min(buf.length, end - pos), pos);
        if (n === 0) break;
        let off = 0;
        while (off < n) off += writeSync(fd, buf, off, n - off, pos + off);
        pos += n;
        written += n;
      }
    }
    fsyncSync(fd);
    return written;
  } finally {
    closeSync(src);
  }
}

export interface DeviceResult extends LayResult {
  baseBytes: number;
  /** The device written: `--device` with symbolic links followed. */
  device: string;
}

/**
 * `check` runs on the root the overlay will be laid over (the base's, or the card's when there
 * is no base) before anything is written: the identity rule (identity.ts).
 */
export async function writeDevice(options: { device: string; base?: string; entries: readonly Entry[]; epoch: number; rootPartition?: number; check?: (root: RootFs) => Promise<void> }): Promise<DeviceResult> {
  const opts = { ...options, device: resolveDevice(options.device) };
  // The base is checked before the card is touched: a bad base must not cost the card.
  if (opts.base) {
    const baseRoot = findRoot(opts.base, rootOpt(opts.rootPartition));
    preflight(baseRoot, opts.entries);
    await opts.check?.(baseRoot);
  }
  checkNotInUse(opts.device);
  const fd = openExclusive(opts.device);
  try {
    // Without a base the card must already hold one: find its root before writing anything.
    if (!opts.base) {
      const cardRoot = findRoot(opts.device, rootOpt(opts.rootPartition));
      preflight(cardRoot, opts.entries);
      await opts.check?.(cardRoot);
    }
    let baseBytes = 0;
    if (opts.base) {
      try {
        baseBytes = await writeBase(opts.base, fd, opts.device);
      } catch (e) {
        if (e instanceof UserError) throw e;
        // The card is half-written now: a failed write, not a refusal (exit 1).
        throw new UserError(`--device ${opts.device}: writing the base failed: ${(e as Error).message}`, { exitCode: 1, hint: "the card may be failing; try another one, then write again" });
      }
    }
    const root = findRoot(opts.device, rootOpt(opts.rootPartition));
    const laid = await layTree(root, opts.entries, opts.epoch);
    return { ...laid, baseBytes, device: opts.device };
  } finally {
    closeSync(fd);
  }
}

function rootOpt(n: number | undefined): { rootPartition?: number } {
  return n === undefined ? {} : { rootPartition: n };
}
