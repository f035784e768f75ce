/**
 * Batch progress and interruption. The bar in a real terminal (tmux at 50 and 120 columns,
 * read back from the pane), the bar's layout and redraw rate with a fake terminal and clock,
 * and SIGINT/SIGTERM mid-batch: the devices in flight are finished or given back (no pending
 * row), the summary says what was built and what was not, exit 130/143.
 */
import { spawn, spawnSync } from "node:child_process";
import { readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Progress, type Terminal } from "../src/util/log.js";
import { requires, tools } from "./helpers/capability.js";
import { CLI, readPub, removeDir, run, sshKeygen, TEST_CACHE, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-progress-");
let fleet: string;

beforeAll(() => {
  fleet = writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } }, { ports: { ssh: "10000-29999", services: "30000-30999" } });
});
afterAll(() => removeDir(dir));

// eslint-disable-next-line no-control-regex -- reading terminal output
const visible = (s: string): string => s.replace(/\x1b\[[0-9;]*[A-Za-z]/g, "").replace(/\r/g, "");

function fakeTerm(width: number): Terminal & { writes: string[] } {
  const writes: string[] = [];
  return { writes, write: (t) => void writes.push(t), columns: () => width };
}

describe("the bar (fake terminal and clock)", () => {
  it("is drawn at once, before any device is done", () => {
    const term = fakeTerm(80);
    const p = new Progress({ total: 500, bar: true, color: false, silent: false, term, now: () => 0 });
    p.start();
    p.stop();
    expect(visible(term.writes[0]!)).toMatch(/^\[-+\] 0\/500 0% --\/s 0:00 ETA --:-- starting$/);
  });

  it.each([12, 20, 30, 40, 50, 60, 80, 120, 200])("fits %i columns (never the last one) at every stage", (width) => {
    let t = 0;
    const term = fakeTerm(width);
    const p = new Progress({ total: 10_000, bar: true, color: true, silent: false, term, now: () => t });
    for (const done of [0, 1, 64, 999, 5000, 9999, 10_000]) {
      for (let i = 0; i < done; i++) p.work();
      t += 1234;
      const line = visible(p.render(width));
      expect(line.length, line).toBeLessThanOrEqual(width - 1);
      expect(line).toMatch(/\d+\/10000/);
      for (let i = 0; i < done; i++) p.result(`gw-${String(i).padStart(5, "0")}-a-long-hostname`);
    }
    // Wide enough terminals get everything.
    if (width >= 120) expect(visible(p.render(width))).toMatch(/^\[#+-*\] 10000\/10000 100% [\d.]+\/s \d+:\d\d ETA 0:00 \S+$/);
    if (width >= 50) expect(visible(p.render(width))).toMatch(/ETA/);
  });

  it("shows rate and ETA once devices are done", () => {
    let t = 0;
    const p = new Progress({ total: 1000, bar: true, color: false, silent: false, term: fakeTerm(100), now: () => t });
    for (let i = 0; i < 250; i++) p.work();
    t = 1000;
    expect(p.render(100)).toMatch(/ 250\/1000 25% 250\/s 0:01 ETA 0:03 /);
  });

  it("redraws at most ten times a second however fast devices go, and not only at chunk ends", () => {
    let t = 0;
    const term = fakeTerm(80);
    const p = new Progress({ total: 5000, bar: true, color: false, silent: false, term, now: () => t });
    p.start();
    for (let i = 0; i < 5000; i++) {
      t += 0.7; // 0.7 ms a device: 3.5 s in all
      p.work();
      if (i % 64 === 63) for (let j = 0; j < 64; j++) p.result("x");
    }
    for (let j = 0; j < 5000 % 64; j++) p.result("x");
    p.stop();
    const draws = term.writes.filter((w) => w.startsWith("\r"));
    expect(draws.length).toBeLessThanOrEqual(3.5 * 10 + 3);
    expect(draws.length).toBeGreaterThanOrEqual(3.5 * 10 - 2);
    const counts = draws.map((d) => Number(/ (\d+)\/5000/.exec(visible(d))![1]));
    expect(counts.filter((c) => c % 64 !== 0).length).toBeGreaterThan(counts.length / 2);
    expect(visible(draws.at(-1)!)).toMatch(/ 5000\/5000 100% /);
  });

  it("names the device its count has reached, not the last of the previous chunk", () => {
    const p = new Progress({ total: 200, bar: true, color: false, silent: false, term: fakeTerm(120), now: () => 0 });
    const name = (i: number) => `gw-${String(i).padStart(4, "0")}`;
    // A chunk of 64 rendered (the bar moves), then its results arrive at once, then the next chunk.
    for (let i = 1; i <= 64; i++) p.work(name(i));
    expect(visible(p.render(120))).toMatch(/ 64\/200 .* gw-0064$/);
    for (let i = 1; i <= 64; i++) p.result(`${name(i)} port ${21000 + i}`);
    expect(visible(p.render(120))).toMatch(/ 64\/200 .* gw-0064 port 21064$/);
    for (let i = 65; i <= 100; i++) p.work(name(i));
    expect(visible(p.render(120))).toMatch(/ 100\/200 .* gw-0100$/);
    // Stopped mid-chunk: what is finished, with its name.
    p.stop();
    expect(visible(p.render(120))).toMatch(/ 64\/200 .* gw-0064 port 21064$/);
  });

  it("NO_COLOR takes the colour away, not the bar", () => {
    const plain = new Progress({ total: 10, bar: true, color: false, silent: false, term: fakeTerm(60), now: () => 0 }).render(60);
    const coloured = new Progress({ total: 10, bar: true, color: true, silent: false, term: fakeTerm(60), now: () => 0 }).render(60);
    expect(plain).not.toMatch(/\x1b/); // eslint-disable-line no-control-regex
    expect(coloured).toMatch(/\x1b\[32m/); // eslint-disable-line no-control-regex
    expect(visible(coloured)).toBe(plain);
  });

  it("without a bar: one plain line per device", () => {
    const term = fakeTerm(80);
    const p = new Progress({ total: 2, bar: false, color: false, silent: false, term });
    p.start();
    p.work();
    p.result("gw-0001 port 21000");
    p.result("gw-0002 FAILED");
    p.stop();
    expect(term.writes).toEqual(["mkoverlay: [1/2] gw-0001 port 21000\n", "mkoverlay: [2/2] gw-0002 FAILED\n"]);
  });
});

/** Runs a command in a detached tmux pane of `width` columns; returns a pane reader and a stop. */
function tmux(width: number, command: string) {
  const sock = `mko-test-${process.pid}-${width}-${Math.random().toString(36).slice(2, 7)}`;
  const t = (...args: string[]) => spawnSync("tmux", ["-L", sock, ...args], { encoding: "utf8" });
  const r = t("new-session", "-d", "-x", String(width), "-y", "30", `${command}; echo EXIT=$?; sleep 120`);
  expect(r.status, r.stderr).toBe(0);
  return {
    /** The pane, wrapped lines joined (-J): a line longer than the pane is one that wrapped. */
    read: (escapes = false) => t("capture-pane", "-p", "-J", ...(escapes ? ["-e"] : []), "-t", "0").stdout,
    stop: () => void t("kill-server"),
  };
}

const envPrefix = (extra: string) => `cd ${dir} && env MKOVERLAY_CACHE=${TEST_CACHE} MKOVERLAY_CONFIG=${fleet} MKOVERLAY_REGISTRY= ${extra}`;

async function until<T>(what: string, f: () => T | undefined, ms = 60_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 60));
  }
}

requires(tools("tmux"))("the bar in a terminal (tmux)", () => {
  it.each([50, 120])("at %i columns: one line that never wraps, moving, with rate, elapsed and ETA", async (width) => {
    const out = join(dir, `tmux-${width}`);
    const pane = tmux(width, envPrefix(`${process.execPath} ${CLI} batch --board rpi4 --bastion eu --count 800 --out ${out} > /dev/null`));
    try {
      const seen: string[] = [];
      const final = await until("the batch to end", () => {
        const text = pane.read();
        const lines = text.split("\n").filter((l) => l.trim() !== "");
        for (const l of lines) expect(l.length, `a line of ${l.length} columns wrapped in a ${width}-column pane: ${JSON.stringify(l)}`).toBeLessThanOrEqual(width);
        // Redrawn in place: never more than one bar line on screen.
        expect(lines.filter((l) => /\d+\/800/.test(l)).length, text).toBeLessThanOrEqual(1);
        const bar = lines.find((l) => /\d+\/800/.test(l));
        if (bar) seen.push(bar);
        return /EXIT=\d+/.test(text) ? text : undefined;
      });
      expect(final).toMatch(/EXIT=0/);
      expect(final).toMatch(/\[#+\] 800\/800 100% [\d.]+\/s \d+:\d\d ETA 0:00/);
      const counts = new Set(seen.map((l) => Number(/(\d+)\/800/.exec(l)![1])));
      const moving = [...counts].filter((c) => c > 0 && c < 800);
      expect(moving.length, seen.join("\n")).toBeGreaterThanOrEqual(3);
      // Rate, elapsed and ETA once the first devices are done (the very first frames say --).
      expect(seen.some((l) => / \d+\/800 \d+% [\d.]+\/s \d+:\d\d ETA \d+:\d\d/.test(l) && !/800\/800/.test(l)), seen.join("\n")).toBe(true);
    } finally {
      pane.stop();
    }
  });

  it("the name on the bar is the device its count stands at", async () => {
    const hosts = join(dir, "counted.txt");
    writeFileSync(hosts, Array.from({ length: 1500 }, (_, i) => `cnt-${String(i + 1).padStart(4, "0")}`).join("\n") + "\n");
    const pane = tmux(120, envPrefix(`${process.execPath} ${CLI} batch --board rpi4 --bastion eu --hosts ${hosts} --out ${join(dir, "counted")} > /dev/null`));
    try {
      const seen = new Set<string>();
      const final = await until("the batch to end", () => {
        const text = pane.read();
        for (const l of text.split("\n")) if (/\d+\/1500 .* cnt-\d{4}/.test(l)) seen.add(l);
        return /EXIT=\d+/.test(text) ? text : undefined;
      });
      expect(final).toMatch(/EXIT=0/);
      const pairs = [...seen].map((l) => [Number(/ (\d+)\/1500 /.exec(l)![1]), Number(/ cnt-(\d{4})/.exec(l)![1])]);
      expect(pairs.filter(([n]) => n! > 0 && n! < 1500).length, [...seen].join("\n")).toBeGreaterThanOrEqual(2);
      for (const [n, named] of pairs) expect(named, [...seen].join("\n")).toBe(n);
    } finally {
      pane.stop();
    }
  });

  it("colour unless NO_COLOR, which leaves the bar; --no-progress gives plain lines", async () => {
    const coloured = tmux(80, envPrefix(`${process.execPath} ${CLI} batch --board rpi4 --bastion eu --count 100 --out ${join(dir, "c1")} > /dev/null`));
    const plain = tmux(80, envPrefix(`NO_COLOR=1 ${process.execPath} ${CLI} batch --board rpi4 --bastion eu --count 100 --out ${join(dir, "c2")} > /dev/null`));
    const lines = tmux(80, envPrefix(`${process.execPath} ${CLI} batch --board rpi4 --bastion eu --count 3 --no-progress --out ${join(dir, "c3")} > /dev/null`));
    try {
      const c = await until("coloured", () => (/EXIT=/.test(coloured.read()) ? coloured.read(true) : undefined));
      const p = await until("NO_COLOR", () => (/EXIT=/.test(plain.read()) ? plain.read(true) : undefined));
      const l = await until("--no-progress", () => (/EXIT=/.test(lines.read()) ? lines.read() : undefined));
      expect(c).toMatch(/\x1b\[32m#+/); // eslint-disable-line no-control-regex
      expect(p).toMatch(/\[#+\] 100\/100 100%/);
      expect(p).not.toMatch(/\x1b\[32m/); // eslint-disable-line no-control-regex
      expect(l).toMatch(/mkoverlay: \[1\/3\] gw-\d+ port \d+\nmkoverlay: \[2\/3\] .*\nmkoverlay: \[3\/3\] /);
      expect(l).not.toMatch(/\[#/);
    } finally {
      coloured.stop();
      plain.stop();
      lines.stop();
    }
  });
});

interface Row {
  hostname: string;
  status: string;
}

function registryRows(db: string): Row[] {
  const d = new Database(db, { readonly: true });
  try {
    return d.prepare("SELECT hostname, status FROM devices").all() as Row[];
  } finally {
    d.close();
  }
}

/** Starts a batch, sends `signal` once `afterLines` devices are out, returns what happened. */
async function interrupted(name: string, signal: NodeJS.Signals, args: string[], afterLines: number, json = true) {
  const ws = join(dir, name);
  const db = join(ws, "registry.db");
  const child = spawn(process.execPath, [CLI, "batch", "--board", "rpi4", "--bastion", "eu", ...(json ? ["--json"] : []), "--out", join(ws, "out"), ...args], {
    cwd: dir,
    env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: fleet, MKOVERLAY_REGISTRY: db, MKOVERLAY_CACHE: TEST_CACHE },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  let sent = false;
  child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
  const code = await new Promise<number | null>((resolve) => {
    child.stdout.on("data", (c: Buffer) => {
      stdout += c.toString();
      if (!sent && stdout.split("\n").length > afterLines) {
        sent = true;
        child.kill(signal);
      }
    });
    child.on("exit", (c) => resolve(c));
  });
  const devices = json ? stdout.split("\n").filter(Boolean).map((l) => JSON.parse(l) as { hostname: string; overlay?: string; error?: string }) : [];
  return { code, stdout, stderr, devices, rows: registryRows(db), outDir: join(ws, "out"), sent };
}

describe("interrupting a batch", () => {
  it.each([
    ["SIGINT", 130],
    ["SIGTERM", 143],
  ] as const)("%s mid-batch: nothing pending, what was built is registered and listed, exit %i", async (signal, exitCode) => {
    const r = await interrupted(signal, signal, ["--count", "20000"], 100);
    expect(r.sent).toBe(true);
    expect(r.code, r.stderr).toBe(exitCode);
    const built = r.devices.filter((d) => d.overlay);
    expect(built.length).toBeGreaterThanOrEqual(100);
    expect(built.length).toBeLessThan(20000);
    // No pending row: every device reserved was either finished or given back.
    expect(r.rows.filter((x) => x.status === "pending")).toEqual([]);
    expect(r.rows.filter((x) => x.status === "active").map((x) => x.hostname).sort()).toEqual(built.map((d) => d.hostname).sort());
    const files = readdirSync(r.outDir);
    expect(files.filter((f) => f.endsWith(".overlay.tar.gz")).length).toBe(built.length);
    expect(files.filter((f) => f.includes(".tmp"))).toEqual([]);
    // With --json the error is one JSON object on stderr (docs/json.md), its signal named.
    const err = JSON.parse(r.stderr.trim().split("\n").at(-1)!) as { error: string; hint: string | null; exitCode: number; signal: string };
    expect(err).toMatchObject({ exitCode, signal, hint: null });
    expect(err.error).toMatch(new RegExp(`^interrupted by ${signal}: ${built.length} of 20000 device\\(s\\) built and registered \\(${built[0]!.hostname} … ${built.at(-1)!.hostname}\\)\\n`));
    expect(err.error).toMatch(new RegExp(`\\n${20000 - built.length} not built, nothing reserved for them\\n`));
    // Nothing for the doctor to do.
    const doctor = run(process.execPath, [CLI, "registry", "doctor", "--json", "--config", fleet], { env: { MKOVERLAY_REGISTRY: join(dir, signal, "registry.db"), MKOVERLAY_CACHE: TEST_CACHE } });
    expect(JSON.parse(doctor.stdout)).toEqual([]);
  });

  it("names the devices of a --hosts file that were not built; a Ctrl-C is 'interrupted', not an error", async () => {
    const hosts = join(dir, "shift.csv");
    writeFileSync(hosts, ["hostname,serial", ...Array.from({ length: 5000 }, (_, i) => `line-${i},SN${i}`)].join("\n") + "\n");
    // Without --json: the summary in text, every line of it as mkoverlay's, none as an error.
    const r = await interrupted("hosts", "SIGINT", ["--hosts", hosts], 64, false);
    expect(r.code, r.stderr).toBe(130);
    const built = r.rows.filter((x) => x.status === "active").length;
    expect(r.rows.filter((x) => x.status === "pending")).toEqual([]);
    expect(r.stderr).toMatch(new RegExp(`^mkoverlay: interrupted by SIGINT: ${built} of 5000 device\\(s\\) built and registered \\(line-0 … line-${built - 1}\\)$`, "m"));
    expect(r.stderr).toMatch(new RegExp(`^mkoverlay: ${5000 - built} not built, nothing reserved for them: line-${built}, line-${built + 1}, .*, … \\(${5000 - built}\\)$`, "m"));
    expect(r.stderr).not.toMatch(/error/);
  });

  it("--format dir (device by device) stops between devices too", async () => {
    const r = await interrupted("dir", "SIGTERM", ["--count", "3000", "--format", "dir"], 20);
    expect(r.code, r.stderr).toBe(143);
    const built = r.devices.filter((d) => d.overlay);
    expect(r.rows.filter((x) => x.status === "pending")).toEqual([]);
    expect(r.rows.length).toBe(built.length);
    expect(readdirSync(r.outDir).filter((f) => f.endsWith(".overlay")).length).toBe(built.length);
  });
});
