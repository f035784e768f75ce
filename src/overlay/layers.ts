/**
 * Static overlay layers: folders under overlays/ that mirror the target root file system
 * (overlays/common/etc/systemd/system/reverse-ssh@.service lands at that path). An
 * executable file keeps mode 0755, anything else is 0644; owners are always root.
 */
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { resourceDir } from "../resources.js";

export interface LayerFile {
  path: string;
  mode: number;
  content: Buffer;
}

const cache = new Map<string, LayerFile[]>();

function walk(root: string, rel: string, out: LayerFile[]): void {
  for (const name of readdirSync(join(root, rel)).sort()) {
    const r = rel ? `${rel}/${name}` : name;
    const st = statSync(join(root, r));
    if (st.isDirectory()) walk(root, r, out);
    else out.push({ path: r, mode: st.mode & 0o111 ? 0o755 : 0o644, content: readFileSync(join(root, r)) });
  }
}

/** Files of overlays/<name>/, read once per process (a batch builds many devices). */
export function layerFiles(name: string): LayerFile[] {
  let files = cache.get(name);
  if (!files) {
    files = [];
    walk(resourceDir("overlays", name), "", files);
    cache.set(name, files);
  }
  return files;
}

export function layerFile(name: string, path: string): LayerFile {
  const f = layerFiles(name).find((x) => x.path === path);
  if (!f) throw new Error(`overlays/${name}/${path} is missing from this installation`);
  return f;
}
