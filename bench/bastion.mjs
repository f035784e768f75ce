#!/usr/bin/env node
// `make bench-bastion` (as root; not part of `make test`): the bastion side at fleet scale, with
// the real programs. Prints a markdown table and writes bench/bastion-results.md.
//
// - sshd CPU per tunnel login (ssh -N -R, closed once the forward listens) with 10, 10,000 and
//   40,000 registered devices, through `bastion install`'s drop-in and the agent's key directory,
//   against a bare sshd with one authorized key, the file export, and device certificates
//   (TrustedUserCAKeys + AuthorizedPrincipalsCommand + a KRL of 40,000 revoked serials).
//   Method: the daemon sshd (listener, re-exec, privsep, keys command and all) runs in its own
//   cpuacct cgroup; CPU per login = the cgroup's usage delta around one login, median of RUNS.
// - Reconnect storm: 200 gateways (real ssh -N -R clients with real device keys, retrying 1 s
//   after a failure) after the bastion's sshd is restarted with its sessions gone (a reboot):
//   time until all 200 ports listen again, agent key directory vs file export.
// - Revocation latency: `mkoverlay revoke HOST` → the device's session gone, PostgreSQL registry
//   of 40,000 devices, the agent with its read-only role; median and max over 20.
// - sshd memory per tunnel: PSS (smaps_rollup) of all sshd session processes / tunnels, with
//   300 tunnels up. And the agent's first sync of 40,000 devices and its RSS.
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { cpus } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { listening, postgresHelper } from "./lib.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const CLI = join(ROOT, "bin/mkoverlay");
const WORK = process.env.BENCH_WORK ?? join(ROOT, "bench/work/bastion");
// sshd trusts an AuthorizedKeysCommand only below root-owned, non-world-writable directories.
const SECURE = "/run/mko-bench";
const SIZES = (process.env.BENCH_SIZES ?? "10,10000,40000").split(",").map(Number);
const RUNS = Number(process.env.BENCH_RUNS ?? 15);
const STORM = Number(process.env.BENCH_STORM ?? 200);
const TUNNELS_FOR_MEMORY = Number(process.env.BENCH_TUNNELS ?? 300);
const REVOCATIONS = Number(process.env.BENCH_REVOCATIONS ?? 20);
const USER = "mko-bench-t";
const SSHD = "/usr/sbin/sshd";
const PORTS = { ssh: "20000-64999", services: "65000-65099" };
const BIG = Math.max(...SIZES);
// BENCH_PARTS=cpu,storm,revoke (default all); BENCH_REUSE=1 keeps the fleets of an earlier run.
const PARTS = new Set((process.env.BENCH_PARTS ?? "cpu,storm,revoke").split(","));
const REUSE = process.env.BENCH_REUSE === "1";

if (process.getuid() !== 0) {
  console.error("bench/bastion.mjs: run as root (it runs sshd, creates the tunnel user, installs bastions into roots under /run)");
  process.exit(2);
}

// A network namespace of its own: loopback only (nothing else on this machine is disturbed or
// disturbs), and an ephemeral port range below the fleet's tunnel ports. On a bastion with
// Linux's default range (32768-60999) an outgoing connection can take a tunnel port in it.
if (!process.env.MKO_BENCH_NETNS) {
  const r = spawnSync("unshare", ["--net", "sh", "-c", 'ip link set lo up && sysctl -qw net.ipv4.ip_local_port_range="10000 19999" && exec "$@"', "sh", process.execPath, ...process.argv.slice(1)], {
    stdio: "inherit",
    env: { ...process.env, MKO_BENCH_NETNS: "1" },
  });
  process.exit(r.status ?? 1);
}

const now = () => Number(process.hrtime.bigint()) / 1e6;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (m) => console.error(`bench: ${m}`);
const sh = (cmd, args, opts = {}) => {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 1 << 28, ...opts });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
};
const mk = (args, opts = {}) => sh(process.execPath, [CLI, ...args], { ...opts, env: { ...process.env, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", ...opts.env } });

function canConnect(port, timeoutMs = 300) {
  return new Promise((resolve) => {
    const s = connect({ port, host: "127.0.0.1" });
    const done = (ok) => (s.destroy(), resolve(ok));
    s.setTimeout(timeoutMs, () => done(false));
    s.once("connect", () => done(true));
    s.once("error", () => done(false));
  });
}


async function waitFor(what, check, timeoutMs = 30_000, step = 50) {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await check()) return;
    await sleep(step);
  }
  throw new Error(`timed out waiting for ${what}`);
}

function ensureUser(name, password) {
  if (spawnSync("id", [name]).status !== 0) sh("useradd", ["--system", "--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent", "--no-create-home", name]);
  if (password) sh("usermod", ["-p", password, name]);
}

// --- fleets, built with the product ---

if (!REUSE) rmSync(WORK, { recursive: true, force: true });
rmSync(SECURE, { recursive: true, force: true });
mkdirSync(WORK, { recursive: true });
mkdirSync(SECURE, { mode: 0o755 });
chmodSync(SECURE, 0o755);
ensureUser(USER, "*");
ensureUser("mkoverlay-keys");
// The devices pin this key (their known_hosts): it lives with the fleets.
if (!existsSync(join(WORK, "bastion_host_key"))) sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(WORK, "bastion_host_key")]);
const bastionKey = join(SECURE, "bastion_host_key");
copyFileSync(join(WORK, "bastion_host_key"), bastionKey);
chmodSync(bastionKey, 0o600);
copyFileSync(join(WORK, "bastion_host_key.pub"), `${bastionKey}.pub`);
const bastionPub = readFileSync(`${bastionKey}.pub`, "utf8").trim();

function fleetDir(name, port) {
  const dir = join(WORK, name);
  mkdirSync(dir, { recursive: true });
  writeFileSync(
    join(dir, "mkoverlay.yaml"),
    ["registry: ./registry.db", "hostname: gw-{seq:05}", "ports:", `  ssh: ${PORTS.ssh}`, `  services: ${PORTS.services}`, "bastions:", "  eu:", "    host: 127.0.0.1", `    port: ${port}`, `    user: ${USER}`, "    hostKeys:", `      - ${bastionPub}`, "operators: none", ""].join("\n"),
  );
  return dir;
}

// The namespace is ours: a fixed port (the devices' known_hosts name it).
const BASTION_PORT = 2222;
const fleets = new Map();
for (const n of SIZES) {
  const dir = fleetDir(`fleet-${n}`, BASTION_PORT);
  fleets.set(n, dir);
  if (REUSE && existsSync(join(dir, "registry.db"))) continue;
  log(`batch of ${n} devices…`);
  const t = now();
  mk(["batch", "--board", "rpi4", "--bastion", "eu", "--count", String(n), "--quiet", "--out", join(dir, "out")], { cwd: dir });
  log(`  ${((now() - t) / 1000).toFixed(1)} s`);
}

/** A device of a fleet: its private key and pinned known_hosts, out of its overlay. */
function deviceOf(dir, i) {
  const hostname = `gw-${String(i).padStart(5, "0")}`;
  const ddir = join(dir, "keys", hostname);
  if (!existsSync(ddir)) {
    mkdirSync(ddir, { recursive: true });
    const archive = join(dir, "out", `${hostname}.overlay.tar.gz`);
    sh("tar", ["-xzf", archive, "-C", ddir, "etc/ssh/mkoverlay/ssh_host_ed25519_key", "etc/ssh/mkoverlay/known_hosts", "etc/mkoverlay/tunnels/eu.env"]);
  }
  const env = Object.fromEntries(readFileSync(join(ddir, "etc/mkoverlay/tunnels/eu.env"), "utf8").split("\n").filter((l) => l.includes("=") && !l.startsWith("#")).map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
  return { hostname, port: Number(env.TUNNEL_PORT), key: join(ddir, "etc/ssh/mkoverlay/ssh_host_ed25519_key"), knownHosts: join(ddir, "etc/ssh/mkoverlay/known_hosts") };
}

/** The tunnel unit's ssh options (overlays/common/etc/systemd/system/reverse-ssh@.service), -R to a port nobody answers. */
function tunnelArgs(d, port = BASTION_PORT, extra = []) {
  return [
    "-F", "none", "-N", "-T", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=3",
    "-o", "ConnectTimeout=30", "-o", "StrictHostKeyChecking=yes", "-o", `UserKnownHostsFile=${d.knownHosts}`, "-o", "GlobalKnownHostsFile=/dev/null",
    "-o", "UpdateHostKeys=no", "-o", "CheckHostIP=no", "-o", "IdentitiesOnly=yes", "-i", d.key, ...extra, "-p", String(port), "-l", USER,
    "-R", `localhost:${d.port}:localhost:9`, "127.0.0.1",
  ];
}

// --- bastions: `bastion install --root` per fleet size ---

function prepareRoot(root) {
  for (const d of ["etc/ssh/sshd_config.d", "usr/sbin", "etc/systemd/system"]) mkdirSync(join(root, d), { recursive: true, mode: 0o755 });
  chmodSync(root, 0o755);
  copyFileSync(SSHD, join(root, "usr/sbin/sshd"));
  copyFileSync("/usr/sbin/nologin", join(root, "usr/sbin/nologin"));
  if (existsSync("/etc/login.defs")) copyFileSync("/etc/login.defs", join(root, "etc/login.defs"));
  writeFileSync(join(root, "etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n");
  writeFileSync(join(root, "etc/group"), "root:x:0:\n");
  writeFileSync(join(root, "etc/shadow"), "root:*:19000:0:99999:7:::\n", { mode: 0o640 });
  writeFileSync(join(root, "etc/gshadow"), "root:*::\n", { mode: 0o640 });
  writeFileSync(
    join(root, "etc/ssh/sshd_config"),
    ["Include /etc/ssh/sshd_config.d/*.conf", `Port ${BASTION_PORT}`, "ListenAddress 127.0.0.1", `HostKey ${bastionKey}`, "KbdInteractiveAuthentication no", "UsePAM no", "PrintMotd no", "AcceptEnv LANG LC_*", "Subsystem sftp /usr/lib/openssh/sftp-server", ""].join("\n"),
  );
}

const rooted = (root, text) => text.replace(/(^|[\s=])(\/usr\/local\/lib\/mkoverlay\/|\/var\/lib\/mkoverlay\/)/gm, (_, pre, p) => `${pre}${root}${p}`);

/** An sshd config: the root's sshd_config with its (rooted) mkoverlay drop-in; `swap` edits the drop-in. */
function sshdConfig(root, name, swap = (t) => t) {
  const dropin = rooted(root, readFileSync(join(root, "etc/ssh/sshd_config.d/60-mkoverlay-bastion-eu.conf"), "utf8"));
  const file = join(SECURE, `${name}.dropin.conf`);
  writeFileSync(file, swap(dropin));
  const main = readFileSync(join(root, "etc/ssh/sshd_config"), "utf8").replace(/^Include .*$/m, `Include ${file}`);
  const cfg = join(SECURE, `${name}.sshd_config`);
  writeFileSync(cfg, `${main}PidFile ${join(SECURE, `${name}.pid`)}\nLogLevel INFO\nStrictModes no\n`);
  sh(SSHD, ["-t", "-f", cfg]);
  return cfg;
}

const roots = new Map();
for (const [n, dir] of fleets) {
  const root = join(SECURE, `root-${n}`);
  mkdirSync(root);
  prepareRoot(root);
  log(`bastion install --root for ${n} devices…`);
  const t = now();
  // The registry where the bastion's agent reads it (inside the image: its first key set comes from there).
  mkdirSync(join(root, "var/lib/mkoverlay"), { recursive: true, mode: 0o755 });
  copyFileSync(join(dir, "registry.db"), join(root, "var/lib/mkoverlay/registry.db"));
  mk(["bastion", "install", "--bastion", "eu", "--root", root, "--mkoverlay", "/usr/local/bin/mkoverlay", "--registry", "/var/lib/mkoverlay/registry.db", "--config", join(dir, "mkoverlay.yaml")], { cwd: dir });
  log(`  ${((now() - t) / 1000).toFixed(1)} s; ${readdirSync(join(root, "var/lib/mkoverlay/bastion/eu/keys")).length} key files`);
  // The export as docs/bastion.md installs it: 0600, owned by the tunnel user (sshd reads it as that user).
  const ak = join(SECURE, `authorized_keys-${n}`);
  writeFileSync(ak, "", { mode: 0o600 });
  sh("chown", [USER, ak]);
  mk(["bastion", "authorized-keys", "--bastion", "eu", "--write", ak, "--config", join(dir, "mkoverlay.yaml")], { cwd: dir });
  roots.set(n, root);
}

// --- sshd daemons in their own cpuacct cgroup ---

function cgroupCounter(name) {
  const v1 = "/sys/fs/cgroup/cpuacct";
  const v2 = existsSync("/sys/fs/cgroup/cgroup.controllers") ? "/sys/fs/cgroup" : existsSync("/sys/fs/cgroup/unified/cgroup.procs") ? "/sys/fs/cgroup/unified" : undefined;
  if (existsSync(join(v1, "cpuacct.usage"))) {
    const dir = join(v1, name);
    mkdirSync(dir, { recursive: true });
    return { procs: join(dir, "cgroup.procs"), usageMs: () => Number(readFileSync(join(dir, "cpuacct.usage"), "utf8")) / 1e6, remove: () => spawnSync("rmdir", [dir]) };
  }
  if (v2) {
    const dir = join(v2, name);
    mkdirSync(dir, { recursive: true });
    return { procs: join(dir, "cgroup.procs"), usageMs: () => Number(/usage_usec (\d+)/.exec(readFileSync(join(dir, "cpu.stat"), "utf8"))[1]) / 1e3, remove: () => spawnSync("rmdir", [dir]) };
  }
  throw new Error("no cpuacct (cgroup v1) or cgroup v2 to account sshd's CPU in");
}

async function startSshd(cfg, cg) {
  const text = readFileSync(cfg, "utf8");
  const pidFile = /^PidFile (.*)$/m.exec(text)[1];
  const port = Number(/^Port (\d+)$/m.exec(text)[1]);
  rmSync(pidFile, { force: true });
  const logFile = cfg.replace(/sshd_config$/, "log");
  sh(SSHD, ["-f", cfg, "-E", logFile]);
  await waitFor("sshd pid file", () => existsSync(pidFile));
  const pid = Number(readFileSync(pidFile, "utf8").trim());
  if (cg) writeFileSync(cg.procs, String(pid));
  await waitFor("sshd listening", () => canConnect(port));
  return { pid, logFile, port };
}

/** Ends the listener and every session process it spawned (a bastion reboot, not systemctl restart). */
function stopSshd(pid) {
  const kids = (p) => spawnSync("pgrep", ["-P", String(p)], { encoding: "utf8" }).stdout.split("\n").filter(Boolean).map(Number);
  const all = [];
  const walk = (p) => kids(p).forEach((k) => (all.push(k), walk(k)));
  walk(pid);
  for (const p of [pid, ...all]) {
    try {
      process.kill(p, "SIGKILL");
    } catch {
      // gone
    }
  }
}

// The CPU rows run every sshd at once, each on its own port and in its own cgroup, and take
// their logins round-robin: background load on a shared machine then hits every row alike.
const CPU_PORT = BASTION_PORT + 1000;
const cpuKnownHosts = join(SECURE, "cpu_known_hosts");
writeFileSync(cpuKnownHosts, Array.from({ length: 16 }, (_, i) => `[127.0.0.1]:${CPU_PORT + i} ${bastionPub}\n`).join(""));

/** One login: ssh -N -R until the forward listens, then the client exits. Returns sshd CPU ms. */
async function oneLogin(m) {
  const before = m.cg.usageMs();
  const args = tunnelArgs(m.device, m.port, m.extra).map((a) => (a.startsWith("UserKnownHostsFile=") ? `UserKnownHostsFile=${cpuKnownHosts}` : a));
  const c = spawn("ssh", args, { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  c.stderr.on("data", (x) => (err += x));
  await waitFor(`login of ${m.device.hostname} (${m.label})`, async () => {
    if (c.exitCode !== null) throw new Error(`ssh exited ${c.exitCode}: ${err}`);
    return listening().has(m.device.port);
  }, 20_000, 5);
  c.kill("SIGTERM");
  await new Promise((r) => c.once("exit", r));
  await waitFor("session end", () => !listening().has(m.device.port), 10_000, 5);
  await sleep(150); // the session processes finish their exit accounting
  return m.cg.usageMs() - before;
}

const rows = [];
const cpu = new Map();
const modes = [];
const addMode = (key, label, cfgOf, device, extra = []) => {
  const port = CPU_PORT + modes.length;
  const cfg = cfgOf();
  writeFileSync(cfg, readFileSync(cfg, "utf8").replace(/^Port \d+$/m, `Port ${port}`));
  modes.push({ key, label, cfg, device, extra, port, cg: cgroupCounter(`mko-bench-${process.pid}-${modes.length}`), xs: [] });
};
// The probe is the last device of each fleet: the worst case for a file (sshd stops at the
// first match, and reads the file twice per login: the key query, then the signature).
const last = (n) => deviceOf(fleets.get(n), n);
const probe = last(BIG);

if (PARTS.has("cpu")) {
log("sshd CPU per tunnel login…");
// Bare: one key in a file, no Match block.
addMode("bare", "bare sshd, 1 key in a file", () => {
  const ak = join(SECURE, "bare.authorized_keys");
  const line = readFileSync(join(SECURE, `authorized_keys-${BIG}`), "utf8").split("\n").find((l) => l.endsWith(` ${probe.hostname}`));
  writeFileSync(ak, `${line}\n`, { mode: 0o644 });
  const cfg = join(SECURE, "bare.sshd_config");
  writeFileSync(cfg, [`Port ${BASTION_PORT}`, "ListenAddress 127.0.0.1", `HostKey ${bastionKey}`, "UsePAM no", "StrictModes no", `AuthorizedKeysFile ${ak}`, `PidFile ${join(SECURE, "bare.pid")}`, "LogLevel INFO", ""].join("\n"));
  return cfg;
}, probe);
const AKC_LINES = /^ {4}AuthorizedKeysFile none\n {4}AuthorizedKeysCommand .*\n {4}AuthorizedKeysCommandUser .*\n/m;
for (const n of SIZES) {
  const root = roots.get(n);
  addMode(`akc-${n}`, `agent key directory, ${n} devices`, () => sshdConfig(root, `akc-${n}`), last(n));
  addMode(`file-${n}`, `file export, ${n} devices`, () => sshdConfig(root, `file-${n}`, (t) => t.replace(AKC_LINES, `    AuthorizedKeysFile ${join(SECURE, `authorized_keys-${n}`)}\n`)), last(n));
}
// Device certificates: a fleet CA signs each device key (principal = hostname, serial = its
// number); sshd checks the CA, a KRL of revoked serials, and asks a command for the principal's
// options. Measured with the largest fleet's worth of revocations in the KRL (the worst case).
{
  const ca = join(SECURE, "fleet_ca");
  sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", ca]);
  const certDir = join(SECURE, "cert");
  mkdirSync(certDir, { mode: 0o755 });
  const key = join(certDir, "id");
  copyFileSync(probe.key, key);
  chmodSync(key, 0o600);
  writeFileSync(`${key}.pub`, sh("ssh-keygen", ["-y", "-f", key]));
  sh("ssh-keygen", ["-q", "-s", ca, "-I", probe.hostname, "-n", probe.hostname, "-z", String(BIG + 1), "-V", "-1d:+52w", `${key}.pub`]);
  const spec = join(certDir, "krl.spec");
  writeFileSync(spec, Array.from({ length: BIG }, (_, i) => `serial: ${i + 1}`).join("\n") + "\n");
  const krl = join(certDir, "revoked.krl");
  sh("ssh-keygen", ["-q", "-k", "-f", krl, "-s", `${ca}.pub`, spec]);
  const principals = join(certDir, "principals");
  mkdirSync(principals, { mode: 0o755 });
  writeFileSync(join(principals, probe.hostname), `restrict,port-forwarding,command="/sbin/nologin",permitlisten="localhost:${probe.port}" ${probe.hostname}\n`);
  const cmd = join(certDir, "principals-command");
  writeFileSync(cmd, `#!/bin/sh\ncase $1 in *[!a-z0-9-]*|"") exit 0 ;; esac\n[ -f "${principals}/$1" ] || exit 0\nwhile IFS= read -r l; do printf '%s\\n' "$l"; done <"${principals}/$1"\n`, { mode: 0o755 });
  chmodSync(cmd, 0o755);
  addMode("cert", `certificates + principals command + KRL of ${BIG} serials`, () =>
    sshdConfig(roots.get(BIG), "cert", (t) =>
      t.replace(AKC_LINES, `    AuthorizedKeysFile none\n    TrustedUserCAKeys ${ca}.pub\n    RevokedKeys ${krl}\n    AuthorizedPrincipalsCommand ${cmd} %i\n    AuthorizedPrincipalsCommandUser mkoverlay-keys\n`),
    ), { ...probe, key }, ["-o", `CertificateFile=${key}-cert.pub`]);
}
const daemons = [];
for (const m of modes) daemons.push((await startSshd(m.cfg, m.cg)).pid);
try {
  for (const m of modes) for (let i = 0; i < 3; i++) await oneLogin(m); // warm the page cache
  for (let i = 0; i < RUNS; i++) for (const m of modes) m.xs.push(await oneLogin(m));
} finally {
  daemons.forEach(stopSshd);
  await sleep(300);
  for (const m of modes) m.cg.remove();
}
for (const m of modes) {
  cpu.set(m.key, median(m.xs));
  log(`  ${m.label}: median ${median(m.xs).toFixed(1)} ms (min ${Math.min(...m.xs).toFixed(1)}, max ${Math.max(...m.xs).toFixed(1)})`);
}

const bare = cpu.get("bare");
const small = SIZES[0];
rows.push([`sshd CPU per tunnel login, bare sshd with 1 key (reference)`, `${bare.toFixed(1)} ms`, "", "", ""]);
for (const n of SIZES) rows.push([`… agent key directory, ${n.toLocaleString("en")} devices`, `${cpu.get(`akc-${n}`).toFixed(1)} ms`, `${(cpu.get(`akc-${n}`) / bare).toFixed(2)}× bare`, "", `file export: ${cpu.get(`file-${n}`).toFixed(1)} ms`]);
rows.push([`Per-login cost flat: ${BIG.toLocaleString("en")} / ${small} devices`, `${(cpu.get(`akc-${BIG}`) / cpu.get(`akc-${small}`)).toFixed(2)}×`, "≤ 1.1×", cpu.get(`akc-${BIG}`) / cpu.get(`akc-${small}`) <= 1.1 ? "yes" : "**no**", ""]);
rows.push([`Key directory with ${small} devices / bare sshd`, `${(cpu.get(`akc-${small}`) / bare).toFixed(2)}×`, "≤ 2×", cpu.get(`akc-${small}`) / bare <= 2 ? "yes" : "**no**", ""]);
rows.push([`File export, ${BIG.toLocaleString("en")} / ${small} devices (for comparison)`, `${(cpu.get(`file-${BIG}`) / cpu.get(`file-${small}`)).toFixed(2)}×`, "", "", ""]);
rows.push([`Certificates + AuthorizedPrincipalsCommand + KRL (${BIG.toLocaleString("en")} revoked)`, `${cpu.get("cert").toFixed(1)} ms`, `${(cpu.get("cert") / bare).toFixed(2)}× bare`, "", "the alternative design"]);

}

// --- reconnect storm ---

/** A gateway: runs the tunnel, and again `retryMs` after it ends (Restart=always; the unit's RestartSec is 10 s). */
function gateway(d, retryMs = 1000) {
  let stopped = false;
  let child;
  let attempts = 0;
  const start = () => {
    if (stopped) return;
    attempts += 1;
    child = spawn("ssh", tunnelArgs(d), { stdio: "ignore" });
    child.once("exit", () => {
      if (!stopped) setTimeout(start, retryMs);
    });
  };
  start();
  return {
    get attempts() {
      return attempts;
    },
    stop() {
      stopped = true;
      child?.kill("SIGTERM");
    },
  };
}

async function storm(label, cfg, devices) {
  const cg = cgroupCounter(`mko-bench-${process.pid}-storm-${label.replace(/\W+/g, "-")}`);
  const { pid } = await startSshd(cfg, cg);
  const gws = devices.map(gateway);
  const all = () => {
    const l = listening();
    return devices.every((d) => l.has(d.port));
  };
  await waitFor(`${devices.length} tunnels up (${label})`, all, 300_000, 100);
  const before = gws.reduce((a, g) => a + g.attempts, 0);
  stopSshd(pid);
  await waitFor("all ports free", () => devices.every((d) => !listening().has(d.port)), 30_000, 50);
  const t0 = now();
  const again = await startSshd(cfg, cg);
  const cpu0 = cg.usageMs();
  await waitFor(`${devices.length} tunnels back (${label})`, all, 600_000, 50);
  const ms = now() - t0;
  const cpuMs = cg.usageMs() - cpu0;
  const attempts = gws.reduce((a, g) => a + g.attempts, 0) - before;
  log(`  storm, ${label}: all ${devices.length} back after ${(ms / 1000).toFixed(1)} s (${attempts} connection attempts, sshd CPU ${(cpuMs / 1000).toFixed(1)} s)`);
  return { ms, attempts, cpuMs, pid: again.pid, gws, cg };
}

// Spread through the fleet (and the file): every 133rd device of 40,000.
const stride = Math.max(1, Math.floor(BIG / TUNNELS_FOR_MEMORY));
const rootBig = roots.get(BIG);
if (PARTS.has("storm")) {
log(`reconnect storm of ${STORM} gateways (${BIG.toLocaleString("en")} devices registered)…`);
const stormDevices = Array.from({ length: STORM }, (_, i) => deviceOf(fleets.get(BIG), (i + 1) * stride));
const akcCfg = sshdConfig(rootBig, "storm-akc");
const fileCfg = sshdConfig(rootBig, "storm-file", (t) =>
  t.replace(/^ {4}AuthorizedKeysFile none\n {4}AuthorizedKeysCommand .*\n {4}AuthorizedKeysCommandUser .*\n/m, `    AuthorizedKeysFile ${join(SECURE, `authorized_keys-${BIG}`)}\n`),
);
const sFile = await storm("file export", fileCfg, stormDevices);
sFile.gws.forEach((g) => g.stop());
stopSshd(sFile.pid);
await sleep(1500);
sFile.cg.remove();
const sAkc = await storm("agent key directory", akcCfg, stormDevices);
rows.push([`Reconnect storm, ${STORM} gateways, ${BIG.toLocaleString("en")} registered: all ports back`, `${(sAkc.ms / 1000).toFixed(1)} s`, "", "", `file export: ${(sFile.ms / 1000).toFixed(1)} s (${sAkc.attempts} vs ${sFile.attempts} connection attempts; sshd MaxStartups default 10:30:100, clients on the same 2 cores, retrying after 1 s)`]);
rows.push([`… sshd CPU spent on that storm`, `${(sAkc.cpuMs / 1000).toFixed(1)} s`, "", "", `file export: ${(sFile.cpuMs / 1000).toFixed(1)} s`]);

// --- sshd memory per tunnel, with TUNNELS_FOR_MEMORY up ---

log(`sshd memory with ${TUNNELS_FOR_MEMORY} tunnels…`);
const more = Array.from({ length: Math.max(0, TUNNELS_FOR_MEMORY - STORM) }, (_, i) => deviceOf(fleets.get(BIG), (STORM + i + 1) * stride));
const moreGws = more.map(gateway);
await waitFor(`${TUNNELS_FOR_MEMORY} tunnels`, () => {
  const l = listening();
  return [...stormDevices, ...more].every((d) => l.has(d.port));
}, 300_000, 100);
await sleep(1000);
function pssOfTree(pid) {
  const kids = (p) => spawnSync("pgrep", ["-P", String(p)], { encoding: "utf8" }).stdout.split("\n").filter(Boolean).map(Number);
  let kb = 0;
  let n = 0;
  const walk = (p) => {
    for (const k of kids(p)) {
      const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${k}/smaps_rollup`, "utf8"));
      kb += Number(m?.[1] ?? 0);
      n += 1;
      walk(k);
    }
  };
  walk(pid);
  return { kb, n };
}
const pss = pssOfTree(sAkc.pid);
for (const g of [...sAkc.gws, ...moreGws]) g.stop();
stopSshd(sAkc.pid);
await sleep(1500);
sAkc.cg.remove();

// The same storms with sshd admitting more unauthenticated connections at once (a global
// setting, the administrator's: after the Include, so outside mkoverlay's Match block).
const wide = (cfg) => {
  const out = cfg.replace(/sshd_config$/, "wide.sshd_config");
  writeFileSync(out, `${readFileSync(cfg, "utf8")}MaxStartups 100:30:300\n`);
  sh(SSHD, ["-t", "-f", out]);
  return out;
};
const wFile = await storm("file export, MaxStartups 100:30:300", wide(fileCfg), stormDevices);
wFile.gws.forEach((g) => g.stop());
stopSshd(wFile.pid);
await sleep(1500);
wFile.cg.remove();
const wAkc = await storm("agent key directory, MaxStartups 100:30:300", wide(akcCfg), stormDevices);
wAkc.gws.forEach((g) => g.stop());
stopSshd(wAkc.pid);
await sleep(1500);
wAkc.cg.remove();
rows.push([`… the same storm with MaxStartups 100:30:300`, `${(wAkc.ms / 1000).toFixed(1)} s`, "", "", `file export: ${(wFile.ms / 1000).toFixed(1)} s; sshd CPU ${(wAkc.cpuMs / 1000).toFixed(1)} s vs ${(wFile.cpuMs / 1000).toFixed(1)} s`]);
rows.push([`sshd memory per tunnel (PSS of all session processes / tunnels, ${TUNNELS_FOR_MEMORY} up)`, `${(pss.kb / TUNNELS_FOR_MEMORY).toFixed(0)} kB`, "", "", `${(pss.kb / 1024).toFixed(0)} MB in ${pss.n} processes`]);
}

// --- revocation latency: PostgreSQL registry, agent with its read-only role ---

if (PARTS.has("revoke")) {
log("revocation latency (PostgreSQL, agent)…");
const { startPostgres } = await postgresHelper(ROOT);
const pgs = await startPostgres();
try {
  const url = await pgs.createDatabase();
  const dir = fleets.get(BIG);
  mk(["registry", "migrate", "--to", url, "--quiet", "--config", join(dir, "mkoverlay.yaml")], { cwd: dir });
  const db = decodeURIComponent(new URL(url).pathname.slice(1));
  await pgs.sql("postgres", "CREATE ROLE mkoverlay_bastion LOGIN");
  for (const q of [`GRANT CONNECT ON DATABASE ${db} TO mkoverlay_bastion`, "GRANT USAGE ON SCHEMA mkoverlay TO mkoverlay_bastion", "GRANT SELECT ON ALL TABLES IN SCHEMA mkoverlay TO mkoverlay_bastion"]) await pgs.sql(url, q);
  const agentUrl = pgs.url(db, "mkoverlay_bastion");
  const state = join(rootBig, "var/lib/mkoverlay/bastion/eu");
  const cfg = sshdConfig(rootBig, "revoke");
  const { pid, logFile } = await startSshd(cfg);
  const t0 = now();
  const agent = spawn(process.execPath, [CLI, "bastion", "agent", "--bastion", "eu", "--config", join(dir, "mkoverlay.yaml"), "--state-dir", state, "--auth-log", logFile], {
    env: { ...process.env, MKOVERLAY_REGISTRY: agentUrl, MKOVERLAY_CONFIG: "" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let agentLog = "";
  agent.stderr.on("data", (x) => (agentLog += x));
  agent.on("exit", () => writeFileSync(join(WORK, "agent.log"), agentLog));
  await waitFor("agent in sync", () => /in sync: \d+ key/.test(agentLog), 120_000);
  const syncMs = now() - t0;
  const rssKb = Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${agent.pid}/status`, "utf8"))[1]);
  rows.push([`Agent: start to first full sync of ${BIG.toLocaleString("en")} devices (PostgreSQL)`, `${(syncMs / 1000).toFixed(1)} s`, "", "", `RSS ${(rssKb / 1024).toFixed(0)} MB`]);
  const victims = Array.from({ length: REVOCATIONS }, (_, i) => deviceOf(dir, (i + 1) * stride));
  // Revoked devices keep retrying, as their unit does (every 10 s).
  const gws = victims.map((d) => gateway(d, 10_000));
  await waitFor("victims up", () => victims.every((d) => listening().has(d.port)), 120_000, 100);
  const lat = [];
  for (const v of victims) {
    const start = now();
    const p = spawn(process.execPath, [CLI, "revoke", v.hostname, "--config", join(dir, "mkoverlay.yaml")], { cwd: dir, env: { ...process.env, MKOVERLAY_REGISTRY: url, MKOVERLAY_CONFIG: "" }, stdio: "ignore" });
    await waitFor(`${v.hostname}'s session to end`, () => !listening().has(v.port), 30_000, 5);
    lat.push(now() - start);
    await new Promise((r) => (p.exitCode !== null ? r() : p.once("exit", r)));
  }
  gws.forEach((g) => g.stop());
  const cmd = median(Array.from({ length: 5 }, () => {
    const s = now();
    spawnSync(process.execPath, [CLI, "--version"], { stdio: "ignore" });
    return now() - s;
  }));
  log(`  revocation: median ${median(lat).toFixed(0)} ms, max ${Math.max(...lat).toFixed(0)} ms`);
  rows.push([`Revocation latency: \`mkoverlay revoke\` started → session gone (${REVOCATIONS} revocations)`, `median ${median(lat).toFixed(0)} ms`, "≤ 5 s", Math.max(...lat) <= 5000 ? "yes" : "**no**", `max ${Math.max(...lat).toFixed(0)} ms; of which starting the revoke command (Node) ≈ ${cmd.toFixed(0)} ms`]);
  agent.kill("SIGTERM");
  stopSshd(pid);
} finally {
  await pgs.stop();
}
}

const table = [
  "| measure | result | target / ratio | met | notes |",
  "|---|---|---|---|---|",
  ...rows.map((r) => `| ${r.join(" | ")} |`),
].join("\n");
const sshdVersion = spawnSync(SSHD, ["-V"], { encoding: "utf8" }).stderr.trim().split(",")[0];
const header = `Measured ${new Date().toISOString().slice(0, 16)}Z on ${cpus().length} × ${cpus()[0]?.model.trim() ?? "CPU"}, ${sshdVersion}, Node ${process.version}, in a network namespace of its own; CPU rows: median of ${RUNS} logins.`;
writeFileSync(join(ROOT, "bench/bastion-results.md"), `# Bastion benchmarks\n\n${header}\n\n${table}\n`);
console.log(table);
rmSync(SECURE, { recursive: true, force: true });
const missed = rows.filter((r) => r[3] === "**no**").map((r) => `${r[0]}: ${r[1]} (target ${r[2]})`);
if (missed.length > 0) {
  process.stderr.write(`bench/bastion.mjs: ${missed.length} target(s) missed:\n${missed.map((m) => `- ${m}`).join("\n")}\n`);
  process.exitCode = 1;
}
