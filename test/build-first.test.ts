/**
 * The cli, system and slow tiers never run a stale dist/ (test/helpers/build-first.ts, their
 * globalSetup): the rule that decides, on a scratch tree with set modification times.
 */
import { mkdirSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { staleBecause } from "./helpers/build-first.js";
import { removeDir, tempDir } from "./helpers/workspace.js";

const root = tempDir("mko-build-first-");
afterAll(() => removeDir(root));

function file(rel: string, at: number): void {
  const p = join(root, rel);
  mkdirSync(join(p, ".."), { recursive: true });
  writeFileSync(p, "");
  utimesSync(p, at, at);
}

describe("build-first: is dist/ stale?", () => {
  it("not built: stale; built after every input: fresh; any input newer (a nested source, the bundler, the lock file): stale, naming it", () => {
    file("src/cli/main.ts", 1000);
    file("src/registry/core.ts", 1000);
    file("scripts/bundle.mjs", 1000);
    file("package.json", 1000);
    file("package-lock.json", 1000);
    expect(staleBecause(root)).toBe("dist/ is not built");
    file("dist/cli.js", 2000);
    expect(staleBecause(root)).toBe("dist/ is not built");
    file("dist/.build-stamp", 2000);
    expect(staleBecause(root)).toBeUndefined();
    for (const rel of ["src/registry/core.ts", "scripts/bundle.mjs", "package-lock.json"]) {
      file(rel, 3000);
      expect(staleBecause(root)).toBe(`${rel} is newer than dist/`);
      file(rel, 1000);
    }
    file("src/notes.md", 3000); // not an input
    expect(staleBecause(root)).toBeUndefined();
  });
});
