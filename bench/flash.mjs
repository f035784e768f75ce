#!/usr/bin/env node
// Many cards at once (issue 22): `mkoverlay flash` of N cards in parallel must take at most
// 1.15x the time of flashing the slowest of them alone (same base, same bmap), for N = 4 and 16;
// and the process must spend under 10 % of a core per card. As root (loop devices). Not run by
// `make test`:
//   node bench/flash.mjs       (the table on stdout; exit 1 when a target is missed, naming it)
// Cards are loop devices over sparse files on a tmpfs (the station's own disk is not what is
// measured), each throttled to BENCH_CARD_MBPS (default 10) MB/s of writes, as an SD card in a
// USB reader writes: cgroup v1's root blkio.throttle.write_bps_device, or v2's io.max in a cgroup
// the CLI is started in. The base is Raspberry-Pi-OS-shaped (MBR, FAT bootfs, ext4 rootfs with
// pi-gen's options) with BENCH_DATA_MB (default 64) MB of incompressible files in its root.
// Every run is the real CLI, start to exit, on a fresh registry: "alone" is `mkoverlay flash`
// with one card, once per card; "parallel" is one `mkoverlay flash` with all N. CPU is the
// process's user + system time (/usr/bin/time), over its wall time, divided by N.
// BENCH_SIZES (default 4,16), BENCH_WORK, BENCH_KEEP=1.
import { execFileSync, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync, rmdirSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const CLI = join(ROOT, "bin/mkoverlay");
const WORK = process.env.BENCH_WORK ?? join(tmpdir(), "mkoverlay-bench-flash");
const SIZES = (process.env.BENCH_SIZES ?? "4,16").split(",").map(Number);
const MBPS = Number(process.env.BENCH_CARD_MBPS ?? 10);
/** Reads too: a card reads at a few times its write speed, not at memory speed (0: unthrottled). */
const READ_MBPS = Number(process.env.BENCH_CARD_READ_MBPS ?? 40);
const DATA_MB = Number(process.env.BENCH_DATA_MB ?? 64);
const TARGET = 1.15;
const CPU_TARGET = 0.1;
const PATH = `${process.env.PATH ?? ""}:/usr/sbin:/sbin`;
const log = (m) => process.stderr.write(`bench/flash: ${m}\n`);
const sh = (cmd, args, opts = {}) => execFileSync(cmd, args, { encoding: "utf8", env: { ...process.env, PATH }, ...opts });

if (process.getuid?.() !== 0) {
  log("needs root (loop devices, cgroup throttling)");
  process.exit(2);
}
const V1 = "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device";
const V1R = "/sys/fs/cgroup/blkio/blkio.throttle.read_bps_device";
const v2 = !existsSync(V1) && readFileSync("/sys/fs/cgroup/cgroup.controllers", "utf8").includes("io");
if (!existsSync(V1) && !v2) {
  log("no cgroup blkio (v1) or io controller (v2) to throttle the loop devices with");
  process.exit(2);
}
const CGROUP = v2 ? `/sys/fs/cgroup/mko-bench-flash-${process.pid}` : undefined;

const loops = [];
const mounts = [];
function cleanup() {
  for (const l of loops.splice(0)) {
    if (!v2) spawnSync("sh", ["-c", `echo '${l.mm} 0' > ${V1}; echo '${l.mm} 0' > ${V1R}`]);
    spawnSync("losetup", ["-d", l.dev], { env: { ...process.env, PATH } });
  }
  if (CGROUP && existsSync(CGROUP)) rmdirSync(CGROUP);
  for (const m of mounts.splice(0)) spawnSync("umount", [m], { env: { ...process.env, PATH } });
  if (!process.env.BENCH_KEEP) rmSync(WORK, { recursive: true, force: true });
}
process.on("exit", cleanup);
for (const s of ["SIGINT", "SIGTERM"]) process.on(s, () => process.exit(130));

rmSync(WORK, { recursive: true, force: true });
mkdirSync(WORK, { recursive: true });

// ---- the base ------------------------------------------------------------------------------
const base = join(WORK, "base.img");
{
  const stage = join(WORK, "stage");
  for (const d of ["etc/ssh/sshd_config.d", "etc/systemd/system", "usr/lib", "usr/bin", "usr/share/data", "boot/firmware", "dev", "proc", "sys", "tmp"]) mkdirSync(join(stage, d), { recursive: true });
  sh("ln", ["-s", "usr/lib", join(stage, "lib")]);
  writeFileSync(join(stage, "etc/hostname"), "raspberrypi\n");
  for (let i = 0; i < DATA_MB / 4; i++) writeFileSync(join(stage, `usr/share/data/blob${i}`), randomBytes(4 << 20));
  const bootStart = 8192;
  const bootSectors = 131072;
  const rootStart = bootStart + bootSectors;
  const rootMiB = DATA_MB + 96;
  sh("truncate", ["-s", String((rootStart + rootMiB * 2048) * 512), base]);
  sh("sfdisk", ["-q", base], { input: `label: dos\nstart=${bootStart}, size=${bootSectors}, type=c\nstart=${rootStart}, type=83\n` });
  sh("mkfs.vfat", ["-F", "32", "-s", "1", "-n", "bootfs", "--offset", String(bootStart), "-h", String(bootStart), base, String(bootSectors / 2)], { stdio: ["ignore", "ignore", "ignore"] });
  sh("mke2fs", ["-q", "-F", "-t", "ext4", "-L", "rootfs", "-O", "^64bit,^huge_file", "-E", `offset=${rootStart * 512}`, "-d", stage, base, `${rootMiB}M`]);
  rmSync(stage, { recursive: true, force: true });
}
const baseSize = Number(sh("stat", ["-c", "%s", base]).trim());

// ---- the fleet -----------------------------------------------------------------------------
sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(WORK, "bastion")]);
const pub = readFileSync(join(WORK, "bastion.pub"), "utf8").trim();
const fleet = join(WORK, "mkoverlay.yaml");
writeFileSync(fleet, JSON.stringify({ registry: "./registry.db", hostname: "gw-{seq:05}", ports: { ssh: "20000-39999", services: "40000-40999" }, operators: "none", bastions: { eu: { host: "bastion-eu.example.com", hostKeys: [pub] } } }));
const env = { ...process.env, PATH, NO_COLOR: "1", MKOVERLAY_CONFIG: fleet, MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: join(WORK, "cache") };

// ---- the cards -----------------------------------------------------------------------------
const cardDir = join(WORK, "cards");
mkdirSync(cardDir);
sh("mount", ["-t", "tmpfs", "-o", `size=${Math.max(...SIZES) * (baseSize + (8 << 20)) + (64 << 20)}`, "mko-bench-flash", cardDir]);
mounts.push(cardDir);
if (CGROUP) {
  if (!readFileSync("/sys/fs/cgroup/cgroup.subtree_control", "utf8").includes("io")) writeFileSync("/sys/fs/cgroup/cgroup.subtree_control", "+io");
  mkdirSync(CGROUP);
}
function card(k) {
  const file = join(cardDir, `card${k}.raw`);
  sh("truncate", ["-s", String(baseSize + (4 << 20)), file]);
  const dev = sh("losetup", ["--show", "-f", file]).trim();
  const mm = readFileSync(`/sys/block/${dev.slice(5)}/dev`, "utf8").trim();
  loops.push({ dev, mm });
  const bps = Math.round(MBPS * 1e6);
  const rbps = Math.round(READ_MBPS * 1e6);
  if (CGROUP) writeFileSync(join(CGROUP, "io.max"), `${mm} wbps=${bps}${rbps > 0 ? ` rbps=${rbps}` : ""}`);
  else {
    writeFileSync(V1, `${mm} ${bps}`);
    if (rbps > 0) writeFileSync(V1R, `${mm} ${rbps}`);
  }
  return dev;
}

/** One `mkoverlay flash` on a fresh registry: wall seconds, CPU seconds (user + system), cards verified. */
function flash(devs) {
  rmSync(join(WORK, "registry.db"), { force: true });
  rmSync(join(WORK, "out"), { recursive: true, force: true });
  const times = join(WORK, "times");
  const argv = ["-f", "%U %S", "-o", times, process.execPath, CLI, "flash", "--base", base, "--board", "rpi4", "--bastion", "eu", "--json", "--no-progress", "-q", ...devs];
  const [cmd, args] = CGROUP ? ["sh", ["-c", `echo $$ > ${CGROUP}/cgroup.procs && exec "$@"`, "sh", "/usr/bin/time", ...argv]] : ["/usr/bin/time", argv];
  const t0 = performance.now();
  const r = spawnSync(cmd, args, { cwd: WORK, env, encoding: "utf8" });
  const wall = (performance.now() - t0) / 1000;
  const cards = r.stdout.trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));
  const ok = cards.filter((o) => o.ok).length;
  if (process.env.BENCH_VERBOSE) log(`${devs.length} card(s) ${wall.toFixed(2)} s: ${cards.map((c) => `${c.ms} ${JSON.stringify(c.phases)}`).join("; ")}`);
  if (r.status !== 0 || ok !== devs.length) throw new Error(`mkoverlay flash ${devs.join(" ")} exited ${r.status}: ${r.stderr}`);
  const [u, s] = readFileSync(times, "utf8").trim().split("\n").at(-1).split(" ").map(Number);
  return { wall, cpu: u + s };
}

// The base's bmap is computed once and cached (as on a station): a first run, not timed.
const warm = card("warm");
flash([warm]);

const rows = [];
const missed = [];
for (const n of SIZES) {
  const devs = Array.from({ length: n }, (_, k) => card(`${n}-${k}`));
  log(`${n} cards: each alone`);
  const alone = devs.map((d) => flash([d]));
  log(`${n} cards: all at once`);
  const all = flash(devs);
  const slowest = Math.max(...alone.map((a) => a.wall));
  const ratio = all.wall / slowest;
  const cpuPerCard = all.cpu / all.wall / n;
  const aloneCpu = Math.max(...alone.map((a) => a.cpu / a.wall));
  rows.push({ n, slowest, fastest: Math.min(...alone.map((a) => a.wall)), all: all.wall, ratio, cpuPerCard, aloneCpu, cpu: all.cpu });
  if (ratio > TARGET) missed.push(`${n} cards took ${ratio.toFixed(2)}x the slowest alone (target <= ${TARGET}x)`);
  if (cpuPerCard >= CPU_TARGET) missed.push(`${n} cards: ${(cpuPerCard * 100).toFixed(1)} % of a core per card (target < ${CPU_TARGET * 100} %)`);
}

const data = Number(sh("du", ["--block-size=1", base]).split("\t")[0]);
const print = (s) => process.stdout.write(`${s}\n`);
print("# mkoverlay flash: many cards at once (bench/flash.mjs)");
print("");
print(`${new Date().toISOString().slice(0, 10)}, ${sh("nproc", []).trim()} cores, load ${loadavg().map((x) => x.toFixed(2)).join(" ")} at the end; Node ${process.version}; cgroup ${CGROUP ? "v2 io.max" : "v1 blkio"} throttling`);
print(`Base: ${(baseSize / 2 ** 20).toFixed(0)} MiB image, ${(data / 1e6).toFixed(1)} MB of data (its bmap's mapped blocks);`);
print(`each card a loop device on a tmpfs, writes throttled to ${MBPS} MB/s, reads ${READ_MBPS > 0 ? `to ${READ_MBPS} MB/s` : "not"}. Each run: \`mkoverlay flash\` start to exit,`);
print("fresh registry, base written by its bmap, read back and compared with the base, overlay laid and read back, device registered.");
print("");
print("| cards | alone: fastest / slowest (s) | all at once (s) | ratio (target <= 1.15) | CPU per card, all at once (target < 10 % of a core) | CPU, one card alone |");
print("|---|---|---|---|---|---|");
for (const r of rows) print(`| ${r.n} | ${r.fastest.toFixed(2)} / ${r.slowest.toFixed(2)} | ${r.all.toFixed(2)} | ${r.ratio.toFixed(3)} ${r.ratio <= TARGET ? "met" : "MISSED"} | ${(r.cpuPerCard * 100).toFixed(1)} % ${r.cpuPerCard < CPU_TARGET ? "met" : "MISSED"} (${r.cpu.toFixed(2)} s CPU) | ${(r.aloneCpu * 100).toFixed(1)} % |`);
print("");
if (missed.length) {
  print(`Missed: ${missed.join("; ")}.`);
  log(`MISSED: ${missed.join("; ")}`);
  process.exitCode = 1;
} else print("Every target met.");
