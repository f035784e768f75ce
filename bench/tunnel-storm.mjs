#!/usr/bin/env node
// The fleet benchmarks of issue 20 (`make bench-bastion`), as root, on the system's OpenSSH (9.2)
// and bookworm-backports' 10.x (scripts/ensure-openssh10.sh). Not part of the test suite.
// Every client is a device: its own `sh` loop (bench/device-loop.sh) running the device's real
// reverse-ssh-backoff around a real `ssh -N -R` with the unit's command line, its own
// RUNTIME_DIRECTORY, the unit's RestartSec=2 between runs. No Node process is in the respawn path.
//
// Parts (BENCH_FLEET_PARTS, default storm,neighbours,cpu):
//  - storm: BENCH_STORM_N (1000) healthy + BENCH_STORM_REVOKED (10) revoked clients from
//    127.0.0.1, all connected, then the bastion "restarts" (listener and every session killed,
//    sshd started again BENCH_STORM_DOWN s (2) later). Measured from the restarted sshd's start:
//    time until 99 % / 100 % of the healthy ports listen again (limit BENCH_STORM_LIMIT, 180 s),
//    healthy attempts refused (client side: dropped before the key exchange or key refused),
//    sshd's log (penalty drops, MaxStartups drops), an administrator's login every 2 s.
//    Layouts BENCH_STORM_LAYOUTS (tunnel,single): "tunnel" = the dedicated tunnel sshd
//    (src/bastion/tunnel-sshd.ts) + the administrators' sshd on its own port; "single" = today's
//    one sshd with sshd's defaults + mkoverlay's Match drop-in, the admin logging in to it.
//    Targets (tunnel layout): 99 % ≤ 60 s, 100 % ≤ 120 s, 0 healthy refused by a penalty,
//    every admin login during the storm gets in.
//  - neighbours: BENCH_NB_HEALTHY (100) healthy + BENCH_NB_REVOKED (10) revoked devices behind
//    127.0.0.1 for BENCH_NB_MINUTES (30) on the tunnel sshd; every BENCH_NB_CHURN s (5) one
//    healthy device's ssh is killed (a NAT dropping it) so healthy devices keep logging in next
//    to the revoked ones; an admin login every 30 s. Targets: no healthy attempt refused, every
//    admin login in, each revoked device's waits on its refusal schedule (n-th: ≥ W/2 with
//    W = BACKOFF_REFUSED_FIRST·4^(n-1), capped; the script's defaults unless overridden).
//  - cpu: sshd CPU per tunnel login (cgroup accounting, median of BENCH_CPU_RUNS (15)), tunnel
//    sshd with BENCH_CPU_SIZES (10,40000) keys in the agent's key directory vs a bare sshd with
//    the one key in a file. Targets: largest/smallest ≤ 1.1×, smallest/bare ≤ 2×.
// BENCH_FLEET_VERSIONS (system,10). Back-off knobs (BACKOFF_*) pass through to every device;
// none is set by default (real time). BENCH_FLEET_WRITE=1: append the results to
// bench/bastion-results.md. Exits 1 when a target is missed, naming it.
import { spawn, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { appendFileSync, chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { clearInterval, setInterval } from "node:timers";
import { build } from "esbuild";
import { listening } from "./lib.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const env = process.env;
const PARTS = new Set((env.BENCH_FLEET_PARTS ?? "storm,neighbours,cpu").split(","));
const VERSIONS = (env.BENCH_FLEET_VERSIONS ?? "system,10").split(",");
const N = Number(env.BENCH_STORM_N ?? 1000);
const REVOKED = Number(env.BENCH_STORM_REVOKED ?? 10);
const DOWN = Number(env.BENCH_STORM_DOWN ?? 2) * 1000;
const LIMIT = Number(env.BENCH_STORM_LIMIT ?? 180) * 1000;
const LAYOUTS = (env.BENCH_STORM_LAYOUTS ?? "tunnel,single").split(",");
const NB_HEALTHY = Number(env.BENCH_NB_HEALTHY ?? 100);
const NB_REVOKED = Number(env.BENCH_NB_REVOKED ?? 10);
const NB_MINUTES = Number(env.BENCH_NB_MINUTES ?? 30);
const NB_CHURN = Number(env.BENCH_NB_CHURN ?? 5) * 1000;
const CPU_SIZES = (env.BENCH_CPU_SIZES ?? "10,40000").split(",").map(Number);
const CPU_RUNS = Number(env.BENCH_CPU_RUNS ?? 15);
// The tunnel sshd's sizing to try instead of the renderer's defaults, e.g. '{"maxStartups":"10:30:100"}'.
const SIZING = JSON.parse(env.BENCH_STORM_SIZING ?? "{}");
const REFUSED_FIRST = Number(env.BACKOFF_REFUSED_FIRST ?? 60);
const REFUSED_CAP = Number(env.BACKOFF_REFUSED_CAP ?? 3600);
const USER = "mko-storm-t";
const BASE_PORT = 21000;
const SECURE = `/run/mko-storm-${process.pid}`;
const BACKOFF = join(ROOT, "overlays/common/usr/local/sbin/reverse-ssh-backoff");

if (process.getuid() !== 0) {
  console.error("bench/tunnel-storm.mjs: run as root (sshd, the tunnel user, a keys command under /run, cgroups)");
  process.exit(2);
}
// A network namespace of its own (loopback only), with an ephemeral port range below the
// clients' forwarded ports, as bench/bastion.mjs does.
if (!env.MKO_BENCH_NETNS) {
  const r = spawnSync("unshare", ["--net", "sh", "-c", 'ip link set lo up && sysctl -qw net.ipv4.ip_local_port_range="10000 19999" && exec "$@"', "sh", process.execPath, ...process.argv.slice(1)], {
    stdio: "inherit",
    env: { ...env, MKO_BENCH_NETNS: "1" },
  });
  process.exit(r.status ?? 1);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (m) => console.error(`fleet ${new Date().toISOString().slice(11, 19)}: ${m}`);
const sh = (cmd, args) => {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
};
const loadavg = () => readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
/** Load average (1 min) sampled every 10 s while a part runs: min–max. */
function loadSampler() {
  const xs = [Number(loadavg().split(" ")[0])];
  const t = setInterval(() => xs.push(Number(loadavg().split(" ")[0])), 10_000);
  return () => (clearInterval(t), `${Math.min(...xs).toFixed(1)}–${Math.max(...xs).toFixed(1)}`);
}

// The renderer and the keys command, straight from the sources.
const bundle = join(SECURE, "tunnel-sshd.mjs");
mkdirSync(SECURE, { mode: 0o755 });
chmodSync(SECURE, 0o755);
const cleanups = [];
process.on("exit", () => {
  for (const c of cleanups) {
    try {
      c();
    } catch {
      // best effort
    }
  }
  rmSync(SECURE, { recursive: true, force: true });
});
for (const s of ["SIGINT", "SIGTERM"]) process.on(s, () => process.exit(130));
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
const clientDir = join(SECURE, "clients");
mkdirSync(clientDir, { mode: 0o700 });
const hostKey = join(SECURE, "host_ed25519");
sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", hostKey]);
const hostPub = readFileSync(`${hostKey}.pub`, "utf8").split(" ").slice(0, 2).join(" ");
const knownHosts = join(SECURE, "known_hosts");
writeFileSync(knownHosts, [2200, 2300, ...Array.from({ length: 16 }, (_, i) => 2400 + i)].map((p) => `[127.0.0.1]:${p} ${hostPub}\n`).join(""));
const adminKey = join(clientDir, "admin");
sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", adminKey]);
const adminKeys = join(SECURE, "admin-keys");
mkdirSync(adminKeys, { mode: 0o755 });
writeFileSync(join(adminKeys, "root"), readFileSync(`${adminKey}.pub`));

/** sha256 fingerprint of a public key line, as ssh-keygen -l -E sha256 prints it. */
const fingerprint = (pub) => `SHA256:${createHash("sha256").update(Buffer.from(pub.split(" ")[1], "base64")).digest("base64").replace(/=+$/, "")}`;
const authLine = (d) => `restrict,port-forwarding,command="/sbin/nologin",permitlisten="localhost:${d.port}" ${d.pub}\n`;

/** count devices' keys (ssh-keygen, 8 at a time); the agent's key directory `dir` gets the healthy ones. */
async function makeDevices(healthy, revoked, dir) {
  mkdirSync(dir, { recursive: true, mode: 0o711 });
  const out = [];
  for (let i = 0; i < healthy + revoked; i++) out.push({ i, key: join(clientDir, `d${i}`), port: BASE_PORT + i, revoked: i >= healthy });
  for (let k = 0; k < out.length; k += 8) {
    await Promise.all(
      out.slice(k, k + 8).map(
        (d) =>
          new Promise((res, rej) => {
            if (existsSync(d.key)) return res();
            const p = spawn("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", `d${d.i}`, "-f", d.key], { stdio: "ignore" });
            p.once("exit", (c) => (c === 0 ? res() : rej(new Error(`ssh-keygen d${d.i} failed`))));
          }),
      ),
    );
  }
  for (const d of out) {
    d.pub = readFileSync(`${d.key}.pub`, "utf8").trim();
    if (!d.revoked) writeFileSync(join(dir, M.fileNameFor(fingerprint(d.pub))), authLine(d), { mode: 0o644 });
  }
  return out;
}

const bastion = { name: "storm", host: "127.0.0.1", port: 2222, user: USER, hostKeys: [], from: undefined, expiry: undefined, jumpUser: undefined };
const fleet = { file: "f.yaml", registry: "r.db", hostnameTemplate: "gw-{seq}", ports: { ssh: { lo: BASE_PORT, hi: BASE_PORT + 9999 }, services: { lo: 40000, hi: 40999 } }, bastions: new Map([["storm", bastion]]), forwards: [], operators: undefined };
const pathsFor = (keysDir) => ({ keysCommand, keysDir, keysUser: "mkoverlay-keys" });

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

/** An sshd with sshd's defaults (the administrators' sshd); `extra`: more lines (the Match drop-in, a key file). */
function plainConfigText(port, name, extra = "", authorizedKeysFile = `${adminKeys}/%u`) {
  return [
    `Port ${port}`,
    "ListenAddress 127.0.0.1",
    `HostKey ${hostKey}`,
    `PidFile ${join(SECURE, `${name}.pid`)}`,
    `AuthorizedKeysFile ${authorizedKeysFile}`,
    "UsePAM no",
    "KbdInteractiveAuthentication no",
    "PasswordAuthentication no",
    "PermitRootLogin prohibit-password",
    "LogLevel VERBOSE",
    extra,
    "",
  ].join("\n");
}
const tunnelConfigText = (bin, port, name, keysDir) =>
  M.renderTunnelSshdConfig({ fleet, bastion, version: bin.version, port, listen: ["127.0.0.1"], hostKeys: [hostKey], pidFile: join(SECURE, `${name}.pid`), paths: pathsFor(keysDir), sizing: SIZING });

// A cgroup v2 of its own per storm sshd: cgroup.kill ends the listener and every session in one
// step, as a reboot does (killing 2,000 session processes one by one took 10 s on a loaded machine).
const V2 = existsSync("/sys/fs/cgroup/cgroup.controllers") ? "/sys/fs/cgroup" : existsSync("/sys/fs/cgroup/unified/cgroup.procs") ? "/sys/fs/cgroup/unified" : undefined;
let killGroups = 0;

function startSshd(bin, config, logFile, extra = []) {
  const t = spawnSync(bin.sshd, [...bin.args, ...extra, "-t", "-f", config], { encoding: "utf8" });
  if (t.status !== 0) throw new Error(`sshd -t ${config}: ${t.stderr}`);
  let p;
  if (V2) {
    const cg = join(V2, `mko-fleet-${process.pid}-${killGroups++}`);
    mkdirSync(cg);
    cleanups.push(() => spawnSync("rmdir", [cg]));
    // The shell moves itself into the cgroup before it becomes sshd: no session can start outside it.
    p = spawn("sh", ["-c", 'echo $$ >"$0/cgroup.procs" && exec "$@"', cg, bin.sshd, ...bin.args, ...extra, "-D", "-e", "-f", config, "-E", logFile], { stdio: "ignore" });
    p.killGroup = cg;
  } else p = spawn(bin.sshd, [...bin.args, ...extra, "-D", "-e", "-f", config, "-E", logFile], { stdio: "ignore" });
  cleanups.push(() => p.exitCode === null && stopTree(p.pid));
  return p;
}

/** Children of every process, from one pass over /proc. */
function processTree() {
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
  return kids;
}
function descendants(pid, kids = processTree()) {
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
const kill = (pid, sig = "SIGKILL") => {
  try {
    process.kill(pid, sig);
  } catch {
    // gone
  }
};
function stopTree(pid) {
  kill(pid, "SIGSTOP");
  for (const k of descendants(pid)) kill(k);
  kill(pid);
}
/** A bastion going down at once: the listener stops accepting first, then every session dies, then the listener. */
async function stopSshd(proc) {
  if (proc.exitCode !== null) return;
  const gone = new Promise((r) => proc.once("exit", r));
  if (proc.killGroup) {
    writeFileSync(join(proc.killGroup, "cgroup.kill"), "1");
    while (readFileSync(join(proc.killGroup, "cgroup.procs"), "utf8").trim() !== "") await sleep(20);
  } else stopTree(proc.pid);
  await gone;
}


const ADMIN_OPTS = ["-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes", `-o`, `UserKnownHostsFile=${knownHosts}`, "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=30"];
function adminLogin(port) {
  return new Promise((resolve) => {
    const p = spawn("ssh", [...ADMIN_OPTS, "-i", adminKey, "-p", String(port), "root@127.0.0.1", "true"], { stdio: "ignore" });
    const t = setTimeout(() => p.kill("SIGKILL"), 30_000);
    p.once("exit", (code) => (clearTimeout(t), resolve(code === 0)));
  });
}
/** An admin login every `everyMs` until stop(): { tries, ok }. */
function adminLoop(port, everyMs) {
  const s = { tries: 0, ok: 0, failedAt: [] };
  let on = true;
  const t0 = Date.now();
  const done = (async () => {
    while (on) {
      const t = Date.now();
      s.tries++;
      if (await adminLogin(port)) s.ok++;
      else s.failedAt.push(((t - t0) / 1000).toFixed(0));
      for (let w = everyMs - (Date.now() - t); on && w > 0; w -= 200) await sleep(Math.min(200, w));
    }
  })();
  return { s, stop: async () => ((on = false), await done, s) };
}

// --- devices: one sh loop each ---

const LOOP = join(SECURE, "device-loop.sh");
copyFileSync(join(ROOT, "bench/device-loop.sh"), LOOP);
chmodSync(LOOP, 0o755);
const BACKOFF_ENV = Object.fromEntries(Object.entries(env).filter(([k]) => k.startsWith("BACKOFF_")));

/** Starts every device's loop against the bastion on `port`. */
function startDevices(devices, port, tag) {
  const rtRoot = join(SECURE, `rt-${tag}`);
  mkdirSync(rtRoot, { mode: 0o755 });
  for (const d of devices) {
    d.rd = join(rtRoot, `d${d.i}`);
    mkdirSync(d.rd, { mode: 0o700 });
    d.proc = spawn("sh", [LOOP], {
      detached: true,
      stdio: "ignore",
      env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", ...BACKOFF_ENV, RUNTIME_DIRECTORY: d.rd, BACKOFF, DEVICE_KEY: d.key, BASTION_PORT: String(port), BASTION_USER: USER, TUNNEL_PORT: String(d.port), KNOWN_HOSTS: knownHosts },
    });
    d.proc.unref();
  }
  const stop = () => {
    for (const d of devices) if (d.proc?.pid) kill(-d.proc.pid);
  };
  cleanups.push(stop);
  return stop;
}
/** Each attempt a device made: { started, ended, rc, cls } (seconds since the epoch). */
function events(d) {
  let text = "";
  try {
    text = readFileSync(join(d.rd, "events"), "utf8");
  } catch {
    return [];
  }
  return text
    .trim()
    .split("\n")
    .filter(Boolean)
    .map((l) => {
      const [started, ended, rc, cls] = l.split(" ");
      return { started: Number(started), ended: Number(ended), rc: Number(rc), cls };
    });
}
/** The pid of the device's running ssh, if ssh (not the back-off wait) is running. */
function sshPid(d) {
  try {
    const pid = Number(readFileSync(join(d.rd, "pid"), "utf8"));
    return readFileSync(`/proc/${pid}/comm`, "utf8").trim() === "ssh" ? pid : undefined;
  } catch {
    return undefined;
  }
}

async function waitUp(devices, t0, limit) {
  const healthy = devices.filter((d) => !d.revoked);
  const want = healthy.length;
  let t99;
  for (;;) {
    const l = listening();
    const up = healthy.filter((d) => l.has(d.port)).length;
    if (t99 === undefined && up >= Math.ceil(want * 0.99)) t99 = Date.now() - t0;
    if (up >= want) return { t99, t100: Date.now() - t0, up };
    if (Date.now() - t0 >= limit) return { t99, t100: undefined, up };
    await sleep(100);
  }
}

function countLog(file) {
  let text = "";
  try {
    text = readFileSync(file, "utf8");
  } catch {
    // none yet
  }
  return {
    penalty: (text.match(/drop connection .*penalty/g) ?? []).length,
    // 9.2 logs "… past MaxStartups", 10.0 "… Maxstartups" (both at VERBOSE).
    maxStartups: (text.match(/drop connection .*(past MaxStartups|Maxstartups)/gi) ?? []).length,
    grace: (text.match(/Timeout before authentication/g) ?? []).length,
  };
}
const classCount = (evs) => evs.reduce((m, e) => ((m[e.cls] = (m[e.cls] ?? 0) + 1), m), {});

const failures = [];
const sections = [];
const bins = binaries();
const machine = `${cpus().length} × ${cpus()[0]?.model.trim() ?? "?"}`;

// --- storm ---

async function storm(bin, layout, devices) {
  const tunnelPort = 2200;
  const adminPort = layout === "single" ? tunnelPort : 2300;
  const tag = `${layout}-${bin.label}`;
  const tconf = join(SECURE, `${tag}.conf`);
  const tlog = join(SECURE, `${tag}.log`);
  const stopLoad = loadSampler();
  const loadStart = loadavg();
  if (layout === "single") writeFileSync(tconf, plainConfigText(tunnelPort, tag, M.renderDropin(fleet, bastion, pathsFor(stormKeys))));
  else writeFileSync(tconf, tunnelConfigText(bin, tunnelPort, tag, stormKeys));
  let admin;
  if (layout !== "single") {
    const aconf = join(SECURE, `${tag}-admin.conf`);
    writeFileSync(aconf, plainConfigText(adminPort, `${tag}-admin`));
    admin = startSshd(bin, aconf, join(SECURE, `${tag}-admin.log`));
  }
  // LogLevel VERBOSE: sshd logs its MaxStartups and penalty drops at VERBOSE (the rendered INFO hides them).
  const verbose = ["-o", "LogLevel=VERBOSE"];
  let sshd = startSshd(bin, tconf, join(SECURE, `${tag}-warmup.log`), verbose);
  await sleep(500);
  log(`${tag}: starting ${N} device loops (+${REVOKED} revoked), load ${loadStart}…`);
  const tw = Date.now();
  const stopDevices = startDevices(devices, tunnelPort, tag);
  const warm = await waitUp(devices, tw, LIMIT * 2);
  log(`${tag}: cold start ${warm.up}/${N} up after ${((warm.t100 ?? LIMIT * 2) / 1000).toFixed(1)} s; restarting the bastion`);
  // Every device as if its tunnel had been up for a long time (≥ BACKOFF_RESET_AFTER): earlier
  // failures forgotten, exactly what --record does for a tunnel up that long.
  for (const d of devices) rmSync(join(d.rd, "backoff"), { force: true });
  const tKill = Date.now();
  await stopSshd(sshd);
  await sleep(DOWN);
  const t0 = Date.now();
  sshd = startSshd(bin, tconf, tlog, verbose);
  const admins = adminLoop(adminPort, 2000);
  const r = await waitUp(devices, t0, LIMIT);
  const adm = await admins.stop();
  const tEnd = Date.now();
  stopDevices();
  await stopSshd(sshd);
  if (admin) await stopSshd(admin);
  await sleep(300);
  // Attempts begun after the kill (whole seconds): the storm's.
  const since = Math.floor(tKill / 1000);
  const stormEvs = (pred) => devices.filter(pred).flatMap((d) => events(d).filter((e) => e.started >= since && e.started * 1000 <= tEnd));
  const healthyEvs = stormEvs((d) => !d.revoked);
  const revokedEvs = stormEvs((d) => d.revoked);
  const hc = classCount(healthyEvs);
  const c = countLog(tlog);
  const res = {
    tag, layout, version: bin.label, ...r, coldStart: warm.t100, coldUp: warm.up, attempts: healthyEvs.length + r.up, healthyClasses: hc, revokedAttempts: revokedEvs.length,
    refusedHealthy: (hc.dropped ?? 0) + (hc.refused ?? 0), penalty: c.penalty, maxStartups: c.maxStartups, grace: c.grace, adminTries: adm.tries, adminOk: adm.ok, downFromKill: t0 - tKill, load: `${loadStart} → ${loadavg()} (1-min samples ${stopLoad()})`,
  };
  log(`${tag}: ${JSON.stringify(res)}`);
  if (layout === "tunnel") {
    const miss = (m) => failures.push(`storm ${tag}: ${m}`);
    if (r.t99 === undefined || r.t99 > 60_000) miss(`99 % back after ${r.t99 === undefined ? `more than ${LIMIT / 1000} s` : `${(r.t99 / 1000).toFixed(1)} s`} (target ≤ 60 s)`);
    if (r.t100 === undefined || r.t100 > 120_000) miss(`100 % back after ${r.t100 === undefined ? `more than ${LIMIT / 1000} s (${r.up}/${N})` : `${(r.t100 / 1000).toFixed(1)} s`} (target ≤ 120 s)`);
    if (c.penalty > 0) miss(`${c.penalty} connections dropped for a penalty (target 0)`);
    if ((hc.refused ?? 0) > 0) miss(`${hc.refused} healthy attempts had their key refused (target 0)`);
    if (adm.tries === 0 || adm.ok < adm.tries) miss(`admin logins during the storm ${adm.ok}/${adm.tries} (target all)`);
  }
  return res;
}

const stormKeys = join(SECURE, "storm-keys");
if (PARTS.has("storm")) {
  log(`storm: ${N} device keys, ${REVOKED} revoked…`);
  const devices = await makeDevices(N, REVOKED, stormKeys);
  const results = [];
  for (const bin of bins) for (const layout of LAYOUTS) results.push(await storm(bin, layout, devices));
  const s = (ms) => (ms === undefined ? `not within ${LIMIT / 1000} s` : `${(ms / 1000).toFixed(1)} s`);
  const cls = (h) => Object.entries(h).map(([k, v]) => `${k} ${v}`).join(", ");
  sections.push(
    [
      `### Reconnect storm: ${N.toLocaleString("en")} devices (+${REVOKED} revoked) from one address`,
      "",
      `Measured ${new Date().toISOString().slice(0, 16)}Z on ${machine}, shared with other work, in a network namespace of its own. Each device is its own \`sh\` loop (bench/device-loop.sh): the real reverse-ssh-backoff (default schedule, real time, no compression) around a real \`ssh -N -R\` with the unit's options, RUNTIME_DIRECTORY of its own, RestartSec=2. All connected first (cold start), their back-off state cleared (as for tunnels up ≥ 60 s), then the listener and every session killed at once (cgroup.kill; on this loaded machine the kernel took a few seconds to end ~2,000 processes) and sshd started again ${DOWN / 1000} s after they were gone; sshd at LogLevel VERBOSE (where it logs its drops); times from that start, limit ${LIMIT / 1000} s. An admin login every 2 s during the storm. "Refused" = a healthy device's attempt that ended before the key exchange (\`kex_exchange_identification\`: penalty or MaxStartups) or with its key refused. Healthy attempts = the failed attempts begun after the kill (classes: down = connection refused, sshd not yet back; dropped = closed before the key exchange; closed = closed during the key exchange or authentication; forward = the port still held by the old session; timeout; ended = any other exit) + the tunnels up at the end.`,
      "",
      "| OpenSSH | bastion | cold start (all up) | bastion down (kill → start) | 99 % back | 100 % back | healthy attempts (classes) | healthy refused (dropped before the key exchange, or key refused) | sshd log: penalty drops | sshd log: MaxStartups drops | sshd log: LoginGraceTime expired | revoked attempts | admin logins in | load average (start → end; samples) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
      ...results.map(
        (r) =>
          `| ${r.version} | ${r.layout === "single" ? "one sshd + Match drop-in (today)" : "tunnel sshd + admin sshd"} | ${r.coldStart === undefined ? `${r.coldUp}/${N} in ${(LIMIT * 2) / 1000} s` : s(r.coldStart)} | ${s(r.downFromKill)} | ${s(r.t99)} | ${s(r.t100)}${r.t100 === undefined ? ` (${r.up}/${N})` : ""} | ${r.attempts} (${cls(r.healthyClasses)}) | ${r.refusedHealthy} | ${r.penalty} | ${r.maxStartups} | ${r.grace} | ${r.revokedAttempts} | ${r.adminOk}/${r.adminTries} | ${r.load} |`,
      ),
    ].join("\n"),
  );
}

// --- revoked neighbours ---

/** The refusal schedule: the n-th refusal in a row waits [W/2, W], W = first·4^(n-1) capped. */
const refusedWindow = (n) => Math.min(REFUSED_FIRST * 4 ** (n - 1), REFUSED_CAP);

async function neighbours(bin) {
  const tag = `nb-${bin.label}`;
  const dir = join(SECURE, `${tag}-keys`);
  const devices = (await makeDevices(NB_HEALTHY, NB_REVOKED, join(SECURE, "nb-prep"))).map((d) => ({ ...d }));
  // The neighbours' healthy devices only in this directory.
  mkdirSync(dir, { mode: 0o711 });
  for (const d of devices) if (!d.revoked) writeFileSync(join(dir, M.fileNameFor(fingerprint(d.pub))), authLine(d), { mode: 0o644 });
  const tconf = join(SECURE, `${tag}.conf`);
  const tlog = join(SECURE, `${tag}.log`);
  writeFileSync(tconf, tunnelConfigText(bin, 2200, tag, dir));
  const aconf = join(SECURE, `${tag}-admin.conf`);
  writeFileSync(aconf, plainConfigText(2300, `${tag}-admin`));
  const admin = startSshd(bin, aconf, join(SECURE, `${tag}-admin.log`));
  const sshd = startSshd(bin, tconf, tlog);
  await sleep(500);
  const stopLoad = loadSampler();
  const loadStart = loadavg();
  log(`${tag}: ${NB_HEALTHY} healthy + ${NB_REVOKED} revoked devices for ${NB_MINUTES} min, load ${loadStart}`);
  const t0 = Date.now();
  const stopDevices = startDevices(devices, 2200, tag);
  const admins = adminLoop(2300, 30_000);
  const healthy = devices.filter((d) => !d.revoked);
  let churned = 0;
  let lastLog = t0;
  while (Date.now() - t0 < NB_MINUTES * 60_000) {
    await sleep(NB_CHURN);
    const l = listening();
    const upNow = healthy.filter((d) => l.has(d.port));
    const victim = upNow[Math.floor(Math.random() * upNow.length)];
    const pid = victim && sshPid(victim);
    if (pid) {
      kill(pid);
      churned++;
    }
    if (Date.now() - lastLog >= 60_000) {
      lastLog = Date.now();
      log(`${tag}: ${((Date.now() - t0) / 60_000).toFixed(0)} min, ${upNow.length}/${NB_HEALTHY} healthy up, ${churned} dropped so far, load ${loadavg()}`);
    }
  }
  const adm = await admins.stop();
  const upEnd = healthy.filter((d) => listening().has(d.port)).length;
  stopDevices();
  await stopSshd(sshd);
  await stopSshd(admin);
  const since = Math.floor(t0 / 1000) - 1;
  const hEvs = healthy.flatMap((d) => events(d).filter((e) => e.started >= since));
  const hc = classCount(hEvs);
  const refusedHealthy = (hc.dropped ?? 0) + (hc.refused ?? 0);
  // Revoked: the gaps between one attempt's end and the next attempt's start, n-th refusal.
  const gaps = [];
  const offSchedule = [];
  const revokedAttempts = [];
  for (const d of devices.filter((x) => x.revoked)) {
    const evs = events(d).filter((e) => e.started >= since);
    revokedAttempts.push(evs.length);
    for (let k = 1; k < evs.length; k++) {
      const n = k; // the wait after the n-th refusal in a row
      const gap = evs[k].started - evs[k - 1].ended;
      const w = refusedWindow(n);
      gaps.push({ n, gap, w });
      // [W/2, W] plus the unit's RestartSec=2 and up to 30 s of a loaded machine (whole seconds).
      if (gap < Math.floor(w / 2) || gap > w + 2 + 30) offSchedule.push(`d${d.i} wait ${n}: ${gap} s (window [${(w + 1) >> 1}, ${w}] s)`);
    }
    if (evs.some((e) => e.cls !== "refused")) offSchedule.push(`d${d.i}: an attempt not refused (${evs.map((e) => e.cls).join(",")})`);
  }
  const byN = new Map();
  for (const g of gaps) {
    if (!byN.has(g.n)) byN.set(g.n, []);
    byN.get(g.n).push(g.gap);
  }
  const c = countLog(tlog);
  const res = {
    tag, minutes: NB_MINUTES, healthyAttempts: hEvs.length, hc, refusedHealthy, churned, upEnd, adminTries: adm.tries, adminOk: adm.ok, penalty: c.penalty, maxStartups: c.maxStartups,
    revokedAttempts, waits: [...byN].map(([n, xs]) => `${n}: ${Math.min(...xs)}–${Math.max(...xs)} s (window [${(refusedWindow(n) + 1) >> 1}, ${refusedWindow(n)}] s, ${xs.length} waits)`), offSchedule,
    load: `${loadStart} → ${loadavg()} (1-min samples ${stopLoad()})`,
  };
  log(`${tag}: ${JSON.stringify(res)}`);
  const miss = (m) => failures.push(`revoked neighbours ${tag}: ${m}`);
  if (refusedHealthy > 0) miss(`${refusedHealthy} healthy attempts refused (target 0)`);
  if (c.penalty > 0) miss(`${c.penalty} connections dropped for a penalty`);
  if (adm.tries === 0 || adm.ok < adm.tries) miss(`admin logins ${adm.ok}/${adm.tries} (target all)`);
  if (offSchedule.length) miss(`revoked devices off their refusal back-off: ${offSchedule.join("; ")}`);
  if (upEnd < NB_HEALTHY) log(`${tag}: ${upEnd}/${NB_HEALTHY} healthy tunnels up at the end (some were between a drop and their next attempt)`);
  return { ...res, bin };
}

if (PARTS.has("neighbours")) {
  const results = [];
  for (const bin of bins) results.push(await neighbours(bin));
  const knobs = Object.keys(BACKOFF_ENV).length ? ` Back-off compressed: ${Object.entries(BACKOFF_ENV).map(([k, v]) => `${k}=${v}`).join(" ")}.` : " The back-off script's defaults, real time (no compression).";
  sections.push(
    [
      `### Revoked neighbours: ${NB_REVOKED} revoked + ${NB_HEALTHY} healthy devices behind one address`,
      "",
      `Measured ${new Date().toISOString().slice(0, 16)}Z on ${machine}, shared with other work. Tunnel sshd (rendered) + admin sshd on its own port; every device its own \`sh\` loop around reverse-ssh-backoff and \`ssh -N -R\` (bench/device-loop.sh).${knobs} Every ${NB_CHURN / 1000} s one healthy device's \`ssh\` is killed (a NAT dropping it), so healthy devices keep logging in beside the revoked ones; an admin login every 30 s. Revoked devices' waits: from the end of one refused attempt to the start of the next (the unit's RestartSec=2 included), the n-th refusal in a row.`,
      "",
      "| OpenSSH | minutes | healthy attempts (classes) | healthy refused | healthy drops (churn) | sshd log: penalty drops | admin logins in | revoked attempts per device | revoked waits, n-th refusal: min–max | off schedule | load average (start → end; samples) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
      ...results.map(
        (r) =>
          `| ${r.bin.label} | ${r.minutes} | ${r.healthyAttempts} (${Object.entries(r.hc).map(([k, v]) => `${k} ${v}`).join(", ")}) | ${r.refusedHealthy} | ${r.churned} | ${r.penalty} | ${r.adminOk}/${r.adminTries} | ${Math.min(...r.revokedAttempts)}–${Math.max(...r.revokedAttempts)} | ${r.waits.join("; ")} | ${r.offSchedule.length ? r.offSchedule.join("; ") : "none"} | ${r.load} |`,
      ),
    ].join("\n"),
  );
}

// --- CPU per login ---

function cgroupCounter(name) {
  const v1 = "/sys/fs/cgroup/cpuacct";
  const v2 = existsSync("/sys/fs/cgroup/cgroup.controllers") ? "/sys/fs/cgroup" : existsSync("/sys/fs/cgroup/unified/cgroup.procs") ? "/sys/fs/cgroup/unified" : undefined;
  if (existsSync(join(v1, "cpuacct.usage"))) {
    const dir = join(v1, name);
    mkdirSync(dir, { recursive: true });
    cleanups.push(() => spawnSync("rmdir", [dir]));
    return { procs: join(dir, "cgroup.procs"), usageMs: () => Number(readFileSync(join(dir, "cpuacct.usage"), "utf8")) / 1e6 };
  }
  if (v2) {
    const dir = join(v2, name);
    mkdirSync(dir, { recursive: true });
    cleanups.push(() => spawnSync("rmdir", [dir]));
    return { procs: join(dir, "cgroup.procs"), usageMs: () => Number(/usage_usec (\d+)/.exec(readFileSync(join(dir, "cpu.stat"), "utf8"))[1]) / 1e3 };
  }
  throw new Error("no cpuacct (cgroup v1) or cgroup v2 to account sshd's CPU in");
}

/** A key directory of `n` entries: the probe device's, and n-1 others (random keys, as the agent writes them). */
function fillKeysDir(dir, n, probe) {
  mkdirSync(dir, { mode: 0o711 });
  writeFileSync(join(dir, M.fileNameFor(fingerprint(probe.pub))), authLine(probe), { mode: 0o644 });
  for (let i = 1; i < n; i++) {
    const blob = Buffer.concat([Buffer.from([0, 0, 0, 11]), Buffer.from("ssh-ed25519"), Buffer.from([0, 0, 0, 32]), randomBytes(32)]);
    const pub = `ssh-ed25519 ${blob.toString("base64")} d${i}`;
    writeFileSync(join(dir, M.fileNameFor(fingerprint(pub))), authLine({ port: BASE_PORT + 100 + (i % 9000), pub }), { mode: 0o644 });
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function oneLogin(m, probe) {
  const before = m.cg.usageMs();
  const c = spawn("ssh", [...ADMIN_OPTS, "-N", "-T", "-o", "ExitOnForwardFailure=yes", "-i", probe.key, "-p", String(m.port), "-R", `localhost:${probe.port}:localhost:22`, `${USER}@127.0.0.1`], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  c.stderr.on("data", (x) => (err += x));
  const t = Date.now();
  while (!listening().has(probe.port)) {
    if (c.exitCode !== null) throw new Error(`login to ${m.label}: ssh exited ${c.exitCode}: ${err}`);
    if (Date.now() - t > 30_000) throw new Error(`login to ${m.label}: no forward after 30 s`);
    await sleep(5);
  }
  c.kill("SIGTERM");
  await new Promise((r) => (c.exitCode !== null ? r() : c.once("exit", r)));
  while (listening().has(probe.port)) await sleep(5);
  await sleep(150); // the session processes finish their exit accounting
  return m.cg.usageMs() - before;
}

async function cpuPart(bin) {
  const tag = `cpu-${bin.label}`;
  const [probe] = await makeDevices(1, 0, join(SECURE, `${tag}-probe`));
  const stopLoad = loadSampler();
  const loadStart = loadavg();
  const modes = [];
  const bareKeys = join(SECURE, `${tag}-bare-keys`);
  mkdirSync(bareKeys, { mode: 0o755 });
  writeFileSync(join(bareKeys, USER), authLine(probe), { mode: 0o644 });
  const add = (key, label, text) => {
    const port = 2400 + modes.length;
    const cfg = join(SECURE, `${tag}-${key}.conf`);
    writeFileSync(cfg, text(port, `${tag}-${key}`));
    const cg = cgroupCounter(`mko-fleet-${process.pid}-${tag}-${key}`);
    const p = startSshd(bin, cfg, join(SECURE, `${tag}-${key}.log`));
    writeFileSync(cg.procs, String(p.pid));
    modes.push({ key, label, port, cg, xs: [] });
  };
  add("bare", "bare sshd, 1 key in a file", (port, name) => plainConfigText(port, name, "", `${bareKeys}/%u`));
  for (const n of CPU_SIZES) {
    log(`${tag}: key directory of ${n} devices…`);
    const dir = join(SECURE, `${tag}-keys-${n}`);
    fillKeysDir(dir, n, probe);
    add(`n${n}`, `tunnel sshd, ${n} keys`, (port, name) => tunnelConfigText(bin, port, name, dir));
  }
  await sleep(1000);
  log(`${tag}: ${CPU_RUNS} logins on each of ${modes.length} sshds, round-robin, load ${loadStart}`);
  for (const m of modes) await oneLogin(m, probe); // warm-up (page cache), not counted
  for (let r = 0; r < CPU_RUNS; r++) for (const m of modes) m.xs.push(await oneLogin(m, probe));
  for (const m of modes) {
    const p = readFileSync(join(SECURE, `${tag}-${m.key}.pid`), "utf8").trim();
    stopTree(Number(p));
  }
  for (const n of CPU_SIZES) rmSync(join(SECURE, `${tag}-keys-${n}`), { recursive: true, force: true });
  const v = Object.fromEntries(modes.map((m) => [m.key, median(m.xs)]));
  const small = Math.min(...CPU_SIZES);
  const big = Math.max(...CPU_SIZES);
  const flat = v[`n${big}`] / v[`n${small}`];
  const vsBare = v[`n${small}`] / v.bare;
  const res = { tag, v, flat, vsBare, load: `${loadStart} → ${loadavg()} (1-min samples ${stopLoad()})` };
  log(`${tag}: ${JSON.stringify(res)}`);
  if (flat > 1.1) failures.push(`cpu ${tag}: per-login CPU ${big} / ${small} keys = ${flat.toFixed(2)}× (target ≤ 1.1×)`);
  if (vsBare > 2) failures.push(`cpu ${tag}: tunnel sshd with ${small} keys / bare sshd = ${vsBare.toFixed(2)}× (target ≤ 2×)`);
  if (v[`n${big}`] / v.bare > 2) failures.push(`cpu ${tag}: tunnel sshd with ${big} keys / bare sshd = ${(v[`n${big}`] / v.bare).toFixed(2)}× (target ≤ 2×)`);
  return { ...res, bin, small, big, modes };
}

if (PARTS.has("cpu")) {
  const results = [];
  for (const bin of bins) results.push(await cpuPart(bin));
  sections.push(
    [
      "### sshd CPU per tunnel login, tunnel sshd",
      "",
      `Measured ${new Date().toISOString().slice(0, 16)}Z on ${machine}, shared with other work. Each sshd (listener, re-exec, sessions, keys command) in a cgroup of its own; CPU per login = the cgroup's usage around one \`ssh -N -R\` login (until the forward listens, then closed); median of ${CPU_RUNS}, the sshds taking their logins round-robin. Tunnel sshd as rendered (src/bastion/tunnel-sshd.ts) with the agent's key directory of N entries (the probe device's and N−1 random keys); bare sshd: sshd's defaults, the one key in an authorized_keys file. CPU time, not wall time: the machine's load changes it little.`,
      "",
      "| OpenSSH | bare sshd | " + CPU_SIZES.map((n) => `tunnel sshd, ${n.toLocaleString("en")} keys`).join(" | ") + " | largest / smallest (≤ 1.1×) | smallest / bare (≤ 2×) | load average (start → end; samples) |",
      "|---|---|" + CPU_SIZES.map(() => "---|").join("") + "---|---|---|",
      ...results.map((r) => `| ${r.bin.label} | ${r.v.bare.toFixed(1)} ms | ${CPU_SIZES.map((n) => `${r.v[`n${n}`].toFixed(1)} ms (${(r.v[`n${n}`] / r.v.bare).toFixed(2)}× bare)`).join(" | ")} | ${r.flat.toFixed(2)}× | ${r.vsBare.toFixed(2)}× | ${r.load} |`),
    ].join("\n"),
  );
}

const out = sections.join("\n\n");
console.log(out);
if (failures.length) console.log(`\n**Targets missed:**\n${failures.map((f) => `- ${f}`).join("\n")}`);
if (env.BENCH_FLEET_WRITE === "1") {
  appendFileSync(join(ROOT, "bench/bastion-results.md"), `\n## Fleet benchmarks (bench/tunnel-storm.mjs, issue 20)\n\n${out}\n${failures.length ? `\n**Targets missed:**\n${failures.map((f) => `- ${f}`).join("\n")}\n` : "\nEvery target of issue 20 met in this run.\n"}`);
}
if (failures.length) {
  for (const f of failures) console.error(`bench/tunnel-storm.mjs: target missed: ${f}`);
  process.exit(1);
}
