/**
 * Atomic file output: write a temp file beside the target (same file system), fsync, rename,
 * fsync the directory. A killed process leaves at most a `.tmp` file, never a truncated
 * file under the final name.
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, fchmodSync, fchownSync, fsyncSync, mkdirSync, rmdirSync, openSync, renameSync, statSync, unlinkSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { atPath, errnoCode, UserError } from "./errors.js";

export function tempNameFor(target: string): string {
  return join(dirname(target), `.${basename(target)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`);
}

function fsyncDir(dir: string): void {
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

export function writeFileAtomic(
  target: string,
  data: Buffer | string,
  mode: number,
  owner?: { uid: number; gid: number },
  opts: { durable: boolean } = { durable: true },
): void {
  try {
    writeAtomic(target, data, mode, owner, opts);
  } catch (e) {
    // write(2) names no file and open(2) names the temp: report the file the user asked for.
    throw atPath(e, target);
  }
}

function writeAtomic(target: string, data: Buffer | string, mode: number, owner: { uid: number; gid: number } | undefined, opts: { durable: boolean }): void {
  const tmp = tempNameFor(target);
  // Created with its final mode: a private key is never readable by others, even briefly.
  const fd = openSync(tmp, "wx", mode);
  try {
    fchmodSync(fd, mode);
    if (owner) fchownSync(fd, owner.uid, owner.gid);
    const buf = typeof data === "string" ? Buffer.from(data) : data;
    let off = 0;
    while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
    if (opts.durable) fsyncSync(fd);
  } catch (e) {
    closeSync(fd);
    unlinkSync(tmp);
    throw e;
  }
  closeSync(fd);
  try {
    renameSync(tmp, target);
  } catch (e) {
    unlinkSync(tmp);
    throw e;
  }
  if (opts.durable) fsyncDir(dirname(target));
}

/**
 * Makes the data of many just-written files durable. One syncfs(2) of their file system
 * (coreutils `sync -f`, as Node has no binding) costs one journal commit instead of one
 * fsync per file — about a millisecond per file on the factory's disks. Falls back to fsync
 * per file when `sync -f` is not there or fails. syncfs also flushes whatever else is dirty on
 * that file system: a station that stages large images beside its output can set
 * MKOVERLAY_SYNCFS=0 to sync file by file instead.
 */
function syncAll(fds: number[], anyPathOnFs: string): void {
  if (process.env.MKOVERLAY_SYNCFS !== "0" && fds.length > 4 && spawnSync("sync", ["-f", anyPathOnFs], { stdio: "ignore" }).status === 0) return;
  for (const fd of fds) fsyncSync(fd);
}

export interface PendingFile {
  target: string;
  data: Buffer | string;
  mode: number;
}

/**
 * Many files at once (a batch): all written under temp names, then synced, then renamed, then
 * each directory synced once. The same guarantee as writeFileAtomic — a final name only ever
 * holds complete, synced data — for one journal commit instead of one per file.
 */
export function writeFilesAtomic(files: PendingFile[]): void {
  const written: { tmp: string; target: string; fd: number }[] = [];
  try {
    for (const f of files) {
      const tmp = tempNameFor(f.target);
      const fd = openSync(tmp, "wx", f.mode);
      written.push({ tmp, target: f.target, fd });
      fchmodSync(fd, f.mode);
      const buf = typeof f.data === "string" ? Buffer.from(f.data) : f.data;
      let off = 0;
      while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
    }
    syncAll(written.map((w) => w.fd), dirname(files[0]?.target ?? "."));
  } catch (e) {
    for (const w of written) {
      closeSync(w.fd);
      unlinkSync(w.tmp);
    }
    throw e;
  }
  for (const w of written) {
    closeSync(w.fd);
    renameSync(w.tmp, w.target);
  }
  for (const dir of new Set(written.map((w) => dirname(w.target)))) fsyncDir(dir);
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
