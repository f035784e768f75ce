/** Stacks printed by the bundled CLI (--debug, or a bug) name the sources, not the minified chunks. */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, expect, it } from "vitest";
import { readableStack } from "../src/util/stack.js";
import { REPO, removeDir, runCli, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-stack-");
afterAll(() => removeDir(dir));

it("--debug prints the stack with src/…ts:line:col positions", () => {
  writeFileSync(join(dir, "mkoverlay.yaml"), 'bastions: {eu: {host: b.example.com, hostKeys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB b"]}}\noperators: none\n');
  const r = runCli(["--board", "nope", "--bastion", "eu", "--debug"], { cwd: dir });
  expect(r.code).toBe(2);
  expect(r.stderr).toMatch(/^ {4}at resolveBoardOs \(src\/config\/profiles\.ts:\d+:\d+\)$/m);
  expect(r.stderr).not.toMatch(/dist\/[^\s]+\.js:\d+/);
});

it("leaves frames it has no map for as they are", () => {
  const s = `Error: x\n    at f (${join(REPO, "src/cli/main.ts")}:1:2)\n    at g (node:internal/x:3:4)`;
  expect(readableStack(s)).toBe(s);
});
