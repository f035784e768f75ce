/**
 * Lays an overlay tree into the ext* root file system of an image or card with debugfs: no
 * mount, no root. Everything is decided before debugfs writes anything: what exists, type
 * conflicts, room. Then one debugfs run writes it all and a read-back checks every entry.
 *
 * Same rules as src/overlay/apply.ts: files and symlinks replace what is there (rm first:
 * debugfs's `write` refuses an existing name), existing directories keep their modes and owners
 * (an overlay adds to an OS, it does not re-own /etc), and an entry whose type conflicts with
 * the image (a directory where the image has a file or a symlink, a file where it has a
 * directory) is refused, never replaced.
 */
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join, posix } from "node:path";
import { UserError } from "../util/errors.js";
import type { TreeView } from "../overlay/view.js";
import type { Entry } from "../overlay/tree.js";
import { debugfs, debugfsSafe } from "./debugfs.js";
import { ImageTreeView, kindOf, TYPE_BITS } from "./reader.js";
import { e2Spec, type RootFs } from "./root.js";
import { checkWritable, roomFor, SUPERBLOCK_OFFSET } from "./superblock.js";
import { readUndoSpans, rollBack } from "./undo.js";
import { readAt } from "../util/fsutil.js";
import { closeSync, existsSync, openSync } from "node:fs";
import { privateDir } from "./temps.js";

export interface LayResult {
  /** debugfs commands run (for logs and tests; never contains file contents). */
  commands: number;
  created: number;
  replaced: number;
  /** Existing directories left as they were. */
  kept: number;
}

const KIND_NAME = { dir: "directory", file: "file", symlink: "symlink", other: "special file" } as const;

function checkNames(entries: readonly Entry[]): void {
  const types = new Map(entries.map((e) => [e.path, e.type]));
  for (const e of entries) {
    const parent = posix.dirname(e.path);
    if (parent !== "." && types.get(parent) !== "dir") throw new UserError(`overlay entry /${e.path}: its parent /${parent} is ${types.has(parent) ? `a ${types.get(parent)}` : "missing"} in the overlay`);
    if (!debugfsSafe(e.path) || e.path.startsWith("/") || e.path.split("/").some((c) => c === ".." || c === "." || c === "")) {
      throw new UserError(`overlay path ${JSON.stringify(e.path)} cannot be written into an image (blank, quote, control character or dot segment)`);
    }
    if (e.type === "symlink" && !debugfsSafe(e.target)) {
      throw new UserError(`overlay symlink ${e.path}: target ${JSON.stringify(e.target)} cannot be written into an image (blank, quote or control character)`);
    }
  }
}

/**
 * What can be refused before anything is copied or written: names debugfs cannot take, a root
 * file system debugfs must not write (superblock.ts), and too little room for the tree.
 */
export function preflight(root: RootFs, entries: readonly Entry[]): void {
  checkNames(entries);
  const sizes = entries.map((e) => ({ type: e.type, size: e.type === "file" ? e.content.length : e.type === "symlink" ? e.target.length : 0 }));
  checkWritable(root.sb, root.where, roomFor(sizes, root.sb?.blockSize ?? 4096));
}

/** `ls -p` of directories: directory → name → mode (reader.ts listDirs). */
export type Listing = Map<string, Map<string, { mode: number }>>;

/** What an entry finds in the image: a conflict (refused), or nothing to say. */
function conflictOf(e: Entry, haveMode: number | undefined): string | undefined {
  if (haveMode === undefined) return undefined;
  const haveKind = KIND_NAME[kindOf(haveMode)];
  if (e.type === "dir") return haveKind === "directory" ? undefined : `/${e.path} is a directory in the overlay but a ${haveKind} in the image`;
  return haveKind === "directory" ? `/${e.path} is a ${e.type === "file" ? "file" : "symlink"} in the overlay but a directory in the image` : undefined;
}

function conflictError(root: RootFs, conflicts: string[]): UserError {
  return new UserError(`${root.where}: the overlay conflicts with the image:\n  ${conflicts.join("\n  ")}`, {
    hint: "an overlay only adds to an OS; fix the base image or the overlay layer that adds these paths",
  });
}

function modeIn(listed: Listing, p: string): number | undefined {
  return listed.get(posix.dirname(p))?.get(posix.basename(p))?.mode;
}

/**
 * Refuses, before anything is written or reserved, an overlay whose entries clash in type with
 * what the image has at their paths (a file where the image has a directory, and so on).
 */
export async function checkConflicts(root: RootFs, entries: readonly Entry[]): Promise<Listing> {
  const listed = await new ImageTreeView(root).listDirs(entries.map((e) => posix.dirname(e.path)));
  const conflicts = entries.map((e) => conflictOf(e, modeIn(listed, e.path))).filter((c): c is string => c !== undefined);
  if (conflicts.length) throw conflictError(root, conflicts);
  return listed;
}

/**
 * Writes `entries` (Tree.list() order: parents first) into `root`. All times, and the times
 * e2fsprogs takes from the clock, are `epoch`, so the same base, tree and epoch give the same
 * bytes. Throws UserError before writing when the image cannot take the tree. `undo` asks
 * debugfs for an undo log of what it overwrote (undo.ts: the bmap re-hashes only those blocks).
 */
// Long on purpose (~80 lines): one debugfs session's script — directories, files, links, modes —
// built in the order debugfs must run it, then read back; its parts share that order.
export async function layTree(root: RootFs, entries: readonly Entry[], epoch: number, opts: { undo?: string; listFrom?: RootFs; listed?: Listing; readBack?: (keptDirs: ReadonlySet<string>) => Promise<void> } = {}): Promise<LayResult> {
  preflight(root, entries);
  const sb = root.sb!;
  const view = new ImageTreeView(root);
  // `listFrom`: a file system byte-identical to `root` (the base it was just copied from), read
  // instead of it: its blocks are in the page cache, a fresh reflink clone's are not. `listed`:
  // that base's listing, already made (checkConflicts before the reservation): only directories
  // it lacks are listed.
  const dirs = [...new Set(entries.map((e) => posix.dirname(e.path)))];
  const missing = dirs.filter((d) => !opts.listed?.has(d === "" ? "." : d));
  const listed: Listing = new Map(opts.listed ?? []);
  if (missing.length) for (const [d, m] of await new ImageTreeView(opts.listFrom ?? root).listDirs(missing)) listed.set(d, m);
  const existing = (p: string): number | undefined => modeIn(listed, p);

  const priv = privateDir("mkoverlay-lay-");
  const dir = priv.path;
  try {
    const cmds: string[] = [];
    const result: LayResult = { commands: 0, created: 0, replaced: 0, kept: 0 };
    const times = ["atime", "mtime", "ctime", ...(sb.inodeSize > 128 ? ["crtime"] : [])];
    const finish = (p: string, mode: number): void => {
      // The type bits must be in the value: `sif f mode 0644` leaves an inode e2fsck flags.
      cmds.push(`sif /${p} mode 0${mode.toString(8)}`, `sif /${p} uid 0`, `sif /${p} gid 0`);
      for (const t of times) cmds.push(`sif /${p} ${t} @${epoch}`);
    };
    const conflicts: string[] = [];
    const keptDirs = new Set<string>();
    let n = 0;
    for (const e of entries) {
      const have = existing(e.path);
      const conflict = conflictOf(e, have);
      if (conflict) {
        conflicts.push(conflict);
        continue;
      }
      if (e.type === "dir") {
        if (have !== undefined) {
          result.kept++;
          keptDirs.add(e.path);
          continue;
        }
        cmds.push(`mkdir /${e.path}`);
        finish(e.path, TYPE_BITS.dir | e.mode);
        result.created++;
        continue;
      }
      if (have !== undefined) {
        cmds.push(`rm /${e.path}`);
        result.replaced++;
      } else result.created++;
      if (e.type === "file") {
        const local = join(dir, `f${n++}`);
        writeFileSync(local, e.content, { mode: 0o600 });
        cmds.push(`write ${local} /${e.path}`);
        finish(e.path, TYPE_BITS.file | e.mode);
      } else {
        cmds.push(`symlink /${e.path} ${e.target}`);
        finish(e.path, TYPE_BITS.symlink | 0o777);
      }
    }
    if (conflicts.length) throw conflictError(root, conflicts);
    if (/\s/.test(dir)) throw new UserError(`temp dir ${dir} has a blank in its path; set TMPDIR to a path without one`);
    // The undo log is also the guard on the partition's extent: every block debugfs wrote is in
    // it. A write outside the partition is rolled back and refused (guardExtent).
    const undo = opts.undo ?? join(dir, "undo.e2undo");
    const guard = extentGuard(root);
    const r = await debugfs(e2Spec(root), cmds, { write: true, fakeTime: epoch, dir, undo });
    await guard.check(undo);
    if (r.errors.length) {
      throw new UserError(`${root.where}: debugfs failed while laying the overlay: ${r.errors.slice(0, 3).join("; ")}`, { exitCode: 1 });
    }
    result.commands = cmds.length;
    // `readBack`: the caller reads the entries back its own way (flash: from the card, its
    // cached pages dropped first), instead of this read-back.
    if (opts.readBack) await opts.readBack(keptDirs);
    else await verifyLaid(view, root, entries, keptDirs);
    return result;
  } finally {
    // The private key passed through here.
    priv.remove();
  }
}

/**
 * Reads every entry back: type, mode, owner, content (by hash), symlink target. Directories
 * that were already in the image (`keptDirs`) are only checked for being directories.
 */
export async function verifyLaid(view: ImageTreeView, root: RootFs, entries: readonly Entry[], keptDirs: ReadonlySet<string> = new Set()): Promise<void> {
  // One debugfs run: what was just written is known, so what to dump is too (files, and link
  // targets too long for the inode).
  const dump = new Set(entries.filter((e) => e.type === "file" || (e.type === "symlink" && Buffer.byteLength(e.target) >= 60)).map((e) => e.path));
  let got;
  try {
    got = await view.statMany(
      entries.map((e) => e.path),
      dump,
    );
  } catch (e) {
    if (!(e instanceof UserError)) throw e;
    throw new UserError(`${root.where}: read-back after laying the overlay failed: ${e.message}`, { exitCode: 1 });
  }
  const problems: string[] = [];
  const sha = (b: Buffer): string => createHash("sha256").update(b).digest("hex");
  for (const e of entries) {
    const g = got.get(e.path);
    if (!g) {
      problems.push(`/${e.path}: missing`);
      continue;
    }
    if (g.type !== e.type) {
      problems.push(`/${e.path}: ${g.type}, expected ${e.type}`);
      continue;
    }
    if (keptDirs.has(e.path)) continue;
    if (g.uid !== 0 || g.gid !== 0) problems.push(`/${e.path}: owner ${g.uid}:${g.gid}, expected 0:0`);
    if (e.type !== "symlink" && g.mode !== e.mode) problems.push(`/${e.path}: mode ${g.mode.toString(8)}, expected ${e.mode.toString(8)}`);
    if (e.type === "dir") continue;
    if (e.type === "file") {
      if (!g.content || sha(g.content) !== sha(e.content)) problems.push(`/${e.path}: content differs`);
    } else if (g.target !== e.target) problems.push(`/${e.path}: points to ${g.target ?? "?"}, expected ${e.target}`);
  }
  if (problems.length) {
    throw new UserError(`${root.where}: read-back after laying the overlay found ${problems.length} problem(s):\n  ${problems.slice(0, 10).join("\n  ")}`, { exitCode: 1 });
  }
}

/**
 * An overlay read back from an archive or folder (image/open.ts `openOverlay`) as tree
 * entries, for laying it into an image (`write OVERLAY --image`). Owners are not carried:
 * everything lands root:root. Anything but files, directories and symlinks is refused.
 */
export async function entriesOf(view: TreeView, source: string): Promise<Entry[]> {
  if (!view.list) throw new UserError(`${source}: not an overlay archive or folder`);
  const out: Entry[] = [];
  for (const e of (await view.list()).sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0))) {
    if (e.path === "" || e.path === ".") continue;
    const content = e.type === "file" ? (e.content ?? (await view.get(e.path))?.content) : undefined;
    if (e.type === "file" && content === undefined) throw new UserError(`${source}: ${e.path}: cannot be read (larger than an overlay's files are?)`);
    if (e.type === "file") out.push({ type: "file", path: e.path, mode: e.mode, content: content! });
    else if (e.type === "dir") out.push({ type: "dir", path: e.path, mode: e.mode });
    else if (e.type === "symlink" && e.target !== undefined) out.push({ type: "symlink", path: e.path, target: e.target });
    else throw new UserError(`${source}: ${e.path}: only files, directories and symlinks can be laid into an image`);
  }
  // Archives made by other tools may leave parents implied, as tar does; debugfs needs them.
  const have = new Set(out.map((e) => e.path));
  for (const e of [...out]) {
    for (let d = posix.dirname(e.path); d !== "." && !have.has(d); d = posix.dirname(d)) {
      have.add(d);
      out.push({ type: "dir", path: d, mode: 0o755 });
    }
  }
  return out.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

/** debugfs wrote outside the root partition (found in its undo log); already rolled back. */
export class OutsideExtent extends UserError {}

/**
 * e2fsprogs can be given the partition's offset but not its end (`?offset=` has no size limit,
 * and a loop device with a size limit needs root), so debugfs believes the superblock about where
 * the file system ends. findRoot refuses a superblock that claims more than its partition; this
 * checks the result: every span in the undo log must lie inside the partition. e2fsprogs 1.47.0
 * logs the primary superblock at the file system's offset added twice (undo.ts): that one key
 * is an outside write only if the bytes there changed, so they are saved first.
 */
function extentGuard(root: RootFs): { check(undo: string): Promise<void> } {
  const start = root.offset;
  const end = root.offset + root.size;
  const bs = root.sb!.blockSize;
  const misplaced = root.offset > 0 ? root.offset + Math.floor((root.offset + SUPERBLOCK_OFFSET) / bs) * bs : -1;
  const fd = openSync(root.path, "r");
  let savedMisplaced: Buffer;
  let savedSb: Buffer;
  try {
    savedMisplaced = misplaced >= 0 ? readAt(fd, misplaced, bs) : Buffer.alloc(0);
    savedSb = readAt(fd, root.offset + SUPERBLOCK_OFFSET, 1024);
  } finally {
    closeSync(fd);
  }
  const unchangedAt = (at: number, old: Buffer): boolean => {
    const f = openSync(root.path, "r");
    try {
      return readAt(f, at, old.length).equals(old);
    } finally {
      closeSync(f);
    }
  };
  return {
    async check(undo: string): Promise<void> {
      // No log: debugfs never opened the file system for writing (its error says why).
      if (!existsSync(undo)) return;
      const spans = readUndoSpans(undo);
      const outside = spans === undefined ? [{ start: -1, end: -1 }] : spans.filter((s) => (s.start < start || s.end > end) && !(s.start === misplaced && unchangedAt(misplaced, savedMisplaced)));
      if (outside.length === 0) return;
      const rolled = await rollBack(root.path, undo, root.offset + SUPERBLOCK_OFFSET, savedSb);
      const what = spans === undefined ? "its undo log could not be read, so its writes cannot be checked against the partition" : `debugfs wrote outside the partition (bytes ${outside[0]!.start}–${outside[0]!.end}; the partition is bytes ${start}–${end})`;
      throw new OutsideExtent(`${root.where}: ${what}; ${rolled ? "changes rolled back with e2undo" : "the roll-back with e2undo failed: restore it from the base"}`, {
        exitCode: 1,
        hint: "the file system's metadata points outside its partition: check it with e2fsck -fn, or use another base",
      });
    },
  };
}
