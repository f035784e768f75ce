/**
 * Registry schema v2 (issue 12): the key a rotation replaced is kept for its grace period
 * (`rotate --grace`), v1 registries are migrated in place on both backends, and every change
 * on PostgreSQL NOTIFYs `mkoverlay_changes` inside its own transaction.
 */
import Database from "better-sqlite3";
import pg from "pg";
import { SCHEMA_VERSION } from "../src/registry/schema.js";
import { afterAll, describe, expect, it } from "vitest";
import { join } from "node:path";
import { need, requires } from "./helpers/capability.js";
import { postgresForTests } from "./helpers/postgres.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const { server: pgServer } = await postgresForTests();
afterAll(async () => {
  await pgServer?.stop();
});

const PORTS = { ssh: "24000-24999", services: "25000-25999" };
const keys = tempDir("mko-grace-keys-");
const bastionKey = readPub(sshKeygen(keys, "bastion"));
afterAll(() => removeDir(keys));

// The v1 layout exactly as mkoverlay 0.1 created it (before prev_* existed).
const SQLITE_V1 = `
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE devices (hostname TEXT PRIMARY KEY, board TEXT NOT NULL, os TEXT NOT NULL, bastions TEXT NOT NULL,
  port INTEGER NOT NULL UNIQUE, public_key TEXT NOT NULL, fingerprint TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')), overlay TEXT, station TEXT NOT NULL,
  created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE ports (port INTEGER PRIMARY KEY, hostname TEXT NOT NULL REFERENCES devices(hostname) ON DELETE CASCADE, purpose TEXT NOT NULL);
CREATE INDEX ports_by_host ON ports(hostname);
INSERT INTO meta(key, value) VALUES ('schema_version', '1'), ('seq', '1');
`;
const PG_V1 = `
CREATE SCHEMA mkoverlay;
CREATE TABLE mkoverlay.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE mkoverlay.devices (hostname TEXT PRIMARY KEY, board TEXT NOT NULL, os TEXT NOT NULL, bastions TEXT NOT NULL,
  port INTEGER NOT NULL UNIQUE, public_key TEXT NOT NULL, fingerprint TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')), overlay TEXT, station TEXT NOT NULL,
  created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE mkoverlay.ports (port INTEGER PRIMARY KEY, hostname TEXT NOT NULL REFERENCES mkoverlay.devices(hostname) ON DELETE CASCADE, purpose TEXT NOT NULL);
CREATE INDEX ports_by_host ON mkoverlay.ports(hostname);
INSERT INTO mkoverlay.meta(key, value) VALUES ('schema_version', '1'), ('seq', '1');
`;
const V1_DEVICE = [
  "gw-0001", "rpi4", "raspios", "eu", 24000,
  "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKHPWLIPXfg+vUdZK1KmPkMqDMZInER4VviOhALCClYv",
  "SHA256:placeholder", "active", null, "old:1", "2025-01-01T00:00:00.000Z", "2025-01-01T00:00:00.000Z",
];

interface Case {
  name: string;
  /** A v1 registry holding one active device; returns its location. */
  v1(dir: string): Promise<string>;
  version(location: string): Promise<number>;
}

const cases: Case[] = [
  {
    name: "sqlite",
    async v1(dir) {
      const file = join(dir, "registry.db");
      const db = new Database(file);
      db.exec(SQLITE_V1);
      db.prepare("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)").run(...V1_DEVICE);
      db.prepare("INSERT INTO ports VALUES (24000, 'gw-0001', 'ssh')").run();
      db.close();
      return file;
    },
    async version(file) {
      const db = new Database(file);
      try {
        return Number((db.prepare("SELECT value FROM meta WHERE key='schema_version'").get() as { value: string }).value);
      } finally {
        db.close();
      }
    },
  },
];
if (pgServer) {
  const server = pgServer;
  cases.push({
    name: "postgres",
    async v1() {
      const url = await server.createDatabase();
      await server.sql(url, PG_V1);
      await server.sql(url, "ALTER SCHEMA mkoverlay OWNER TO mko; ALTER TABLE mkoverlay.meta OWNER TO mko; ALTER TABLE mkoverlay.devices OWNER TO mko; ALTER TABLE mkoverlay.ports OWNER TO mko");
      await server.sql(url, `INSERT INTO mkoverlay.devices VALUES (${V1_DEVICE.map((_, i) => `$${i + 1}`).join(", ")})`, V1_DEVICE);
      await server.sql(url, "INSERT INTO mkoverlay.ports VALUES (24000, 'gw-0001', 'ssh')");
      return url;
    },
    version: async (url) => Number((await server.sql<{ value: string }>(url, "SELECT value FROM mkoverlay.meta WHERE key = 'schema_version'"))[0]?.value),
  });
}

describe.each(cases.map((c) => [c.name, c] as const))("registry v2 on %s", (_n, c) => {
  it("migrates a v1 registry in place; rotate --grace keeps the old key as `previous`, --grace 0 drops it", async () => {
    const dir = tempDir("mko-grace-");
    try {
      const location = await c.v1(dir);
      const cfg = writeFleet(dir, { eu: { hostKeys: [bastionKey] } }, { registry: location, ports: PORTS });
      const cli = (args: string[]) => runCli([...args, "--config", cfg], { cwd: dir });
      const listed = cli(["registry", "list", "--json"]);
      expect(listed.code, listed.stderr).toBe(0);
      expect(JSON.parse(listed.stdout)).toMatchObject([{ hostname: "gw-0001", port: 24000, status: "active" }]);
      expect(JSON.parse(listed.stdout)[0]).not.toHaveProperty("previous");
      expect(await c.version(location)).toBe(SCHEMA_VERSION);

      const b = cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet", "--out", join(dir, "out")]);
      expect(b.code, b.stderr).toBe(0);
      const built = JSON.parse(b.stdout) as { hostname: string; fingerprint: string; publicKey: string };
      const t0 = Date.now();
      const rot = cli(["rotate", built.hostname, "--grace", "2d", "--json", "--out", join(dir, "rot1")]);
      expect(rot.code, rot.stderr).toBe(0);
      const r1 = JSON.parse(rot.stdout) as { fingerprint: string; previousFingerprint: string; graceUntil: string };
      expect(r1.previousFingerprint).toBe(built.fingerprint);
      expect(Math.abs(Date.parse(r1.graceUntil) - (t0 + 2 * 86_400_000))).toBeLessThan(60_000);
      const dev = (JSON.parse(cli(["registry", "list", "--json"]).stdout) as { hostname: string; previous?: unknown }[]).find((d) => d.hostname === built.hostname);
      expect(dev?.previous).toEqual({ publicKey: built.publicKey.split(" ").slice(0, 2).join(" "), fingerprint: built.fingerprint, until: r1.graceUntil });

      const rot0 = cli(["rotate", built.hostname, "--grace", "0", "--json", "--out", join(dir, "rot2")]);
      expect(rot0.code, rot0.stderr).toBe(0);
      expect(JSON.parse(rot0.stdout)).toMatchObject({ graceUntil: null });
      const dev2 = (JSON.parse(cli(["registry", "list", "--json"]).stdout) as { hostname: string; previous?: unknown }[]).find((d) => d.hostname === built.hostname);
      expect(dev2).not.toHaveProperty("previous");
    } finally {
      removeDir(dir);
    }
  });

  it("rejects a bad --grace before anything is written", async () => {
    const dir = tempDir("mko-grace-");
    try {
      const location = await c.v1(dir);
      const cfg = writeFleet(dir, { eu: { hostKeys: [bastionKey] } }, { registry: location, ports: PORTS });
      for (const bad of ["7", "7x", "-1d", "1y", "soon"]) {
        const r = runCli(["rotate", "gw-0001", "--grace", bad, "--config", cfg, "--out", join(dir, "never")], { cwd: dir });
        expect(r.code, bad).toBe(2);
        expect(r.stderr).toMatch(/^mkoverlay: error: --grace "[^"]*": not a duration[^\n]*\nmkoverlay: hint: use e\.g\. 12h, 7d, 2w, or 0/);
      }
      expect(await c.version(location)).toBe(1); // the registry was not even opened (no migration)
    } finally {
      removeDir(dir);
    }
  });
});

requires(need(pgServer, "PostgreSQL (scripts/ensure-postgres.sh)"))("postgres NOTIFY", () => {
  it("every change notifies mkoverlay_changes with the hostname; a refused change does not", async () => {
    const server = pgServer!;
    const dir = tempDir("mko-notify-");
    const url = await server.createDatabase();
    const listener = new pg.Client({ connectionString: url });
    await listener.connect();
    const got: string[] = [];
    listener.on("notification", (n) => got.push(`${n.channel}:${n.payload}`));
    await listener.query("LISTEN mkoverlay_changes");
    try {
      const cfg = writeFleet(dir, { eu: { hostKeys: [bastionKey] } }, { registry: url, ports: PORTS });
      const cli = (args: string[]) => runCli([...args, "--config", cfg], { cwd: dir });
      const b = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "gw-n1", "--json", "--quiet", "--out", join(dir, "out")]);
      expect(b.code, b.stderr).toBe(0);
      expect(cli(["rotate", "gw-n1", "--quiet", "--out", join(dir, "rot")]).code).toBe(0);
      expect(cli(["revoke", "gw-n1"]).code).toBe(0);
      expect(cli(["registry", "release", "gw-n1"]).code).toBe(0);
      // A reservation that fails (name taken) rolls back: no notice for it.
      const b2 = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "gw-n2", "--json", "--quiet", "--out", join(dir, "out")]);
      expect(b2.code).toBe(0);
      expect(cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "gw-n2", "--quiet", "--out", join(dir, "out")]).code).toBe(2);
      await new Promise((r) => setTimeout(r, 300));
      // What a bastion accepts changed: activate (build), rotate, revoke, release; then gw-n2's
      // activation. A pending reservation changes nothing a bastion accepts: no notice.
      expect(got).toEqual([
        "mkoverlay_changes:gw-n1", "mkoverlay_changes:gw-n1", "mkoverlay_changes:gw-n1", "mkoverlay_changes:gw-n1",
        "mkoverlay_changes:gw-n2",
      ]);
    } finally {
      await listener.end();
      removeDir(dir);
    }
  });
});
