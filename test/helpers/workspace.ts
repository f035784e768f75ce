/**
 * Test workspaces: a temp directory with a fleet config, and the built CLI run in it as a user
 * would run it (a separate process, real exit codes, real stdout/stderr).
 */
import { spawn, spawnSync, type SpawnSyncReturns } from "node:child_process";
import { chmodSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";

export const REPO = resolve(import.meta.dirname, "../..");
export const CLI = join(REPO, "bin/mkoverlay");

/**
 * The CLI's config cache for this test process (MKOVERLAY_CACHE=off is kept): tests never read
 * or write the developer's ~/.cache/mkoverlay, and never see entries another checkout wrote.
 * Set in process.env too, so tests that spawn the CLI themselves inherit it.
 */
export const TEST_CACHE = process.env.MKOVERLAY_CACHE === "off" ? "off" : mkdtempSync(join(process.env.MKOVERLAY_TEST_RUN_DIR ?? tmpdir(), "mko-cache-"));
process.env.MKOVERLAY_CACHE = TEST_CACHE;
if (TEST_CACHE !== "off") process.on("exit", () => rmSync(TEST_CACHE, { recursive: true, force: true }));

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs the CLI as `nobody` (uid/gid 65534, no groups) through setpriv, as a station user would.
 * A clone made under `mktemp -d` sits in a 0700 folder, so first the checkout's ancestors that
 * lack it get search permission for others (o+x: no listing); it stays so for the run, since
 * files run in parallel and an undo could pull it from under another. Root only.
 */
export function runCliAsNobody(args: string[], opts: { cwd?: string; env?: Record<string, string> } = {}): Run {
  for (let d = REPO; d !== dirname(d); d = dirname(d)) {
    const mode = statSync(d).mode;
    if ((mode & 0o001) === 0) chmodSync(d, (mode & 0o7777) | 0o001);
  }
  return run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", process.execPath, CLI, ...args], opts);
}

export function tempDir(prefix = "mko-"): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

export function runCli(args: string[], opts: { cwd: string; env?: Record<string, string>; input?: string }): Run {
  const r: SpawnSyncReturns<string> = spawnSync(process.execPath, [CLI, ...args], {
    cwd: opts.cwd,
    env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: TEST_CACHE, ...opts.env },
    encoding: "utf8",
    input: opts.input ?? "",
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** runCli without blocking the test process: several can run at once. */
export function runCliAsync(args: string[], opts: { cwd: string; env?: Record<string, string> }): Promise<Run> {
  const child = spawn(process.execPath, [CLI, ...args], {
    cwd: opts.cwd,
    env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: TEST_CACHE, ...opts.env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  return new Promise((res, rej) => {
    child.once("error", rej);
    child.once("close", (code) => res({ code: code ?? -1, stdout, stderr }));
  });
}

export function run(cmd: string, args: string[], opts: { cwd?: string; input?: string; env?: Record<string, string> } = {}): Run {
  const r = spawnSync(cmd, args, { encoding: "utf8", cwd: opts.cwd, input: opts.input ?? "", env: { ...process.env, ...opts.env } });
  if (r.error) throw r.error;
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Generates an ssh key with the real ssh-keygen; returns the private key path. */
export function sshKeygen(dir: string, name: string, type = "ed25519", extra: string[] = []): string {
  const file = join(dir, name);
  const r = run("ssh-keygen", ["-q", "-t", type, "-N", "", "-C", name, "-f", file, ...extra]);
  if (r.code !== 0) throw new Error(`ssh-keygen failed: ${r.stderr}`);
  return file;
}

export function readPub(privPath: string): string {
  return readFileSync(`${privPath}.pub`, "utf8").trim();
}

export interface BastionDef {
  host?: string;
  port?: number;
  user?: string;
  hostKeys: string[];
  from?: string[];
  expiry?: string;
  jumpUser?: string;
}

/** Writes a fleet config into `dir` (registry beside it) and returns its path. */
export function writeFleet(dir: string, bastions: Record<string, BastionDef>, extra: Record<string, unknown> = {}): string {
  const cfg = {
    registry: "./registry.db",
    hostname: "gw-{seq:04}",
    ports: { ssh: "21000-21999", services: "22000-22999" },
    operators: "none",
    ...extra,
    bastions: Object.fromEntries(
      Object.entries(bastions).map(([k, b]) => [k, { host: b.host ?? `bastion-${k}.example.com`, ...b }]),
    ),
  };
  const file = join(dir, "mkoverlay.yaml");
  writeFileSync(file, JSON.stringify(cfg, null, 2)); // JSON is YAML
  return file;
}

/** Extracts an overlay with GNU tar, as a user laying it over a rootfs would. */
export function extract(archive: string, into: string): void {
  const r = run("tar", ["-xzf", archive, "-C", into, "--same-owner", "--numeric-owner"]);
  if (r.code !== 0) throw new Error(`tar failed: ${r.stderr}`);
}
