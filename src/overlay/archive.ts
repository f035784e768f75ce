/**
 * Reproducible tar.gz of a tree: entries sorted, uid/gid 0 named root/root, explicit modes,
 * every mtime clamped to SOURCE_DATE_EPOCH (or a fixed epoch), gzip header without a
 * timestamp. The same tree gives the same bytes, so a rebuild can be compared with `cmp`.
 */
import { gzipSync } from "node:zlib";
import { pack } from "tar-stream";
import { UserError } from "../util/errors.js";
import type { Tree } from "./tree.js";

/** 2020-01-01T00:00:00Z: used when SOURCE_DATE_EPOCH is unset. */
export const FIXED_EPOCH = 1577836800;

export function archiveEpoch(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.SOURCE_DATE_EPOCH;
  if (v === undefined || v === "") return FIXED_EPOCH;
  if (!/^\d{1,12}$/.test(v)) throw new UserError(`SOURCE_DATE_EPOCH=${JSON.stringify(v)} is not a number of seconds since 1970`, { hint: "e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)" });
  return Number(v);
}

export async function tarball(tree: Tree, epoch: number): Promise<Buffer> {
  const p = pack();
  const chunks: Buffer[] = [];
  p.on("data", (c: unknown) => chunks.push(c as Buffer));
  const done = new Promise<void>((resolve, reject) => {
    p.on("end", () => resolve());
    p.on("error", reject);
  });
  const mtime = new Date(epoch * 1000);
  const common = { uid: 0, gid: 0, uname: "root", gname: "root", mtime };
  for (const e of tree.list()) {
    if (e.type === "file") p.entry({ ...common, name: e.path, mode: e.mode, type: "file", size: e.content.length }, e.content);
    else if (e.type === "dir") p.entry({ ...common, name: `${e.path}/`, mode: e.mode, type: "directory" });
    else p.entry({ ...common, name: e.path, mode: 0o777, type: "symlink", linkname: e.target });
  }
  p.finalize();
  await done;
  // Node's gzip writes mtime 0 and no file name in the header: nothing time-dependent.
  // Level 3: a seventh of level 9's time for 9 % more bytes (6.7 KB vs 6.2 KB, measured on a
  // real overlay); at factory scale the time matters and the bytes do not.
  return gzipSync(Buffer.concat(chunks), { level: 3 });
}
