/**
 * The device's reconnect back-off (overlays/common/usr/local/sbin/reverse-ssh-backoff) on real
 * `ssh` exits against a real sshd on 127.0.0.1: the overlay is built with the CLI, and the
 * unit's ExecStart (wrapper, which execs ssh) and ExecStopPost (`--record`) run exactly as
 * written, with the overlay's key and known_hosts. Each ExecStart + ExecStopPost is one start
 * of the unit; the test plays systemd's Restart=always by running them again. The times are shrunk through the wrapper's environment,
 * and in the schedule tests BACKOFF_SLEEP records the wait instead of sleeping it; the
 * "accepted again" test sleeps for real. The tests that meet the bastion run on every sshd version
 * the bastions run (the system's 9.2 and 10.x: helpers/sshd10.ts), one after the other on the
 * same port (the device pins [127.0.0.1]:PORT).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_TUNNEL_SIZING } from "../src/bastion/tunnel-sshd.js";
import { BACKOFF, tunnelCommand } from "./helpers/device.js";
import { portBlock, type PortBlock } from "./helpers/net.js";
import { canConnect, ensureUser, killSessions, startSshd, waitFor, type Sshd } from "./helpers/sshd.js";
import { expectSshdVersion, sshdVersions, type SshdBinary } from "./helpers/sshd10.js";
import { extract, readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-tunnel";
const dir = tempDir("mko-backoff-");
const root = join(dir, "root");
let ports: PortBlock;
let bastion: Sshd;
let build: { hostname: string; port: number; authorizedKeys: Record<string, string> };
let sleeper = "";
let hostKey = "";
const versions = sshdVersions();
const procs: ChildProcess[] = [];

/** Ends a started unit the way systemd stops one: the wrapper, its sleep and its ssh. */
function killGroup(p: ChildProcess): void {
  try {
    if (p.pid !== undefined) process.kill(-p.pid, "SIGKILL");
  } catch {
    // already gone
  }
}

beforeAll(async () => {
  ensureUser(TUNNEL_USER);
  // 0 bastion, 1 a port nobody listens on, 2 impostor, 4-7 the fleet's ranges.
  ports = await portBlock(8);
  hostKey = sshKeygen(dir, "bastion_host_key");
  writeFleet(
    dir,
    { lo: { host: "127.0.0.1", port: ports.port(0), user: TUNNEL_USER, hostKeys: [readPub(hostKey)] } },
    { ports: { ssh: ports.range(4, 5), services: ports.range(6, 7) } },
  );
  const r = runCli(["--board", "rpi4", "--bastion", "lo", "--json"], { cwd: dir });
  expect(r.code, r.stderr).toBe(0);
  build = JSON.parse(r.stdout);
  mkdirSync(root);
  extract((JSON.parse(r.stdout) as { overlay: string }).overlay, root);
  // Records each wait ("$1") in $WAITS instead of sleeping it.
  sleeper = join(dir, "record-wait");
  writeFileSync(sleeper, '#!/bin/sh\necho "$1" >> "$WAITS"\n');
  chmodSync(sleeper, 0o755);
}, 60_000);

afterAll(async () => {
  for (const p of procs) killGroup(p);
  await bastion?.stop();
  ports?.release();
  if (!process.env.KEEP) removeDir(dir);
});

function accept(yes: boolean): void {
  writeFileSync(join(bastion.dir, "authorized_keys", TUNNEL_USER), yes ? build.authorizedKeys.lo + "\n" : "", { mode: 0o644 });
}

/** ExecStart with the bastion's port swapped (`port`) and the device-side target a dead port. */
function command(port = ports.port(0)): string[] {
  const argv = tunnelCommand(root, "lo", build.hostname);
  expect(argv[0]).toBe(join(root, BACKOFF));
  const p = argv.indexOf("-p");
  argv[p + 1] = String(port);
  const r = argv.indexOf("-R");
  argv[r + 1] = `localhost:${build.port}:localhost:${ports.port(1)}`;
  return argv;
}

interface Device {
  state: string;
  waits: string;
}

function device(name: string): Device {
  const state = join(dir, "run", name);
  mkdirSync(state, { recursive: true, mode: 0o700 });
  return { state, waits: join(dir, `${name}.waits`) };
}

const SCHEDULE = { BACKOFF_FIRST: "10", BACKOFF_CAP: "40", BACKOFF_REFUSED_FIRST: "100", BACKOFF_REFUSED_CAP: "1000", BACKOFF_RESET_AFTER: "60" };

/** ExecStopPost= as the unit has it, with the wrapper inside the unpacked tree. */
function stopPost(): string[] {
  const unit = readFileSync(join(root, "etc/systemd/system/reverse-ssh@.service"), "utf8");
  const m = /^ExecStopPost=(.*)$/m.exec(unit);
  expect(m?.[1]).toBe(`${BACKOFF} --record`);
  return [join(root, BACKOFF), "--record"];
}

/** One start of the unit (ExecStart, then ExecStopPost), waits recorded rather than slept. */
function startOnce(d: Device, argv = command()): { code: number; stderr: string; state: string } {
  const env = { ...SCHEDULE, RUNTIME_DIRECTORY: d.state, BACKOFF_SLEEP: sleeper, WAITS: d.waits };
  const [cmd, ...args] = argv;
  const r = run(cmd!, args, { env });
  const [post, ...postArgs] = stopPost();
  const p = run(post!, postArgs, { env });
  expect(p.code, p.stderr).toBe(0);
  return { code: r.code, stderr: r.stderr + p.stderr, state: readFileSync(join(d.state, "backoff"), "utf8").trim() };
}

function waits(d: Device): number[] {
  try {
    return readFileSync(d.waits, "utf8").trim().split("\n").filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** The window each wait was drawn from, as the wrapper logged it. */
function windows(stderr: string): number[] {
  return [...stderr.matchAll(/waiting (\d+) s \(window (\d+) s/g)].map((m) => Number(m[2]));
}

/**
 * The bastion stands in for mkoverlay's tunnel sshd, which on OpenSSH >= 9.8 sets no
 * authentication penalties (src/bastion/tunnel-sshd.ts): with 10.x's defaults, the refused
 * device's own failures would get 127.0.0.1 dropped before the key exchange
 * ("kex_exchange_identification: Connection closed") and the refusal would never be seen.
 */
function penalties(bin: SshdBinary): string {
  return bin.major > 9 || (bin.major === 9 && bin.minor >= 8) ? `PerSourcePenalties ${DEFAULT_TUNNEL_SIZING.perSourcePenalties}` : "";
}

describe.each(versions.map((b) => [b.version, b] as const))("reverse-ssh-backoff on real ssh exits, bastion on OpenSSH %s", (version, bin) => {
  beforeAll(async () => {
    // The bastion starts out refusing the device: its tunnel user has no line for it.
    bastion = await startSshd({ dir: join(dir, `bastion-${version}`), hostKey, port: ports.port(0), authorizedKeys: { [TUNNEL_USER]: "" }, sshd: bin, extraConfig: penalties(bin) });
  }, 30_000);
  afterAll(async () => {
    for (const p of procs) killGroup(p);
    await bastion?.stop();
  });

  it(`the bastion is OpenSSH ${version}`, async () => {
    await expectSshdVersion(ports.port(0), bin);
  });

  it("ExecStart becomes ssh itself (exec): the unit's main process is ssh, with its sandbox", async () => {
    const d = device(`exec-${version}`);
    const [cmd, ...args] = command();
    const p = spawn(cmd!, args, { env: { ...process.env, ...SCHEDULE, RUNTIME_DIRECTORY: d.state }, stdio: "ignore", detached: true });
    procs.push(p);
    // The refused ssh takes a moment: long enough to see which program the started pid runs.
    await waitFor("the started process to become ssh", () => {
      try {
        return readFileSync(`/proc/${p.pid}/comm`, "utf8").trim() === "ssh";
      } catch {
        return false;
      }
    }, 5_000, 5);
    if (p.exitCode === null) await new Promise((r) => p.once("exit", r));
  }, 30_000);

  it("a refused key backs off to the long interval, not every 10 s", () => {
    accept(false);
    const d = device(`refused-${version}`);
    const seen: number[] = [];
    const states: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = startOnce(d);
      expect(r.code).toBe(255);
      expect(r.stderr).toContain("Permission denied (publickey)");
      seen.push(...windows(r.stderr));
      states.push(r.state);
    }
    expect(states).toEqual(["refused 1", "refused 2", "refused 3", "refused 4", "refused 5"]);
    // The first start does not wait; then 100 × 4^(n-1), capped at 1000.
    expect(seen).toEqual([100, 400, 1000, 1000]);
    const w = waits(d);
    expect(w).toHaveLength(4);
    [100, 400, 1000, 1000].forEach((win, i) => {
      expect(w[i]).toBeGreaterThanOrEqual(win / 2);
      expect(w[i]).toBeLessThanOrEqual(win);
    });
  }, 60_000);

  it("a changed bastion host key counts as refused (Host key verification failed)", async () => {
    const impostor = await startSshd({ dir: join(dir, `impostor-${version}`), port: ports.port(2), authorizedKeys: { [TUNNEL_USER]: build.authorizedKeys.lo + "\n" }, sshd: bin, extraConfig: penalties(bin) });
    try {
      const d = device(`impostor-${version}`);
      const r1 = startOnce(d, command(impostor.port));
      expect(r1.code).toBe(255);
      expect(r1.stderr).toContain("Host key verification failed");
      expect(r1.state).toBe("refused 1");
    } finally {
      await impostor.stop();
    }
  }, 30_000);

  it("a port still held by a stale session is a network failure, not a refusal", () => {
    accept(true);
    const d = device(`held-${version}`);
    const argv = command();
    // A port the line does not permit: sshd refuses the forward like a held one.
    argv[argv.indexOf("-R") + 1] = `localhost:${ports.port(3)}:localhost:${ports.port(1)}`;
    const r = startOnce(d, argv);
    expect(r.code).toBe(255);
    expect(r.stderr).toContain("remote port forwarding failed");
    expect(r.state).toBe("network 1");
  }, 30_000);

  it("a device refused by mistake comes back within its cap once the bastion accepts it again", async () => {
    accept(false);
    const d = device(`mistake-${version}`);
    // Real sleeps, small times: refusals wait [W/2, W] with W = 2, then 3 (the cap).
    const env = { BACKOFF_FIRST: "1", BACKOFF_CAP: "2", BACKOFF_REFUSED_FIRST: "2", BACKOFF_REFUSED_CAP: "3", BACKOFF_RESET_AFTER: "2", RUNTIME_DIRECTORY: d.state };
    const CAP_MS = 3_000;
    const RESTART_MS = 200;
    let stopped = false;
    let log = "";
    // systemd's Restart=always, in small: start again RESTART_MS after each exit.
    const loop = (async () => {
      while (!stopped) {
        const [cmd, ...args] = command();
        const p = spawn(cmd!, args, { env: { ...process.env, ...env }, stdio: ["ignore", "ignore", "pipe"], detached: true });
        procs.push(p);
        p.stderr.on("data", (b: Buffer) => (log += b.toString()));
        await new Promise((r) => p.once("exit", r));
        const [post, ...postArgs] = stopPost();
        log += run(post!, postArgs, { env }).stderr;
        await new Promise((r) => setTimeout(r, RESTART_MS));
      }
    })();
    try {
      await waitFor("three refusals", () => (log.match(/Permission denied/g) ?? []).length >= 3, 30_000);
      expect(readFileSync(join(d.state, "backoff"), "utf8").trim()).toMatch(/^refused [3-9]$/);
      const acceptedAt = Date.now();
      accept(true);
      await waitFor("the tunnel on the bastion", () => canConnect(build.port), CAP_MS + RESTART_MS + 10_000, 100);
      const back = Date.now() - acceptedAt;
      // Within the refused cap, plus the restart gap and the ssh handshake.
      expect(back).toBeLessThanOrEqual(CAP_MS + RESTART_MS + 3_000);
      // A tunnel that stayed up RESET_AFTER forgets the refusals: when the bastion drops it,
      // the next wait is a first network failure.
      await new Promise((r) => setTimeout(r, 2_500));
      killSessions(bastion.proc.pid);
      await waitFor("the state after the drop", () => readFileSync(join(d.state, "backoff"), "utf8").trim() === "network 1", 10_000);
    } finally {
      stopped = true;
      for (const p of procs) killGroup(p);
      await loop;
    }
  }, 90_000);
});

describe("reverse-ssh-backoff with the network down (no sshd answers)", () => {
  it("network down: jittered exponential waits up to the cap, and they differ between devices", () => {
    const a = device("net-a");
    const b = device("net-b");
    for (const d of [a, b]) {
      const seen: number[] = [];
      for (let i = 0; i < 6; i++) {
        const r = startOnce(d, command(ports.port(1)));
        expect(r.code).toBe(255);
        expect(r.stderr).toMatch(/Connection refused/);
        expect(r.state).toBe(`network ${i + 1}`);
        seen.push(...windows(r.stderr));
      }
      expect(seen).toEqual([10, 20, 40, 40, 40]);
      const w = waits(d);
      [10, 20, 40, 40, 40].forEach((win, i) => {
        expect(w[i]).toBeGreaterThanOrEqual(1);
        expect(w[i]).toBeLessThanOrEqual(win);
      });
    }
    // Five draws from [1,10], [1,20], [1,40]…: two devices agreeing on all is ~1 in 10^7.
    expect(waits(a)).not.toEqual(waits(b));
  }, 60_000);
});

describe("reverse-ssh-backoff lint", () => {
  const SCRIPT = resolve(import.meta.dirname, "../overlays/common", "." + BACKOFF);

  it("is shellcheck-clean as POSIX sh, every optional check but SC2250 (braces)", () => {
    const r = spawnSync("shellcheck", ["-s", "sh", "--enable=all", "--exclude=SC2250", SCRIPT], { encoding: "utf8" });
    if (r.error) throw r.error; // shellcheck missing must fail the test, not skip it
    expect(r.stdout + r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(readFileSync(SCRIPT, "utf8").split("\n")[0]).toBe("#!/bin/sh");
  });
});
