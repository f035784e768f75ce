/**
 * The bastion side and the fleet, end to end against real OpenSSH: the exported
 * authorized_keys file and Match block on a real sshd, revoke and rotate, operator access by
 * name through ProxyJump with strict host key checking, batches, forwards, verify, output forms.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tunnelArgv } from "./helpers/device.js";
import { portBlock, type PortBlock } from "./helpers/net.js";
import { canConnect, ensureUser, startSshd, waitFor, type Sshd } from "./helpers/sshd.js";
import { CLI, extract, readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-tunnel";
const dir = tempDir("mko-fleet-");
const procs: ChildProcess[] = [];
const sshds: Sshd[] = [];
let bastionKey: string;
let bastionPort: number;
let operatorKey: string;
const cli = (args: string[]) => runCli(args, { cwd: dir });
/**
 * Every port this file listens on or reserves comes from a block it owns (helpers/net.ts: fixed
 * ports collide with other runs on the machine): 0 bastion, 1 device sshd, 2 the -L target,
 * 3 the device's -L port, 4 the forwards bastion; 16-111 / 112-207 the fleet's ranges,
 * 208-303 / 304-399 the forwards workspace's.
 */
let ports: PortBlock;

interface Built {
  hostname: string;
  port: number;
  fingerprint: string;
  publicKey: string;
  overlay: string;
  services: Record<string, number>;
}

beforeAll(async () => {
  ensureUser(TUNNEL_USER);
  bastionKey = sshKeygen(dir, "bastion_host_key");
  operatorKey = sshKeygen(dir, "operator");
  ports = await portBlock(400);
  bastionPort = ports.port(0);
  writeFleet(
    dir,
    { lo: { host: "127.0.0.1", port: bastionPort, user: TUNNEL_USER, hostKeys: [readPub(bastionKey)], jumpUser: "root" } as never },
    { ports: { ssh: ports.range(16, 111), services: ports.range(112, 207) } },
  );
});

afterAll(async () => {
  for (const p of procs) p.kill("SIGKILL");
  for (const s of sshds) await s.stop();
  ports?.release();
  removeDir(dir);
});

function build(extra: string[] = []): Built {
  const r = cli(["--board", "rpi4", "--bastion", "lo", "--json", ...extra]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Built;
}

function unpack(b: Built, name = b.hostname): string {
  const root = join(dir, `root-${name}`);
  mkdirSync(root, { recursive: true });
  extract(b.overlay, root);
  return root;
}

/** The bastion as its admin sets it up from mkoverlay's exports. */
async function startBastion(): Promise<{ sshd: Sshd; akFile: string }> {
  const bdir = join(dir, "bastion");
  mkdirSync(bdir, { recursive: true });
  chmodSync(dir, 0o755);
  chmodSync(bdir, 0o755);
  const akFile = join(bdir, "tunnel_authorized_keys");
  writeFileSync(akFile, "");
  run("chown", [`${TUNNEL_USER}:`, akFile]);
  const w = cli(["bastion", "authorized-keys", "--bastion", "lo", "--write", akFile]);
  expect(w.code, w.stderr).toBe(0);
  const match = cli(["bastion", "sshd-config", "--bastion", "lo", "--authorized-keys-file", akFile]);
  expect(match.code, match.stderr).toBe(0);
  const sshd = await startSshd({
    dir: bdir,
    hostKey: bastionKey,
    port: bastionPort,
    // root stands for an operator's own account on the bastion (ProxyJump goes through it).
    authorizedKeys: { root: readPub(operatorKey) + "\n" },
    extraConfig: match.stdout,
  });
  sshds.push(sshd);
  return { sshd, akFile };
}

/** Runs the device's tunnel as its unit would, with the sshd forward pointed at `devicePort`. */
async function openTunnel(b: Built, root: string, devicePort: number): Promise<ChildProcess> {
  const argv = tunnelArgv(root, "lo", b.hostname);
  argv[argv.indexOf("-R") + 1] = `localhost:${b.port}:localhost:${devicePort}`;
  const p = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
  procs.push(p);
  let err = "";
  p.stderr?.on("data", (d: Buffer) => (err += d.toString()));
  await waitFor(`tunnel ${b.hostname} on ${b.port}`, async () => {
    if (p.exitCode !== null) throw new Error(`tunnel exited ${p.exitCode}: ${err}`);
    return canConnect(b.port);
  });
  return p;
}

function tryTunnel(b: Built, root: string): { code: number; stdout: string; stderr: string } {
  const argv = tunnelArgv(root, "lo", b.hostname).filter((a) => a !== "-N");
  return run(argv[0]!, [...argv.slice(1), "true"]);
}

describe("bastion import on a real sshd", () => {
  let a: Built, revoked: Built, rotated: Built;
  let rootA: string, rootRevoked: string, rootRotatedOld: string;
  let bastion: { sshd: Sshd; akFile: string };
  let device: Sshd;

  beforeAll(async () => {
    a = build();
    revoked = build();
    rotated = build();
    [rootA, rootRevoked, rootRotatedOld] = [unpack(a), unpack(revoked), unpack(rotated, "rotated-old")];
    expect(cli(["revoke", revoked.hostname]).code).toBe(0);
    // --grace 0: the old key is dropped at once (bastion-agent.test.ts covers the grace period).
    const rot = cli(["rotate", rotated.hostname, "--grace", "0", "--json", "--out", join(dir, "rotated")]);
    expect(rot.code, rot.stderr).toBe(0);
    bastion = await startBastion();
    device = await startSshd({ dir: join(dir, "device"), port: ports.port(1), hostKey: join(rootA, "etc/ssh/mkoverlay/ssh_host_ed25519_key"), authorizedKeys: { root: readPub(operatorKey) + "\n" } });
    sshds.push(device);
  });

  it("the exported file has a header and only live devices, in port order", () => {
    const text = readFileSync(bastion.akFile, "utf8");
    expect(text).toMatch(/^# authorized_keys for mko-tunnel@127\.0\.0\.1 \(bastion 'lo'\)\n# Generated by mkoverlay/);
    const keys = text.split("\n").filter((l) => l && !l.startsWith("#"));
    expect(keys.map((l) => l.split(" ").pop())).toEqual([a.hostname, rotated.hostname]);
    expect(text).not.toContain(revoked.publicKey.split(" ")[1]);
    expect(statSync(bastion.akFile).mode & 0o777).toBe(0o600);
    expect(statSync(bastion.akFile).uid).toBe(Number(run("id", ["-u", TUNNEL_USER]).stdout.trim()));
  });

  it("the Match block passes sshd -t (with the whole config)", () => {
    expect(run("/usr/sbin/sshd", ["-t", "-f", join(bastion.sshd.dir, "sshd_config")]).code).toBe(0);
  });

  it("accepts a live device's tunnel", async () => {
    await openTunnel(a, rootA, device.port);
  });

  it("refuses the revoked device and the rotated-out key", () => {
    for (const [b, root] of [[revoked, rootRevoked], [rotated, rootRotatedOld]] as const) {
      const r = tryTunnel(b, root);
      expect(r.code, b.hostname).toBe(255);
      expect(r.stderr).toMatch(/Permission denied \(publickey\)/);
    }
  });

  it("accepts the rotated device's new key on the same port", async () => {
    const list = JSON.parse(cli(["registry", "list", "--json"]).stdout) as Built[];
    const now = list.find((d) => d.hostname === rotated.hostname)!;
    expect(now.port).toBe(rotated.port);
    expect(now.fingerprint).not.toBe(rotated.fingerprint);
    const root = join(dir, "root-rotated-new");
    mkdirSync(root);
    extract(join(dir, "rotated", `${rotated.hostname}.overlay.tar.gz`), root);
    const r = tryTunnel(rotated, root);
    expect(r.stderr).not.toMatch(/Permission denied/);
    // Authenticated and forwarded; the session itself meets ForceCommand /sbin/nologin.
    expect(r.stdout + r.stderr).toMatch(/This account is currently not available/);
  });

  it("refuses -L and -W to the bastion's own sshd and anywhere else, even for a live key", () => {
    for (const target of [`127.0.0.1:${bastionPort}`, `localhost:${bastionPort}`, "127.0.0.1:9"]) {
      const argv = tunnelArgv(rootA, "lo", a.hostname).filter((x) => x !== "-N");
      const i = argv.indexOf("-R");
      argv.splice(i, 2, "-W", target);
      const r = run(argv[0]!, argv.slice(1));
      expect(r.code, target).not.toBe(0);
      expect(r.stderr, target).toMatch(/administratively prohibited|open failed/);
    }
  });

  it("exactly ssh-config --known-hosts FILE + known-hosts > FILE: both hops strictly checked against FILE", () => {
    const kh = join(dir, "operator_known_hosts");
    const known = cli(["known-hosts"]);
    expect(known.code).toBe(0);
    // The bastion's pinned key comes with the export; nothing is added by hand.
    expect(known.stdout).toContain(`\n[127.0.0.1]:${bastionPort} ${readPub(bastionKey).split(" ").slice(0, 2).join(" ")}\n`);
    writeFileSync(kh, known.stdout);
    const cfg = cli(["ssh-config", "--known-hosts", kh]);
    expect(cfg.code, cfg.stderr).toBe(0);
    expect(cfg.stdout).toContain(`Host ${a.hostname}\n    HostName localhost\n    Port ${a.port}\n    User root\n    ProxyJump root@127.0.0.1:${bastionPort}\n    HostKeyAlias ${a.hostname}`);
    const file = join(dir, "operator_ssh_config");
    // The operator's own defaults come after the generated entries and are lax on purpose: the
    // generated entries must win for both hops (no UserKnownHostsFile here; the global file off).
    writeFileSync(
      file,
      `${cfg.stdout}\nHost *\n    IdentityFile ${operatorKey}\n    IdentitiesOnly yes\n    BatchMode yes\n    StrictHostKeyChecking accept-new\n    UserKnownHostsFile ${join(dir, "operator_default_known_hosts")}\n    GlobalKnownHostsFile /dev/null\n`,
    );
    const r = run("ssh", ["-F", file, a.hostname, "echo", "hello-from-device"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe("hello-from-device");
    // With a wrong key for the alias, strict checking refuses the device.
    const bastionLine = `[127.0.0.1]:${bastionPort} ${readPub(bastionKey)}\n`;
    writeFileSync(kh, `${a.hostname} ${rotated.publicKey}\n${bastionLine}`);
    const bad = run("ssh", ["-F", file, a.hostname, "true"]);
    expect(bad.code).toBe(255);
    expect(bad.stderr).toMatch(/REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed/);
    // The bastion hop is checked against the same file: a wrong bastion key is refused, and so
    // is a bastion missing from the file (StrictHostKeyChecking yes beats the later accept-new).
    writeFileSync(kh, known.stdout.replace(readPub(bastionKey).split(" ")[1]!, rotated.publicKey.split(" ")[1]!));
    const wrongBastion = run("ssh", ["-F", file, a.hostname, "true"]);
    expect(wrongBastion.code).toBe(255);
    expect(wrongBastion.stderr).toMatch(new RegExp(`Host key for \\[127\\.0\\.0\\.1\\]:${bastionPort} has changed|REMOTE HOST IDENTIFICATION HAS CHANGED`));
    writeFileSync(kh, known.stdout.split("\n").filter((l) => !l.startsWith("[127.0.0.1]")).join("\n"));
    const unknownBastion = run("ssh", ["-F", file, a.hostname, "true"]);
    expect(unknownBastion.code).toBe(255);
    expect(unknownBastion.stderr).toMatch(/No ED25519 host key is known for \[127\.0\.0\.1\]|Host key verification failed/);
  });

  it("verify passes a fresh overlay and fails a revoked or tampered one", () => {
    expect(cli(["verify", a.overlay]).code).toBe(0);
    const v = cli(["verify", revoked.overlay]);
    expect(v.code).toBe(1);
    expect(v.stdout).toMatch(/FAIL .* is active in the registry: revoked/);
    // Tamper: drop the raspios mask and loosen the key's mode.
    const t = join(dir, "tampered");
    mkdirSync(t);
    extract(a.overlay, t);
    run("rm", [join(t, "etc/systemd/system/regenerate_ssh_host_keys.service")]);
    chmodSync(join(t, "etc/ssh/mkoverlay/ssh_host_ed25519_key"), 0o644);
    const tv = cli(["verify", t]);
    expect(tv.code).toBe(1);
    expect(tv.stdout).toMatch(/^FAIL first-boot guards: \/etc\/systemd\/system\/regenerate_ssh_host_keys\.service is missing$/m);
    expect(tv.stdout).toMatch(/^FAIL host key: \/etc\/ssh\/mkoverlay\/ssh_host_ed25519_key is mode 0644, not 0600$/m);
  });

  it("release gives a revoked device's port back; the next device gets it", () => {
    expect(cli(["registry", "release", a.hostname]).code).not.toBe(0);
    expect(cli(["registry", "release", revoked.hostname]).code).toBe(0);
    expect(build().port).toBe(revoked.port);
  });
});

describe("batches", () => {
  it("a batch of 40 yields 40 distinct names, ports and keys, all registered", () => {
    const out = join(dir, "batch40");
    const r = cli(["batch", "--board", "cm4", "--bastion", "lo", "--count", "40", "--out", out, "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const devs = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as Built);
    expect(devs).toHaveLength(40);
    for (const k of ["hostname", "port", "fingerprint"] as const) expect(new Set(devs.map((d) => d[k])).size).toBe(40);
    for (const d of devs) expect(existsSync(d.overlay)).toBe(true);
    const list = JSON.parse(cli(["registry", "list", "--json"]).stdout) as Built[];
    for (const d of devs) expect(list.find((x) => x.hostname === d.hostname)?.port).toBe(d.port);
  });

  it("--hosts: a taken name fails alone; the others are built (a bad row rejects the file: hosts-file.test.ts)", () => {
    const first = join(dir, "hosts1.csv");
    writeFileSync(first, "serial,hostname\n1,line-a\n");
    expect(cli(["batch", "--board", "rpi5", "--bastion", "lo", "--hosts", first, "--out", join(dir, "batch-hosts")]).code).toBe(0);
    const hosts = join(dir, "hosts.csv");
    writeFileSync(hosts, "serial,hostname\n2,line-b\n3,line-a\n4,line-c\n");
    const r = cli(["batch", "--board", "rpi5", "--bastion", "lo", "--hosts", hosts, "--out", join(dir, "batch-hosts")]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/line-a: hostname line-a is already registered/);
    expect(r.stderr).toMatch(/1 of 3 device\(s\) failed/);
    const list = JSON.parse(cli(["registry", "list", "--json"]).stdout) as Built[];
    expect(list.filter((d) => d.hostname.startsWith("line-")).map((d) => d.hostname).sort()).toEqual(["line-a", "line-b", "line-c"]);
  });
});

describe("registry list", () => {
  it.each([
    ["csv", /^hostname,bastions,port,services,fingerprint,board,os,status,created[,\n]/], // then any factory data columns
    ["markdown", /^\| hostname \| bastions \| port /],
    ["table", /^hostname\s+port\s+bastions\s+board\s+os\s+status\s+seen/], // fits 80 columns (conventions.test.ts)
  ])("--format %s", (format, head) => {
    const r = cli(["registry", "list", "--format", format]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(head);
  });
  it("--json has at least hostname, port, fingerprint, status", () => {
    const list = JSON.parse(cli(["registry", "list", "--json"]).stdout) as Record<string, unknown>[];
    for (const k of ["hostname", "port", "fingerprint", "status"]) expect(list[0]).toHaveProperty(k);
  });
});

describe("output forms", () => {
  it("--format dir writes a root-owned tree with the archive's modes", () => {
    const out = join(dir, "dirform");
    const b = JSON.parse(cli(["--board", "rpi4", "--bastion", "lo", "--format", "dir", "--out", out, "--json"]).stdout) as Built;
    expect(b.overlay).toBe(join(out, `${b.hostname}.overlay`));
    const key = statSync(join(b.overlay, "etc/ssh/mkoverlay/ssh_host_ed25519_key"));
    expect([key.mode & 0o777, key.uid, key.gid]).toEqual([0o600, 0, 0]);
    expect(cli(["verify", b.overlay]).code).toBe(0);
  });

  it("--format dir: the folder is synced before it takes its name, and its name after (strace)", () => {
    const out = join(dir, "dirform-sync");
    const trace = join(dir, "dirform.strace");
    const env = { NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: "off" };
    const r = run("strace", ["-f", "-qq", "-y", "-o", trace, "-e", "trace=fsync,fdatasync,syncfs,rename,renameat,renameat2", process.execPath, CLI, "--board", "rpi4", "--bastion", "lo", "--format", "dir", "--out", out, "--json"], { cwd: dir, env });
    expect(r.code, r.stderr).toBe(0);
    const folder = (JSON.parse(r.stdout) as Built).overlay;
    const calls = readFileSync(trace, "utf8").split("\n");
    const renamed = calls.findIndex((l) => /rename\w*\(/.test(l) && l.includes(`"${folder}"`));
    expect(renamed, "the folder was renamed into place").toBeGreaterThan(0);
    expect(calls.slice(0, renamed).some((l) => /^\d+ +(syncfs|fsync)\(\d+<[^>]*\/\.[^/>]*\.overlay\.[^/>]*\.tmp/.test(l)), "its files synced before").toBe(true);
    expect(calls.slice(renamed).some((l) => new RegExp(`^\\d+ +fsync\\(\\d+<${out}>\\)`).test(l)), "its name synced after").toBe(true);
  });

  it("--apply lays it over a root file system, keeping the target's existing folders", () => {
    const root = join(dir, "mounted-root");
    mkdirSync(join(root, "etc/ssh"), { recursive: true });
    chmodSync(join(root, "etc"), 0o751);
    const r = cli(["--board", "rpi4", "--bastion", "lo", "--apply", root, "--out", join(dir, "applied-out"), "--json"]);
    expect(r.code, r.stderr).toBe(0);
    expect(statSync(join(root, "etc")).mode & 0o777).toBe(0o751);
    expect(statSync(join(root, "etc/ssh/mkoverlay")).mode & 0o777).toBe(0o755);
    expect(run("readlink", [join(root, "etc/systemd/system/regenerate_ssh_host_keys.service")]).stdout.trim()).toBe("/dev/null");
    expect(cli(["verify", root]).code).toBe(0);
  });
});

describe("two tunnels and forwards", () => {
  const ws = join(dir, "forwards");
  let targetPort: number;
  let echo: import("node:net").Server;

  beforeAll(async () => {
    mkdirSync(ws, { recursive: true });
    const net = await import("node:net");
    // A service on the bastion side that the device reaches through -L.
    echo = net.createServer((s) => s.end("bastion-side-service\n"));
    targetPort = ports.port(2);
    await new Promise<void>((r) => echo.listen(targetPort, "127.0.0.1", () => r()));
  });
  afterAll(() => echo.close());

  function fleetWith(forwards: unknown[], port = bastionPort): void {
    writeFleet(
      ws,
      {
        lo: { host: "127.0.0.1", port, user: TUNNEL_USER, hostKeys: [readPub(bastionKey)] },
        lo2: { host: "localhost", port, user: TUNNEL_USER, hostKeys: [readPub(bastionKey)] },
      },
      { ports: { ssh: ports.range(208, 303), services: ports.range(304, 399) }, forwards },
    );
  }

  it("-L or -D on two tunnels is refused with the reason", () => {
    fleetWith([
      { name: "a", type: "local", bastion: "lo", listen: 14505, to: "localhost:4505" },
      { name: "b", type: "socks", bastion: "lo2", listen: 11080, allow: ["intranet.example.com:8080"] },
    ]);
    const r = runCli(["--board", "rpi4", "--bastion", "lo,lo2"], { cwd: ws });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/forwards\[1\]\.bastion: local \(-L\) and SOCKS \(-D\) forwards bind ports on the device, so only one tunnel may carry them/);
  });

  it("service ports, -L and permitopen render per tunnel, and work against the real bastion", async () => {
    const deviceListen = ports.port(3);
    fleetWith([
      { name: "http", local: 8080 },
      { name: "svc", type: "local", bastion: "lo", listen: deviceListen, to: `localhost:${targetPort}` },
    ]);
    const r = runCli(["--board", "rpi4", "--bastion", "lo,lo2", "--json"], { cwd: ws });
    expect(r.code, r.stderr).toBe(0);
    const b = JSON.parse(r.stdout) as Built & { authorizedKeys: Record<string, string> };
    const http = b.services.http!;
    expect(http).toBeGreaterThanOrEqual(ports.port(304));
    expect(b.authorizedKeys.lo).toContain(`permitlisten="localhost:${b.port}",permitlisten="localhost:${http}",permitopen="localhost:${targetPort}" `);
    expect(b.authorizedKeys.lo2).toContain(`permitlisten="localhost:${b.port}",permitlisten="localhost:${http}" `);
    expect(b.authorizedKeys.lo2).not.toContain("permitopen");
    const root = join(ws, "root");
    mkdirSync(root);
    extract(b.overlay, root);
    expect(readFileSync(join(root, "etc/mkoverlay/tunnels/lo.env"), "utf8")).toContain(
      `EXTRA_FORWARDS=-R localhost:${http}:localhost:8080 -L localhost:${deviceListen}:localhost:${targetPort}\n`,
    );
    expect(readFileSync(join(root, "etc/mkoverlay/tunnels/lo2.env"), "utf8")).toContain(`EXTRA_FORWARDS=-R localhost:${http}:localhost:8080\n`);
    // The bastion's Match block now permits exactly that destination, and sshd accepts it.
    const match = runCli(["bastion", "sshd-config", "--bastion", "lo"], { cwd: ws }).stdout;
    expect(match).toContain(`    AllowTcpForwarding yes\n    PermitOpen localhost:${targetPort}\n`);
    const s = await startSshd({ dir: join(ws, "bastion"), port: ports.port(4), hostKey: bastionKey, authorizedKeys: { [TUNNEL_USER]: `${b.authorizedKeys.lo}\n` }, extraConfig: match });
    sshds.push(s);
    const argv = tunnelArgv(root, "lo", b.hostname).map((x) => (x === String(bastionPort) ? String(s.port) : x));
    const kh = join(root, "etc/ssh/mkoverlay/known_hosts");
    writeFileSync(kh, readFileSync(kh, "utf8").replace(`[127.0.0.1]:${bastionPort}`, `[127.0.0.1]:${s.port}`));
    const p = spawn(argv[0]!, argv.slice(1), { stdio: "ignore" });
    procs.push(p);
    await waitFor("service port on the bastion", () => canConnect(http));
    await waitFor("-L port on the device", () => canConnect(deviceListen));
    const net = await import("node:net");
    const got = await new Promise<string>((resolve, reject) => {
      let data = "";
      const c = net.connect(deviceListen, "127.0.0.1");
      c.on("data", (d) => (data += d.toString()));
      c.on("end", () => resolve(data));
      c.on("error", reject);
    });
    expect(got).toBe("bastion-side-service\n");
  });
});
