/**
 * The registry never lies, whatever else runs at the same time (issue 11, items 1, 2, 5, 6, 7):
 * a doctor during a batch, a failed rename inside a batch, a paused (stalled) batch whose leases
 * ran out, `migrate --force` into a used file, rotations racing each other, a bastion removed
 * from the config. Each ends with the same audit: every port is held once, and every archive on
 * disk carries the key its device is registered with.
 */
import Database from "better-sqlite3";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { HOST_KEY_PUB } from "../src/overlay/paths.js";
import { CLI, readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet, type Run } from "./helpers/workspace.js";

const dir = tempDir("mko-defects-");
afterAll(() => removeDir(dir));
const bastionKey = readPub(sshKeygen(dir, "bastion"));

interface Ws {
  ws: string;
  out: string;
  cli(args: string[], env?: Record<string, string>): Run;
}

function workspace(name: string, extra: Record<string, unknown> = {}, bastions: Record<string, { hostKeys: string[] }> = { eu: { hostKeys: [bastionKey] } }): Ws {
  const ws = join(dir, name);
  mkdirSync(ws);
  writeFleet(ws, bastions, extra);
  return { ws, out: join(ws, "out"), cli: (args, env = {}) => runCli(args, { cwd: ws, env }) };
}

function spawnCli(args: string[], cwd: string, env: Record<string, string> = {}) {
  const child = spawn(process.execPath, [CLI, ...args], { cwd, env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const done = new Promise<Run>((res) => child.once("close", (code) => res({ code: code ?? -1, stdout, stderr })));
  return { child, done };
}

interface Row {
  hostname: string;
  port: number;
  status: string;
  public_key: string;
  overlay: string | null;
}

function rows(ws: string): Row[] {
  const db = new Database(join(ws, "registry.db"), { readonly: true });
  try {
    return db.prepare("SELECT hostname, port, status, public_key, overlay FROM devices").all() as Row[];
  } finally {
    db.close();
  }
}

function archivedKey(archive: string): string {
  const r = spawnSync("tar", ["-xzOf", archive, HOST_KEY_PUB.slice(1)], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`tar -xzOf ${archive}: ${r.stderr}`);
  return r.stdout.trim().split(" ").slice(0, 2).join(" ");
}

/** One port, one key, one device: ports unique, each archive's key = its device's, no .tmp left. */
function audit(w: Ws): Row[] {
  const all = rows(w.ws);
  const ports = all.map((r) => r.port);
  expect(new Set(ports).size, "a port is held twice").toBe(ports.length);
  const byHost = new Map(all.map((r) => [r.hostname, r]));
  const files = existsSync(w.out) ? readdirSync(w.out) : [];
  expect(files.filter((f) => f.endsWith(".tmp")), "temp files left behind").toEqual([]);
  for (const f of files.filter((n) => n.endsWith(".overlay.tar.gz") && statSync(join(w.out, n)).isFile())) {
    const host = f.slice(0, -".overlay.tar.gz".length);
    const d = byHost.get(host);
    expect(d, `${f} is on disk but ${host} is not registered (its port may be someone else's)`).toBeDefined();
    expect(archivedKey(join(w.out, f)), `${f} carries another key than the registry's`).toBe(d!.public_key);
  }
  return all;
}

describe("doctor during a batch (item 1)", () => {
  it("never reclaims a reservation the batch is still working on", async () => {
    const w = workspace("doctor-batch", { ports: { ssh: "21000-24999", services: "25000-25999" } });
    const batch = spawnCli(["batch", "--board", "rpi4", "--bastion", "eu", "--count", "1200", "--quiet", "--json", "--out", w.out], w.ws);
    let running = true;
    void batch.done.then(() => (running = false));
    const reports: { action: string }[] = [];
    let doctors = 0;
    while (running) {
      // Asynchronously: the batch's output must keep flowing while the doctor runs.
      const d = await spawnCli(["registry", "doctor", "--fix", "--grace", "0", "--json"], w.ws).done;
      expect(d.code, d.stderr).toBe(0);
      reports.push(...(JSON.parse(d.stdout) as { action: string }[]));
      doctors++;
    }
    const r = await batch.done;
    expect(r.code, r.stderr).toBe(0);
    expect(doctors).toBeGreaterThan(3);
    expect(reports.filter((x) => x.action !== "waiting"), "the doctor took work from a live batch").toEqual([]);
    const all = audit(w);
    expect(all).toHaveLength(1200);
    expect(all.every((d) => d.status === "active")).toBe(true);
    expect(r.stdout.trim().split("\n")).toHaveLength(1200);
  }, 120_000);

  it("a stalled batch whose leases ran out loses those devices: reported failed, nothing shipped with a reused port", async () => {
    const w = workspace("stalled", { ports: { ssh: "21000-24999", services: "25000-25999" } });
    const env = { MKOVERLAY_LEASE_SECONDS: "1" };
    const batch = spawnCli(["batch", "--board", "rpi4", "--bastion", "eu", "--count", "1500", "--quiet", "--json", "--out", w.out], w.ws, env);
    let caught = 0;
    // Pause the batch while it holds pending reservations (committed, not in a write
    // transaction), let the leases run out, let the doctor reclaim them and another build take
    // a freed port, then let the batch go on.
    for (let tries = 0; tries < 400 && caught === 0; tries++) {
      await new Promise((r) => setTimeout(r, 5 + (tries % 7) * 3));
      batch.child.kill("SIGSTOP");
      let pending = 0;
      try {
        pending = existsSync(join(w.ws, "registry.db")) ? rows(w.ws).filter((d) => d.status === "pending").length : 0;
      } catch {
        pending = 0; // caught in the middle of a write: try another moment
      }
      const db = existsSync(join(w.ws, "registry.db")) ? new Database(join(w.ws, "registry.db"), { timeout: 0 }) : undefined;
      let writable = false;
      try {
        db?.exec("BEGIN IMMEDIATE; ROLLBACK");
        writable = db !== undefined;
      } catch {
        writable = false; // stopped inside a write transaction: try another moment
      } finally {
        db?.close();
      }
      if (pending > 0 && writable) {
        await new Promise((r) => setTimeout(r, 1500));
        const d = w.cli(["registry", "doctor", "--fix", "--grace", "0", "--json"], env);
        expect(d.code, d.stderr).toBe(0);
        caught = (JSON.parse(d.stdout) as { action: string }[]).filter((x) => x.action === "reclaimed").length;
        if (caught > 0) {
          const other = w.cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet", "--out", w.out]);
          expect(other.code, other.stderr).toBe(0);
        }
      }
      batch.child.kill("SIGCONT");
    }
    const r = await batch.done;
    expect(caught, "never paused the batch while it held reservations").toBeGreaterThan(0);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/the reservation was reclaimed \(by 'registry doctor'\) before the build finished/);
    const built = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as { hostname: string | null; error?: string });
    expect(built.filter((b) => b.error).length).toBeGreaterThan(0);
    audit(w);
  }, 120_000);
});

describe("a failed rename inside a batch (item 2)", () => {
  it("fails that device alone: no orphan archive, no temp file, its port free; the others stand", () => {
    const w = workspace("rename");
    mkdirSync(w.out, { mode: 0o700 });
    // A directory sits where device 3's archive goes.
    mkdirSync(join(w.out, "gw-0003.overlay.tar.gz"));
    const r = w.cli(["batch", "--board", "rpi4", "--bastion", "eu", "--count", "6", "--json", "--quiet", "--out", w.out]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).not.toMatch(/internal error|This is a bug|\n\s+at /);
    expect(r.stderr).toMatch(/^mkoverlay: error: device 3: .*gw-0003\.overlay\.tar\.gz: is a directory \(rename\)$/m);
    const all = audit(w);
    expect(all.map((d) => d.hostname).sort()).toEqual(["gw-0001", "gw-0002", "gw-0004", "gw-0005", "gw-0006"]);
    expect(all.every((d) => d.status === "active")).toBe(true);
    expect(existsSync(join(w.out, "gw-0003.authorized_keys"))).toBe(false);
    // gw-0003's port went back: the next device gets it.
    const next = JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu", "--json", "--hostname", "late", "--out", w.out]).stdout) as { port: number };
    expect(next.port).toBe(21002);
  });
});

describe("migrate --force into a used registry file (item 5)", () => {
  it("does not keep the old file's free-port hints: the next build finds the free ports", () => {
    const ports = { ssh: "24000-24004", services: "25000-25999" };
    const full = workspace("full", { ports });
    for (let i = 0; i < 5; i++) expect(full.cli(["--board", "rpi4", "--bastion", "eu", "--quiet", "--out", full.out]).code).toBe(0);
    expect(full.cli(["--board", "rpi4", "--bastion", "eu", "--quiet", "--out", full.out]).stderr).toMatch(/no free tunnel port left/);
    const small = workspace("small", { ports });
    expect(small.cli(["--board", "rpi4", "--bastion", "eu", "--quiet", "--out", small.out]).code).toBe(0);
    const m = small.cli(["registry", "migrate", "--to", join(full.ws, "registry.db"), "--force"]);
    expect(m.code, m.stderr).toBe(0);
    const next = full.cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet", "--out", full.out]);
    expect(next.code, next.stderr).toBe(0);
    expect((JSON.parse(next.stdout) as { port: number }).port).toBe(24001);
  });
});

describe("concurrent rotations of one device (item 6)", () => {
  it("one wins at a time; the registry and the archive always agree", async () => {
    const w = workspace("rotate");
    const b = JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet", "--out", w.out]).stdout) as { hostname: string };
    for (let round = 0; round < 3; round++) {
      const runs = await Promise.all(Array.from({ length: 6 }, () => spawnCli(["rotate", b.hostname, "--json", "--quiet", "--out", w.out], w.ws).done));
      const ok = runs.filter((r) => r.code === 0);
      expect(ok.length).toBeGreaterThan(0);
      for (const r of runs.filter((x) => x.code !== 0)) {
        expect(r.code, r.stderr).toBe(2);
        expect(r.stderr).toMatch(/rotate gw-0001: (a rotation is already under way|its key changed meanwhile)/);
      }
      const [d] = audit(w);
      expect(archivedKey(join(w.out, "gw-0001.overlay.tar.gz"))).toBe(d!.public_key);
    }
  });
});

/** Makes the registry refuse one kind of update (a test trigger), as a lost connection would. */
function refuse(w: Ws, name: string, when: string): () => void {
  const db = new Database(join(w.ws, "registry.db"));
  db.exec(`CREATE TRIGGER ${name} BEFORE UPDATE ON devices WHEN ${when} BEGIN SELECT RAISE(ABORT, 'test: ${name}'); END`);
  db.close();
  return () => {
    const again = new Database(join(w.ws, "registry.db"));
    again.exec(`DROP TRIGGER ${name}`);
    again.close();
  };
}

describe("the registry fails after the output is in place", () => {
  it("build: the port is not given back (the archive holds it); the doctor finishes the device", () => {
    const w = workspace("activate-fails");
    expect(w.cli(["--board", "rpi4", "--bastion", "eu", "--quiet", "--out", w.out]).code).toBe(0); // creates the registry
    const allow = refuse(w, "no_activation", "NEW.status = 'active'");
    const r = w.cli(["--board", "rpi4", "--bastion", "eu", "--out", w.out]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/gw-0002 was written but not registered as built; 'mkoverlay registry doctor --fix' finishes it/);
    expect(existsSync(join(w.out, "gw-0002.overlay.tar.gz"))).toBe(true);
    expect(audit(w).map((d) => [d.hostname, d.port, d.status])).toEqual([
      ["gw-0001", 21000, "active"],
      ["gw-0002", 21001, "pending"],
    ]);
    allow();
    // The next device does not get the archive's port.
    expect(JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet", "--out", w.out]).stdout)).toMatchObject({ hostname: "gw-0003", port: 21002 });
    // Its station is gone: the doctor finishes it at once.
    const fix = w.cli(["registry", "doctor", "--fix", "--json"]);
    expect(fix.code, fix.stderr).toBe(0);
    expect(JSON.parse(fix.stdout)).toMatchObject([{ hostname: "gw-0002", action: "activated", fixed: true }]);
    expect(audit(w).map((d) => d.status)).toEqual(["active", "active", "active"]);
  });

  it("rotate: the new key is not dropped (the archive holds it); the doctor finishes the rotation", () => {
    const w = workspace("rotate-commit-fails");
    expect(w.cli(["--board", "rpi4", "--bastion", "eu", "--quiet", "--out", w.out]).code).toBe(0);
    const archive = join(w.out, "gw-0001.overlay.tar.gz");
    const oldKey = archivedKey(archive);
    const allow = refuse(w, "no_rotation", "NEW.public_key IS NOT OLD.public_key");
    const r = w.cli(["rotate", "gw-0001", "--out", w.out]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/gw-0001: the new overlay was written but the rotation not recorded; 'mkoverlay registry doctor --fix' finishes it/);
    const newKey = archivedKey(archive);
    expect(newKey).not.toBe(oldKey);
    allow();
    const fix = w.cli(["registry", "doctor", "--fix", "--json"]);
    expect(fix.code, fix.stderr).toBe(0);
    expect(JSON.parse(fix.stdout)).toMatchObject([{ hostname: "gw-0001", action: "rotated", fixed: true }]);
    expect(audit(w)[0]!.public_key).toBe(newKey);
  });
});

describe("a bastion removed from the config (item 7)", () => {
  const w = workspace("removed", {}, { eu: { hostKeys: [bastionKey] }, us: { hostKeys: [bastionKey] } });
  const built = [1, 2, 3].map(() => JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu,us", "--json", "--quiet", "--out", w.out]).stdout) as { hostname: string });
  const cfg = join(w.ws, "mkoverlay.yaml");
  const config = JSON.parse(readFileSync(cfg, "utf8")) as { bastions: Record<string, unknown> };
  delete config.bastions.us;
  writeFileSync(cfg, JSON.stringify(config));

  it("exports, listing and revocation work for the bastions that remain", () => {
    expect(w.cli(["registry", "list"]).code).toBe(0);
    expect(w.cli(["revoke", built[1]!.hostname]).code).toBe(0);
    const ak = w.cli(["bastion", "authorized-keys", "--bastion", "eu"]);
    expect(ak.code, ak.stderr).toBe(0);
    expect(ak.stdout).toContain(` ${built[0]!.hostname}\n`);
    expect(ak.stdout).not.toContain(` ${built[1]!.hostname}\n`);
    expect(w.cli(["ssh-config"]).code).toBe(0);
  });

  it("registry remove-bastion takes it off every device", () => {
    const r = w.cli(["registry", "remove-bastion", "us", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ bastion: "us", devices: built.map((b) => b.hostname), withoutBastion: [] });
    const list = JSON.parse(w.cli(["registry", "list", "--json"]).stdout) as { bastions: string[] }[];
    expect(list.every((d) => d.bastions.join() === "eu")).toBe(true);
    // The device's old overlay still names 'us': rebuilding it (re-flash) drops it.
    expect(w.cli(["verify", join(w.out, `${built[0]!.hostname}.overlay.tar.gz`)]).code).toBe(1);
  });
});
