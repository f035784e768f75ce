/**
 * Reads an overlay back into a tree, from a .tar.gz or a directory, recording owners so
 * `verify` can check them. The inverse of archive.ts / apply.ts.
 */
import { lstatSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import { extract } from "tar-stream";
import { errnoCode, UserError } from "../errors.js";

export interface ReadEntry {
  path: string;
  type: "file" | "dir" | "symlink" | "other";
  mode: number;
  uid: number;
  gid: number;
  content?: Buffer;
  target?: string;
}

export async function readOverlay(path: string): Promise<Map<string, ReadEntry>> {
  let st;
  try {
    st = lstatSync(path);
  } catch (e) {
    throw new UserError(`${path}: ${errnoCode(e) === "ENOENT" ? "no such file" : (e as Error).message}`);
  }
  return st.isDirectory() ? readDir(path) : readArchive(path);
}

async function readArchive(file: string): Promise<Map<string, ReadEntry>> {
  let raw: Buffer;
  try {
    raw = gunzipSync(readFileSync(file));
  } catch {
    throw new UserError(`${file}: not a gzip-compressed overlay archive`);
  }
  const out = new Map<string, ReadEntry>();
  const ex = extract();
  const done = new Promise<void>((resolve, reject) => {
    ex.on("entry", (h, stream, next) => {
      const chunks: Buffer[] = [];
      stream.on("data", (c: unknown) => chunks.push(c as Buffer));
      stream.on("end", () => {
        const path = h.name.replace(/^\.\//, "").replace(/\/$/, "");
        const type = h.type === "file" ? "file" : h.type === "directory" ? "dir" : h.type === "symlink" ? "symlink" : "other";
        out.set(path, {
          path,
          type,
          mode: (h.mode ?? 0) & 0o7777,
          uid: h.uid ?? -1,
          gid: h.gid ?? -1,
          ...(type === "file" ? { content: Buffer.concat(chunks) } : {}),
          ...(h.linkname ? { target: h.linkname } : {}),
        });
        next();
      });
      stream.resume();
    });
    ex.on("finish", resolve);
    ex.on("error", (e) => reject(new UserError(`${file}: corrupt overlay archive (${e.message})`)));
  });
  ex.end(raw);
  await done;
  return out;
}

function readDir(root: string): Map<string, ReadEntry> {
  const out = new Map<string, ReadEntry>();
  const walk = (rel: string) => {
    for (const name of readdirSync(join(root, rel)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      const p = join(root, r);
      const st = lstatSync(p);
      const base = { path: r, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid };
      if (st.isSymbolicLink()) out.set(r, { ...base, type: "symlink", target: readlinkSync(p) });
      else if (st.isDirectory()) {
        out.set(r, { ...base, type: "dir" });
        walk(r);
      } else if (st.isFile()) out.set(r, { ...base, type: "file", content: readFileSync(p) });
      else out.set(r, { ...base, type: "other" });
    }
  };
  walk("");
  return out;
}
