/**
 * A bastion set up by `mkoverlay bastion install --root DIR` and run for real on 127.0.0.1:
 * the system's sshd reads the root's sshd_config with mkoverlay's drop-in, the keys command
 * and key directory inside the root (paths prefixed with it: the only change to the generated
 * files), and the agent runs as the unit would run it (its env file, its config copy).
 *
 * sshd runs an AuthorizedKeysCommand only below root-owned directories nobody else can write,
 * so roots live under /run/mko-test (not /tmp). Root only, as bastion install is.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { tunnelArgv } from "./device.js";
import { canConnect, runSshd, SSHD, waitFor } from "./sshd.js";
import type { SshdBinary } from "./sshd10.js";
import { CLI, extract, removeDir, run, runCli, sshKeygen, tempDir } from "./workspace.js";

export { isRoot } from "./capability.js";

/** A new root directory sshd will trust for its keys command. */
export function secureRoot(): string {
  mkdirSync("/run/mko-test", { recursive: true, mode: 0o755 });
  chmodSync("/run/mko-test", 0o755);
  const dir = join("/run/mko-test", `r-${process.pid}-${randomBytes(4).toString("hex")}`);
  mkdirSync(dir, { mode: 0o755 });
  chmodSync(dir, 0o755);
  return dir;
}

/** A minimal image root: sshd, its config including sshd_config.d, users files, nologin. */
export function prepareRoot(root: string, port: number, extraMain = ""): void {
  for (const d of ["etc/ssh/sshd_config.d", "etc/default", "usr/sbin", "etc/systemd/system"]) mkdirSync(join(root, d), { recursive: true, mode: 0o755 });
  copyFileSync(SSHD, join(root, "usr/sbin/sshd"));
  copyFileSync("/usr/sbin/nologin", join(root, "usr/sbin/nologin"));
  chmodSync(join(root, "usr/sbin/nologin"), 0o755);
  if (existsSync("/etc/login.defs")) copyFileSync("/etc/login.defs", join(root, "etc/login.defs"));
  writeFileSync(join(root, "etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n");
  writeFileSync(join(root, "etc/group"), "root:x:0:\n");
  writeFileSync(join(root, "etc/shadow"), "root:*:19000:0:99999:7:::\n", { mode: 0o640 });
  writeFileSync(join(root, "etc/gshadow"), "root:*::\n", { mode: 0o640 });
  const hostKey = sshKeygen(join(root, "etc/ssh"), "ssh_host_ed25519_key");
  chmodSync(hostKey, 0o600);
  // Debian's layout: the drop-ins first (first value wins), then the main settings.
  writeFileSync(
    join(root, "etc/ssh/sshd_config"),
    [
      "Include /etc/ssh/sshd_config.d/*.conf",
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      "HostKey /etc/ssh/ssh_host_ed25519_key",
      "KbdInteractiveAuthentication no",
      "UsePAM no",
      "X11Forwarding yes",
      "PrintMotd no",
      "AcceptEnv LANG LC_*",
      "Subsystem sftp /usr/lib/openssh/sftp-server",
      extraMain,
      "",
    ].join("\n"),
  );
}

/** A file's paths inside the root, as the host sees them. */
function rooted(root: string, text: string): string {
  return text.replace(/(^|[\s=])(\/etc\/ssh\/|\/usr\/local\/lib\/mkoverlay\/|\/var\/lib\/mkoverlay\/)/gm, (_, pre: string, p: string) => `${pre}${root}${p}`);
}

export interface Bastion {
  port: number;
  logFile: string;
  config: string;
  proc: ChildProcess;
  stop(): Promise<void>;
}

/**
 * A config for the system's sshd: the root's sshd_config with its drop-in directory and the
 * paths the generated files name moved into the root (their content otherwise verbatim).
 */
export function bastionConfig(root: string, name: string, dir: string): { config: string; port: number } {
  mkdirSync("/run/sshd", { recursive: true, mode: 0o755 });
  const dropins = join(root, "etc/ssh/sshd_config.d");
  const runDir = join(dir, `run-${name}.d`);
  mkdirSync(runDir, { recursive: true });
  for (const f of readdirSync(dropins)) if (f.endsWith(".conf")) writeFileSync(join(runDir, f), rooted(root, readFileSync(join(dropins, f), "utf8")));
  const main = readFileSync(join(root, "etc/ssh/sshd_config"), "utf8").replace(/^Include .*$/m, `Include ${runDir}/*.conf`);
  const config = join(dir, `sshd_config-${name}`);
  writeFileSync(config, `${rooted(root, main)}\nPidFile ${join(dir, `sshd-${name}.pid`)}\nLogLevel INFO\n`);
  return { config, port: Number(/^Port (\d+)$/m.exec(main)![1]) };
}

/**
 * The system's sshd (or `sshd`, e.g. sshd10.ts's 10.x with its session/auth paths) on the root's
 * configuration (generated files verbatim, paths rooted).
 */
export async function startBastion(root: string, name: string, dir: string, sshd?: SshdBinary): Promise<Bastion> {
  const { config, port } = bastionConfig(root, name, dir);
  const logFile = join(dir, `sshd-${name}.log`);
  const t = run(sshd?.sshd ?? SSHD, [...(sshd?.args ?? []), "-t", "-f", config]);
  if (t.code !== 0) throw new Error(`sshd -t: ${t.stderr}`);
  const { proc, stop } = await runSshd(config, logFile, port, sshd);
  return { port, logFile, config, proc, stop };
}

export interface AgentProc {
  proc: ChildProcess;
  lines: string[];
  waitLog(re: RegExp, timeoutMs?: number): Promise<string>;
  stop(): Promise<void>;
}

/** The agent, run as its unit runs it: the env file's variables, the config copy, the state dir. */
export function startAgent(root: string, name: string, opts: { authLog: string; resync?: number; env?: Record<string, string>; args?: string[] }): AgentProc {
  const env: Record<string, string> = {};
  for (const l of readFileSync(join(root, `etc/mkoverlay/bastion/${name}/agent.env`), "utf8").split("\n")) {
    const i = l.indexOf("=");
    // Values are single-quoted (read alike by systemd's EnvironmentFile= and sh).
    if (i > 0 && !l.startsWith("#")) env[l.slice(0, i)] = l.slice(i + 1).replace(/^'(.*)'$/, "$1");
  }
  const args = [CLI, "bastion", "agent", "--bastion", name, "--config", join(root, `etc/mkoverlay/bastion/${name}/fleet.yaml`), "--state-dir", join(root, `var/lib/mkoverlay/bastion/${name}`), "--auth-log", opts.authLog];
  if (opts.resync) args.push("--resync", String(opts.resync));
  args.push(...(opts.args ?? []));
  const proc = spawn(process.execPath, args, { env: { ...process.env, MKOVERLAY_CONFIG: "", ...env, ...opts.env }, stdio: ["ignore", "ignore", "pipe"] });
  const lines: string[] = [];
  let buf = "";
  proc.stderr!.setEncoding("utf8").on("data", (d: string) => {
    buf += d;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
  return {
    proc,
    lines,
    async waitLog(re, timeoutMs = 10_000) {
      let hit: string | undefined;
      await waitFor(`agent log ${re}`, () => {
        if (proc.exitCode !== null) throw new Error(`agent exited ${proc.exitCode}:\n${lines.join("\n")}`);
        hit = lines.find((l) => re.test(l));
        return hit !== undefined;
      }, timeoutMs, 50);
      return hit!;
    },
    async stop() {
      if (proc.exitCode !== null) return;
      proc.kill("SIGTERM");
      await new Promise<void>((r) => (proc.exitCode !== null ? r() : proc.once("exit", () => r())));
    },
  };
}

export interface Device {
  hostname: string;
  port: number;
  fingerprint: string;
  /** The unpacked overlay. */
  root: string;
}

/** Builds a device with the CLI and unpacks its overlay (its key and tunnel unit). */
export function buildDevice(ws: string, cfg: string, extra: string[] = []): Device {
  const r = runCli(["--board", "rpi4", "--bastion", "lo", "--json", "--quiet", "--out", join(ws, "out"), "--config", cfg, ...extra], { cwd: ws });
  if (r.code !== 0) throw new Error(`build failed: ${r.stderr}`);
  const b = JSON.parse(r.stdout) as { hostname: string; port: number; fingerprint: string; overlay: string };
  const root = tempDir("mko-dev-");
  extract(b.overlay, root);
  return { hostname: b.hostname, port: b.port, fingerprint: b.fingerprint, root };
}

export interface Tunnel {
  proc: ChildProcess;
  stderr(): string;
  exited(): boolean;
  stop(): Promise<void>;
}

/** The tunnel unit's exact ssh command (the -R target is a port nobody needs to answer). */
export function openTunnel(d: Device, overlayRoot = d.root): Tunnel {
  const argv = tunnelArgv(overlayRoot, "lo", d.hostname);
  const i = argv.indexOf("-R");
  argv[i + 1] = argv[i + 1]!.replace(/:localhost:22$/, ":localhost:9");
  const proc = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  proc.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
  return {
    proc,
    stderr: () => err,
    exited: () => proc.exitCode !== null || proc.signalCode !== null,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill("SIGTERM");
      await new Promise<void>((r) => proc.once("exit", () => r()));
    },
  };
}

/** Keeps trying the tunnel (as Restart= would, but every 200 ms) until the port listens; returns the time it took. */
export async function tunnelUp(d: Device, timeoutMs: number, overlayRoot = d.root): Promise<{ tunnel: Tunnel; ms: number }> {
  const t0 = Date.now();
  for (;;) {
    const t = openTunnel(d, overlayRoot);
    const deadline = Date.now() + 3000;
    while (!t.exited() && Date.now() < deadline) {
      if (await canConnect(d.port, "127.0.0.1", 200)) return { tunnel: t, ms: Date.now() - t0 };
      await new Promise((r) => setTimeout(r, 50));
    }
    await t.stop();
    if (Date.now() - t0 > timeoutMs) throw new Error(`tunnel of ${d.hostname} not up within ${timeoutMs} ms: ${t.stderr()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** One login attempt with the device's key: the forward up (then closed), or ssh's error. */
export async function tryLogin(d: Device, overlayRoot = d.root): Promise<{ ok: boolean; stderr: string }> {
  const t = openTunnel(d, overlayRoot);
  const deadline = Date.now() + 8000;
  while (!t.exited() && Date.now() < deadline) {
    if (await canConnect(d.port, "127.0.0.1", 200)) {
      await t.stop();
      return { ok: true, stderr: t.stderr() };
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  await t.stop();
  return { ok: false, stderr: t.stderr() };
}

export function cleanup(dirs: string[]): void {
  if (process.env.KEEP) return;
  for (const d of dirs) removeDir(d);
}
