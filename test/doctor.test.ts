/**
 * `registry doctor`: work is left alone while its station holds the lease; once the lease ran
 * out (or the station is a dead process of this host) a complete output is finished and
 * anything else reclaimed. "Complete" means every entry the build makes, checked over the
 * overlay's own paths only — a half-laid `--apply` is reclaimed, and a huge file elsewhere in
 * the root is never read.
 */
import Database from "better-sqlite3";
import { spawnSync } from "node:child_process";
import { closeSync, mkdirSync, openSync, readFileSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { bootId, stationIsDead } from "../src/registry/core.js";
import { openRegistry } from "../src/registry/open.js";
import { requires, root } from "./helpers/capability.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-doctor-");
afterAll(() => removeDir(dir));

/** A station id of this boot of this host whose process is gone (pid 2^22 + 1 is above Linux's pid_max). */
const DEAD_STATION = `${hostname()}:4194305:1:${bootId()}`;

interface Built {
  hostname: string;
  port: number;
  overlay: string;
}

function setup(name: string): { ws: string; cli: (args: string[]) => ReturnType<typeof runCli>; build: (extra?: string[]) => Built; sql: (q: string, ...a: unknown[]) => void } {
  const ws = join(dir, name);
  mkdirSync(ws);
  writeFleet(ws, { eu: { hostKeys: [readPub(sshKeygen(ws, "bastion"))] } });
  const cli = (args: string[]) => runCli(args, { cwd: ws });
  const build = (extra: string[] = []) => {
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--json", ...extra]);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as Built;
  };
  const sql = (q: string, ...a: unknown[]) => {
    const db = new Database(join(ws, "registry.db"));
    try {
      db.prepare(q).run(...a);
    } finally {
      db.close();
    }
  };
  return { ws, cli, build, sql };
}

describe("registry doctor on killed builds", () => {
  const { cli, build, sql } = setup("killed");
  const a = build();
  const b = build();
  // Put both back to where a SIGKILL between the steps leaves them: pending, held by a station
  // (process) that is gone.
  sql("UPDATE devices SET status = 'pending', station = ? WHERE hostname IN (?, ?)", DEAD_STATION, a.hostname, b.hostname);
  rmSync(b.overlay); // b was killed before its archive got its final name

  it("reports without --fix and changes nothing", () => {
    const r = cli(["registry", "doctor"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`${a.hostname}\\tport ${a.port}\\twould be: overlay was written; device is live`));
    expect(r.stdout).toMatch(new RegExp(`${b.hostname}\\tport ${b.port}\\twould be: build never finished; port given back`));
    expect(cli(["registry", "doctor", "--json"]).stdout).toContain('"fixed":false');
  });

  it("--fix finishes the complete build and reclaims the other at once: their station is dead", () => {
    const r = cli(["registry", "doctor", "--fix", "--grace", "86400", "--json"]);
    expect(JSON.parse(r.stdout)).toEqual([
      { hostname: a.hostname, port: a.port, work: "build", action: "activated", fixed: true },
      { hostname: b.hostname, port: b.port, work: "build", action: "reclaimed", fixed: true },
    ]);
    const list = JSON.parse(cli(["registry", "list", "--json"]).stdout) as { hostname: string; status: string }[];
    expect(list).toEqual([expect.objectContaining({ hostname: a.hostname, status: "active" })]);
    expect(cli(["registry", "doctor"]).stdout).toMatch(/healthy/);
    expect(build().port).toBe(b.port);
  });
});

describe("which stations are dead", () => {
  it("only a process of this very boot of this host that no longer runs", () => {
    expect(stationIsDead(DEAD_STATION)).toBe(true);
    // Another boot (or a station cloned from the same image, with the same host name): unknown.
    expect(stationIsDead(`${hostname()}:4194305:1:000000000000`)).toBe(false);
    expect(stationIsDead(`another-host:4194305:1:${bootId()}`)).toBe(false);
    // This process is alive.
    const stat = readFileSync(`/proc/${process.pid}/stat`, "utf8");
    const start = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
    expect(stationIsDead(`${hostname()}:${process.pid}:${start}:${bootId()}`)).toBe(false);
    // An older format says nothing.
    expect(stationIsDead(`${hostname()}:4194305`)).toBe(false);
  });
});

describe("registry doctor and leases", () => {
  const { ws, cli, sql } = setup("leases");
  const req = (i: number) => ({
    hostname: undefined,
    hostnameTemplate: "lease-{seq}",
    range: { lo: 21000, hi: 21999 },
    services: [],
    serviceRange: { lo: 22000, hi: 22999 },
    now: new Date(),
    board: "rpi4",
    os: "raspios",
    bastions: ["eu"],
    publicKey: `ssh-ed25519 LEASE${i}`,
    fingerprint: `SHA256:lease${i}`,
    overlayPath: (h: string) => join(ws, "out", `${h}.overlay.tar.gz`),
  });

  it("leaves a reservation alone while its (live) station holds the lease, whatever --grace says", async () => {
    // This test process is the station: alive, lease fresh.
    const r = await openRegistry(join(ws, "registry.db"));
    try {
      const d = await r.reserve(req(1));
      const doc = cli(["registry", "doctor", "--fix", "--grace", "0", "--json"]);
      expect(JSON.parse(doc.stdout)).toEqual([{ hostname: d.hostname, port: d.port, work: "build", action: "waiting", fixed: false }]);
      // The lease ran out (a stalled station): now it is reclaimed, although the process lives.
      sql("UPDATE devices SET lease_until = lease_until - 3600000 WHERE hostname = ?", d.hostname);
      const again = cli(["registry", "doctor", "--fix", "--grace", "0", "--json"]);
      expect(JSON.parse(again.stdout)).toEqual([{ hostname: d.hostname, port: d.port, work: "build", action: "reclaimed", fixed: true }]);
      // The station wakes up: its activation changes nothing, and that is an error, not a success.
      await expect(r.activate(d.hostname)).rejects.toThrow(/reservation was reclaimed/);
      expect(await r.confirm([d.hostname])).toEqual(new Set());
    } finally {
      await r.close();
    }
  });

  it("waits --grace seconds after a lease ran out", async () => {
    const r = await openRegistry(join(ws, "registry.db"));
    try {
      const d = await r.reserve(req(2));
      sql("UPDATE devices SET lease_until = lease_until - ? WHERE hostname = ?", 130_000, d.hostname);
      // Ran out ~10 s ago: within a 60 s grace it waits, with no grace it goes.
      expect(JSON.parse(cli(["registry", "doctor", "--fix", "--json"]).stdout)[0]).toMatchObject({ action: "waiting" });
      expect(JSON.parse(cli(["registry", "doctor", "--fix", "--grace", "5", "--json"]).stdout)[0]).toMatchObject({ action: "reclaimed", fixed: true });
    } finally {
      await r.close();
    }
  });
});

requires(root)("registry doctor on --apply (root)", () => {
  const { ws, cli, build, sql } = setup("apply");

  function applied(name: string): { root: string; d: Built } {
    const root = join(ws, name);
    mkdirSync(root);
    const d = build(["--apply", root, "--out", join(ws, `${name}-out`)]);
    sql("UPDATE devices SET status = 'pending', station = ? WHERE hostname = ?", DEAD_STATION, d.hostname);
    return { root, d };
  }

  it("reclaims a half-laid --apply (the public key is there, the rest is not)", () => {
    const { root, d } = applied("half");
    // Killed midway: the key went in, the HostKey drop-in and the raspios mask did not.
    unlinkSync(join(root, "etc/ssh/sshd_config.d/50-mkoverlay.conf"));
    unlinkSync(join(root, "etc/systemd/system/regenerate_ssh_host_keys.service"));
    const r = cli(["registry", "doctor", "--fix", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual([{ hostname: d.hostname, port: d.port, work: "build", action: "reclaimed", fixed: true }]);
  });

  it("reads only the overlay's paths of the root: a 3 GiB file beside them costs nothing", () => {
    const { root, d } = applied("big");
    // Sparse: no disk used, but reading it would take 3 GiB of memory (and fail past 2 GiB).
    const fd = openSync(join(root, "var-lib-huge.img"), "w");
    closeSync(fd);
    spawnSync("truncate", ["-s", "3G", join(root, "var-lib-huge.img")]);
    writeFileSync(join(ws, "rss.py"), "import resource,subprocess,sys\nsubprocess.run(sys.argv[1:],stdout=open(sys.argv[0]+'.out','w'))\nprint(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n");
    const cliArgs = [process.execPath, join(import.meta.dirname, "../bin/mkoverlay"), "registry", "doctor", "--fix", "--json"];
    const r = spawnSync("python3", [join(ws, "rss.py"), ...cliArgs], { cwd: ws, encoding: "utf8", env: { ...process.env, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "" } });
    expect(r.status, r.stderr).toBe(0);
    const maxRssKb = Number(r.stdout.trim());
    expect(maxRssKb).toBeLessThan(200_000);
    const report = JSON.parse(spawnSync("cat", [join(ws, "rss.py.out")], { encoding: "utf8" }).stdout) as unknown[];
    expect(report).toEqual([{ hostname: d.hostname, port: d.port, work: "build", action: "activated", fixed: true }]);
  });
});
