#!/usr/bin/env node
// One build on a PostgreSQL registry that holds 10,000 devices against one on an empty
// PostgreSQL registry (issue 23: at most 1.25×). `make bench-pg`; not part of `make test`.
// A throwaway PostgreSQL server (test/helpers/postgres.ts: Debian's server binaries, its own data
// directory and port on 127.0.0.1), two databases, the real CLI (`mkoverlay --board rpi4
// --bastion eu`) with $MKOVERLAY_REGISTRY naming each; the full one filled by one `batch --count`.
// Builds alternate between the two, median of BENCH_RUNS (default 15) each.
// Writes bench/pg-growth-results.md (nothing outside bench/); exits 1 when the target is missed.
// BENCH_GROWTH (default 10000).
import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, loadavg, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { postgresHelper } from "./lib.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const CLI = join(ROOT, "bin/mkoverlay");
const GROWTH = Number(process.env.BENCH_GROWTH ?? 10_000);
const RUNS = Number(process.env.BENCH_RUNS ?? 15);
const TARGET = 1.25;
const log = (m) => process.stderr.write(`bench/pg-growth: ${m}\n`);
const now = () => Number(process.hrtime.bigint()) / 1e6;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const work = mkdtempSync(join(tmpdir(), "mko-bench-pg-"));
const { postgresForTests } = await postgresHelper(ROOT);

const { server, reason } = await postgresForTests();
if (!server) {
  log(`PostgreSQL is not available here: ${reason}`);
  rmSync(work, { recursive: true, force: true });
  process.exit(1);
}
let code = 1;
try {
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(work, "bastion")]);
  const pub = readFileSync(join(work, "bastion.pub"), "utf8").trim();
  mkdirSync(join(work, "ws"), { mode: 0o700 });
  writeFileSync(
    join(work, "ws", "mkoverlay.yaml"),
    ["registry: ./unused.db", "hostname: gw-{seq:05}", "ports:", "  ssh: 10000-29999", "  services: 30000-30999", "bastions:", "  eu:", "    host: bastion-eu.example.com", "    hostKeys:", `      - ${pub}`, "operators: none", ""].join("\n"),
  );
  const full = await server.createDatabase();
  const empty = await server.createDatabase();
  const run = (registry, args, out) => {
    const t = now();
    const r = spawnSync(CLI, args, { cwd: join(work, "ws"), env: { ...process.env, MKOVERLAY_REGISTRY: registry, MKOVERLAY_CONFIG: "" }, stdio: ["ignore", "ignore", "pipe"], encoding: "utf8" });
    if (r.status !== 0) throw new Error(`mkoverlay ${args.join(" ")} (${out}) exited ${r.status}: ${r.stderr}`);
    return now() - t;
  };
  log(`filling one registry with ${GROWTH} devices…`);
  const fillMs = run(full, ["batch", "--board", "rpi4", "--bastion", "eu", "--count", String(GROWTH), "--out", join(work, "fill"), "--quiet"], "fill");
  log(`filled in ${(fillMs / 1000).toFixed(1)} s; ${RUNS} builds on each…`);
  const one = (registry, i, tag) => run(registry, ["--board", "rpi4", "--bastion", "eu", "--out", join(work, `${tag}-${i}`), "--quiet"], tag);
  one(empty, "warm", "empty");
  one(full, "warm", "full");
  const onFull = [];
  const onEmpty = [];
  for (let i = 0; i < RUNS; i++) {
    onEmpty.push(one(empty, i, "empty"));
    onFull.push(one(full, i, "full"));
  }
  const ratio = median(onFull) / median(onEmpty);
  const met = ratio <= TARGET;
  const machine = `${cpus().length} × ${cpus()[0]?.model.trim() ?? "?"}, Node ${process.version}, PostgreSQL ${(await server.sql("postgres", "show server_version"))[0]?.server_version ?? "?"}`;
  const table = [
    "# One build on PostgreSQL: a full registry against an empty one",
    "",
    `Measured ${new Date().toISOString().slice(0, 16)}Z on ${machine}; load average ${loadavg().map((l) => l.toFixed(2)).join(" ")} at the end. The whole command (Node's start included), median of ${RUNS} alternating builds each.`,
    "",
    "| measure | result | target | met | notes |",
    "|---|---|---|---|---|",
    `| One build with ${GROWTH} devices registered / with an empty registry (PostgreSQL) | ${ratio.toFixed(2)}× | ≤ ${TARGET}× | ${met ? "yes" : "**no**"} | ${median(onFull).toFixed(0)} ms vs ${median(onEmpty).toFixed(0)} ms; the ${GROWTH} registered by one batch in ${(fillMs / 1000).toFixed(1)} s |`,
    "",
  ].join("\n");
  writeFileSync(join(ROOT, "bench/pg-growth-results.md"), table);
  process.stdout.write(table);
  if (!met) log(`missed: one build on a full registry is ${ratio.toFixed(2)}× one on an empty one (target ≤ ${TARGET}×)`);
  code = met ? 0 : 1;
} finally {
  await server.stop();
  rmSync(work, { recursive: true, force: true });
}
process.exit(code);
