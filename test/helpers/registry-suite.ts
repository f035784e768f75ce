/**
 * The registry suite (test/registry.test.ts runs it on SQLite, test/registry-postgres.test.ts on
 * PostgreSQL, so the two run in parallel), against both backends: the embedded SQLite file and a real
 * PostgreSQL server (test/helpers/postgres.ts; no mocks). The built CLI runs as separate
 * processes, the way stations on a factory floor do: concurrent builds never share a port,
 * SIGKILLed builds leave nothing the doctor cannot finish or reclaim, `registry migrate`
 * copies everything both ways, and server trouble is one clear line.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import Database from "better-sqlite3";
import { afterAll, describe, expect, it } from "vitest";
import { HOST_KEY_PUB } from "../../src/overlay/paths.js";
import { openRegistry } from "../../src/registry/open.js";
import { SCHEMA_VERSION } from "../../src/registry/schema.js";
import type { DeviceRecord, Registry } from "../../src/registry/types.js";
import { need, requires } from "./capability.js";
import { closedPort, postgresForTests, PW_ROLE, type PgServer } from "./postgres.js";
import { CLI, readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet, type Run } from "./workspace.js";

// Ranges of this file only (other test files use 21000-22999).
const SSH_LO = 24000;
const SVC_LO = 25000;
const PORTS = { ssh: "24000-24999", services: "25000-25999" };


/** Registers the suite for one backend (the migration and server-error cases go with PostgreSQL). */
export async function registryTests(which: "sqlite" | "postgres"): Promise<void> {
  const { server: pgServer, reason: pgReason } = which === "postgres" ? await postgresForTests() : { server: undefined, reason: "not this suite" };
  afterAll(async () => {
    await pgServer?.stop();
  });

  const keys = tempDir("mko-registry-keys-");
  const bastionKey = readPub(sshKeygen(keys, "bastion"));
  afterAll(() => removeDir(keys));

  interface Backend {
    name: "sqlite" | "postgres";
    /** A new, empty registry location for one workspace. */
    fresh(ws: string): Promise<string>;
    /** Reads the name counter straight from the meta table. */
    seq(location: string): Promise<number>;
    /** Overwrites schema_version in the meta table, as a newer mkoverlay would have. */
    setSchemaVersion(location: string, v: number): Promise<void>;
  }

  function sqliteMeta(file: string, sql: string, ...args: unknown[]): { value: string } | undefined {
    const db = new Database(file);
    try {
      const st = db.prepare(sql);
      return st.reader ? (st.get(...args) as { value: string } | undefined) : (st.run(...args), undefined);
    } finally {
      db.close();
    }
  }

  const SQLITE: Backend = {
    name: "sqlite",
    fresh: async (ws) => join(ws, "registry.db"),
    seq: async (file) => Number(sqliteMeta(file, "SELECT value FROM meta WHERE key='seq'")?.value),
    setSchemaVersion: async (file, v) => void sqliteMeta(file, "UPDATE meta SET value = ? WHERE key = 'schema_version'", String(v)),
  };

  function postgresBackend(pg: PgServer): Backend {
    return {
      name: "postgres",
      fresh: () => pg.createDatabase(),
      seq: async (url) => Number((await pg.sql<{ value: string }>(url, "SELECT value FROM mkoverlay.meta WHERE key = 'seq'"))[0]?.value),
      setSchemaVersion: async (url, v) => void (await pg.sql(url, "UPDATE mkoverlay.meta SET value = $1 WHERE key = 'schema_version'", [String(v)])),
    };
  }

  const BACKENDS: Backend[] = which === "sqlite" ? [SQLITE] : pgServer ? [postgresBackend(pgServer)] : [];

  // --- workspace and CLI helpers ---

  interface Workspace {
    dir: string;
    cfg: string;
    out: string;
    registry: string;
  }

  function workspace(registry: string, dir = tempDir("mko-registry-")): Workspace {
    const cfg = writeFleet(dir, { eu: { hostKeys: [bastionKey] } }, { registry, ports: PORTS, forwards: [{ name: "web", type: "remote", local: 80 }] });
    return { dir, cfg, out: join(dir, "out"), registry };
  }

  /** A workspace with a new, empty registry of `backend` (a SQLite file inside it, or a new database). */
  async function freshWorkspace(backend: Backend): Promise<Workspace> {
    const dir = tempDir("mko-registry-");
    return workspace(await backend.fresh(dir), dir);
  }

  const BUILD = ["--board", "rpi4", "--bastion", "eu", "--quiet", "--json"];

  interface Spawned {
    pid: number;
    kill(): void;
    done: Promise<Run & { signal: NodeJS.Signals | null }>;
  }

  /** The built CLI as a separate process, asynchronously (so many can run at once). */
  function spawnCli(args: string[], cwd: string, env: Record<string, string> = {}): Spawned {
    const child = spawn(process.execPath, [CLI, ...args], {
      cwd,
      env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    return {
      pid: child.pid ?? -1,
      kill: () => void child.kill("SIGKILL"),
      done: new Promise((res, rej) => {
        child.once("error", rej);
        child.once("close", (code, signal) => res({ code: code ?? -1, signal, stdout, stderr }));
      }),
    };
  }

  async function withRegistry<T>(location: string, fn: (r: Registry) => Promise<T>): Promise<T> {
    const r = await openRegistry(location);
    try {
      return await fn(r);
    } finally {
      await r.close();
    }
  }

  const list = (location: string): Promise<DeviceRecord[]> => withRegistry(location, (r) => r.list());

  function allPorts(devices: DeviceRecord[]): number[] {
    return devices.flatMap((d) => [d.port, ...Object.values(d.services)]);
  }

  /** The lowest port >= lo that no device holds. */
  function lowestFree(devices: DeviceRecord[], lo: number): number {
    const used = new Set(allPorts(devices));
    let p = lo;
    while (used.has(p)) p++;
    return p;
  }

  /** The public key (type and blob) inside an overlay archive, read with GNU tar. */
  function archivedPublicKey(archive: string): string {
    const r = spawnSync("tar", ["-xzOf", archive, HOST_KEY_PUB.slice(1)], { encoding: "utf8" });
    if (r.status !== 0) throw new Error(`tar -xzOf ${archive}: ${r.stderr}`);
    return r.stdout.trim().split(" ").slice(0, 2).join(" ");
  }

  /** One user-facing error line (plus an optional hint), no stack, no internal error. */
  function expectOneLineError(r: Run, message: RegExp): void {
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.code, r.stderr).not.toBe(70);
    // With --json the error is one JSON object on stderr (docs/json.md, Errors): read it as text.
    const e = r.stderr.startsWith("{") ? (JSON.parse(r.stderr) as { error: string; hint: string | null }) : undefined;
    if (e) expect(r.stderr.trim().split("\n"), r.stderr).toHaveLength(1);
    const lines = e ? [`mkoverlay: error: ${e.error}`, ...(e.hint ? [`mkoverlay: hint: ${e.hint}`] : [])] : r.stderr.split("\n").filter(Boolean);
    expect(lines.filter((l) => l.startsWith("mkoverlay: error:")), r.stderr).toHaveLength(1);
    expect(lines.every((l) => /^mkoverlay: (error|hint): /.test(l)), r.stderr).toBe(true);
    expect(r.stderr, r.stderr).not.toMatch(/\n\s+at |internal error|Error:/);
    expect(lines[0], r.stderr).toMatch(message);
  }

  /** A tiny deterministic PRNG so a failing kill schedule can be replayed (seed in the test name). */
  function prng(seed: number): () => number {
    let s = seed >>> 0;
    return () => {
      s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
      return s / 2 ** 32;
    };
  }

  if (which === "postgres" && !pgServer) {
    describe.skip(`postgres backend — SKIPPED, PostgreSQL unavailable: ${pgReason}`, () => {
      it("needs PostgreSQL (see scripts/ensure-postgres.sh)", () => undefined);
    });
  }

  describe.each(BACKENDS.map((b) => [b.name, b] as const))("registry on %s", (_name, backend) => {
    it("16 concurrent builds from separate processes get 16 distinct ports, all active", async () => {
      const ws = await freshWorkspace(backend);
      try {
        const runs = await Promise.all(Array.from({ length: 16 }, () => spawnCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], ws.dir).done));
        for (const r of runs) expect(r.code, r.stderr).toBe(0);
        const results = runs.map((r) => JSON.parse(r.stdout) as { hostname: string; port: number; services: Record<string, number> });
        expect(new Set(results.map((r) => r.port)).size).toBe(16);
        expect(new Set(results.map((r) => r.hostname)).size).toBe(16);
        const devices = await list(ws.registry);
        expect(devices).toHaveLength(16);
        expect(devices.every((d) => d.status === "active")).toBe(true);
        // Each took the lowest free port at its turn: together exactly the first 16 of each range.
        expect(devices.map((d) => d.port).sort((a, b) => a - b)).toEqual(Array.from({ length: 16 }, (_, i) => SSH_LO + i));
        expect(devices.map((d) => d.services.web!).sort((a, b) => a - b)).toEqual(Array.from({ length: 16 }, (_, i) => SVC_LO + i));
        expect(devices.map((d) => d.hostname).sort()).toEqual(Array.from({ length: 16 }, (_, i) => `gw-${String(i + 1).padStart(4, "0")}`));
        for (const r of results) expect(devices.find((d) => d.hostname === r.hostname)?.port).toBe(r.port);
        expect(await backend.seq(ws.registry)).toBe(16);
      } finally {
        removeDir(ws.dir);
      }
    });

    it("every command works unchanged: batch, list, revoke, rotate, release, exports, ssh-config, verify, doctor", async () => {
      const ws = await freshWorkspace(backend);
      const cli = (args: string[]) => runCli([...args, "--config", ws.cfg], { cwd: ws.dir });
      try {
        const b = cli(["batch", "--board", "rpi4", "--bastion", "eu", "--count", "5", "--json", "--quiet", "--out", ws.out]);
        expect(b.code, b.stderr).toBe(0);
        const built = b.stdout.trim().split("\n").map((l) => JSON.parse(l) as { hostname: string; port: number; overlay: string });
        expect(new Set(built.map((d) => d.port)).size).toBe(5);
        const listed = JSON.parse(cli(["registry", "list", "--json"]).stdout) as { hostname: string; status: string }[];
        expect(listed.map((d) => d.hostname).sort()).toEqual(built.map((d) => d.hostname).sort());
        expect(cli(["verify", built[0]!.overlay]).code).toBe(0);
        expect(cli(["revoke", built[1]!.hostname]).code).toBe(0);
        const rot = cli(["rotate", built[2]!.hostname, "--json", "--out", join(ws.dir, "rotated")]);
        expect(rot.code, rot.stderr).toBe(0);
        const ak = cli(["bastion", "authorized-keys", "--bastion", "eu"]).stdout;
        // 4 live devices, plus the rotated device's old key for its grace period (default 7d).
        const akLines = ak.split("\n").filter((l) => l && !l.startsWith("#"));
        expect(akLines).toHaveLength(5);
        expect(akLines.filter((l) => l.includes("expiry-time=") && l.endsWith(` ${built[2]!.hostname}`))).toHaveLength(1);
        expect(ak).not.toContain(` ${built[1]!.hostname}\n`);
        expect(ak).toContain(` ${built[2]!.hostname}\n`);
        expect(cli(["verify", built[2]!.overlay]).code).toBe(1); // rotated out
        expect(cli(["ssh-config"]).stdout.match(/^Host /gm)).toHaveLength(4);
        expect(cli(["known-hosts"]).stdout.split("\n").filter((l) => l.startsWith("gw-"))).toHaveLength(4);
        expect(cli(["registry", "release", built[1]!.hostname]).code).toBe(0);
        const next = cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet", "--out", ws.out]);
        expect((JSON.parse(next.stdout) as { port: number }).port).toBe(built[1]!.port);
        expect(cli(["registry", "doctor"]).stdout).toMatch(/healthy/);
      } finally {
        removeDir(ws.dir);
      }
    });

    const SEED = 20251124;
    it(`SIGKILLed builds (30 rounds, seed ${SEED}) leave no duplicate port, no truncated archive, nothing the doctor cannot fix`, async () => {
      const ws = await freshWorkspace(backend);
      const rand = prng(SEED);
      const pauses = tempDir("mko-pause-");
      const count = async (): Promise<number> => (await list(ws.registry)).length;
      /**
       * Where each build is killed, aimed by the registry's test-only pause
       * (MKOVERLAY_TEST_ONLY_PAUSE, src/registry/test-pause.ts), not by timing:
       * - early: at 0-400 ms, or inside the reservation's transaction if it gets there first;
       * - inside: as soon as the reservation's rows are written, before its commit;
       * - window: as soon as the reservation has committed, before the output is written;
       * - finish: not killed (let go on from the same pause).
       * Nothing killed early or inside may leave a row (the reservation is one transaction);
       * each kill in the window leaves exactly one pending device.
       */
      type Kind = "early" | "inside" | "window" | "finish";
      const KINDS: Kind[] = ["early", "inside", "window", "window", "finish"];
      const tally: Record<Kind, number> = { early: 0, inside: 0, window: 0, finish: 0 };
      const schedule: string[] = [];
      async function one(kind: Kind): Promise<void> {
        const phase = kind === "window" || kind === "finish" ? "reserved" : "in-reserve";
        const s = spawnCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], ws.dir, { MKOVERLAY_TEST_ONLY_PAUSE: `${phase}:${pauses}` });
        const marker = join(pauses, `${s.pid}.${phase}`);
        let exited = false;
        const done = s.done.finally(() => (exited = true));
        if (kind === "early") {
          const delay = Math.floor(rand() * 400);
          schedule.push(`early@${delay}`);
          setTimeout(s.kill, delay);
        } else {
          schedule.push(kind);
          while (!exited && !existsSync(marker)) await new Promise((r) => setTimeout(r, 5));
          if (kind === "finish") writeFileSync(join(pauses, `${s.pid}.go`), "");
          else s.kill();
        }
        const r = await done;
        if (kind === "finish") expect(r.code, r.stderr).toBe(0);
        else expect(r.signal, `${kind}: ${r.stderr}`).toBe("SIGKILL");
        tally[kind]++;
      }
      try {
        for (let round = 0; round < 30; round++) {
          // Two stations at a time, as on a factory floor.
          const kinds = [0, 1].map(() => KINDS[Math.floor(rand() * KINDS.length)]!);
          if (round === 0) kinds.splice(0, 2, "inside", "window"); // each kind at least once, whatever the seed
          if (round === 1) kinds.splice(0, 2, "early", "finish");
          const rows = await count();
          await Promise.all(kinds.map(one));
          const committed = kinds.filter((k) => k === "window" || k === "finish").length;
          expect(await count(), `round ${round} (${kinds.join(", ")}): a killed reservation left a row, or a committed one is missing`).toBe(rows + committed);
        }
        const finished = tally.finish;
        const stats = `${JSON.stringify(tally)}; schedule ${schedule.join(",")}`;
        const pendingSeen = (await withRegistry(ws.registry, (r) => r.unfinished())).length;
        expect(pendingSeen, `every kill between reserve and activate leaves one pending device (${stats})`).toBe(tally.window);

        // The registry opens and no port is held twice.
        const before = await list(ws.registry);
        expect(new Set(allPorts(before)).size).toBe(allPorts(before).length);
        expect(before.filter((d) => d.status === "active").length).toBeGreaterThanOrEqual(finished);

        // Nothing under a final archive name is truncated (killed writes leave only .tmp files).
        const archives = existsSync(ws.out) ? readdirSync(ws.out).filter((n) => n.endsWith(".overlay.tar.gz")) : [];
        for (const a of archives) {
          const t = spawnSync("tar", ["-tzf", join(ws.out, a)], { encoding: "utf8" });
          expect(t.status, `${a}: ${t.stderr}`).toBe(0);
        }

        const doc = runCli(["registry", "doctor", "--config", ws.cfg, "--fix", "--grace", "0", "--json"], { cwd: ws.dir });
        expect(doc.code, doc.stderr).toBe(0);
        const report = JSON.parse(doc.stdout) as { hostname: string; action: string; fixed: boolean }[];
        const pendingBefore = before.filter((d) => d.status === "pending").map((d) => d.hostname).sort();
        expect(report.map((r) => r.hostname).sort()).toEqual(pendingBefore);
        expect(report.every((r) => r.fixed && (r.action === "activated" || r.action === "reclaimed"))).toBe(true);

        const after = await list(ws.registry);
        expect(after.length).toBe(before.length - report.filter((r) => r.action === "reclaimed").length);
        for (const d of after) {
          expect(d.status, d.hostname).toBe("active");
          expect(existsSync(d.overlay!), `${d.hostname}: ${d.overlay}`).toBe(true);
          expect(archivedPublicKey(d.overlay!), d.hostname).toBe(d.publicKey);
        }
        expect(new Set(allPorts(after)).size).toBe(allPorts(after).length);

        // Reclaimed ports are handed out again, lowest first: the same rule on both backends.
        const expected = lowestFree(after, SSH_LO);
        const next = runCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], { cwd: ws.dir });
        expect(next.code, next.stderr).toBe(0);
        expect((JSON.parse(next.stdout) as { port: number }).port).toBe(expected);
      } finally {
        removeDir(ws.dir);
        removeDir(pauses);
      }
    }, 180_000);

    it("keeps the Registry contract: lowest free port, quarantine, errors, key rotation", async () => {
      const dir = tempDir("mko-registry-");
      const location = await backend.fresh(dir);
      const range = { lo: 26000, hi: 26005 };
      const serviceRange = { lo: 27000, hi: 27999 };
      const req = (i: number, hostname?: string) => ({
        hostname,
        hostnameTemplate: "dev-{seq:03}",
        range,
        services: ["web", "vnc"],
        serviceRange,
        now: new Date("2025-06-01T00:00:00.000Z"),
        board: "rpi4",
        os: "raspios",
        bastions: ["eu", "us"],
        publicKey: `ssh-ed25519 KEY${i}`,
        fingerprint: `SHA256:fp${i}`,
        overlayPath: (h: string) => `/out/${h}.overlay.tar.gz`,
      });
      try {
        await withRegistry(location, async (r) => {
          const made = [];
          for (let i = 1; i <= 5; i++) made.push(await r.reserve(req(i)));
          expect(made.map((d) => [d.hostname, d.port, d.services, d.status])).toEqual(
            [1, 2, 3, 4, 5].map((i) => [`dev-00${i}`, 26000 + i - 1, { web: 27000 + 2 * (i - 1), vnc: 27001 + 2 * (i - 1) }, "pending"]),
          );
          for (const h of ["dev-001", "dev-003", "dev-004"]) await r.activate(h);
          await r.abandon("dev-002"); // pending: forgotten, ports free
          await r.revoke("dev-003"); // quarantined: ports stay taken
          await r.revoke("dev-004");
          await r.release("dev-004"); // released: ports free
          // dev-005 stays pending: its ports stay taken.
          expect((await r.unfinished()).map((u) => u.device.hostname)).toEqual(["dev-005"]);
          const a = await r.reserve({ ...req(6), attributes: { serial: "SN-6", site: "lyon" } });
          expect(a.attributes).toEqual({ serial: "SN-6", site: "lyon" });
          const b = await r.reserve(req(7, "explicit"));
          const c = await r.reserve(req(8));
          expect([a, b, c].map((d) => [d.hostname, d.port, d.services])).toEqual([
            ["dev-006", 26001, { web: 27002, vnc: 27003 }],
            ["explicit", 26003, { web: 27006, vnc: 27007 }],
            ["dev-007", 26005, { web: 27010, vnc: 27011 }],
          ]);
          await expect(r.reserve(req(9))).rejects.toThrow("no free tunnel port left in ports.ssh 26000-26005");
          await expect(r.reserve(req(9, "explicit"))).rejects.toThrow("hostname explicit is already registered (pending)");
          await expect(r.reserve(req(1))).rejects.toThrow("this key is already registered to dev-001");
          await r.beginRotate("dev-001", "SHA256:fp1", "ssh-ed25519 MIDKEY", "SHA256:mid", "/out/mid.tar.gz");
          await expect(r.beginRotate("dev-001", "SHA256:fp1", "ssh-ed25519 OTHER", "SHA256:other", "/out/x.tar.gz")).rejects.toThrow("a rotation is already under way");
          await r.commitRotate("dev-001", "SHA256:mid", new Date("2025-06-08T00:00:00.000Z"));
          expect((await r.get("dev-001"))?.previous).toEqual({ publicKey: "ssh-ed25519 KEY1", fingerprint: "SHA256:fp1", until: "2025-06-08T00:00:00.000Z" });
          await r.beginRotate("dev-001", "SHA256:mid", "ssh-ed25519 NEWKEY", "SHA256:new", "/out/new.tar.gz");
          await r.commitRotate("dev-001", "SHA256:new", undefined);
          expect((await r.get("dev-001"))?.previous).toBeUndefined();
          await r.updateDevice("dev-001", { board: "rpi5", os: "armbian", bastions: ["us"], overlay: "/out/again.tar.gz" });
          expect(await r.getByFingerprint("SHA256:fp1")).toBeUndefined();
          const d1 = await r.get("dev-001");
          expect(d1).toMatchObject({
            hostname: "dev-001", port: 26000, services: { web: 27000, vnc: 27001 }, publicKey: "ssh-ed25519 NEWKEY", fingerprint: "SHA256:new",
            board: "rpi5", os: "armbian", bastions: ["us"], overlay: "/out/again.tar.gz", status: "active", created: "2025-06-01T00:00:00.000Z",
          });
          expect(await r.getByFingerprint("SHA256:new")).toEqual(d1);
          expect(await r.get("nope")).toBeUndefined();
          expect((await r.findByAttribute("serial", "SN-6")).map((d) => [d.hostname, d.attributes])).toEqual([["dev-006", { serial: "SN-6", site: "lyon" }]]);
          expect(await r.findByAttribute("serial", "SN-7")).toEqual([]);
          // Factory data added later (registry import-manufacturing): added or replaced, others kept.
          expect(await r.setAttributes("dev-006", { eth_mac: "d8:3a:dd:00:00:01", site: "paris" })).toBe(true);
          expect((await r.get("dev-006"))?.attributes).toEqual({ eth_mac: "d8:3a:dd:00:00:01", serial: "SN-6", site: "paris" });
          expect((await r.findByAttribute("eth_mac", "d8:3a:dd:00:00:01")).map((d) => d.hostname)).toEqual(["dev-006"]);
          expect(await r.setAttributes("nope", { eth_mac: "x" })).toBe(false);
          expect(await r.findByAttribute("eth_mac", "x")).toEqual([]);
          expect((await r.list()).map((d) => `${d.hostname}:${d.port}:${d.status}`)).toEqual([
            "dev-001:26000:active", "dev-006:26001:pending", "dev-003:26002:revoked", "explicit:26003:pending", "dev-005:26004:pending", "dev-007:26005:pending",
          ]);
        });
        expect(await backend.seq(location)).toBe(7);
      } finally {
        removeDir(dir);
      }
    });

    it("refuses a registry written by a newer mkoverlay, in one line", async () => {
      const ws = await freshWorkspace(backend);
      try {
        expect(runCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], { cwd: ws.dir }).code).toBe(0);
        await backend.setSchemaVersion(ws.registry, 99);
        const r = runCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], { cwd: ws.dir });
        expectOneLineError(r, new RegExp(`registry .*: schema version 99 was written by a newer mkoverlay \\(this one knows ${SCHEMA_VERSION}\\)`));
        expect(r.stdout).toBe("");
        expect(readdirSync(ws.out).filter((n) => n.endsWith(".overlay.tar.gz"))).toHaveLength(1);
      } finally {
        removeDir(ws.dir);
      }
    });
  });


  if (which === "postgres") requires(need(pgServer, "PostgreSQL (scripts/ensure-postgres.sh)"))("registry migrate (sqlite ↔ postgres)", () => {
    const pg = pgServer!;

    /** A SQLite registry with every kind of row: active (with service ports), revoked, pending, a gap. */
    async function populated(): Promise<Workspace> {
      const dir = tempDir("mko-migrate-");
      const ws = workspace(join(dir, "registry.db"), dir);
      for (let i = 0; i < 4; i++) expect(runCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], { cwd: dir }).code).toBe(0);
      expect(runCli(["--config", ws.cfg, ...BUILD, "--hostname", "lab-1", "--out", ws.out], { cwd: dir }).code).toBe(0);
      await withRegistry(ws.registry, async (r) => {
        await r.revoke("gw-0002"); // quarantined: ports stay taken
        await r.revoke("gw-0003");
        await r.release("gw-0003"); // a gap at the lowest ports
        await r.reserve({
          hostname: undefined,
          hostnameTemplate: "gw-{seq:04}",
          range: { lo: SSH_LO, hi: SSH_LO + 999 },
          services: ["web"],
          serviceRange: { lo: SVC_LO, hi: SVC_LO + 999 },
          now: new Date("2025-01-02T03:04:05.000Z"),
          board: "rpi4",
          os: "raspios",
          bastions: ["eu"],
          publicKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPendingPendingPendingPendingPendingPending0",
          fingerprint: "SHA256:pending-device-fingerprint",
          overlayPath: (h) => join(ws.out, `${h}.overlay.tar.gz`),
          attributes: { serial: "SN-PENDING", site: "line 3" },
        }); // left pending, as a killed build would
        // What a bastion saw: a tunnel up with its key, another that went away, a stray listener.
        const look = (ports: number[], at: string) =>
          r.observe({ bastion: "eu", at: new Date(at), intervalS: 15, agent: "test:1", listeners: ports.map((port, i) => (i === 0 ? { port, fingerprint: "SHA256:seen-with-this-key", tunnel: true } : port === SSH_LO + 900 ? { port, tunnel: false, uid: 65534 } : { port })) });
        await look([SSH_LO, SSH_LO + 3, SSH_LO + 900], "2025-01-02T03:00:00.000Z");
        await look([SSH_LO, SSH_LO + 900], "2025-01-02T03:00:15.000Z");
      });
      return ws;
    }

    const migrate = (ws: Workspace, to: string, extra: string[] = [], env: Record<string, string> = {}) =>
      runCli(["registry", "migrate", "--config", ws.cfg, "--to", to, ...extra], { cwd: ws.dir, env });

    it("is wired in the CLI", () => {
      const r = runCli(["registry", "migrate", "--help"], { cwd: keys });
      expect(r.stdout, `'mkoverlay registry migrate' is not in src/cli/main.ts yet:\n${r.stdout}${r.stderr}`).toMatch(/Usage: mkoverlay registry migrate .*\n[^]*--to <registry>[^]*--force/);
    });

    it("round-trips sqlite → postgres → new sqlite, keeping ports, keys, statuses and the name counter", async () => {
      const ws = await populated();
      try {
        const original = await list(ws.registry);
        expect(original.map((d) => d.status).sort()).toEqual(["active", "active", "active", "pending", "revoked"]);
        const seq = await SQLITE.seq(ws.registry);
        expect(seq).toBe(5);

        const url = await pg.createDatabase();
        const toPg = migrate(ws, url);
        expect(toPg.code, toPg.stderr).toBe(0);
        expect(toPg.stdout).toMatch(/copied 5 device\(s\) \(3 active, 1 pending, 1 revoked\), 10 port\(s\), name counter 5/);
        expect(await list(url)).toEqual(original);
        expect(await postgresBackend(pg).seq(url)).toBe(seq);
        // The bastions' observations (sightings, history, heartbeats) come along.
        const seen = await withRegistry(ws.registry, (r) => r.observations());
        expect(seen.sightings).toHaveLength(3);
        expect(await withRegistry(url, (r) => r.observations())).toEqual(seen);

        // Back again: the PostgreSQL registry is now the one in use.
        const back = join(ws.dir, "back.db");
        const toFile = migrate(ws, back, [], { MKOVERLAY_REGISTRY: url });
        expect(toFile.code, toFile.stderr).toBe(0);
        expect(await list(back)).toEqual(original);
        expect(await SQLITE.seq(back)).toBe(seq);
        expect(await withRegistry(back, (r) => r.observations())).toEqual(seen);

        // All three hand out the same next name and the same (lowest free) ports.
        const nextOn = (registry: string) => {
          const r = runCli(["--config", ws.cfg, ...BUILD, "--out", join(ws.dir, "next")], { cwd: ws.dir, env: { MKOVERLAY_REGISTRY: registry } });
          expect(r.code, r.stderr).toBe(0);
          const { hostname, port, services } = JSON.parse(r.stdout) as DeviceRecord;
          return { hostname, port, services };
        };
        const a = nextOn(ws.registry);
        // 24002 is the pending device's; 24001 stays quarantined for the revoked one.
        expect(a).toEqual({ hostname: "gw-0006", port: SSH_LO + 5, services: { web: SVC_LO + 5 } });
        removeDir(join(ws.dir, "next"));
        expect(nextOn(url)).toEqual(a);
        removeDir(join(ws.dir, "next"));
        expect(nextOn(back)).toEqual(a);
      } finally {
        removeDir(ws.dir);
      }
    });

    it("refuses a non-empty target without --force (and leaves it alone), replaces it with --force", async () => {
      const ws = await populated();
      try {
        const url = await pg.createDatabase();
        expect(migrate(ws, url).code).toBe(0);
        const copied = await list(url);

        // The source moves on; copying again needs --force.
        expect(runCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], { cwd: ws.dir }).code).toBe(0);
        const again = migrate(ws, url);
        expectOneLineError(again, /registry postgres:\/\/mko@127\.0\.0\.1:\d+\/\w+: not empty \(5 device\(s\), name counter at 5\); nothing copied/);
        expect(again.stderr).toMatch(/hint: pass --force/);
        expect(await list(url)).toEqual(copied);

        const forced = migrate(ws, url, ["--force"]);
        expect(forced.code, forced.stderr).toBe(0);
        expect(await list(url)).toEqual(await list(ws.registry));
        expect(await postgresBackend(pg).seq(url)).toBe(6);

        // The same for a file target.
        const file = join(ws.dir, "other.db");
        expect(migrate(ws, file).code).toBe(0);
        const before = readFileSync(file);
        expectOneLineError(migrate(ws, file), /registry .*other\.db: not empty \(6 device\(s\), name counter at 6\); nothing copied/);
        expect(readFileSync(file).equals(before)).toBe(true);

        // Copying onto itself is refused.
        expectOneLineError(migrate(ws, ws.registry, ["--force"]), /the target .*registry\.db is the registry in use/);
        expectOneLineError(
          migrate(ws, url.replace("postgres://mko@", "postgresql://other@"), ["--force"], { MKOVERLAY_REGISTRY: url }),
          /the target postgresql:\/\/other@.* is the registry in use/,
        );
      } finally {
        removeDir(ws.dir);
      }
    });
  });

  if (which === "postgres") requires(need(pgServer, "PostgreSQL (scripts/ensure-postgres.sh)"))("postgres registry errors: one line, no stack", () => {
    const pg = pgServer!;

    async function buildWith(registry: string): Promise<Run & { ws: Workspace }> {
      const ws = workspace(registry);
      try {
        const r = runCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], { cwd: ws.dir });
        expect(r.stdout).toBe("");
        expect(existsSync(ws.out), "nothing is written when the registry fails").toBe(false);
        return { ...r, ws };
      } finally {
        removeDir(ws.dir);
      }
    }

    it("unreachable server (a closed local port)", async () => {
      const port = await closedPort();
      const r = await buildWith(`postgres://mko@127.0.0.1:${port}/registry`);
      expectOneLineError(r, new RegExp(`^mkoverlay: error: registry postgres://mko@127\\.0\\.0\\.1:${port}/registry: cannot connect to PostgreSQL at 127\\.0\\.0\\.1:${port} \\(connection refused\\)$`));
    });

    it("bad credentials (password role, wrong password): the password is never printed", async () => {
      const url = await pg.createDatabase();
      const db = new URL(url).pathname.slice(1);
      const r = await buildWith(pg.url(db, PW_ROLE.user, "wrong-password"));
      expectOneLineError(r, /^mkoverlay: error: registry postgres:\/\/mko_pw:\*\*\*@127\.0\.0\.1:\d+\/\w+: login refused: password authentication failed for user "mko_pw"$/);
      expect(r.stderr).not.toContain("wrong-password");
    });

    it("password role without a password in the URL", async () => {
      const url = await pg.createDatabase();
      const r = await buildWith(pg.url(new URL(url).pathname.slice(1), PW_ROLE.user));
      expectOneLineError(r, /the server wants a password and the registry URL gives none/);
    });

    it("database that does not exist", async () => {
      const r = await buildWith(pg.url("no_such_db"));
      expectOneLineError(r, /registry postgres:\/\/mko@127\.0\.0\.1:\d+\/no_such_db: database "no_such_db" does not exist/);
    });

    it("a 'mkoverlay' schema that is not a registry is left untouched", async () => {
      const url = await pg.createDatabase();
      await pg.sql(url, "CREATE SCHEMA mkoverlay AUTHORIZATION mko; CREATE TABLE mkoverlay.other (x int); ALTER TABLE mkoverlay.other OWNER TO mko");
      const r = await buildWith(url);
      expectOneLineError(r, /a database, but not an mkoverlay registry \(it holds other tables\); left untouched/);
      expect(await pg.sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'mkoverlay'")).toEqual([{ tablename: "other" }]);
    });

    it("the right password works (the password role is a real login)", async () => {
      const url = await pg.createDatabase();
      const db = new URL(url).pathname.slice(1);
      // The role needs to own what it creates: give it the database.
      await pg.sql("postgres", `ALTER DATABASE ${db} OWNER TO ${PW_ROLE.user}`);
      const ws = workspace(pg.url(db, PW_ROLE.user, PW_ROLE.password));
      try {
        const r = runCli(["--config", ws.cfg, ...BUILD, "--out", ws.out], { cwd: ws.dir });
        expect(r.code, r.stderr).toBe(0);
        expect((JSON.parse(r.stdout) as { port: number }).port).toBe(SSH_LO);
      } finally {
        removeDir(ws.dir);
      }
    });

  });

  if (which === "sqlite") describe("backend loading", () => {
    it("the CLI imports pg only for a postgres registry (start-up cost of the SQLite path)", async () => {
      // A preload that reports, at exit, whether any file of the pg package was loaded.
      const probe = join(keys, "probe.mjs");
      writeFileSync(
        probe,
        `import { createRequire } from "node:module";\n` +
          `const cache = createRequire(import.meta.url).cache;\n` +
          `process.on("exit", () => process.stderr.write(Object.keys(cache).some((k) => /node_modules\\/pg\\//.test(k)) ? "PROBE pg loaded\\n" : "PROBE pg not loaded\\n"));\n`,
      );
      const loads = (registry: string): string => {
        const ws = workspace(registry);
        try {
          const r = spawnSync(process.execPath, ["--import", pathToFileURL(probe).href, CLI, "registry", "doctor", "--config", ws.cfg], {
            cwd: ws.dir,
            encoding: "utf8",
            env: { ...process.env, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "" },
          });
          return /PROBE (.*)/.exec(r.stderr)?.[1] ?? r.stderr;
        } finally {
          removeDir(ws.dir);
        }
      };
      expect(loads("./registry.db")).toBe("pg not loaded");
      // The control: a postgres:// registry does load it (the server need not even answer).
      expect(loads(`postgres://mko@127.0.0.1:${await closedPort()}/registry`)).toBe("pg loaded");
    });
  });
}
