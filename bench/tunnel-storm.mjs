#!/usr/bin/env node
// Reconnect storm from one shared address (issue 20), on the system's OpenSSH (9.2) and
// bookworm-backports' 10.x (scripts/ensure-openssh10.sh), as root. Not part of the test suite.
//
// N tunnel clients (real `ssh -N -R` with real keys, the device unit's command line) plus R
// revoked devices, all from 127.0.0.1, against two bastion layouts:
//   - "single": today's bastion, one sshd with sshd's defaults and mkoverlay's Match drop-in,
//     the administrator logging in to the same sshd;
//   - "tunnel": the dedicated tunnel sshd (src/bastion/tunnel-sshd.ts, rendered for that
//     version) and the administrator's own sshd on another port (sshd's defaults).
// Each client behaves like the device unit: when ssh exits it starts again after RETRY seconds
// (RestartSec=10, no jitter: today's unit). All N are connected first; then the bastion
// "restarts": the listener and every session are killed, sshd is started again after DOWN
// seconds, and the time until 99 % / 100 % of the N ports listen again is measured from that
// start. sshd's own log counts connections it dropped for a penalty or past MaxStartups; an
// administrator logs in every 2 s during the storm.
//
// BENCH_STORM_N (default 1000), BENCH_STORM_REVOKED (10), BENCH_STORM_RETRY (10 s),
// BENCH_STORM_DOWN (2 s), BENCH_STORM_LIMIT (300 s per storm), BENCH_STORM_LAYOUTS (single,tunnel),
// BENCH_STORM_VERSIONS (system,10), BENCH_STORM_SIZING (JSON, the tunnel sshd's sizing). Prints a Markdown table (bench/bastion-results.md, "tunnel sshd").
import { spawn, spawnSync } from "node:child_process";
import { appendFileSync, chmodSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { build } from "esbuild";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const N = Number(process.env.BENCH_STORM_N ?? 1000);
const REVOKED = Number(process.env.BENCH_STORM_REVOKED ?? 10);
const RETRY = Number(process.env.BENCH_STORM_RETRY ?? 10) * 1000;
const DOWN = Number(process.env.BENCH_STORM_DOWN ?? 2) * 1000;
const LIMIT = Number(process.env.BENCH_STORM_LIMIT ?? 300) * 1000;
const LAYOUTS = (process.env.BENCH_STORM_LAYOUTS ?? "single,tunnel").split(",");
const VERSIONS = (process.env.BENCH_STORM_VERSIONS ?? "system,10").split(",");
// The tunnel sshd's sizing to try instead of the renderer's defaults, e.g. '{"maxStartups":"10:30:100"}'.
const SIZING = JSON.parse(process.env.BENCH_STORM_SIZING ?? "{}");
const USER = "mko-storm-t";
const BASE_PORT = 21000;
const SECURE = `/run/mko-storm-${process.pid}`;

if (process.getuid() !== 0) {
  console.error("bench/tunnel-storm.mjs: run as root (sshd, the tunnel user, a keys command under /run)");
  process.exit(2);
}
// A network namespace of its own (loopback only), with an ephemeral port range below the
// clients' forwarded ports, as bench/bastion.mjs does.
if (!process.env.MKO_BENCH_NETNS) {
  const r = spawnSync("unshare", ["--net", "sh", "-c", 'ip link set lo up && sysctl -qw net.ipv4.ip_local_port_range="10000 19999" && exec "$@"', "sh", process.execPath, ...process.argv.slice(1)], {
    stdio: "inherit",
    env: { ...process.env, MKO_BENCH_NETNS: "1" },
  });
  process.exit(r.status ?? 1);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (m) => console.error(`storm: ${m}`);
const sh = (cmd, args) => {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
};

// The renderer and the keys command, straight from the sources.
const bundle = join(SECURE, "tunnel-sshd.mjs");
mkdirSync(SECURE, { mode: 0o755 });
chmodSync(SECURE, 0o755);
process.on("exit", () => rmSync(SECURE, { recursive: true, force: true }));
await build({
  stdin: { contents: 'export * from "./src/bastion/tunnel-sshd.ts"; export { renderDropin } from "./src/bastion/dropin.ts"; export { KEYS_COMMAND } from "./src/bastion/keys-command.ts"; export { fileNameFor } from "./src/bastion/keystore.ts";', resolveDir: ROOT, loader: "ts" },
  bundle: true,
  platform: "node",
  format: "esm",
  outfile: bundle,
  logLevel: "error",
});
const M = await import(pathToFileURL(bundle).href);

for (const u of [USER, "mkoverlay-keys"]) {
  if (spawnSync("id", [u]).status !== 0) sh("useradd", ["--system", "--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent", "--no-create-home", u]);
}
sh("usermod", ["-p", "*", USER]);
mkdirSync("/run/sshd", { recursive: true, mode: 0o755 });

const keysCommand = join(SECURE, "authorized-keys");
writeFileSync(keysCommand, M.KEYS_COMMAND, { mode: 0o755 });
const keysDir = join(SECURE, "keys");
mkdirSync(keysDir, { mode: 0o711 });
const clientDir = join(SECURE, "clients");
mkdirSync(clientDir, { mode: 0o700 });
const hostKey = join(SECURE, "host_ed25519");
sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", hostKey]);
const adminKey = join(clientDir, "admin");
sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", adminKey]);
const adminKeys = join(SECURE, "admin-keys");
mkdirSync(adminKeys, { mode: 0o755 });
writeFileSync(join(adminKeys, "root"), readFileSync(`${adminKey}.pub`));

log(`${N} device keys, ${REVOKED} revoked…`);
const devices = [];
for (let i = 0; i < N + REVOKED; i++) {
  const key = join(clientDir, `d${i}`);
  sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", key]);
  const port = BASE_PORT + i;
  if (i < N) {
    const fp = sh("ssh-keygen", ["-l", "-E", "sha256", "-f", `${key}.pub`]).split(" ")[1];
    writeFileSync(join(keysDir, M.fileNameFor(fp)), `restrict,port-forwarding,command="/sbin/nologin",permitlisten="localhost:${port}" ${readFileSync(`${key}.pub`, "utf8").trim()}\n`, { mode: 0o644 });
  }
  devices.push({ key, port, revoked: i >= N });
}

const bastion = { name: "storm", host: "127.0.0.1", port: 2222, user: USER, hostKeys: [], from: undefined, expiry: undefined, jumpUser: undefined };
const fleet = { file: "f.yaml", registry: "r.db", hostnameTemplate: "gw-{seq}", ports: { ssh: { lo: BASE_PORT, hi: BASE_PORT + 9999 }, services: { lo: 40000, hi: 40999 } }, bastions: new Map([["storm", bastion]]), forwards: [], operators: undefined };
const paths = { keysCommand, keysDir, keysUser: "mkoverlay-keys" };

function binaries() {
  const out = [];
  for (const v of VERSIONS) {
    if (v === "system") out.push({ sshd: "/usr/sbin/sshd", args: [] });
    else {
      const dir = sh("bash", [join(ROOT, "scripts/ensure-openssh10.sh")]).trim().split("\n").pop();
      out.push({ sshd: join(dir, "usr/sbin/sshd"), args: ["-o", `SshdSessionPath=${join(dir, "usr/lib/openssh/sshd-session")}`, "-o", `SshdAuthPath=${join(dir, "usr/lib/openssh/sshd-auth")}`] });
    }
  }
  for (const b of out) {
    b.versionText = spawnSync(b.sshd, ["-V"], { encoding: "utf8" }).stderr.trim().split("\n")[0];
    b.version = M.parseSshdVersion(b.versionText);
    b.label = `${b.version.major}.${b.version.minor}`;
  }
  return out;
}

function adminConfigText(port, name, withDropin) {
  return [
    `Port ${port}`,
    "ListenAddress 127.0.0.1",
    `HostKey ${hostKey}`,
    `PidFile ${join(SECURE, `${name}.pid`)}`,
    `AuthorizedKeysFile ${adminKeys}/%u`,
    "UsePAM no",
    "KbdInteractiveAuthentication no",
    "PermitRootLogin prohibit-password",
    "LogLevel VERBOSE",
    withDropin ? M.renderDropin(fleet, bastion, paths) : "",
    "",
  ].join("\n");
}

function startSshd(bin, config, logFile) {
  const t = spawnSync(bin.sshd, [...bin.args, "-t", "-f", config], { encoding: "utf8" });
  if (t.status !== 0) throw new Error(`sshd -t ${config}: ${t.stderr}`);
  return spawn(bin.sshd, [...bin.args, "-D", "-e", "-f", config, "-E", logFile], { stdio: "ignore" });
}

/** Every descendant of `pid`, from one pass over /proc (spawning pgrep per process is far too slow in a storm). */
function descendants(pid) {
  const kids = new Map();
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e)) continue;
    let stat;
    try {
      stat = readFileSync(`/proc/${e}/stat`, "utf8");
    } catch {
      continue;
    }
    const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
    if (!kids.has(ppid)) kids.set(ppid, []);
    kids.get(ppid).push(Number(e));
  }
  const out = [];
  const walk = (p) => {
    for (const k of kids.get(p) ?? []) {
      out.push(k);
      walk(k);
    }
  };
  walk(pid);
  return out;
}
/** A bastion going down at once: the listener stops accepting first, then every session dies, then the listener. */
async function stopSshd(proc) {
  if (proc.exitCode === null) process.kill(proc.pid, "SIGSTOP");
  for (const k of descendants(proc.pid)) {
    try {
      process.kill(k, "SIGKILL");
    } catch {
      // gone
    }
  }
  if (proc.exitCode === null) {
    proc.kill("SIGKILL");
    await new Promise((r) => proc.once("exit", r));
  }
}

function listening() {
  const out = new Set();
  for (const line of readFileSync("/proc/net/tcp", "utf8").split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[3] === "0A" && f[1]?.startsWith("0100007F:")) out.add(Number.parseInt(f[1].split(":")[1], 16));
  }
  return out;
}

const ADMIN_OPTS = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=30"];
// The device unit's options that matter here.
const SSH_OPTS = [...ADMIN_OPTS, "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3", "-o", "ExitOnForwardFailure=yes"];

/** Device units: ssh -N -R, restarted RETRY ms after each exit, until stopped. */
function runClients(port) {
  let stop = false;
  const stats = { starts: 0, exits: 0, refused: 0 };
  const procs = new Set();
  const loops = devices.map(async (d) => {
    while (!stop) {
      const p = spawn("ssh", [...SSH_OPTS, "-N", "-i", d.key, "-p", String(port), "-R", `localhost:${d.port}:localhost:9`, `${USER}@127.0.0.1`], { stdio: ["ignore", "ignore", "pipe"] });
      procs.add(p);
      stats.starts++;
      let err = "";
      p.stderr.setEncoding("utf8").on("data", (x) => (err += x));
      await new Promise((r) => p.once("exit", r));
      // Dropped before the key exchange: a penalty or MaxStartups (sshd closes the connection unanswered).
      if (!d.revoked && /kex_exchange_identification/.test(err)) stats.refused++;
      procs.delete(p);
      stats.exits++;
      if (!stop) await sleep(RETRY);
    }
  });
  return {
    stats,
    async stop() {
      stop = true;
      for (const p of procs) p.kill("SIGKILL");
      await Promise.race([Promise.all(loops), sleep(RETRY + 5000)]);
    },
  };
}

function adminLogin(port) {
  return new Promise((resolve) => {
    const p = spawn("ssh", [...ADMIN_OPTS, "-i", adminKey, "-p", String(port), "root@127.0.0.1", "true"], { stdio: "ignore" });
    const t = setTimeout(() => p.kill("SIGKILL"), 30_000);
    p.once("exit", (code) => (clearTimeout(t), resolve(code === 0)));
  });
}

/** The namespace's TcpExt ListenOverflows + ListenDrops: connections the kernel's accept queue could not take (the client's SYN is retransmitted after 1, 2, 4, 8 … s). */
function listenDrops() {
  const lines = readFileSync("/proc/net/netstat", "utf8").split("\n").filter((l) => l.startsWith("TcpExt:"));
  const names = lines[0].split(/\s+/);
  const values = lines[1].split(/\s+/);
  return Number(values[names.indexOf("ListenOverflows")]) + Number(values[names.indexOf("ListenDrops")]);
}

function countLog(file) {
  let text = "";
  try {
    text = readFileSync(file, "utf8");
  } catch {
    // none yet
  }
  return { penalty: (text.match(/drop connection .*penalty/g) ?? []).length, maxStartups: (text.match(/drop connection .*past MaxStartups/g) ?? []).length };
}

async function waitUp(want, t0) {
  let t99;
  while (Date.now() - t0 < LIMIT) {
    const l = listening();
    const up = devices.filter((d) => !d.revoked && l.has(d.port)).length;
    if (t99 === undefined && up >= Math.ceil(want * 0.99)) t99 = Date.now() - t0;
    if (up >= want) return { t99, t100: Date.now() - t0, up };
    await sleep(100);
  }
  const l = listening();
  return { t99, t100: undefined, up: devices.filter((d) => !d.revoked && l.has(d.port)).length };
}

async function storm(bin, layout) {
  const tunnelPort = 2200;
  const adminPort = layout === "single" ? tunnelPort : 2300;
  const tag = `${layout}-${bin.label}`;
  const tconf = join(SECURE, `${tag}.conf`);
  const tlog = join(SECURE, `${tag}.log`);
  if (layout === "single") writeFileSync(tconf, adminConfigText(tunnelPort, tag, true));
  else writeFileSync(tconf, M.renderTunnelSshdConfig({ fleet, bastion, version: bin.version, port: tunnelPort, listen: ["127.0.0.1"], hostKeys: [hostKey], pidFile: join(SECURE, `${tag}.pid`), paths, sizing: SIZING }));
  let admin;
  if (layout !== "single") {
    const aconf = join(SECURE, `${tag}-admin.conf`);
    writeFileSync(aconf, adminConfigText(adminPort, `${tag}-admin`, false));
    admin = startSshd(bin, aconf, join(SECURE, `${tag}-admin.log`));
  }
  let sshd = startSshd(bin, tconf, join(SECURE, `${tag}-warmup.log`));
  await sleep(500);
  log(`${tag}: connecting ${N} devices (+${REVOKED} revoked)…`);
  const clients = runClients(tunnelPort);
  const warm = await waitUp(N, Date.now());
  log(`${tag}: warm-up ${warm.up}/${N} up after ${((warm.t100 ?? LIMIT) / 1000).toFixed(1)} s; restarting the bastion`);
  await stopSshd(sshd);
  await sleep(DOWN);
  const startsBefore = clients.stats.starts;
  const refusedBefore = clients.stats.refused;
  const dropsBefore = listenDrops();
  const t0 = Date.now();
  sshd = startSshd(bin, tconf, tlog);
  let adminTries = 0;
  let adminOk = 0;
  let storming = true;
  const adminLoop = (async () => {
    while (storming) {
      const t = Date.now();
      adminTries++;
      if (await adminLogin(adminPort)) adminOk++;
      await sleep(Math.max(0, 2000 - (Date.now() - t)));
    }
  })();
  const r = await waitUp(N, t0);
  storming = false;
  await adminLoop;
  const attempts = clients.stats.starts - startsBefore;
  const refused = clients.stats.refused - refusedBefore;
  const listenDropped = listenDrops() - dropsBefore;
  await clients.stop();
  await stopSshd(sshd);
  if (admin) await stopSshd(admin);
  const c = countLog(tlog);
  const res = { tag, layout, version: bin.label, ...r, attempts, refused, listenDropped, penalty: c.penalty, maxStartups: c.maxStartups, adminTries, adminOk };
  log(`${tag}: ${JSON.stringify(res)}`);
  return res;
}

const results = [];
for (const bin of binaries()) for (const layout of LAYOUTS) results.push(await storm(bin, layout));

const s = (ms) => (ms === undefined ? `not within ${LIMIT / 1000} s` : `${(ms / 1000).toFixed(1)} s`);
const load = readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
const out = [
  `Measured ${new Date().toISOString().slice(0, 16)}Z on ${cpus().length} × ${cpus()[0]?.model.trim() ?? "?"} (load average at the end ${load}), in a network namespace of its own; ${N} tunnel clients + ${REVOKED} revoked from 127.0.0.1, retrying ${RETRY / 1000} s after each exit (today's unit), bastion down ${DOWN / 1000} s; times from the restarted sshd's start (the clients' first retry comes ${(RETRY - DOWN) / 1000} s after it).${Object.keys(SIZING).length ? ` Tunnel sshd sizing: ${JSON.stringify(SIZING)}.` : ""}`,
  "",
  "| OpenSSH | bastion | 99 % back | 100 % back | connection attempts | healthy clients' attempts refused before the key exchange | sshd log: dropped for a penalty (rate-limited) | sshd log: dropped past MaxStartups | kernel: accept queue overflows (SYNs retransmitted) | admin logins during the storm |",
  "|---|---|---|---|---|---|---|---|---|---|",
  ...results.map(
    (r) =>
      `| ${r.version} | ${r.layout === "single" ? "one sshd + Match drop-in (today)" : "tunnel sshd + admin sshd"} | ${s(r.t99)} | ${s(r.t100)}${r.t100 === undefined ? ` (${r.up}/${N})` : ""} | ${r.attempts} | ${r.refused} | ${r.penalty} | ${r.maxStartups} | ${r.listenDropped} | ${r.adminOk}/${r.adminTries} |`,
  ),
].join("\n");
console.log(out);
// BENCH_STORM_WRITE=1 (make bench-bastion): appended to bench/bastion-results.md, which
// bench/bastion.mjs has just rewritten.
if (process.env.BENCH_STORM_WRITE === "1") {
  const file = join(ROOT, "bench/bastion-results.md");
  appendFileSync(file, `\n## Tunnel sshd: reconnect storm from one address (bench/tunnel-storm.mjs)\n\n${out}\n`);
}
