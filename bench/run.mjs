#!/usr/bin/env node
// `make bench`: factory-scale benchmarks. Ratios are the headline (machines are noisy);
// absolute numbers beside them. Writes bench/results.md (and nothing outside bench/); exits 1,
// naming them, when a target is missed.
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const CLI = join(ROOT, "bin/mkoverlay");
const WORK = process.env.BENCH_WORK ?? join(ROOT, "bench/work");
const COUNT = Number(process.env.BENCH_COUNT ?? 1000);
const GROWTH = Number(process.env.BENCH_GROWTH ?? 10000);
const RUNS = Number(process.env.BENCH_RUNS ?? 9);

rmSync(WORK, { recursive: true, force: true });
mkdirSync(WORK, { recursive: true });
const bastionKey = join(WORK, "bastion_key");
execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", bastionKey]);
const pub = readFileSync(`${bastionKey}.pub`, "utf8").trim();
// Flush what earlier runs left dirty (removing a previous bench/work is thousands of files), so
// neither side of a comparison pays for it.
const settle = () => execFileSync("sync");

function fleet(dir) {
  mkdirSync(dir, { recursive: true });
  writeFileSync(
    join(dir, "mkoverlay.yaml"),
    [
      "registry: ./registry.db",
      "hostname: gw-{seq:05}",
      "ports:",
      "  ssh: 30000-49999",
      "  services: 50000-50999",
      "bastions:",
      "  eu:",
      "    host: bastion-eu.example.com",
      "    hostKeys:",
      `      - ${pub}`,
      "operators: none",
      "",
    ].join("\n"),
  );
  return dir;
}

const now = () => Number(process.hrtime.bigint()) / 1e6;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function timed(cmd, args, cwd) {
  const t = now();
  const r = spawnSync(cmd, args, { cwd, stdio: ["ignore", "ignore", "pipe"], encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed: ${r.stderr}`);
  return now() - t;
}

/** Runs a batch, timing each device as its JSON line arrives; peak RSS from /usr/bin/time when present. */
function batch(dir, count) {
  return new Promise((resolve, reject) => {
    const t0 = now();
    const marks = [];
    const args = ["batch", "--board", "rpi4", "--bastion", "eu", "--count", String(count), "--json", "--quiet"];
    const hasTime = spawnSync("/usr/bin/time", ["-f", "%M", "true"]).status === 0;
    const p = hasTime
      ? spawn("/usr/bin/time", ["-f", "maxrss_kb=%M", CLI, ...args], { cwd: dir, stdio: ["ignore", "pipe", "pipe"] })
      : spawn(CLI, args, { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
    let buf = "";
    let err = "";
    p.stdout.on("data", (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        buf = buf.slice(i + 1);
        marks.push(now() - t0);
      }
    });
    p.stderr.on("data", (d) => (err += d));
    p.on("exit", (code) => {
      if (code !== 0) return reject(new Error(`batch failed: ${err}`));
      const rss = /maxrss_kb=(\d+)/.exec(err);
      resolve({ ms: now() - t0, marks, rssMb: rss ? Number(rss[1]) / 1024 : undefined });
    });
  });
}

const rows = [];
const fmt = (ms) => (ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${ms.toFixed(1)} ms`);

// 1. Batch throughput against the recipe in shell.
// The disk of a shared machine is noisy: the median of three batches, each into a fresh
// registry and folder.
console.error(`bench: 3 batches of ${COUNT} with mkoverlay…`);
const batches = [];
for (let i = 0; i < 3; i++) {
  settle();
  batches.push(await batch(fleet(join(WORK, `batch${i}`)), COUNT));
}
const mk = [...batches].sort((a, b) => a.ms - b.ms)[1];
console.error(`bench: the recipe in shell for ${COUNT} devices…`);
settle();
const recipeMs = timed("bash", [join(ROOT, "bench/recipe.sh"), String(COUNT), join(WORK, "recipe")]);
const batchRatio = mk.ms / recipeMs;
rows.push([`Batch of ${COUNT} (median of 3): mkoverlay / recipe (ssh-keygen, sed, tar, sqlite3)`, `${(batchRatio * 100).toFixed(1)} %`, "≤ 5 %", batchRatio <= 0.05, `${fmt(mk.ms)} vs ${fmt(recipeMs)} (${(mk.ms / COUNT).toFixed(2)} vs ${(recipeMs / COUNT).toFixed(1)} ms/device)`]);

// 2. One device, one process, against a bare Node start (interleaved medians).
const single = fleet(join(WORK, "single"));
timed(CLI, ["--board", "rpi4", "--bastion", "eu", "--quiet"], single); // warms the config cache
const bare = [];
const one = [];
for (let i = 0; i < RUNS; i++) {
  bare.push(timed(process.execPath, ["-e", ""], single));
  one.push(timed(CLI, ["--board", "rpi4", "--bastion", "eu", "--quiet"], single));
}
const startRatio = median(one) / median(bare);
rows.push([`One build, one process / bare \`node -e ''\` (medians of ${RUNS})`, `${startRatio.toFixed(2)}×`, "≤ 2.0×", startRatio <= 2.0, `${fmt(median(one))} vs ${fmt(median(bare))}`]);

// 3. Growth: a batch of GROWTH (per-device time, RSS), then single builds on that registry vs an empty one.
console.error(`bench: batch of ${GROWTH}…`);
const big = fleet(join(WORK, "growth"));
settle();
const g = await batch(big, GROWTH);
const tenth = Math.floor(GROWTH / 10);
const firstTenth = g.marks[tenth - 1];
const lastTenth = g.marks[GROWTH - 1] - g.marks[GROWTH - tenth - 1];
const flat = lastTenth / firstTenth;
rows.push([`Batch of ${GROWTH}: last tenth / first tenth time per device`, `${flat.toFixed(2)}×`, "flat (≈ 1)", flat <= 1.3, `${(firstTenth / tenth).toFixed(2)} → ${(lastTenth / tenth).toFixed(2)} ms/device`]);
const steady = lastTenth / tenth / (recipeMs / COUNT);
rows.push([`Steady state (last tenth of the ${GROWTH} batch) / recipe, per device`, `${(steady * 100).toFixed(1)} %`, "(information)", steady <= 0.05, `${(lastTenth / tenth).toFixed(2)} vs ${(recipeMs / COUNT).toFixed(1)} ms/device`]);
if (g.rssMb !== undefined) rows.push([`Batch of ${GROWTH}: peak RSS`, `${g.rssMb.toFixed(0)} MB`, "≤ 150 MB", g.rssMb <= 150, ""]);
const empty = fleet(join(WORK, "empty"));
timed(CLI, ["--board", "rpi4", "--bastion", "eu", "--quiet"], empty);
const onFull = [];
const onEmpty = [];
for (let i = 0; i < RUNS; i++) {
  onEmpty.push(timed(CLI, ["--board", "rpi4", "--bastion", "eu", "--quiet"], empty));
  onFull.push(timed(CLI, ["--board", "rpi4", "--bastion", "eu", "--quiet"], big));
}
const growth = median(onFull) / median(onEmpty);
rows.push([`One build with ${GROWTH} devices registered / with an empty registry`, `${growth.toFixed(2)}×`, "≤ 1.2×", growth <= 1.2, `${fmt(median(onFull))} vs ${fmt(median(onEmpty))}`]);

// 4. Fleet status (issue 13): the GROWTH devices of the growth registry seen by two bastions'
// agents (each device connected on one of them, a tenth offline, one stray listener), then
// `mkoverlay status` reads it all back.
{
  const { default: Database } = await import("better-sqlite3");
  const db = new Database(join(big, "registry.db"));
  const at = new Date().toISOString();
  const devices = db.prepare("SELECT hostname, port FROM devices").all();
  const put = db.prepare("INSERT INTO sightings (bastion, port, hostname, fingerprint, since, last_seen, connected) VALUES (?, ?, ?, NULL, ?, ?, ?)");
  const hist = db.prepare("INSERT INTO device_history (hostname, bastion, first_seen, last_seen) VALUES (?, ?, ?, ?)");
  db.transaction(() => {
    devices.forEach((d, i) => {
      const b = i % 2 === 0 ? "eu" : "us";
      put.run(b, d.port, d.hostname, at, at, i % 10 === 9 ? 0 : 1);
      hist.run(d.hostname, b, at, at);
    });
    put.run("eu", 29999, null, at, at, 1);
    for (const b of ["eu", "us"]) db.prepare("INSERT INTO heartbeats (bastion, at, interval_s, agent) VALUES (?, ?, 15, 'bench')").run(b, at);
  })();
  db.close();
  const st = [];
  for (let i = 0; i < 5; i++) st.push(timed(CLI, ["status", "--json"], big));
  rows.push([`\`mkoverlay status\` with ${GROWTH} devices seen by 2 bastions (median of 5)`, fmt(median(st)), "< 1 s", median(st) < 1000, "the whole command, Node's start included"]);
}

const cpu = cpus()[0]?.model ?? "?";
const table = [
  `Measured ${new Date().toISOString().slice(0, 16)}Z on ${cpus().length} × ${cpu}, Node ${process.version}.`,
  "",
  "| measure | result | target | met | absolute |",
  "|---|---|---|---|---|",
  ...rows.map(([m, r, t, ok, abs]) => `| ${m} | **${r}** | ${t} | ${ok ? "yes" : "**no**"} | ${abs} |`),
  "",
].join("\n");
process.stdout.write(table);
writeFileSync(join(ROOT, "bench/results.md"), `# mkoverlay benchmarks\n\n${table}`);
rmSync(WORK, { recursive: true, force: true });
const missed = rows.filter(([, , , ok]) => !ok).map(([m, r, t]) => `${m}: ${r} (target ${t})`);
if (missed.length > 0) {
  process.stderr.write(`bench/run.mjs: ${missed.length} target(s) missed:\n${missed.map((m) => `- ${m}`).join("\n")}\n`);
  process.exit(1);
}
