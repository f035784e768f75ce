/**
 * Static overlay layers: folders under overlays/ that mirror the target root file system
 * (overlays/common/etc/systemd/system/reverse-ssh@.service lands at that path), laid wholesale:
 * a file added to a layer ships. An executable file keeps mode 0755, anything else is 0644;
 * owners are always root.
 *
 * This is the edge that reads them from disk; the build steps only receive the result (a
 * `Layers` map), so the core never touches the file system.
 */
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { resourceDir } from "../util/resources.js";

interface LayerFile {
  /** Relative to the target root, e.g. `etc/ssh/sshd_config.d/50-mkoverlay.conf`. */
  path: string;
  mode: number;
  content: Buffer;
}

/** Layer name → its files, sorted by path. */
export type Layers = ReadonlyMap<string, readonly LayerFile[]>;

/** The layer every device gets. */
export const COMMON = "common";

const cache = new Map<string, LayerFile[]>();

function walk(root: string, rel: string, out: LayerFile[]): void {
  for (const name of readdirSync(join(root, rel)).sort()) {
    const r = rel ? `${rel}/${name}` : name;
    const st = statSync(join(root, r));
    if (st.isDirectory()) walk(root, r, out);
    else out.push({ path: r, mode: st.mode & 0o111 ? 0o755 : 0o644, content: readFileSync(join(root, r)) });
  }
}

/** Reads overlays/<name>/ for each name (once per process: a batch builds many devices). */
export function loadLayers(names: readonly string[]): Layers {
  const out = new Map<string, LayerFile[]>();
  for (const name of new Set([COMMON, ...names])) {
    let files = cache.get(name);
    if (!files) {
      files = [];
      walk(resourceDir("overlays", name), "", files);
      cache.set(name, files);
    }
    out.set(name, files);
  }
  return out;
}

/** A layer file's text, for steps that read a unit's [Install] section. */
export function layerText(layers: Layers, name: string, absPath: string): string {
  const rel = absPath.replace(/^\//, "");
  const f = layers.get(name)?.find((x) => x.path === rel);
  if (!f) throw new Error(`overlays/${name}/${rel} is missing from this installation`);
  return f.content.toString("utf8");
}
