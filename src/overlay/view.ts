/**
 * A read-only view of an overlay, wherever it is: the tree just built, an archive, a folder, a
 * root file system it was laid over, an image. `verify` and `registry doctor` run over this one
 * interface, and ask only for the paths they expect, so a view over a whole root file system
 * reads a few small files, never the rest.
 */
import type { Tree } from "./tree.js";

export interface ViewEntry {
  /** Relative to the target root, no leading slash. */
  path: string;
  type: "file" | "dir" | "symlink" | "other";
  mode: number;
  uid: number;
  gid: number;
  /** File content (views refuse files larger than an overlay's files ever are). */
  content?: Buffer;
  target?: string;
}

export interface TreeView {
  /** What it is, for messages (a path). */
  readonly where: string;
  /**
   * True for a root file system (or an image of one) the overlay was laid over: other entries
   * are the OS's, and directories that existed keep their own modes and owners.
   */
  readonly isRoot: boolean;
  get(path: string): Promise<ViewEntry | undefined>;
  /** Many paths at once, for views that pay per call (an image: a debugfs run). Absent paths are left out. */
  getMany?(paths: readonly string[]): Promise<Map<string, ViewEntry>>;
  /** Every entry, for views that hold an overlay alone (archive, folder). */
  list?(): Promise<ViewEntry[]>;
}

/** `/etc/hostname/` → `etc/hostname` */
export function normPath(p: string): string {
  return p.replace(/^\/+/, "").replace(/\/+$/, "");
}

/** Many paths from any view: in one call where the view can, else one by one. */
export async function getMany(view: TreeView, paths: readonly string[]): Promise<Map<string, ViewEntry>> {
  if (view.getMany) return view.getMany(paths);
  const out = new Map<string, ViewEntry>();
  for (const p of paths) {
    const e = await view.get(normPath(p));
    if (e) out.set(normPath(p), e);
  }
  return out;
}

/** Files an overlay ships are small: a view refuses anything larger as "not an overlay". */
export const MAX_ENTRY_BYTES = 1 << 20;

/** The view of a tree just built (all root:root, as archives and `--apply` write them). */
export function treeView(tree: Tree, where = "(built)"): TreeView {
  const entry = (path: string): ViewEntry | undefined => {
    const e = tree.get(path);
    if (!e) return undefined;
    if (e.type === "file") return { path: e.path, type: "file", mode: e.mode, uid: 0, gid: 0, content: e.content };
    if (e.type === "dir") return { path: e.path, type: "dir", mode: e.mode, uid: 0, gid: 0 };
    return { path: e.path, type: "symlink", mode: 0o777, uid: 0, gid: 0, target: e.target };
  };
  return {
    where,
    isRoot: false,
    get: async (path) => entry(path),
    list: async () => tree.list().map((e) => entry(e.path)!),
  };
}
