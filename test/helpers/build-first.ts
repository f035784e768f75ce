/**
 * vitest globalSetup of the tiers that run the built CLI (cli, system, slow): when a source is
 * newer than the bundle, build it first (`node scripts/bundle.mjs`, then the stamp `make build`
 * checks), so these tests never run a stale dist/. The same inputs as the Makefile's
 * dist/.build-stamp rule: src/**\/*.ts, scripts/bundle.mjs, package.json, package-lock.json.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const REPO = join(import.meta.dirname, "../..");
const STAMP = join(REPO, "dist/.build-stamp");

function newestInput(root: string): { file: string; mtime: number } {
  const files = readdirSync(join(root, "src"), { recursive: true })
    .map((f) => join("src", String(f)))
    .filter((f) => f.endsWith(".ts"))
    .concat(["scripts/bundle.mjs", "package.json", "package-lock.json"]);
  let newest = { file: "", mtime: 0 };
  for (const f of files) {
    const p = join(root, f);
    if (!existsSync(p)) continue;
    const m = statSync(p).mtimeMs;
    if (m > newest.mtime) newest = { file: f, mtime: m };
  }
  return newest;
}

/** Why `root`'s dist/ is stale, or undefined when it is up to date. */
export function staleBecause(root = REPO): string | undefined {
  const stamp = join(root, "dist/.build-stamp");
  if (!existsSync(stamp) || !existsSync(join(root, "dist/cli.js"))) return "dist/ is not built";
  const n = newestInput(root);
  return n.mtime > statSync(stamp).mtimeMs ? `${n.file} is newer than dist/` : undefined;
}

export default function setup(): void {
  const why = staleBecause();
  if (why === undefined) return;
  process.stderr.write(`[build-first] ${why}: node scripts/bundle.mjs\n`);
  const r = spawnSync(process.execPath, [join(REPO, "scripts/bundle.mjs")], { cwd: REPO, stdio: ["ignore", "inherit", "inherit"] });
  if (r.status !== 0) throw new Error(`node scripts/bundle.mjs failed (exit ${r.status ?? r.signal}): the CLI tests need a fresh dist/`);
  writeFileSync(STAMP, "");
}
