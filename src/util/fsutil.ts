/**
 * Atomic file output, the one way mkoverlay writes a file: a temp file beside the target (same
 * file system) created with its final mode, data written and (by default) synced, renamed over
 * the target, the directory synced. A killed process leaves at most a `.tmp` file, never a
 * truncated file under the final name; a failure removes its temp file.
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, readSync, fchmodSync, fchownSync, fsyncSync, futimesSync, mkdirSync, openSync, renameSync, rmdirSync, statSync, unlinkSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { atPath, errnoCode, ioUserError, UserError } from "./errors.js";

export function tempNameFor(target: string): string {
  return join(dirname(target), `.${basename(target)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`);
}

/** Syncs a directory (its new names); a file system that refuses is not an error. */
export function fsyncDir(dir: string): void {
  try {
    const fd = openSync(dir, "r");
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    // Some file systems refuse fsync on a directory; the rename itself is still atomic.
  }
}

/** Up to `len` bytes at `pos` (fewer at the end of the file). */
export function readAt(fd: number, pos: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  let got = 0;
  while (got < len) {
    const n = readSync(fd, b, got, len - got, pos + got);
    if (n === 0) break;
    got += n;
  }
  return b.subarray(0, got);
}

function unlinkQuietly(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}

/** An error from writing `path`: the user's problem when it is one (errors.ts), naming `path`. */
export function pathError(e: unknown, path: string): unknown {
  return ioUserError(atPath(e, path)) ?? e;
}

export interface WriteOptions {
  mode: number;
  owner?: { uid: number; gid: number };
  /** false: not synced on its own (a later syncfs or the caller's directory sync covers it). */
  durable?: boolean;
  mtime?: Date;
  /** The path errors name (default: the target). */
  reportAs?: string;
}

function writeTemp(target: string, data: Buffer | string, o: WriteOptions): { tmp: string; fd: number } {
  const tmp = tempNameFor(target);
  return { tmp, fd: createFile(tmp, data, o) };
}

/**
 * Creates `path`, which must not exist (a temp name, or a name in a folder still under its own
 * temp name), with its final mode, owner and mtime, and writes `data`; returns the open fd (not
 * synced: the caller syncs and closes it). A failure removes it.
 */
export function createFile(path: string, data: Buffer | string, o: Omit<WriteOptions, "durable" | "reportAs">): number {
  // Created with its final mode: a private key is never readable by others, even briefly.
  const fd = openSync(path, "wx", o.mode);
  try {
    fchmodSync(fd, o.mode);
    if (o.owner) fchownSync(fd, o.owner.uid, o.owner.gid);
    const buf = typeof data === "string" ? Buffer.from(data) : data;
    let off = 0;
    while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
    if (o.mtime) futimesSync(fd, o.mtime, o.mtime);
    return fd;
  } catch (e) {
    closeSync(fd);
    unlinkQuietly(path);
    throw e;
  }
}

export function writeFileAtomic(target: string, data: Buffer | string, o: WriteOptions): void {
  let w: { tmp: string; fd: number } | undefined;
  try {
    w = writeTemp(target, data, o);
    if (o.durable !== false) fsyncSync(w.fd);
    closeSync(w.fd);
    w.fd = -1;
    renameSync(w.tmp, target);
  } catch (e) {
    if (w) {
      if (w.fd >= 0) closeSync(w.fd);
      unlinkQuietly(w.tmp);
    }
    // write(2) names no file and open(2) names the temp: report the file the user asked for.
    throw pathError(e, o.reportAs ?? target);
  }
  if (o.durable !== false) fsyncDir(dirname(target));
}

/**
 * Makes the data of many just-written files durable. One syncfs(2) of their file system
 * (coreutils `sync -f`, as Node has no binding) costs one journal commit instead of one
 * fsync per file — about a millisecond per file on the factory's disks. Falls back to fsync
 * per file when `sync -f` is not there or fails. syncfs also flushes whatever else is dirty on
 * that file system: a station that stages large images beside its output can set
 * MKOVERLAY_SYNCFS=0 to sync file by file instead.
 */
export function syncAll(fds: number[], anyPathOnFs: string): void {
  if (process.env.MKOVERLAY_SYNCFS !== "0" && fds.length > 4 && spawnSync("sync", ["-f", anyPathOnFs], { stdio: "ignore" }).status === 0) return;
  for (const fd of fds) fsyncSync(fd);
}

export interface PendingFile {
  target: string;
  data: Buffer | string;
  mode: number;
  /** false: a convenience copy the registry can re-make; renamed with the others, not synced. */
  durable?: boolean;
}

/**
 * Groups of files (one group per device) written under temp names and synced together (one
 * journal commit for a whole batch chunk), then renamed group by group: a group that cannot
 * take its final names fails alone, and whatever of it was already renamed is removed again.
 * Every temp file not renamed is removed by `discardRest()`, whatever happened; `finish()`
 * syncs the directories once.
 */
export class StagedGroups {
  private readonly temps: ({ tmp: string; target: string }[] | undefined)[];
  /** Directories that got a new name, synced once each by finish(). */
  private readonly dirs = new Set<string>();

  constructor(groups: PendingFile[][]) {
    const temps: { tmp: string; target: string }[][] = [];
    const fds: number[] = [];
    const durable: number[] = [];
    try {
      for (const g of groups) {
        const group: { tmp: string; target: string }[] = [];
        temps.push(group);
        for (const f of g) {
          let w;
          try {
            w = writeTemp(f.target, f.data, { mode: f.mode, durable: false });
          } catch (e) {
            throw pathError(e, f.target);
          }
          fds.push(w.fd);
          if (f.durable !== false) durable.push(w.fd);
          group.push({ tmp: w.tmp, target: f.target });
        }
      }
      syncAll(durable, dirname(groups[0]?.[0]?.target ?? "."));
    } catch (e) {
      for (const fd of fds) closeSync(fd);
      for (const t of temps.flat()) unlinkQuietly(t.tmp);
      throw pathError(e, dirname(groups[0]?.[0]?.target ?? "."));
    }
    for (const fd of fds) closeSync(fd);
    this.temps = temps;
  }

  /** Renames group `i` into place; on failure undoes it and returns the error. */
  commit(i: number): unknown {
    const group = this.temps[i];
    if (!group) return undefined;
    this.temps[i] = undefined;
    const done: string[] = [];
    try {
      for (const t of group) {
        renameSync(t.tmp, t.target);
        done.push(t.target);
        this.dirs.add(dirname(t.target));
      }
      return undefined;
    } catch (e) {
      for (const t of group) unlinkQuietly(t.tmp);
      for (const target of done) unlinkQuietly(target);
      return pathError(e, group[done.length]?.target ?? "");
    }
  }

  /** Makes the renames durable: each directory synced once, however many groups went in. */
  finish(): void {
    for (const dir of this.dirs) fsyncDir(dir);
    this.dirs.clear();
  }

  /** Drops group `i` without renaming anything. */
  discard(i: number): void {
    for (const t of this.temps[i] ?? []) unlinkQuietly(t.tmp);
    this.temps[i] = undefined;
  }

  discardRest(): void {
    for (let i = 0; i < this.temps.length; i++) this.discard(i);
  }
}

/** Removes files a failed device had already put under their final names. */
export function removeFiles(paths: string[]): void {
  for (const p of paths) unlinkQuietly(p);
}

/**
 * Makes sure `dir` is a usable output directory, creating it 0700 (it will hold private
 * keys). Checked before anything is reserved, so a bad --out costs nothing.
 */
export function prepareOutDir(dir: string, flag = "--out"): { created: boolean } {
  let created = false;
  try {
    const st = statSync(dir);
    if (!st.isDirectory()) throw new UserError(`${flag} ${dir}: exists and is not a directory`, { hint: "name a directory (it is created if missing)" });
  } catch (e) {
    if (e instanceof UserError) throw e;
    if (errnoCode(e) !== "ENOENT") throw new UserError(`${flag} ${dir}: ${(e as Error).message}`);
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      created = true;
    } catch (e2) {
      throw new UserError(`${flag} ${dir}: cannot create it (${errnoCode(e2) ?? (e2 as Error).message})`);
    }
  }
  // Probe writability now rather than after a port is reserved.
  const probe = tempNameFor(join(dir, "probe"));
  try {
    closeSync(openSync(probe, "wx", 0o600));
    unlinkSync(probe);
  } catch (e) {
    throw new UserError(`${flag} ${dir}: not writable (${errnoCode(e) ?? (e as Error).message})`);
  }
  return { created };
}

/** Undoes prepareOutDir when the build failed: a folder we made and left empty goes away. */
export function removeIfEmpty(dir: string): void {
  try {
    rmdirSync(dir);
  } catch {
    // not empty, or not ours to remove
  }
}
