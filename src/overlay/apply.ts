/**
 * Writes a tree to a directory instead of an archive: `--format dir` (a fresh folder, e.g. an
 * image builder's files folder) or `--apply ROOT` (laid over a mounted root file system).
 * Files and links are owned by root:root with the tree's mode. A fresh folder is built under a
 * temp name, synced and renamed into place; over a root, every file and link is written under
 * a temp name and renamed. A failure leaves no temp file behind. Existing directories of the
 * target keep their modes and owners: the overlay adds to an OS, it does not re-own it.
 */
import { chmodSync, chownSync, closeSync, existsSync, lchownSync, lstatSync, lutimesSync, mkdirSync, renameSync, rmSync, symlinkSync, unlinkSync } from "node:fs";
import { dirname, join } from "node:path";
import { UserError } from "../util/errors.js";
import { createFile, fsyncDir, pathError, syncAll, tempNameFor, writeFileAtomic } from "../util/fsutil.js";
import type { Tree } from "./tree.js";

const isRoot = (): boolean => process.getuid?.() === 0;

/**
 * `fresh`: `root` is a new folder under a temp name, so entries are created in place, not each
 * under a temp name of its own; the files' fds are left open in `fresh` for the caller to sync.
 * Otherwise (`--apply`) each file is written atomically and synced. `reportAs`: the path errors
 * name (a folder built under a temp name is named by its final name).
 */
function layInto(tree: Tree, root: string, epoch: number, fresh: number[] | undefined, reportAs?: string): void {
  const owner = isRoot() ? { uid: 0, gid: 0 } : undefined;
  const t = new Date(epoch * 1000);
  for (const e of tree.list()) {
    const target = join(root, e.path);
    try {
      if (e.type === "dir") {
        if (existsSync(target)) {
          if (!lstatSync(target).isDirectory()) throw new UserError(`${target}: exists and is not a directory`, { hint: "remove it, or lay the overlay over a clean root" });
          continue;
        }
        mkdirSync(target, { mode: e.mode });
        chmodSync(target, e.mode);
        if (owner) chownSync(target, 0, 0);
      } else if (e.type === "file") {
        if (fresh) fresh.push(createFile(target, e.content, { mode: e.mode, owner, mtime: t }));
        else writeFileAtomic(target, e.content, { mode: e.mode, owner, mtime: t, reportAs: reportAs ?? target });
      } else if (fresh) {
        symlinkSync(e.target, target);
        if (owner) lchownSync(target, 0, 0);
        lutimesSync(target, t, t);
      } else {
        const tmp = tempNameFor(target);
        try {
          symlinkSync(e.target, tmp);
          if (owner) lchownSync(tmp, 0, 0);
          lutimesSync(tmp, t, t);
          renameSync(tmp, target);
        } catch (err) {
          try {
            unlinkSync(tmp);
          } catch {
            // never created
          }
          throw err;
        }
      }
    } catch (err) {
      throw pathError(err, reportAs ?? target);
    }
  }
}

export function writeTreeTo(tree: Tree, dir: string, opts: { epoch: number; replaceWhole: boolean }): void {
  if (!opts.replaceWhole) {
    if (!isRoot()) throw new UserError(`--apply ${dir}: must run as root to give the files to root:root`);
    if (!existsSync(dir) || !lstatSync(dir).isDirectory()) throw new UserError(`--apply ${dir}: not a directory (mount the image's root file system there)`);
    layInto(tree, dir, opts.epoch, undefined);
    return;
  }
  // A fresh folder built aside, synced, and renamed into place: never half a tree under the
  // final name, and a device counts as built only once its folder would survive a power cut.
  const tmp = tempNameFor(dir);
  mkdirSync(tmp, { mode: 0o700 });
  const fds: number[] = [];
  try {
    layInto(tree, tmp, opts.epoch, fds, dir);
    // The top folder stands for the target root: / is 0755 root:root.
    chmodSync(tmp, 0o755);
    if (isRoot()) chownSync(tmp, 0, 0);
    syncAll(fds, tmp);
    for (const e of tree.list()) if (e.type === "dir") fsyncDir(join(tmp, e.path));
    fsyncDir(tmp);
    if (existsSync(dir)) {
      const old = tempNameFor(dir);
      renameSync(dir, old);
      renameSync(tmp, dir);
      rmSync(old, { recursive: true, force: true });
    } else {
      renameSync(tmp, dir);
    }
    fsyncDir(dirname(dir));
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw pathError(e, dir);
  } finally {
    for (const fd of fds) closeSync(fd);
  }
}
