/**
 * A fleet behind one shared address (issue 20), against real sshds on 127.0.0.1: revoked devices
 * (real `ssh` clients whose keys the bastion does not accept) retrying in a loop, while a healthy
 * device opens its tunnel and an administrator logs in, each on a schedule, all from 127.0.0.1.
 * Every refusal of the healthy device or the administrator is recorded with ssh's own message.
 */
import { spawn } from "node:child_process";
import { canConnect } from "./sshd.js";

const SSH_OPTS = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=8"];

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** One `ssh ... true`: exit code and stderr. */
function sshOnce(port: number, user: string, key: string, timeoutMs = 15_000): Promise<{ ok: boolean; code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn("ssh", [...SSH_OPTS, "-i", key, "-p", String(port), `${user}@127.0.0.1`, "true"], { stdio: ["ignore", "ignore", "pipe"] });
    let err = "";
    p.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
    const t = setTimeout(() => p.kill("SIGKILL"), timeoutMs);
    p.once("exit", (code) => {
      clearTimeout(t);
      resolve({ ok: code === 0, code, stderr: err.trim() });
    });
  });
}

/**
 * One tunnel attempt as the device unit makes it (ssh -N -R with ExitOnForwardFailure): ok once
 * the forwarded port listens on the bastion (the session is then closed), else ssh's stderr.
 */
function tunnelOnce(port: number, user: string, key: string, listen: number, timeoutMs = 8000): Promise<{ ok: boolean; ms: number; stderr: string }> {
  const t0 = Date.now();
  const p = spawn("ssh", [...SSH_OPTS, "-N", "-o", "ExitOnForwardFailure=yes", "-i", key, "-p", String(port), "-R", `localhost:${listen}:localhost:9`, `${user}@127.0.0.1`], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let err = "";
  let exited = false;
  p.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
  const gone = new Promise<void>((r) => p.once("exit", () => ((exited = true), r())));
  return (async () => {
    let ok = false;
    while (!exited && Date.now() - t0 < timeoutMs) {
      if (await canConnect(listen, "127.0.0.1", 200)) {
        ok = true;
        break;
      }
      await sleep(50);
    }
    const ms = Date.now() - t0;
    if (!exited) p.kill("SIGTERM");
    await gone;
    return { ok, ms, stderr: err.trim() || (ok ? "" : "(no forward within the time)") };
  })();
}

export interface SharedAddressRun {
  healthy: { ok: boolean; ms: number; stderr: string }[];
  admin: { ok: boolean; stderr: string }[];
  revokedAttempts: number;
}

export interface SharedAddressOptions {
  /** The sshd the devices use. */
  tunnelPort: number;
  tunnelUser: string;
  /** Keys the bastion does not accept. */
  revokedKeys: string[];
  /** How often each revoked device retries (the unit's RestartSec; compressed in tests). */
  revokedEveryMs: number;
  healthyKey: string;
  healthyListen: number;
  /** The sshd the administrator uses (the same as tunnelPort for today's single sshd). */
  adminPort: number;
  adminUser: string;
  adminKey: string;
  /** How long the revoked devices run before the first healthy/admin attempt. */
  warmupMs: number;
  /** Healthy tunnel attempts and admin logins, one each every `everyMs`. */
  tries: number;
  everyMs: number;
}

export async function sharedAddress(o: SharedAddressOptions): Promise<SharedAddressRun> {
  let stop = false;
  let revokedAttempts = 0;
  const loops = o.revokedKeys.map(async (key, i) => {
    await sleep((i * o.revokedEveryMs) / o.revokedKeys.length);
    while (!stop) {
      const t0 = Date.now();
      await sshOnce(o.tunnelPort, o.tunnelUser, key);
      revokedAttempts++;
      await sleep(Math.max(0, o.revokedEveryMs - (Date.now() - t0)));
    }
  });
  const out: SharedAddressRun = { healthy: [], admin: [], revokedAttempts: 0 };
  try {
    await sleep(o.warmupMs);
    for (let i = 0; i < o.tries; i++) {
      const t0 = Date.now();
      const [h, a] = await Promise.all([tunnelOnce(o.tunnelPort, o.tunnelUser, o.healthyKey, o.healthyListen), sshOnce(o.adminPort, o.adminUser, o.adminKey)]);
      out.healthy.push(h);
      out.admin.push({ ok: a.ok, stderr: a.stderr });
      await sleep(Math.max(0, o.everyMs - (Date.now() - t0)));
    }
  } finally {
    stop = true;
    await Promise.all(loops);
  }
  out.revokedAttempts = revokedAttempts;
  return out;
}
