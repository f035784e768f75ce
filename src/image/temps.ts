/**
 * Temp files and folders that hold a device's private key — the image being staged, the key
 * files handed to debugfs, contents read back, a decompressed .img.zst — are removed on every
 * exit path: by `finally` blocks on errors, and here on SIGINT, SIGTERM and SIGHUP. An image
 * takes seconds to stage, long enough for a Ctrl-C; without this it would leave gigabytes
 * holding a key. After removing them the signal takes its usual course (the process ends),
 * unless someone else in the process handles it (a batch stopping after the current device).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const live = new Set<string>();
const SIGNALS: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];

function onSignal(sig: NodeJS.Signals): void {
  for (const p of live) rmSync(p, { recursive: true, force: true });
  live.clear();
  for (const s of SIGNALS) process.removeListener(s, onSignal);
  if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
}

/** Removes `path` if the process is interrupted before the returned function is called. */
export function track(path: string): () => void {
  if (live.size === 0) for (const s of SIGNALS) process.on(s, onSignal);
  live.add(path);
  return () => {
    live.delete(path);
    if (live.size === 0) for (const s of SIGNALS) process.removeListener(s, onSignal);
  };
}

/** A 0700 folder in $TMPDIR, removed by `remove()` or when the process is interrupted. */
export function privateDir(prefix: string): { path: string; remove(): void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  const untrack = track(path);
  return {
    path,
    remove() {
      rmSync(path, { recursive: true, force: true });
      untrack();
    },
  };
}
