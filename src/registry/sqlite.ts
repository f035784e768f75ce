/**
 * Embedded registry on SQLite (better-sqlite3). Several station processes may share the file:
 * WAL mode plus a busy timeout, and every reservation runs in a BEGIN IMMEDIATE transaction,
 * so two builds never see the same free port. Ports are UNIQUE in the schema as a second guard.
 */
import Database from "better-sqlite3";
import { closeSync, existsSync, openSync, readSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { hostname as osHostname } from "node:os";
import { dirname, join } from "node:path";
import { renderHostname } from "../config/rules.js";
import { errnoCode, UserError } from "../errors.js";
import { DEVICE_KEYS, hostnameTaken, keyTaken, noFreePort, pendingRow, toRecord, type DeviceRow } from "./rows.js";
import type { DeviceRecord, Registry, ReserveRequest } from "./types.js";

export const SCHEMA_VERSION = 2;

/**
 * The addon's path, handed to better-sqlite3 directly: its default lookup (the `bindings`
 * package) walks candidate folders and parses a stack trace, several milliseconds of every
 * single build. Falls back to that lookup when the file is not where a normal install puts it.
 */
function nativeBinding(): { nativeBinding?: string } {
  try {
    const req = createRequire(import.meta.url);
    const file = join(dirname(req.resolve("better-sqlite3/package.json")), "build", "Release", "better_sqlite3.node");
    return existsSync(file) ? { nativeBinding: file } : {};
  } catch {
    return {};
  }
}
const HEADER = Buffer.from("SQLite format 3\0", "latin1");

const SCHEMA = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
  hostname    TEXT PRIMARY KEY,
  board       TEXT NOT NULL,
  os          TEXT NOT NULL,
  bastions    TEXT NOT NULL,
  port        INTEGER NOT NULL UNIQUE,
  public_key  TEXT NOT NULL,
  fingerprint TEXT NOT NULL UNIQUE,
  status      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
  overlay     TEXT,
  station     TEXT NOT NULL,
  created     TEXT NOT NULL,
  updated     TEXT NOT NULL,
  prev_public_key  TEXT,
  prev_fingerprint TEXT,
  prev_until       TEXT
);
CREATE TABLE IF NOT EXISTS ports (
  port     INTEGER PRIMARY KEY,
  hostname TEXT NOT NULL REFERENCES devices(hostname) ON DELETE CASCADE,
  purpose  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ports_by_host ON ports(hostname);
`;

/**
 * Refuses, before SQLite touches it, a file that is not a SQLite database: opening garbage
 * must leave it byte-for-byte as it was.
 */
function checkIsDatabase(file: string): void {
  let st;
  try {
    st = statSync(file);
  } catch (e) {
    if (errnoCode(e) === "ENOENT") return;
    throw new UserError(`registry ${file}: ${(e as Error).message}`);
  }
  if (st.isDirectory()) throw new UserError(`registry ${file}: is a directory, not a registry file`);
  if (st.size === 0) return;
  const head = Buffer.alloc(HEADER.length);
  const fd = openSync(file, "r");
  try {
    readSync(fd, head, 0, head.length, 0);
  } finally {
    closeSync(fd);
  }
  if (!head.equals(HEADER)) {
    throw new UserError(`registry ${file}: not an mkoverlay registry (not a SQLite database); left untouched`, {
      hint: "point 'registry:' in the config (or MKOVERLAY_REGISTRY) at the right file",
    });
  }
}

export class SqliteRegistry implements Registry {
  private readonly db: Database.Database;
  private readonly station = `${osHostname()}:${process.pid}`;
  private readonly statements = new Map<string, Database.Statement>();

  /** Prepared once per connection: a batch runs the same few statements thousands of times. */
  private stmt(sql: string): Database.Statement {
    let st = this.statements.get(sql);
    if (!st) {
      st = this.db.prepare(sql);
      this.statements.set(sql, st);
    }
    return st;
  }

  constructor(readonly file: string) {
    checkIsDatabase(file);
    const fresh = !existsSync(file);
    try {
      this.db = new Database(file, { timeout: 30_000, ...nativeBinding() });
    } catch (e) {
      throw new UserError(`registry ${file}: cannot open (${(e as Error).message})`);
    }
    try {
      // Switching a new file to WAL needs a moment alone with it: when stations start together
      // it answers SQLITE_BUSY at once (the busy timeout does not cover it), so retry briefly.
      for (const deadline = Date.now() + 30_000; ; ) {
        try {
          this.db.pragma("journal_mode = WAL");
          break;
        } catch (e) {
          if ((e as { code?: string }).code !== "SQLITE_BUSY" || Date.now() > deadline) throw e;
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10 + Math.random() * 20);
        }
      }
      this.db.pragma("foreign_keys = ON");
      this.db.pragma("synchronous = FULL");
      this.migrate(fresh);
    } catch (e) {
      this.db.close();
      if (e instanceof UserError) throw e;
      throw new UserError(`registry ${file}: unusable (${(e as Error).message})`);
    }
  }

  private migrate(fresh: boolean): void {
    const tx = this.db.transaction(() => {
      const hasMeta = this.stmt("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").get();
      if (!hasMeta) {
        const tables = this.stmt("SELECT count(*) AS n FROM sqlite_master WHERE type='table'").get() as { n: number };
        if (!fresh && tables.n > 0) throw new UserError(`registry ${this.file}: a SQLite database, but not an mkoverlay registry`);
        this.db.exec(SCHEMA);
        this.stmt("INSERT INTO meta(key, value) VALUES ('schema_version', ?), ('seq', '0')").run(String(SCHEMA_VERSION));
        return;
      }
      const v = this.stmt("SELECT value FROM meta WHERE key='schema_version'").get() as { value: string } | undefined;
      const version = Number(v?.value ?? 0);
      if (version > SCHEMA_VERSION) {
        throw new UserError(`registry ${this.file}: schema version ${version} was written by a newer mkoverlay (this one knows ${SCHEMA_VERSION})`, {
          hint: "upgrade mkoverlay on this station",
        });
      }
      if (version < 2) {
        // v2: the key a rotation replaced, kept for its grace period (rotate --grace).
        this.db.exec("ALTER TABLE devices ADD COLUMN prev_public_key TEXT; ALTER TABLE devices ADD COLUMN prev_fingerprint TEXT; ALTER TABLE devices ADD COLUMN prev_until TEXT;");
        this.stmt("UPDATE meta SET value = ? WHERE key='schema_version'").run(String(SCHEMA_VERSION));
      }
    });
    tx.immediate();
  }

  /** One reservation; must run inside a transaction (it reads then writes). */
  private reserveOne(req: ReserveRequest): DeviceRecord {
    let name = req.hostname;
    if (name === undefined) {
      let seq = Number((this.stmt("SELECT value FROM meta WHERE key='seq'").get() as { value: string }).value);
      const exists = this.stmt("SELECT 1 FROM devices WHERE hostname = ?");
      do {
        seq += 1;
        name = renderHostname(req.hostnameTemplate, seq);
      } while (exists.get(name));
      this.stmt("UPDATE meta SET value = ? WHERE key='seq'").run(String(seq));
    } else {
      const taken = this.stmt("SELECT status FROM devices WHERE hostname = ?").get(name) as { status: string } | undefined;
      if (taken) throw hostnameTaken(name, taken.status);
    }
    const dup = this.stmt("SELECT hostname FROM devices WHERE fingerprint = ?").get(req.fingerprint) as { hostname: string } | undefined;
    if (dup) throw keyTaken(dup.hostname);
    const port = this.lowestFreePort(req.range.lo, req.range.hi);
    if (port === undefined) throw noFreePort(req.range);
    const row = pendingRow(req, name, port, this.station);
    this.stmt(`INSERT INTO devices (${DEVICE_KEYS.join(", ")}) VALUES (${DEVICE_KEYS.map((k) => `@${k}`).join(", ")})`).run(row);
    const insertPort = this.stmt("INSERT INTO ports (port, hostname, purpose) VALUES (?, ?, ?)");
    insertPort.run(port, name, "ssh");
    const services: Record<string, number> = {};
    for (const svc of req.services) {
      const p = this.lowestFreePort(req.serviceRange.lo, req.serviceRange.hi);
      if (p === undefined) throw noFreePort(req.serviceRange, svc);
      insertPort.run(p, name, `service:${svc}`);
      services[svc] = p;
    }
    return toRecord(row, services);
  }

  async reserve(req: ReserveRequest): Promise<DeviceRecord> {
    return this.db.transaction(() => this.reserveOne(req)).immediate();
  }

  async reserveMany(reqs: ReserveRequest[]): Promise<(DeviceRecord | UserError)[]> {
    // One write transaction (one sync) for the lot; each device in its own savepoint, so a
    // device that fails leaves no trace and the others stand.
    const one = this.db.transaction((req: ReserveRequest) => this.reserveOne(req));
    return this.db
      .transaction(() =>
        reqs.map((req) => {
          try {
            return one(req);
          } catch (e) {
            if (e instanceof UserError) return e;
            throw e;
          }
        }),
      )
      .immediate();
  }

  /**
   * Lowest port in [lo, hi] with no row in `ports`. A hint per range (meta `free_from:LO-HI`)
   * records that every port below it is taken, so the walk starts there instead of at `lo`:
   * the cost of a reservation does not grow with the fleet. Freeing a port lowers the hint.
   */
  private lowestFreePort(lo: number, hi: number): number | undefined {
    const hintKey = `free_from:${lo}-${hi}`;
    const hint = this.stmt("SELECT value FROM meta WHERE key = ?").get(hintKey) as { value: string } | undefined;
    const start = Math.max(lo, Number(hint?.value ?? lo));
    if (start > hi) return undefined;
    let port: number | undefined;
    if (!this.stmt("SELECT 1 FROM ports WHERE port = ?").get(start)) port = start;
    else {
      const r = this.stmt(
        `SELECT p.port + 1 AS free FROM ports p
         WHERE p.port >= ? AND p.port < ? AND NOT EXISTS (SELECT 1 FROM ports q WHERE q.port = p.port + 1)
         ORDER BY p.port LIMIT 1`,
      ).get(start, hi) as { free: number } | undefined;
      port = r?.free;
    }
    if (port !== undefined) this.stmt("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value").run(hintKey, String(port + 1));
    return port;
  }

  /** Ports are about to be freed: every range hint above one of them comes down to it. */
  private lowerHints(ports: number[]): void {
    if (ports.length === 0) return;
    for (const { key, value } of this.stmt("SELECT key, value FROM meta WHERE key LIKE 'free_from:%'").all() as { key: string; value: string }[]) {
      const [lo = 0, hi = 0] = key.slice("free_from:".length).split("-").map(Number);
      const inRange = ports.filter((p) => p >= lo && p <= hi);
      if (inRange.length > 0 && Math.min(...inRange) < Number(value)) this.stmt("UPDATE meta SET value = ? WHERE key = ?").run(String(Math.min(...inRange)), key);
    }
  }

  async activate(hostname: string): Promise<void> {
    // Not synced on its own: if power fails before the WAL reaches the disk, the device is
    // still `pending` with its archive in place, and `registry doctor` activates it. The
    // reservation itself (which must never be lost once an archive carries its port) is FULL.
    this.db.pragma("synchronous = NORMAL");
    try {
      this.stmt("UPDATE devices SET status='active', updated=? WHERE hostname=? AND status='pending'").run(new Date().toISOString(), hostname);
    } finally {
      this.db.pragma("synchronous = FULL");
    }
  }

  async activateMany(hostnames: string[]): Promise<void> {
    this.db.pragma("synchronous = NORMAL");
    try {
      const stmt = this.stmt("UPDATE devices SET status='active', updated=? WHERE hostname=? AND status='pending'");
      const at = new Date().toISOString();
      this.db.transaction(() => hostnames.forEach((h) => stmt.run(at, h))).immediate();
    } finally {
      this.db.pragma("synchronous = FULL");
    }
  }

  async abandon(hostname: string): Promise<void> {
    // Only a device that is still pending: an active device (the doctor racing a build that
    // just finished) keeps its name and ports.
    const tx = this.db.transaction(() => {
      const freed = this.stmt("SELECT port FROM ports WHERE hostname=? AND EXISTS (SELECT 1 FROM devices WHERE hostname=? AND status='pending')").all(hostname, hostname) as { port: number }[];
      this.lowerHints(freed.map((f) => f.port));
      this.stmt("DELETE FROM ports WHERE hostname=? AND EXISTS (SELECT 1 FROM devices WHERE hostname=? AND status='pending')").run(hostname, hostname);
      this.stmt("DELETE FROM devices WHERE hostname=? AND status='pending'").run(hostname);
    });
    tx.immediate();
  }

  async updateDevice(hostname: string, f: { board: string; os: string; bastions: string[]; overlay: string }): Promise<void> {
    this.db
      .prepare("UPDATE devices SET board=?, os=?, bastions=?, overlay=?, updated=? WHERE hostname=?")
      .run(f.board, f.os, f.bastions.join(","), f.overlay, new Date().toISOString(), hostname);
  }

  async revoke(hostname: string): Promise<void> {
    this.stmt("UPDATE devices SET status='revoked', updated=? WHERE hostname=?").run(new Date().toISOString(), hostname);
  }

  async release(hostname: string): Promise<void> {
    const tx = this.db.transaction(() => {
      this.lowerHints((this.stmt("SELECT port FROM ports WHERE hostname=?").all(hostname) as { port: number }[]).map((f) => f.port));
      this.stmt("DELETE FROM ports WHERE hostname=?").run(hostname);
      this.stmt("DELETE FROM devices WHERE hostname=?").run(hostname);
    });
    tx.immediate();
  }

  async rotate(hostname: string, publicKey: string, fingerprint: string, overlay: string, graceUntil?: string): Promise<void> {
    // SET reads the row as it was: the replaced key moves to prev_* in the same statement.
    const keep = graceUntil === undefined ? "prev_public_key=NULL, prev_fingerprint=NULL, prev_until=NULL" : "prev_public_key=public_key, prev_fingerprint=fingerprint, prev_until=@until";
    this.db
      .prepare(`UPDATE devices SET ${keep}, public_key=@publicKey, fingerprint=@fingerprint, overlay=@overlay, updated=@now WHERE hostname=@hostname`)
      .run({ publicKey, fingerprint, overlay, now: new Date().toISOString(), hostname, ...(graceUntil === undefined ? {} : { until: graceUntil }) });
  }

  private withServices(rows: DeviceRow[]): DeviceRecord[] {
    if (rows.length === 0) return [];
    const svc = new Map<string, Record<string, number>>();
    const q =
      rows.length === 1
        ? this.stmt("SELECT port, hostname, purpose FROM ports WHERE hostname = ? AND purpose LIKE 'service:%'").all(rows[0]!.hostname)
        : this.stmt("SELECT port, hostname, purpose FROM ports WHERE purpose LIKE 'service:%'").all();
    for (const p of q as { port: number; hostname: string; purpose: string }[]) {
      const m = svc.get(p.hostname) ?? {};
      m[p.purpose.slice("service:".length)] = p.port;
      svc.set(p.hostname, m);
    }
    return rows.map((r) => toRecord(r, svc.get(r.hostname)));
  }

  async pending(): Promise<DeviceRecord[]> {
    return this.withServices(this.stmt("SELECT * FROM devices WHERE status='pending' ORDER BY port").all() as DeviceRow[]);
  }

  async get(hostname: string): Promise<DeviceRecord | undefined> {
    const r = this.stmt("SELECT * FROM devices WHERE hostname = ?").get(hostname) as DeviceRow | undefined;
    return r && this.withServices([r])[0];
  }

  async getByFingerprint(fp: string): Promise<DeviceRecord | undefined> {
    const r = this.stmt("SELECT * FROM devices WHERE fingerprint = ?").get(fp) as DeviceRow | undefined;
    return r && this.withServices([r])[0];
  }

  async list(): Promise<DeviceRecord[]> {
    return this.withServices(this.stmt("SELECT * FROM devices ORDER BY port").all() as DeviceRow[]);
  }

  async close(): Promise<void> {
    this.db.close();
  }
}
