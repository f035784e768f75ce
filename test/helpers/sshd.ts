/**
 * A throwaway OpenSSH server on 127.0.0.1, standing in for a bastion (or a device). It runs
 * the system's real sshd with its own host key, config and authorized_keys, and stop() kills
 * the listener and every session process it spawned (docs/facts.md: a stale session keeps its
 * forwarded port).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { canConnect, freePort } from "./net.js";
import { dirname, join } from "node:path";
import type { SshdBinary } from "./sshd10.js";
import { readPub, run, sshKeygen } from "./workspace.js";

export const SSHD = "/usr/sbin/sshd";

export { canConnect, freePort };

export async function waitFor(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 15_000, stepMs = 100): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, stepMs));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

/** Creates a local user with a nologin shell (as a bastion's tunnel user would be). */
export function ensureUser(name: string): void {
  if (spawnSync("id", [name]).status !== 0) {
    const r = run("useradd", ["--system", "--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent", "--no-create-home", name]);
    // Several test files make the same user at once on a fresh machine: one useradd wins, the
    // others fail with "already exists" (exit 9), which is just as good.
    if (r.code !== 0 && spawnSync("id", [name]).status !== 0) throw new Error(`useradd ${name}: ${r.stderr}`);
  }
  // '!' (useradd's default) is a locked account, which sshd refuses without PAM; '*' is "no
  // password" but not locked (docs/bastion.md says the same for real bastions).
  const u = run("usermod", ["-p", "*", name]);
  if (u.code !== 0) throw new Error(`usermod ${name}: ${u.stderr}`);
}

export interface Sshd {
  port: number;
  dir: string;
  hostKeyPub: string;
  logFile: string;
  proc: ChildProcess;
  stop(): Promise<void>;
}

export interface SshdOptions {
  dir: string;
  /** authorized_keys content per user name. */
  authorizedKeys: Record<string, string>;
  /** Extra sshd_config text appended at the end (e.g. a Match block). */
  extraConfig?: string;
  /** Use this host key instead of generating one. */
  hostKey?: string;
  port?: number;
  /** Run this sshd (sshd10.ts: the system's or 10.x, with its session/auth paths) instead of the system's. */
  sshd?: SshdBinary;
}

export async function startSshd(o: SshdOptions): Promise<Sshd> {
  mkdirSync("/run/sshd", { recursive: true, mode: 0o755 });
  const akDir = join(o.dir, "authorized_keys");
  mkdirSync(akDir, { recursive: true });
  // sshd reads authorized_keys as the target user: the path must be traversable by others
  // (mkdtemp makes 0700 folders).
  for (let d = akDir; d.startsWith(tmpdir() + "/"); d = dirname(d)) chmodSync(d, 0o755);
  for (const [user, text] of Object.entries(o.authorizedKeys)) writeFileSync(join(akDir, user), text, { mode: 0o644 });
  const hostKey = o.hostKey ?? sshKeygen(o.dir, "sshd_host_ed25519_key");
  const port = o.port ?? (await freePort());
  const logFile = join(o.dir, "sshd.log");
  const config = join(o.dir, "sshd_config");
  writeFileSync(
    config,
    [
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${hostKey}`,
      `AuthorizedKeysFile ${akDir}/%u`,
      `PidFile ${join(o.dir, "sshd.pid")}`,
      // The test's files live under /tmp (world-writable), which StrictModes would refuse.
      "StrictModes no",
      "UsePAM no",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "PermitRootLogin prohibit-password",
      "LogLevel DEBUG1",
      o.extraConfig ?? "",
      "",
    ].join("\n"),
  );
  const t = run(o.sshd?.sshd ?? SSHD, [...(o.sshd?.args ?? []), "-t", "-f", config]);
  if (t.code !== 0) throw new Error(`sshd -t rejected the test config: ${t.stderr}`);
  const { proc, stop } = await runSshd(config, logFile, port, o.sshd);
  return { port, dir: o.dir, hostKeyPub: readPub(hostKey), logFile, proc, stop };
}

/**
 * Runs the system's sshd (or `bin`: sshd10.ts) on `config` (listening on 127.0.0.1:`port`,
 * logging to `logFile`) until stop(), which also ends every session process it spawned.
 */
export async function runSshd(config: string, logFile: string, port: number, bin?: SshdBinary): Promise<{ proc: ChildProcess; stop(): Promise<void> }> {
  const proc = spawn(bin?.sshd ?? SSHD, [...(bin?.args ?? []), "-D", "-e", "-f", config, "-E", logFile], { stdio: "ignore" });
  await waitFor(`sshd ${bin?.version ?? ""} on 127.0.0.1:${port}`, () => {
    if (proc.exitCode !== null) throw new Error(`sshd exited ${proc.exitCode} (log: ${logFile})`);
    return canConnect(port);
  });
  let stopped = false;
  return {
    proc,
    async stop() {
      if (stopped) return;
      stopped = true;
      killSessions(proc.pid);
      proc.kill("SIGTERM");
      await new Promise<void>((r) => (proc.exitCode !== null ? r() : proc.once("exit", () => r())));
    },
  };
}

/** Kills every descendant of the listener (the per-connection sshd processes). */
export function killSessions(pid: number | undefined): void {
  if (pid === undefined) return;
  const r = spawnSync("pgrep", ["-P", String(pid)], { encoding: "utf8" });
  for (const child of (r.stdout ?? "").split("\n").filter(Boolean)) {
    killSessions(Number(child));
    try {
      process.kill(Number(child), "SIGKILL");
    } catch {
      // already gone
    }
  }
}
