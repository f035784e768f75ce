/**
 * Writes a tree to a directory instead of an archive: `--format dir` (a fresh folder, e.g. an
 * image builder's files folder) or `--apply ROOT` (laid over a mounted root file system).
 * Every file and link is written under a temp name and renamed into place, owned by root:root
 * with the tree's mode. Existing directories of the target keep their modes and owners: the
 * overlay adds to an OS, it does not re-own it.
 */
import { randomBytes } from "node:crypto";
import { chmodSync, chownSync, existsSync, lchownSync, lstatSync, lutimesSync, mkdirSync, renameSync, rmSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { atPath, UserError } from "../errors.js";
import type { Tree } from "./tree.js";

const isRoot = (): boolean => process.getuid?.() === 0;

function tmpBeside(path: string): string {
  return join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`);
}

function layInto(tree: Tree, root: string, epoch: number): void {
  const owner = isRoot();
  const t = new Date(epoch * 1000);
  for (const e of tree.list()) {
    const target = join(root, e.path);
    if (e.type === "dir") {
      if (existsSync(target)) {
        if (!lstatSync(target).isDirectory()) throw new UserError(`${target}: exists and is not a directory`);
        continue;
      }
      mkdirSync(target, { mode: e.mode });
      chmodSync(target, e.mode);
      if (owner) chownSync(target, 0, 0);
    } else if (e.type === "file") {
      const tmp = tmpBeside(target);
      try {
        writeFileSync(tmp, e.content, { mode: e.mode, flag: "wx" });
        chmodSync(tmp, e.mode);
        if (owner) chownSync(tmp, 0, 0);
        utimesSync(tmp, t, t);
        renameSync(tmp, target);
      } catch (err) {
        // No .tmp debris on any failure (a full disk, a mount point in the way…).
        rmSync(tmp, { force: true });
        throw atPath(err, target);
      }
    } else {
      const tmp = tmpBeside(target);
      try {
        symlinkSync(e.target, tmp);
        if (owner) lchownSync(tmp, 0, 0);
        lutimesSync(tmp, t, t);
        renameSync(tmp, target);
      } catch (err) {
        rmSync(tmp, { force: true });
        throw atPath(err, target);
      }
    }
  }
}

export function writeTreeTo(tree: Tree, dir: string, opts: { epoch: number; replaceWhole: boolean }): void {
  if (!opts.replaceWhole) {
    if (!isRoot()) throw new UserError(`--apply ${dir}: must run as root to give the files to root:root`);
    if (!existsSync(dir) || !lstatSync(dir).isDirectory()) throw new UserError(`--apply ${dir}: not a directory (mount the image's root file system there)`);
    layInto(tree, dir, opts.epoch);
    return;
  }
  // A fresh folder built aside and renamed into place: never half a tree under the final name.
  const tmp = tmpBeside(dir);
  mkdirSync(tmp, { mode: 0o700 });
  try {
    layInto(tree, tmp, opts.epoch);
    // The top folder stands for the target root: / is 0755 root:root.
    chmodSync(tmp, 0o755);
    if (isRoot()) chownSync(tmp, 0, 0);
    if (existsSync(dir)) {
      const old = tmpBeside(dir);
      renameSync(dir, old);
      renameSync(tmp, dir);
      rmSync(old, { recursive: true, force: true });
    } else {
      renameSync(tmp, dir);
    }
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw atPath(e, dir);
  }
}
