/**
 * Is the target in use? debugfs's `?offset=` does no mount check, and writing a mounted file
 * system behind the kernel's back corrupts it. A block device counts as in use when it or one
 * of its partitions is mounted (/proc/self/mountinfo, by device number) or held by device
 * mapper/md (sysfs holders); an image file when a loop device is backed by it
 * (/sys/block/loop*\/loop/backing_file). Opening the device O_EXCL (device.ts) closes the race
 * with a mount that starts after this check.
 */
import { existsSync, readdirSync, readFileSync, realpathSync, statSync } from "node:fs";
import { join } from "node:path";
import { errnoCode, UserError } from "../util/errors.js";

function read(p: string): string | undefined {
  try {
    return readFileSync(p, "utf8").trim();
  } catch {
    return undefined;
  }
}

/** "8:16" style device numbers of a block device and its partitions, with their names. */
function deviceAndPartitions(majMin: string): Map<string, string> {
  const out = new Map<string, string>();
  const sys = `/sys/dev/block/${majMin}`;
  let dir: string;
  try {
    dir = realpathSync(sys);
  } catch {
    return out;
  }
  const name = dir.split("/").pop() ?? majMin;
  out.set(majMin, name);
  for (const sub of safeList(dir)) {
    const dev = existsSync(join(dir, sub, "partition")) ? read(join(dir, sub, "dev")) : undefined;
    if (dev) out.set(dev, sub);
  }
  return out;
}

function safeList(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/** Unescapes mountinfo's octal escapes (\040 for a blank). */
function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

export interface Mount {
  dev: string;
  mountPoint: string;
}

export function parseMountinfo(text: string): Mount[] {
  return text
    .split("\n")
    .filter(Boolean)
    .map((l) => {
      const f = l.split(" ");
      return { dev: f[2] ?? "", mountPoint: unescape(f[4] ?? "") };
    });
}

/** Loop devices backed by `file` (its real path), by name ("loop3"). */
function loopDevicesOf(file: string): string[] {
  const real = realpathSync(file);
  return safeList("/sys/block")
    .filter((n) => n.startsWith("loop"))
    .filter((n) => read(`/sys/block/${n}/loop/backing_file`)?.replace(/ \(deleted\)$/, "") === real);
}

/**
 * Throws UserError (exit 2) if `target` (image file or block device) is mounted or attached.
 * `mountinfo` is injectable for tests.
 */
export function checkNotInUse(target: string, mountinfo = read("/proc/self/mountinfo") ?? ""): void {
  let st;
  try {
    st = statSync(target);
  } catch (e) {
    throw new UserError(`${target}: ${errnoCode(e) === "ENOENT" ? "no such file or device" : (e as Error).message}`);
  }
  if (!st.isBlockDevice() && !st.isFile()) throw new UserError(`${target}: not an image file or a block device`);
  const devs = new Map<string, string>();
  if (st.isBlockDevice()) {
    const major = Math.floor(st.rdev / 256) & 0xfff;
    const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00);
    for (const [k, v] of deviceAndPartitions(`${major}:${minor}`)) devs.set(k, v);
  }
  // A loop device over the file or device (losetup, `mount -o loop,offset=…`) reaches it too.
  const loops = loopDevicesOf(target);
  for (const l of loops) {
    const dev = read(`/sys/block/${l}/dev`);
    if (dev) for (const [k, v] of deviceAndPartitions(dev)) devs.set(k, v);
  }
  const own = stationDiskMount(devs, mountinfo);
  if (own) throw new UserError(`${target}: the station's own disk (${own.mountPoint} is on it, through /dev/${devs.get(own.dev)})`, { hint: "name the card: `lsblk -o NAME,SIZE,MODEL,TRAN,MOUNTPOINTS` lists the disks; a card reader is usually usb or mmc" });
  const mounted = parseMountinfo(mountinfo).find((m) => devs.has(m.dev));
  if (mounted) throw inUse(target, `mounted at ${mounted.mountPoint} (through /dev/${devs.get(mounted.dev)})`);
  if (loops.length) throw inUse(target, `attached to /dev/${loops.join(", /dev/")}`, `detach it first: losetup -d /dev/${loops[0]}`);
  for (const [dev, name] of devs) {
    const holders = safeList(`/sys/dev/block/${dev}/holders`);
    if (holders.length) throw inUse(target, `/dev/${name} is held by ${holders.join(", ")} (device mapper, RAID or LVM)`);
  }
}

function inUse(target: string, why: string, hint = "unmount it first (umount), and make sure nothing else is using it"): UserError {
  return new UserError(`${target}: in use: ${why}`, { hint });
}

/** Where the station itself lives: a disk under one of these is never a card. */
const SYSTEM_MOUNTS = new Set(["/", "/boot", "/boot/efi", "/boot/firmware", "/usr", "/var", "/home"]);

/** Block devices under `majMin` through device mapper, RAID or LVM (sysfs `slaves`), and itself. */
function underlying(majMin: string, seen = new Set<string>()): Set<string> {
  if (seen.has(majMin)) return seen;
  seen.add(majMin);
  for (const s of safeList(`/sys/dev/block/${majMin}/slaves`)) {
    const dev = read(`/sys/class/block/${s}/dev`);
    if (dev) underlying(dev, seen);
  }
  return seen;
}

/** The mount of the station's own system (/, /usr, …) that lies on one of `devs`, if any. */
function stationDiskMount(devs: ReadonlyMap<string, string>, mountinfo: string): Mount | undefined {
  return parseMountinfo(mountinfo)
    .filter((m) => SYSTEM_MOUNTS.has(m.mountPoint))
    .find((m) => [...underlying(m.dev)].some((d) => devs.has(d)));
}

/** The whole disk a partition belongs to ("sdb" for sdb1), or undefined for a whole disk. */
export function wholeDiskOf(majMin: string): string | undefined {
  let dir: string;
  try {
    dir = realpathSync(`/sys/dev/block/${majMin}`);
  } catch {
    return undefined;
  }
  if (!existsSync(join(dir, "partition"))) return undefined;
  return dir.split("/").slice(-2, -1)[0];
}

/** "8:17" of a block device's st_rdev. */
export function majMinOf(rdev: number): string {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
  return `${major}:${minor}`;
}
