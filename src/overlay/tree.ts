/**
 * The in-memory file tree an overlay is built as. Paths are relative to the target root
 * (`etc/hostname`); every entry is owned by root:root with an explicit mode. The tree is the
 * single product of the pure core: archives, directories and `verify` all read it.
 */
import { posix } from "node:path";

export type Entry =
  | { type: "file"; path: string; mode: number; content: Buffer }
  | { type: "dir"; path: string; mode: number }
  | { type: "symlink"; path: string; target: string };

/** Parent directories get this mode unless a step sets one explicitly (Debian's default). */
const DEFAULT_DIR_MODE = 0o755;

export class Tree {
  private readonly entries = new Map<string, Entry>();

  private norm(path: string): string {
    const p = posix.normalize(path.replace(/^\/+/, ""));
    if (p === "." || p.startsWith("..") || p.includes("\0")) throw new Error(`bad overlay path: ${path}`);
    return p.replace(/\/$/, "");
  }

  private ensureParents(path: string): void {
    const dir = posix.dirname(path);
    if (dir === "." || this.entries.has(dir)) return;
    this.ensureParents(dir);
    this.entries.set(dir, { type: "dir", path: dir, mode: DEFAULT_DIR_MODE });
  }

  private put(e: Entry): void {
    const existing = this.entries.get(e.path);
    if (existing && !(existing.type === "dir" && e.type === "dir")) {
      throw new Error(`overlay path added twice: ${e.path}`);
    }
    this.ensureParents(e.path);
    this.entries.set(e.path, e);
  }

  file(path: string, content: string | Buffer, mode = 0o644): void {
    this.put({ type: "file", path: this.norm(path), mode, content: typeof content === "string" ? Buffer.from(content, "utf8") : content });
  }

  dir(path: string, mode = DEFAULT_DIR_MODE): void {
    this.put({ type: "dir", path: this.norm(path), mode });
  }

  symlink(path: string, target: string): void {
    this.put({ type: "symlink", path: this.norm(path), target });
  }

  get(path: string): Entry | undefined {
    return this.entries.get(this.norm(path));
  }

  /** Entries sorted by path (byte order), parents before children: the archive order. */
  list(): Entry[] {
    return [...this.entries.values()].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  }
}
