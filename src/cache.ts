/**
 * A small on-disk cache for validated data (the fleet config, the board/OS profiles), keyed
 * by a hash of everything the result depends on. A flashing script runs mkoverlay once per
 * device: skipping the YAML parser and the schema library halves its start-up. Any failure to
 * read or write the cache just means computing again.
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

export function cacheDir(): string | undefined {
  if (process.env.MKOVERLAY_CACHE === "off") return undefined;
  if (process.env.MKOVERLAY_CACHE) return process.env.MKOVERLAY_CACHE;
  const base = process.env.XDG_CACHE_HOME || join(homedir(), ".cache");
  return join(base, "mkoverlay");
}

export async function cached<T>(kind: string, keyParts: string[], compute: () => Promise<T>): Promise<T> {
  const dir = cacheDir();
  if (!dir) return compute();
  const h = createHash("sha256");
  for (const part of keyParts) h.update(String(part.length)).update(":").update(part);
  const file = join(dir, `${kind}-${h.digest("hex").slice(0, 32)}.json`);
  try {
    return JSON.parse(readFileSync(file, "utf8")) as T;
  } catch {
    // miss
  }
  const value = await compute();
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const tmp = `${file}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
    writeFileSync(tmp, JSON.stringify(value), { mode: 0o600 });
    renameSync(tmp, file);
  } catch {
    // read-only home, full disk: the cache is an optimisation only
  }
  return value;
}
