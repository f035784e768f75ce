/**
 * The OpenSSH versions a bastion runs (issue 20): the system's sshd (9.2 on bookworm) and
 * bookworm-backports' 10.x, unpacked next to it by scripts/ensure-openssh10.sh (never installed
 * over it). A 10.x sshd from another folder must be told where its sshd-session and sshd-auth
 * are (`SshdSessionPath`, `SshdAuthPath`: docs/facts.md); sshdCommand() adds them.
 *
 * openssh10() is the capability gate: undefined (with a loud warning) when the 10.x sshd cannot
 * be had outside CI; in CI (CI=true) it throws, so the tests that need it fail.
 */
import { spawnSync, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { inCI } from "./capability.js";
import { runSshd, SSHD } from "./sshd.js";
import { REPO } from "./workspace.js";

export interface SshdBinary {
  /** "9.2", "10.0", ... as `sshd -V` says. */
  version: string;
  major: number;
  minor: number;
  sshd: string;
  /** Arguments every run of this sshd needs before its own (-o SshdSessionPath=... for 10.x). */
  args: string[];
}

/** "OpenSSH_10.0p2 Debian-7~bpo12+1, OpenSSL ..." → [10, 0]. */
function sshdVersionOf(sshd: string): { version: string; major: number; minor: number } {
  const r = spawnSync(sshd, ["-V"], { encoding: "utf8" });
  const m = /OpenSSH_(\d+)\.(\d+)/.exec(`${r.stdout ?? ""}${r.stderr ?? ""}`);
  if (!m) throw new Error(`${sshd} -V did not name an OpenSSH version: ${r.stderr || r.error?.message}`);
  return { version: `${m[1]}.${m[2]}`, major: Number(m[1]), minor: Number(m[2]) };
}

export function systemSshd(): SshdBinary {
  return { ...sshdVersionOf(SSHD), sshd: SSHD, args: [] };
}

let cached: { bin: SshdBinary | undefined; reason: string } | undefined;

function load10(): SshdBinary {
  const r = spawnSync("bash", [join(REPO, "scripts/ensure-openssh10.sh")], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`scripts/ensure-openssh10.sh failed (exit ${r.status}): ${(r.stderr || r.error?.message || "").trim()}`);
  const dir = r.stdout.trim().split("\n").pop() ?? "";
  const sshd = join(dir, "usr/sbin/sshd");
  const session = join(dir, "usr/lib/openssh/sshd-session");
  const auth = join(dir, "usr/lib/openssh/sshd-auth");
  for (const f of [sshd, session, auth]) if (!existsSync(f)) throw new Error(`${f} is missing (re-run scripts/ensure-openssh10.sh)`);
  const v = sshdVersionOf(sshd);
  if (v.major !== 10) throw new Error(`${sshd} is OpenSSH ${v.version}, not 10.x`);
  return { ...v, sshd, args: ["-o", `SshdSessionPath=${session}`, "-o", `SshdAuthPath=${auth}`] };
}

/** OpenSSH 10.x, or undefined outside CI when it cannot be had (CI: throws). */
export function openssh10(): SshdBinary | undefined {
  if (!cached) {
    try {
      cached = { bin: load10(), reason: "" };
    } catch (e) {
      cached = { bin: undefined, reason: (e as Error).message };
    }
  }
  if (cached.bin) return cached.bin;
  if (inCI) throw new Error(`OpenSSH 10.x is required in CI (CI=${process.env.CI}) but is not available: ${cached.reason}`);
  process.stderr.write(`\n${"!".repeat(78)}\n!! OpenSSH 10.x tests CANNOT RUN: ${cached.reason}\n!! Not in CI, so they are SKIPPED here. Run: bash scripts/ensure-openssh10.sh (as root: make test-deps)\n${"!".repeat(78)}\n`);
  return undefined;
}

/** Every sshd version the tests run: the system's and, when available, 10.x. */
export function sshdVersions(): SshdBinary[] {
  const ten = openssh10();
  return ten ? [systemSshd(), ten] : [systemSshd()];
}

/** `sshd -t -f config` (extra -o options after the binary's own), as { ok, stderr }. */
export function sshdTest(bin: SshdBinary, config: string, extra: string[] = []): { ok: boolean; stderr: string } {
  const r = spawnSync(bin.sshd, [...bin.args, ...extra, "-t", "-f", config], { encoding: "utf8" });
  return { ok: r.status === 0, stderr: (r.stderr ?? "") + (r.error?.message ?? "") };
}

/**
 * Runs `bin` on `config` in the foreground (listening on 127.0.0.1:`port`, logging to
 * `logFile`) until stop(), which ends every session process it spawned too — sshd.ts's runSshd
 * for any version.
 */
export function runSshdVersion(bin: SshdBinary, config: string, logFile: string, port: number): Promise<{ proc: ChildProcess; stop(): Promise<void> }> {
  return runSshd(config, logFile, port, bin);
}

/** The identification line the sshd on 127.0.0.1:`port` sends ("SSH-2.0-OpenSSH_10.0p2 …"): which sshd really answers. */
function sshdBanner(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = "";
    const sock = connect(port, "127.0.0.1");
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`no SSH banner from 127.0.0.1:${port} within 5 s (got ${JSON.stringify(got)})`));
    }, 5000);
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => {
      got += d;
      const i = got.indexOf("\n");
      if (i < 0) return;
      clearTimeout(timer);
      sock.destroy();
      resolve(got.slice(0, i).replace(/\r$/, ""));
    });
    sock.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** Fails unless the sshd on `port` is `bin`'s version (its banner names OpenSSH_MAJOR.MINOR). */
export async function expectSshdVersion(port: number, bin: SshdBinary): Promise<void> {
  const banner = await sshdBanner(port);
  if (!banner.startsWith(`SSH-2.0-OpenSSH_${bin.version}`)) throw new Error(`127.0.0.1:${port} answers ${JSON.stringify(banner)}, not OpenSSH ${bin.version}`);
}
