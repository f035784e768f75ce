/**
 * One read-only view of a root tree, whatever holds it: the tree just built, an archive read
 * back, or the root file system inside an image (issue 15). `verify` asks each for the same
 * paths and compares what comes back, so the checks do not care where the overlay lives.
 * Paths are relative to the root (`etc/hostname`), answers are lstat-like (a symlink is
 * reported, not followed).
 *
 * Lives in src/image/ for now because the other modules are being restructured; it imports
 * nothing from here and can move to src/overlay/ unchanged.
 */
import type { ReadEntry } from "../overlay/read.js";
import type { Tree } from "../overlay/tree.js";

export interface TreeView {
  get(path: string): Promise<ReadEntry | undefined>;
  /** Many paths at once; backends that spawn a tool (images) answer in one run. Absent paths are left out. */
  getMany(paths: readonly string[]): Promise<Map<string, ReadEntry>>;
}

export function normPath(p: string): string {
  return p.replace(/^\/+/, "").replace(/\/+$/, "");
}

/** A built tree as the target would see it: root:root, symlinks 0777. */
export function viewOfTree(tree: Tree): TreeView {
  const one = (path: string): ReadEntry | undefined => {
    const e = tree.get(normPath(path));
    if (!e) return undefined;
    if (e.type === "file") return { path: e.path, type: "file", mode: e.mode, uid: 0, gid: 0, content: e.content };
    if (e.type === "dir") return { path: e.path, type: "dir", mode: e.mode, uid: 0, gid: 0 };
    return { path: e.path, type: "symlink", mode: 0o777, uid: 0, gid: 0, target: e.target };
  };
  return viewOfFunction(one);
}

/** What readOverlay returns (an archive or a folder read back). */
export function viewOfMap(map: ReadonlyMap<string, ReadEntry>): TreeView {
  return viewOfFunction((p) => map.get(normPath(p)));
}

function viewOfFunction(one: (p: string) => ReadEntry | undefined): TreeView {
  return {
    get: async (p) => one(p),
    getMany: async (paths) => {
      const out = new Map<string, ReadEntry>();
      for (const p of paths) {
        const e = one(p);
        if (e) out.set(normPath(p), e);
      }
      return out;
    },
  };
}
