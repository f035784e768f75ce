/**
 * Views (view.ts) of an overlay on disk: a .tar.gz archive or a folder (an overlay folder, or a
 * root file system it was laid over). Everything read is bounded: an archive of more than
 * MAX_ARCHIVE_BYTES (packed or unpacked) or with a file larger than an overlay's files ever are
 * is refused as "not an overlay", and a folder is read path by path, only where asked.
 */
import { closeSync, fstatSync, lstatSync, openSync, readdirSync, readlinkSync, readSync } from "node:fs";
import { basename, join } from "node:path";
import { constants as zc, gunzipSync } from "node:zlib";
import { extract } from "tar-stream";
import { errnoCode, UserError } from "../errors.js";
import { MAX_ENTRY_BYTES, type TreeView, type ViewEntry } from "./view.js";

/** An overlay archive is a few KB; this bounds what verify and the doctor will read. */
export const MAX_ARCHIVE_BYTES = 32 << 20;
/** An overlay has tens of entries. */
const MAX_ENTRIES = 10_000;

function notAnOverlay(where: string, why: string): UserError {
  return new UserError(`${where}: not an mkoverlay overlay (${why})`, { hint: "give the .overlay.tar.gz or .overlay folder that mkoverlay wrote" });
}

/**
 * Opens the overlay at `path`: an archive, an overlay folder (`--format dir` names it
 * `<host>.overlay`), or any other folder as a root file system it was laid over (`--apply`).
 */
export async function openOverlay(path: string): Promise<TreeView> {
  let st;
  try {
    st = lstatSync(path);
  } catch (e) {
    throw new UserError(`${path}: ${errnoCode(e) === "ENOENT" ? "no such file or directory" : (e as Error).message}`);
  }
  if (st.isDirectory()) return dirView(path, !basename(path).endsWith(".overlay"));
  if (!st.isFile()) throw notAnOverlay(path, "neither a file nor a folder");
  return archiveView(path);
}

function readBounded(file: string, max: number): Buffer {
  const fd = openSync(file, "r");
  try {
    const size = fstatSync(fd).size;
    if (size > max) throw notAnOverlay(file, `${size} bytes; an overlay archive is far smaller`);
    const buf = Buffer.alloc(size);
    let off = 0;
    while (off < size) {
      const n = readSync(fd, buf, off, size - off, off);
      if (n === 0) break;
      off += n;
    }
    return buf.subarray(0, off);
  } finally {
    closeSync(fd);
  }
}

async function archiveView(file: string): Promise<TreeView> {
  const packed = readBounded(file, MAX_ARCHIVE_BYTES);
  let raw: Buffer;
  try {
    raw = gunzipSync(packed, { maxOutputLength: MAX_ARCHIVE_BYTES });
  } catch (e) {
    if ((e as { code?: string }).code === "ERR_BUFFER_TOO_LARGE" || (e as { errno?: number }).errno === zc.Z_BUF_ERROR) {
      throw notAnOverlay(file, `unpacks to more than ${MAX_ARCHIVE_BYTES >> 20} MiB`);
    }
    throw notAnOverlay(file, "not a gzip-compressed archive");
  }
  const entries = new Map<string, ViewEntry>();
  const ex = extract();
  const done = new Promise<void>((resolve, reject) => {
    ex.on("entry", (h, stream, next) => {
      const path = h.name.replace(/^\.\//, "").replace(/\/$/, "");
      if (entries.size >= MAX_ENTRIES) {
        reject(notAnOverlay(file, `more than ${MAX_ENTRIES} entries`));
        return;
      }
      if ((h.size ?? 0) > MAX_ENTRY_BYTES) {
        reject(notAnOverlay(file, `${path} is ${h.size} bytes`));
        return;
      }
      const chunks: Buffer[] = [];
      stream.on("data", (c: unknown) => chunks.push(c as Buffer));
      stream.on("end", () => {
        const type = h.type === "file" ? "file" : h.type === "directory" ? "dir" : h.type === "symlink" ? "symlink" : "other";
        entries.set(path, {
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
    ex.on("error", (e) => reject(notAnOverlay(file, `corrupt archive: ${e.message}`)));
  });
  ex.end(raw);
  await done;
  return { where: file, isRoot: false, get: async (p) => entries.get(p), list: async () => [...entries.values()] };
}

function readEntry(root: string, rel: string): ViewEntry | undefined {
  const p = join(root, rel);
  let st;
  try {
    st = lstatSync(p);
  } catch (e) {
    if (errnoCode(e) === "ENOENT" || errnoCode(e) === "ENOTDIR") return undefined;
    throw new UserError(`${p}: ${(e as Error).message}`);
  }
  const base = { path: rel, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid };
  if (st.isSymbolicLink()) return { ...base, type: "symlink", target: readlinkSync(p) };
  if (st.isDirectory()) return { ...base, type: "dir" };
  if (!st.isFile()) return { ...base, type: "other" };
  // A file larger than an overlay's files ever are is reported without its content.
  if (st.size > MAX_ENTRY_BYTES) return { ...base, type: "file" };
  const fd = openSync(p, "r");
  try {
    const buf = Buffer.alloc(st.size);
    const n = readSync(fd, buf, 0, st.size, 0);
    return { ...base, type: "file", content: buf.subarray(0, n) };
  } finally {
    closeSync(fd);
  }
}

function dirView(root: string, isRoot: boolean): TreeView {
  const view: TreeView = {
    where: root,
    isRoot,
    get: async (rel) => readEntry(root, rel),
  };
  if (isRoot) return view;
  // An overlay folder holds the overlay alone: it may be listed (bounded, no content read).
  view.list = async () => {
    const out: ViewEntry[] = [];
    const walk = (rel: string) => {
      for (const name of readdirSync(join(root, rel)).sort()) {
        const r = rel ? `${rel}/${name}` : name;
        if (out.length >= MAX_ENTRIES) throw notAnOverlay(root, `more than ${MAX_ENTRIES} entries`);
        const st = lstatSync(join(root, r));
        const type = st.isSymbolicLink() ? "symlink" : st.isDirectory() ? "dir" : st.isFile() ? "file" : "other";
        out.push({ path: r, type, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid });
        if (type === "dir") walk(r);
      }
    };
    walk("");
    return out;
  };
  return view;
}
