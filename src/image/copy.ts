/**
 * The base image copied to a new private file: a reflink clone where the file system has them
 * (XFS reflink=1, btrfs: O(1), a few milliseconds whatever the size), else a sparse copy.
 *
 * The sparse copy is coreutils' `cp --sparse=always`: it keeps holes and turns runs of zeros
 * into holes too, so a 2.5 GiB base with 1.5 GB of data costs 1.5 GB. An in-process copy of the
 * data ranges (FIEMAP ranges, 8 MiB reads and writes) measured 4.0–9.4 s against cp's 1.4–6.6 s
 * on that base here: Node has no SEEK_DATA/copy_file_range binding, and cp needs none of ours.
 *
 * Written 0600 under a temp name in the output directory (the image will hold a private key),
 * renamed by the caller once the image is complete; removed on failure.
 */
import { chmodSync, constants, copyFileSync, rmSync } from "node:fs";
import { errnoCode, UserError } from "../util/errors.js";
import { findTool, runTool } from "./debugfs.js";

export type CopyMethod = "reflink" | "sparse-copy";

/** Copies `src` to `dst` (which must not exist). Returns how. */
export async function copyImage(src: string, dst: string): Promise<CopyMethod> {
  try {
    copyFileSync(src, dst, constants.COPYFILE_FICLONE_FORCE | constants.COPYFILE_EXCL);
    chmodSync(dst, 0o600);
    return "reflink";
  } catch (e) {
    const code = errnoCode(e);
    if (code === "EEXIST") throw new UserError(`${dst}: already exists`);
    if (code === "ENOENT") throw new UserError(`${src}: no such file`);
    if (code === "EACCES") throw new UserError(`${src}: permission denied`);
    // EXDEV (other file system), EOPNOTSUPP/ENOTSUP/EINVAL/ENOSYS (no reflinks here): copy.
    rmSync(dst, { force: true });
  }
  const cp = findTool("cp", "coreutils");
  // umask 077 for cp alone: the copy is created 0600, never readable by others, not even
  // before the key is in it. (Pre-creating the file 0600 instead made cp 0.2–0.4 s slower on
  // the 2.5 GiB base: it then treats the destination as an existing file.) spawn forks before
  // runTool returns, so the process's umask is restored at once.
  const oldMask = process.umask(0o077);
  let running: ReturnType<typeof runTool>;
  try {
    // --reflink=auto, not never: it also lets cp use copy_file_range (an in-kernel copy) for
    // the data; `never` forces read/write through user space, 3x slower here (7.0 s vs 2.3 s).
    running = runTool(cp, ["--sparse=always", "--reflink=auto", "--", src, dst]);
  } finally {
    process.umask(oldMask);
  }
  const r = await running;
  if (r.code !== 0) {
    rmSync(dst, { force: true });
    const msg = r.signal ? `cp was stopped by ${r.signal}` : r.stderr.trim().split("\n")[0] || `cp exited ${r.code}`;
    throw new UserError(`copying ${src} to ${dst} failed: ${msg}`, { hint: /No space/.test(msg) ? "the output directory needs room for the base image's data" : undefined });
  }
  chmodSync(dst, 0o600);
  return "sparse-copy";
}
