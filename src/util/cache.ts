/**
 * A small on-disk cache for validated data (the fleet config, the board/OS profiles), keyed
 * by a hash of everything the result depends on — the input texts and the code that validated
 * them. A flashing script runs mkoverlay once per device: skipping the YAML parser and the
 * schema library halves its start-up. Any failure to read or write the cache just means
 * computing again.
 */
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, statSync, unlinkSync, utimesSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { writeFileAtomic } from "./fsutil.js";

/** Set by scripts/bundle.mjs: a hash of the sources and locked dependencies of this build. */
declare const __MKOVERLAY_BUILD_ID__: string | undefined;

/**
 * The code that validates. A newer mkoverlay may refuse what an older one accepted, so an
 * entry is only good for the build that wrote it. The id is fixed into the bundle when it is
 * made, which costs nothing at start-up (hashing the bundle on every run would). Unbundled
 * runs (tests importing src/ directly) have no id and do not cache.
 */
const BUILD_ID: string | undefined = typeof __MKOVERLAY_BUILD_ID__ === "string" ? __MKOVERLAY_BUILD_ID__ : undefined;

/** Entries not rewritten for this long are pruned (a hot one is simply validated again). */
const MAX_AGE_MS = 30 * 24 * 3600 * 1000;
/** At most this many entries are kept (each config edit or upgrade writes a new one). */
const MAX_ENTRIES = 100;
/** Pruning reads the whole folder, so it runs on a miss and at most once a day. */
const PRUNE_EVERY_MS = 24 * 3600 * 1000;
const STAMP = ".pruned";

export function cacheDir(): string | undefined {
  if (process.env.MKOVERLAY_CACHE === "off") return undefined;
  if (process.env.MKOVERLAY_CACHE) return process.env.MKOVERLAY_CACHE;
  const base = process.env.XDG_CACHE_HOME || join(homedir(), ".cache");
  return join(base, "mkoverlay");
}

export async function cached<T>(kind: string, keyParts: string[], compute: () => Promise<T>): Promise<T> {
  const dir = cacheDir();
  if (!dir || BUILD_ID === undefined) return compute();
  const h = createHash("sha256");
  for (const part of [BUILD_ID, ...keyParts]) h.update(String(part.length)).update(":").update(part);
  const file = join(dir, `${kind}-${h.digest("hex").slice(0, 32)}.json`);
  try {
    return JSON.parse(readFileSync(file, "utf8")) as T;
  } catch {
    // miss
  }
  const value = await compute();
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    // Not synced: a cache entry lost in a power cut is only computed again.
    writeFileAtomic(file, JSON.stringify(value), { mode: 0o600, durable: false });
    pruneCache(dir, Date.now());
  } catch {
    // read-only home, full disk: the cache is an optimisation only
  }
  return value;
}

/**
 * Drops entries older than MAX_AGE_MS, keeps the newest MAX_ENTRIES, and removes temp files
 * a killed run left behind. Runs at most once per PRUNE_EVERY_MS (a stamp file's time says
 * when it last ran), so a run that hits the cache never lists the folder.
 */
export function pruneCache(dir: string, now: number): void {
  const stamp = join(dir, STAMP);
  try {
    if (now - statSync(stamp).mtimeMs < PRUNE_EVERY_MS) return;
  } catch {
    // never pruned
  }
  writeFileSync(stamp, "");
  utimesSync(stamp, now / 1000, now / 1000);
  const entries: { file: string; mtime: number }[] = [];
  for (const name of readdirSync(dir)) {
    const file = join(dir, name);
    let mtime: number;
    try {
      mtime = statSync(file).mtimeMs;
    } catch {
      continue;
    }
    const stale = name.endsWith(".tmp") ? now - mtime > 3600 * 1000 : name.endsWith(".json") && now - mtime > MAX_AGE_MS;
    if (stale) removeQuietly(file);
    else if (name.endsWith(".json")) entries.push({ file, mtime });
  }
  entries.sort((a, b) => b.mtime - a.mtime);
  for (const e of entries.slice(MAX_ENTRIES)) removeQuietly(e.file);
}

function removeQuietly(file: string): void {
  try {
    unlinkSync(file);
  } catch {
    // another run removed it first
  }
}
