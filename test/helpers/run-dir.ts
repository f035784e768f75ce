/**
 * vitest globalSetup: what a test run leaves behind is removed at its end.
 *
 * - One temp folder for the whole run. Per-process temp folders (the CLI's config cache of each
 *   test worker, helpers/workspace.ts) go inside it, so a worker that the pool ends with a
 *   signal — and so never runs its exit handlers — still leaves nothing in /tmp. Workers are
 *   started after the global setups and inherit the variable.
 * - The system users the run made: the helpers (sshd.ts, boot.ts) and `bastion install` itself
 *   create tunnel users (`mko-…`) and `mkoverlay-keys` as root, shared by test files running at
 *   once, so none of them can remove its own. Those that did not exist when the run began are
 *   removed when it ends (as root; a second run started meanwhile on the same machine would lose
 *   them too: one run at a time, as for the VM lock).
 * - The port-lock folder (helpers/net.ts): locks whose process is gone (a worker the pool ended
 *   never released its own), then the folder itself once no run holds a lock in it.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const TEST_USER = /^(mko-[a-z0-9-]+|mkoverlay-keys)$/;

function testUsers(): Set<string> {
  try {
    return new Set(readFileSync("/etc/passwd", "utf8").split("\n").map((l) => l.split(":")[0]!).filter((u) => TEST_USER.test(u)));
  } catch {
    return new Set();
  }
}

function alive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

export default function setup(): () => void {
  const dir = mkdtempSync(join(tmpdir(), "mko-run-"));
  process.env.MKOVERLAY_TEST_RUN_DIR = dir;
  const before = testUsers();
  return () => {
    rmSync(dir, { recursive: true, force: true });
    const locks = join(tmpdir(), "mkoverlay-test-ports");
    try {
      for (const f of readdirSync(locks)) if (!alive(Number(readFileSync(join(locks, f), "utf8")))) rmSync(join(locks, f), { force: true });
      rmdirSync(locks); // only when empty: a live run's locks stay
    } catch {
      // not there, or another run holds ports
    }
    if (process.getuid?.() !== 0) return;
    for (const u of testUsers()) if (!before.has(u)) spawnSync("userdel", [u], { env: { ...process.env, PATH: `${process.env.PATH ?? ""}:/usr/sbin:/sbin` } });
  };
}
