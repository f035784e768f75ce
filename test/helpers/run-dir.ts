/**
 * vitest globalSetup: one temp folder for the whole run, removed at its end. Per-process temp
 * folders (the CLI's config cache of each test worker, helpers/workspace.ts) go inside it, so
 * a worker that the pool ends with a signal — and so never runs its exit handlers — still
 * leaves nothing behind in /tmp. Workers are started after the global setups and inherit the
 * variable.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export default function setup(): () => void {
  const dir = mkdtempSync(join(tmpdir(), "mko-run-"));
  process.env.MKOVERLAY_TEST_RUN_DIR = dir;
  return () => rmSync(dir, { recursive: true, force: true });
}
