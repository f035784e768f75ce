/**
 * Issue 22, a factory shift that can be resumed: a batch stopped half-way writes the rows it did
 * not build next to the outputs (same columns) and says how to finish; feeding that file back
 * builds the rest; re-running the whole shift skips what is built (one summary line, exit 0);
 * a row registered without its output is refused with the way out, not rebuilt with a new key.
 * Real CLI, real SIGINT, the registry read back, `registry doctor` clean.
 */
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, readPub, removeDir, run, sshKeygen, TEST_CACHE, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-shift-");
let fleet: string;
const db = join(dir, "registry.db");
const out = join(dir, "out");
const env = (): Record<string, string> => ({ NO_COLOR: "1", MKOVERLAY_CONFIG: fleet, MKOVERLAY_REGISTRY: db, MKOVERLAY_CACHE: TEST_CACHE });
const ROWS = 400;

beforeAll(() => {
  fleet = writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } }, { ports: { ssh: "10000-19999", services: "30000-30999" } });
});
afterAll(() => removeDir(dir));

const batch = (hosts: string) => run(process.execPath, [CLI, "batch", "--board", "rpi4", "--bastion", "eu", "--out", out, "--hosts", hosts, "--no-progress"], { cwd: dir, env: env() });

function statuses(): Map<string, string> {
  const d = new Database(db, { readonly: true });
  try {
    return new Map((d.prepare("SELECT hostname, status FROM devices").all() as { hostname: string; status: string }[]).map((r) => [r.hostname, r.status]));
  } finally {
    d.close();
  }
}

/** A batch over `hosts`, SIGINT once `after` devices are out. */
async function interruptedBatch(hosts: string, after: number): Promise<{ code: number | null; stderr: string; built: string[] }> {
  const child = spawn(process.execPath, [CLI, "batch", "--board", "rpi4", "--bastion", "eu", "--json", "--out", out, "--hosts", hosts], { cwd: dir, env: { ...process.env, ...env() }, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  let sent = false;
  child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
  const code = await new Promise<number | null>((resolve) => {
    child.stdout.on("data", (c: Buffer) => {
      stdout += c.toString();
      if (!sent && stdout.split("\n").length > after) {
        sent = true;
        child.kill("SIGINT");
      }
    });
    child.on("exit", (c) => resolve(c));
  });
  const built = stdout
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { hostname: string; overlay?: string })
    .filter((d) => d.overlay)
    .map((d) => d.hostname);
  return { code, stderr, built };
}

describe("a factory shift: interrupt, remaining rows, resume", () => {
  const hosts = join(dir, "shift.csv");
  const remaining = join(out, "shift.remaining.csv");
  let firstBuilt: string[] = [];

  it("Ctrl-C writes the rows not built next to the outputs, with the file's columns, and says how to finish", async () => {
    // A quoted comma and a quote in the factory data must come back as they were.
    writeFileSync(hosts, ["hostname,serial,site", ...Array.from({ length: ROWS }, (_, i) => `pj-${String(i).padStart(4, "0")},SN${i},"rack ${i % 3}, bay ""${i}"""`)].join("\n") + "\n");
    const r = await interruptedBatch(hosts, 64);
    expect(r.code, r.stderr).toBe(130);
    firstBuilt = r.built;
    expect(firstBuilt.length).toBeGreaterThanOrEqual(64);
    expect(firstBuilt.length).toBeLessThan(ROWS);
    expect(r.stderr).toContain(`the rows not built are in ${remaining}: run the same command with --hosts ${remaining} to finish the shift`);
    const text = readFileSync(remaining, "utf8").trimEnd().split("\n");
    expect(text[0]).toBe("hostname,serial,site");
    const left = text.slice(1);
    expect(left.length).toBe(ROWS - firstBuilt.length);
    const i = firstBuilt.length;
    expect(left[0]).toBe(`pj-${String(i).padStart(4, "0")},SN${i},"rack ${i % 3}, bay ""${i}"""`);
    expect([...statuses().values()].filter((s) => s === "pending")).toEqual([]);
  });

  it("feeding the file back finishes the shift: exit 0, every row built once, the file removed", () => {
    const r = batch(remaining);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(new RegExp(`batch done: ${ROWS - firstBuilt.length} built, 0 failed; shift complete \\(removed ${remaining.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}\\)`));
    expect(existsSync(remaining)).toBe(false);
    const s = statuses();
    expect(s.size).toBe(ROWS);
    expect([...s.values()].every((x) => x === "active")).toBe(true);
    expect(readdirSync(out).filter((f) => f.endsWith(".overlay.tar.gz")).length).toBe(ROWS);
    // The factory data came through the remaining file intact.
    const d = new Database(db, { readonly: true });
    try {
      expect(d.prepare("SELECT value FROM attributes WHERE hostname = ? AND key = 'site'").get(`pj-0399`)).toEqual({ value: 'rack 0, bay "399"' });
    } finally {
      d.close();
    }
  });

  it("re-running the whole shift skips what is built: one summary line, no error, exit 0, registry untouched", () => {
    const before = readFileSync(db);
    const r = batch(hosts);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe("");
    expect(r.stderr.trim()).toBe(`mkoverlay: batch done: 0 built, ${ROWS} already built (skipped), 0 failed`);
    expect(readFileSync(db).equals(before)).toBe(true);
    const doctor = run(process.execPath, [CLI, "registry", "doctor", "--json"], { cwd: dir, env: env() });
    expect(JSON.parse(doctor.stdout)).toEqual([]);
  });

  it("--json says which rows were skipped", () => {
    const r = run(process.execPath, [CLI, "batch", "--board", "rpi4", "--bastion", "eu", "--out", out, "--hosts", hosts, "--json"], { cwd: dir, env: env() });
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as { hostname: string; skipped: string; port: number; overlay: string });
    expect(lines.length).toBe(ROWS);
    expect(lines[0]).toMatchObject({ hostname: "pj-0000", skipped: "already built", overlay: join(out, "pj-0000.overlay.tar.gz") });
  });

  it("the same name with other factory data is another device: refused, not skipped", () => {
    const other = join(dir, "other.csv");
    writeFileSync(other, "hostname,serial\npj-0001,SN9999\n");
    const before = readFileSync(db);
    const r = run(process.execPath, [CLI, "batch", "--board", "rpi4", "--bastion", "eu", "--out", out, "--hosts", other, "--no-progress"], { cwd: dir, env: env() });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('pj-0001: hostname pj-0001 is already registered (active), with other factory data: serial is "SN1" there, "SN9999" in this row');
    expect(readFileSync(db).equals(before)).toBe(true);
  });

  it("a row registered whose output is gone is refused with the way out, not rebuilt with another key; the others skip", () => {
    rmSync(join(out, "pj-0007.overlay.tar.gz"));
    const before = readFileSync(db);
    const r = batch(hosts);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`pj-0007: pj-0007 is registered (port`);
    expect(r.stderr).toContain(`but its output ${join(out, "pj-0007.overlay.tar.gz")} is missing, and its private key was only there`);
    expect(r.stderr).toContain("mkoverlay rotate pj-0007 --grace 0");
    expect(r.stderr).toContain(`batch done: 0 built, ${ROWS - 1} already built (skipped), 1 failed`);
    expect(readFileSync(db).equals(before)).toBe(true);
    expect(readFileSync(remaining, "utf8")).toBe('hostname,serial,site\npj-0007,SN7,"rack 1, bay ""7"""\n');
  });
});
