/**
 * Views (view.ts) of an overlay on disk: a .tar.gz archive or a folder (an overlay folder, or a
 * root file system it was laid over). Everything read is bounded: an archive of more than
 * MAX_ARCHIVE_BYTES (packed or unpacked) or with a file larger than an overlay's files ever are
 * is refused as "not an overlay", and a folder is read path by path, only where asked.
 */
import { closeSync, fstatSync, lstatSync, type Stats, openSync, readdirSync, readlinkSync, readSync } from "node:fs";
import { basename, join } from "node:path";
import { constants as zc, gunzipSync } from "node:zlib";
import { extract } from "tar-stream";
import { errnoCode, UserError } from "../util/errors.js";
import { MAX_ENTRY_BYTES, type TreeView, type ViewEntry } from "../overlay/view.js";

/** An overlay archive is a few KB; this bounds what verify and the doctor will read. */
const MAX_ARCHIVE_BYTES = 32 << 20;
/** An overlay has tens of entries. */
const MAX_ENTRIES = 10_000;

function notAnOverlay(where: string, why: string): UserError {
  return new UserError(`${where}: not an mkoverlay overlay (${why})`, { hint: "give the .overlay.tar.gz or .overlay folder that mkoverlay wrote" });
}

export interface OpenOptions {
  /** For a disk image: the root partition's number (default: found as `mkoverlay image` finds it). */
  rootPartition?: number;
}

type Sniffed = "gzip" | "zstd" | "image" | "other";

/**
 * What a file is, by its first bytes, not its name: gzip (an archive), zstd (a compressed
 * image), a partition table (MBR/GPT: 55 AA at byte 510) or an ext superblock (EF 53 at byte
 * 1080, a partition-less image).
 */
function sniff(path: string): Sniffed {
  const b = Buffer.alloc(1088);
  const fd = openSync(path, "r");
  let n: number;
  try {
    n = readSync(fd, b, 0, b.length, 0);
  } finally {
    closeSync(fd);
  }
  if (n >= 2 && b[0] === 0x1f && b[1] === 0x8b) return "gzip";
  if (n >= 4 && b.readUInt32LE(0) === 0xfd2fb528) return "zstd";
  if ((n >= 512 && b[510] === 0x55 && b[511] === 0xaa) || (n >= 1082 && b.readUInt16LE(1080) === 0xef53)) return "image";
  return "other";
}

function lstatOrFail(path: string): Stats {
  try {
    return lstatSync(path);
  } catch (e) {
    throw new UserError(`${path}: ${errnoCode(e) === "ENOENT" ? "no such file or directory" : (e as Error).message}`);
  }
}

/**
 * Opens the overlay at `path`: an archive, an overlay folder (`--format dir` names it
 * `<host>.overlay`), any other folder as a root file system it was laid over (`--apply`), or a
 * disk image or card (the root partition's file system, read with debugfs: no mount). A
 * zstd-compressed image needs `withOverlay`, which decompresses it to a private temp file.
 */
export async function openOverlay(path: string, opts: OpenOptions = {}): Promise<TreeView> {
  const st = lstatOrFail(path);
  if (st.isDirectory()) return dirView(path, !basename(path).endsWith(".overlay"));
  if (st.isBlockDevice()) return imageView(path, path, opts);
  if (!st.isFile()) throw notAnOverlay(path, "neither a file nor a folder");
  const kind = sniff(path);
  if (kind === "zstd") throw new UserError(`${path}: a zstd-compressed file; decompress it first (zstd -d)`);
  if (kind === "image") return imageView(path, path, opts);
  return archiveView(path);
}

/** The image code is loaded only when an image is read (verify and doctor of archives do not pay for it). */
async function imageView(path: string, where: string, opts: OpenOptions): Promise<TreeView> {
  const [{ findRoot }, { ImageTreeView }] = await Promise.all([import("./root.js"), import("./reader.js")]);
  const v = new ImageTreeView(findRoot(path, opts.rootPartition === undefined ? {} : { rootPartition: opts.rootPartition }));
  return { where, isRoot: v.isRoot, get: (p) => v.get(p), getMany: (ps) => v.getMany(ps) };
}

/**
 * openOverlay, for the length of `fn`, including `.img.zst` images: those are decompressed into
 * a private temp dir (0700, in $TMPDIR) that is removed afterwards, also on SIGINT/SIGTERM,
 * since the image holds a private key. The decompression is bounded (image/compress.ts): at most
 * 64 GiB, holes kept, and stopped before it leaves less than 512 MiB free in $TMPDIR.
 */
export async function withOverlay<T>(path: string, opts: OpenOptions, fn: (view: TreeView) => Promise<T>): Promise<T> {
  if (!lstatOrFail(path).isFile() || sniff(path) !== "zstd") return fn(await openOverlay(path, opts));
  const [{ decompressZstdBounded }, { privateDir }] = await Promise.all([import("./compress.js"), import("./temps.js")]);
  const priv = privateDir("mkoverlay-zst-");
  try {
    const img = join(priv.path, "image");
    // Bounded (compress.ts): a small .zst can say, or turn out, to be terabytes.
    await decompressZstdBounded(path, img);
    if (sniff(img) !== "image") throw notAnOverlay(path, "a zstd-compressed file that holds no disk image");
    return await fn(await imageView(img, path, opts));
  } finally {
    priv.remove();
  }
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
