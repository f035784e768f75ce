/**
 * The product end to end against real OpenSSH: build an overlay with the CLI, give a real
 * sshd on 127.0.0.1 (the bastion) only the emitted authorized_keys line, and run the tunnel
 * exactly as the overlay's unit runs it — with the overlay's own key and known_hosts.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tunnelArgv } from "./helpers/device.js";
import { portBlock, type PortBlock } from "./helpers/net.js";
import { canConnect, ensureUser, startSshd, waitFor, type Sshd } from "./helpers/sshd.js";
import { extract, readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-tunnel";
const dir = tempDir("mko-tunnel-");
const root = join(dir, "root");
let bastion: Sshd;
let device: Sshd;
let build: { hostname: string; port: number; fingerprint: string; publicKey: string; overlay: string; authorizedKeys: Record<string, string> };
let operatorKey: string;
const procs: ChildProcess[] = [];
/**
 * Every port this file listens on comes from a block it owns (helpers/net.ts says why a fixed
 * range made this file fail whenever another run of the suite held 21000): 0 bastion,
 * 1 impostor, 2 device sshd, 4-7 the first describe's ranges, 8+ the from=/expiry cases.
 */
let ports: PortBlock;

beforeAll(async () => {
  ensureUser(TUNNEL_USER);
  ports = await portBlock(16);
  const bastionHostKey = sshKeygen(dir, "bastion_host_key");
  const bastionPort = ports.port(0);
  writeFleet(
    dir,
    { lo: { host: "127.0.0.1", port: bastionPort, user: TUNNEL_USER, hostKeys: [readPub(bastionHostKey)] } },
    { ports: { ssh: ports.range(4, 5), services: ports.range(6, 7) } },
  );
  const r = runCli(["--board", "rpi4", "--bastion", "lo", "--json"], { cwd: dir });
  expect(r.code, r.stderr).toBe(0);
  build = JSON.parse(r.stdout);
  run("mkdir", ["-p", root]);
  extract(build.overlay, root);
  // The bastion holds nothing but the emitted line.
  bastion = await startSshd({ dir: join(dir, "bastion"), hostKey: bastionHostKey, port: bastionPort, authorizedKeys: { [TUNNEL_USER]: build.authorizedKeys.lo + "\n" } });
  // The device's sshd, with the overlay's key as its host key; an operator key for root.
  operatorKey = sshKeygen(dir, "operator");
  device = await startSshd({
    dir: join(dir, "device"),
    port: ports.port(2),
    hostKey: join(root, "etc/ssh/mkoverlay/ssh_host_ed25519_key"),
    authorizedKeys: { root: readPub(operatorKey) + "\n" },
  });
}, 60_000);

afterAll(async () => {
  for (const p of procs) p.kill("SIGKILL");
  await bastion?.stop();
  await device?.stop();
  ports?.release();
  if (!process.env.KEEP) removeDir(dir);
});

/** The unit's ssh command, optionally with the forward spec swapped (to try what the bastion refuses). */
function deviceArgv(forward?: string): string[] {
  const argv = tunnelArgv(root, "lo", build.hostname);
  const i = argv.indexOf("-R");
  expect(argv[i + 1]).toBe(`localhost:${build.port}:localhost:22`);
  // Port 22 is not ours on a test machine: the device's sshd listens on device.port instead.
  argv[i + 1] = forward ?? `localhost:${build.port}:localhost:${device.port}`;
  return argv;
}

describe("tunnel against a real sshd holding only the emitted line", () => {
  it("the line is the documented shape", () => {
    expect(build.authorizedKeys.lo).toBe(
      `restrict,port-forwarding,command="/sbin/nologin",permitlisten="localhost:${build.port}" ${build.publicKey}`,
    );
  });

  it("refuses a forward on any other port", () => {
    const argv = deviceArgv(`localhost:${build.port + 1}:localhost:22`);
    const r = run(argv[0]!, argv.slice(1));
    expect(r.code).toBe(255);
    expect(r.stderr).toMatch(/remote port forwarding failed for listen port/);
  });

  it("refuses a 0.0.0.0 bind and a 127.0.0.1 bind of the reserved port", () => {
    for (const bind of ["0.0.0.0", "127.0.0.1"]) {
      const argv = deviceArgv(`${bind}:${build.port}:localhost:22`);
      const r = run(argv[0]!, argv.slice(1));
      expect(r.code, bind).toBe(255);
      expect(r.stderr).toMatch(/remote port forwarding failed/);
    }
  });

  it("refuses a shell or command", () => {
    const argv = deviceArgv().filter((a) => a !== "-N");
    const r = run(argv[0]!, [...argv.slice(1), "echo", "PWNED"]);
    expect(r.stdout).not.toContain("PWNED");
    // Authenticated (the key is accepted), then the forced command refuses the session.
    expect(r.stdout + r.stderr).toMatch(/This account is currently not available/);
    expect(r.code).not.toBe(0);
  });

  it("refuses a bastion whose host key is not the pinned one", async () => {
    const impostor = await startSshd({ dir: join(dir, "impostor"), port: ports.port(1), authorizedKeys: { [TUNNEL_USER]: build.authorizedKeys.lo + "\n" } });
    try {
      const argv = deviceArgv().map((a) => (a === String(bastion.port) ? String(impostor.port) : a));
      const r = run(argv[0]!, argv.slice(1));
      expect(r.code).toBe(255);
      expect(r.stderr).toMatch(/Host key verification failed|No ED25519 host key is known/);
    } finally {
      await impostor.stop();
    }
  });

  it("opens the tunnel on the reserved port; an operator reaches the device's sshd with the registered host key", async () => {
    const argv = deviceArgv();
    const p = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
    procs.push(p);
    let err = "";
    p.stderr?.on("data", (d: Buffer) => (err += d.toString()));
    await waitFor(`tunnel port ${build.port} on the bastion`, async () => {
      if (p.exitCode !== null) throw new Error(`tunnel ssh exited ${p.exitCode}: ${err}`);
      return canConnect(build.port);
    });
    // known_hosts holding only the registered key: strict checking proves which key answered.
    const kh = join(dir, "operator_known_hosts");
    writeFileSync(kh, `[127.0.0.1]:${build.port} ${build.publicKey}\n`);
    const r = run("ssh", [
      "-F", "none", "-p", String(build.port), "-i", operatorKey, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
      "-o", "StrictHostKeyChecking=yes", "-o", `UserKnownHostsFile=${kh}`, "-o", "GlobalKnownHostsFile=/dev/null",
      "root@127.0.0.1", "echo", "reached-device",
    ]);
    expect(r.stderr).not.toMatch(/REMOTE HOST IDENTIFICATION HAS CHANGED/);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe("reached-device");
    // The session on the bastion was the device key's, by fingerprint.
    expect(readFileSync(bastion.logFile, "utf8")).toContain(build.fingerprint);
  });
});

describe("sshd accepts the overlay's key and drop-in", () => {
  it("sshd -t passes with the overlay's HostKey line", () => {
    const dropin = readFileSync(join(root, "etc/ssh/sshd_config.d/50-mkoverlay.conf"), "utf8");
    const cfg = join(dir, "sshd_check_config");
    writeFileSync(cfg, dropin.replace(/\/etc\/ssh\/mkoverlay\//g, `${root}/etc/ssh/mkoverlay/`));
    const r = run("/usr/sbin/sshd", ["-t", "-f", cfg]);
    expect(r.code, r.stderr).toBe(0);
    const t = run("/usr/sbin/sshd", ["-T", "-f", cfg]);
    expect(t.stdout).toContain(`hostkey ${root}/etc/ssh/mkoverlay/ssh_host_ed25519_key`);
  });
});

describe("from= and expiry-time= are accepted by a real sshd (a bad option would drop the line silently)", () => {
  let next = 8;
  async function tryLine(bastionOpts: { from?: string[]; expiry?: string }): Promise<{ code: number; stdout: string; stderr: string; line: string }> {
    const ws = join(dir, `opts-${Object.keys(bastionOpts).join("-")}-${(bastionOpts.from ?? []).length}`);
    run("mkdir", ["-p", ws]);
    const hk = sshKeygen(ws, "host");
    // Listening ports are machine-wide: stay clear of the tunnel the first describe holds open.
    const port = ports.port(next);
    const ranges = { ssh: ports.range(next + 1, next + 1), services: ports.range(next + 2, next + 2) };
    next += 3;
    writeFleet(ws, { lo: { host: "127.0.0.1", port, user: TUNNEL_USER, hostKeys: [readPub(hk)], ...bastionOpts } }, { ports: ranges });
    const r = runCli(["--board", "rpi4", "--bastion", "lo", "--json"], { cwd: ws });
    expect(r.code, r.stderr).toBe(0);
    const b = JSON.parse(r.stdout) as typeof build;
    const root2 = join(ws, "root");
    run("mkdir", ["-p", root2]);
    extract(b.overlay, root2);
    const s = await startSshd({ dir: join(ws, "bastion"), hostKey: hk, port, authorizedKeys: { [TUNNEL_USER]: `${b.authorizedKeys.lo}\n` } });
    try {
      // One round trip that needs the key accepted and the listen permitted: -R then exit.
      const argv = tunnelArgv(root2, "lo", b.hostname).filter((a) => a !== "-N");
      const res = run(argv[0]!, [...argv.slice(1), "true"]);
      return { ...res, line: b.authorizedKeys.lo ?? "" };
    } finally {
      await s.stop();
    }
  }

  it("a matching from= and a future expiry-time let the key in", async () => {
    const r = await tryLine({ from: ["127.0.0.0/8", "::1"], expiry: "30d" });
    expect(r.line).toMatch(/from="127\.0\.0\.0\/8,::1",expiry-time="\d{12}"/);
    // Authenticated: the forced command answers (the session itself is refused by nologin).
    expect(r.stderr).not.toMatch(/Permission denied/);
    expect(r.stdout + r.stderr).toMatch(/This account is currently not available/);
  });

  it("a from= that excludes the device refuses the key", async () => {
    const r = await tryLine({ from: ["192.0.2.0/24"] });
    expect(r.code).toBe(255);
    expect(r.stderr).toMatch(/Permission denied/);
  });
});
