/**
 * Reads entries out of the ext* root file system inside an image or card, without mounting:
 * `ls -p` of the parent directories gives type, mode, owner and size; `stat` gives times and
 * short symlink targets; `dump` copies file contents (and long symlink targets) into a private
 * temp dir, removed before returning. Two debugfs runs per batch, whatever its size.
 */
import { readFileSync } from "node:fs";
import { join, posix } from "node:path";
import { errnoCode, UserError } from "../util/errors.js";
import { debugfs, debugfsSafe } from "./debugfs.js";
import { e2Spec, type RootFs } from "./root.js";
import { privateDir } from "./temps.js";
import { normPath, type TreeView, type ViewEntry } from "../overlay/view.js";

export interface ImageEntry extends ViewEntry {
  size: number;
  /** Seconds since the epoch, from the inode. */
  atime: number;
  mtime: number;
  ctime: number;
  /** Only on inodes large enough to hold it (256 bytes, as mke2fs makes them). */
  crtime?: number;
  /** Set when a file is larger than the content cap: `content` is then left out. */
  truncated?: boolean;
}

interface Listed {
  mode: number;
  uid: number;
  gid: number;
  size: number;
}

/** The file-type bits of an inode's mode (`S_IFDIR`, `S_IFREG`, `S_IFLNK`). */
export const TYPE_BITS = { dir: 0o040000, file: 0o100000, symlink: 0o120000 } as const;

/** What kind of entry an inode's full mode says it is. */
export function kindOf(mode: number): ViewEntry["type"] {
  const t = mode & 0o170000;
  return t === TYPE_BITS.dir ? "dir" : t === TYPE_BITS.file ? "file" : t === TYPE_BITS.symlink ? "symlink" : "other";
}

/** Errors that only mean "not there": a missing parent, or a parent that is not a directory. */
const ABSENT = /File not found by ext2_lookup|Ext2 inode is not a directory|Ext2 file too big|Too many symbolic links/;

/** `/ino/mode/uid/gid/name/size/` lines of `ls -p`; names cannot hold "/". */
function parseLsP(lines: readonly string[]): Map<string, Listed> {
  const out = new Map<string, Listed>();
  for (const line of lines) {
    const f = line.split("/");
    if (f.length !== 8 || f[0] !== "" || f[7] !== "") continue;
    const name = f[5]!;
    if (name === "." || name === "..") continue;
    out.set(name, { mode: parseInt(f[2]!, 8), uid: Number(f[3]), gid: Number(f[4]), size: Number(f[6]) });
  }
  return out;
}

function timeField(lines: readonly string[], name: string): number | undefined {
  const re = new RegExp(`^\\s*${name}: 0x([0-9a-f]+)`);
  for (const l of lines) {
    const m = re.exec(l);
    if (m) return parseInt(m[1]!, 16);
  }
  return undefined;
}

export class ImageTreeView implements TreeView {
  private readonly spec: string;
  /** A root file system: entries besides the overlay's are the OS's. */
  readonly isRoot = true;

  get where(): string {
    return this.root.path;
  }

  constructor(
    readonly root: Pick<RootFs, "path" | "offset">,
    private readonly opts: { maxContent?: number } = {},
  ) {
    this.spec = e2Spec(root);
  }

  async get(path: string): Promise<ImageEntry | undefined> {
    return (await this.getMany([path])).get(normPath(path));
  }

  async getMany(paths: readonly string[]): Promise<Map<string, ImageEntry>> {
    const want = [...new Set(paths.map(normPath).filter((p) => p !== ""))];
    for (const p of want) if (!debugfsSafe(p)) throw new UserError(`cannot read ${JSON.stringify(p)} from an image: blank, quote or control character in the path`);
    const listed = await this.listDirs(want.map((p) => posix.dirname(p)));
    const found = want.flatMap((p) => {
      const l = listed.get(posix.dirname(p))?.get(posix.basename(p));
      return l ? [{ path: p, ...l }] : [];
    });
    const out = new Map<string, ImageEntry>();
    if (found.length === 0) return out;

    const cap = this.opts.maxContent ?? 4 << 20;
    const priv = privateDir("mkoverlay-read-");
    const dir = priv.path;
    try {
      const cmds: string[] = [];
      const dumps = new Map<string, string>();
      found.forEach((e, i) => {
        cmds.push(`stat /${e.path}`);
        const t = kindOf(e.mode);
        // Long symlink targets live in a data block; `dump` reads it like file content.
        if ((t === "file" && e.size <= cap) || (t === "symlink" && e.size >= 60)) {
          const local = join(dir, `d${i}`);
          dumps.set(e.path, local);
          cmds.push(`dump /${e.path} ${local}`);
        }
      });
      const r = await debugfs(this.spec, cmds, { dir });
      if (r.errors.length) throw new UserError(`${this.root.path}: debugfs could not read the root file system: ${r.errors[0]}`);
      const stats = r.sections.filter((_, i) => cmds[i]!.startsWith("stat "));
      found.forEach((e, i) => {
        const st = stats[i] ?? [];
        const t = kindOf(e.mode);
        const entry: ImageEntry = {
          path: e.path,
          type: t,
          mode: e.mode & 0o7777,
          uid: e.uid,
          gid: e.gid,
          size: e.size,
          atime: timeField(st, "atime") ?? -1,
          mtime: timeField(st, "mtime") ?? -1,
          ctime: timeField(st, "ctime") ?? -1,
        };
        const cr = timeField(st, "crtime");
        if (cr !== undefined) entry.crtime = cr;
        const local = dumps.get(e.path);
        if (t === "file") {
          if (local) entry.content = readFileSync(local);
          else entry.truncated = true;
        } else if (t === "symlink") {
          if (local) entry.target = readFileSync(local).subarray(0, e.size).toString("utf8");
          else {
            const m = st.map((l) => /Fast link dest: "(.*)"$/.exec(l)).find(Boolean);
            if (m) entry.target = m[1]!;
          }
        }
        out.set(e.path, entry);
      });
      return out;
    } finally {
      priv.remove();
    }
  }

  /**
   * Entries whose paths are known to exist, in ONE debugfs run: `stat` of each (type, mode,
   * owner, size, times, short link targets) and `dump` of those in `dump` (files, long link
   * targets). getMany needs a listing first to know what to dump; a read-back of what was just
   * written knows. Paths that turn out absent are left out.
   */
  async statMany(paths: readonly string[], dump: ReadonlySet<string>): Promise<Map<string, ImageEntry>> {
    const want = [...new Set(paths.map(normPath).filter((p) => p !== ""))];
    for (const p of want) if (!debugfsSafe(p)) throw new UserError(`cannot read ${JSON.stringify(p)} from an image: blank, quote or control character in the path`);
    const out = new Map<string, ImageEntry>();
    if (want.length === 0) return out;
    const priv = privateDir("mkoverlay-read-");
    try {
      const cmds: string[] = [];
      const local = new Map<string, string>();
      want.forEach((p, i) => {
        cmds.push(`stat /${p}`);
        if (dump.has(p)) {
          local.set(p, join(priv.path, `d${i}`));
          cmds.push(`dump /${p} ${local.get(p)!}`);
        }
      });
      const r = await debugfs(this.spec, cmds, { dir: priv.path });
      const real = r.errors.filter((l) => !ABSENT.test(l));
      if (real.length) throw new UserError(`${this.root.path}: debugfs could not read the root file system: ${real[0]}`);
      const stats = r.sections.filter((_, i) => cmds[i]!.startsWith("stat "));
      want.forEach((p, i) => {
        const st = stats[i] ?? [];
        const text = st.join("\n");
        const type = /Type: (\w+)/.exec(text)?.[1];
        const mode = /Mode:\s+([0-7]+)/.exec(text)?.[1];
        const owner = /User:\s+(\d+)\s+Group:\s+(\d+)/.exec(text);
        if (!type || mode === undefined || !owner) return; // absent
        const t: ViewEntry["type"] = type === "regular" ? "file" : type === "directory" ? "dir" : type === "symlink" ? "symlink" : "other";
        const size = Number(/Size:\s+(\d+)/.exec(text)?.[1] ?? "0");
        const entry: ImageEntry = {
          path: p,
          type: t,
          mode: parseInt(mode, 8) & 0o7777,
          uid: Number(owner[1]),
          gid: Number(owner[2]),
          size,
          atime: timeField(st, "atime") ?? -1,
          mtime: timeField(st, "mtime") ?? -1,
          ctime: timeField(st, "ctime") ?? -1,
        };
        const file = local.get(p);
        let data: Buffer | undefined;
        try {
          data = file ? readFileSync(file) : undefined;
        } catch {
          data = undefined; // dump wrote nothing
        }
        if (t === "file") {
          if (data) entry.content = data;
        } else if (t === "symlink") {
          const fast = st.map((l) => /Fast link dest: "(.*)"$/.exec(l)).find(Boolean);
          if (fast) entry.target = fast[1]!;
          else if (data) entry.target = data.subarray(0, size).toString("utf8");
        }
        out.set(p, entry);
      });
      return out;
    } finally {
      priv.remove();
    }
  }

  /**
   * The content of one regular file, or undefined when there is none at `path` (one debugfs
   * run: `dump`, where get() needs a listing first). Capped like get()'s contents.
   */
  async readFile(path: string): Promise<Buffer | undefined> {
    const p = normPath(path);
    if (!debugfsSafe(p)) throw new UserError(`cannot read ${JSON.stringify(p)} from an image: blank, quote or control character in the path`);
    const priv = privateDir("mkoverlay-read-");
    const dir = priv.path;
    try {
      const local = join(dir, "f");
      // `dump` copies whatever the name is (a symlink's target, a directory's blocks): ask for
      // the type first, in the same run.
      const r = await debugfs(this.spec, [`stat /${p}`, `dump /${p} ${local}`], { dir });
      const real = r.errors.filter((l) => !ABSENT.test(l));
      if (real.length) throw new UserError(`${this.root.path}: debugfs could not read the root file system: ${real[0]}`);
      const type = (r.sections[0] ?? []).map((l) => /Type: (\w+)/.exec(l)?.[1]).find(Boolean);
      if (type !== "regular") return undefined;
      const content = readFileSync(local);
      return content.length > (this.opts.maxContent ?? 4 << 20) ? undefined : content;
    } catch (e) {
      if (errnoCode(e) === "ENOENT") return undefined;
      throw e;
    } finally {
      priv.remove();
    }
  }

  /** `ls -p DIR/.` of each directory (name → mode, owner, size): "/." makes debugfs follow a symlinked directory, as the kernel would. */
  async listDirs(dirs: readonly string[]): Promise<Map<string, Map<string, Listed>>> {
    const uniq = [...new Set(dirs.map((d) => (d === "." ? "" : normPath(d))))];
    const out = new Map<string, Map<string, Listed>>();
    if (uniq.length === 0) return out;
    const r = await debugfs(
      this.spec,
      uniq.map((d) => `ls -p /${d ? `${d}/` : ""}.`),
    );
    const real = r.errors.filter((l) => !ABSENT.test(l));
    if (real.length) throw new UserError(`${this.root.path}: debugfs could not read the root file system: ${real[0]}`, { hint: "is this an ext2/3/4 file system? try e2fsck -fn on it" });
    uniq.forEach((d, i) => out.set(d === "" ? "." : d, parseLsP(r.sections[i] ?? [])));
    return out;
  }
}
