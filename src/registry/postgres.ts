/**
 * Registry on PostgreSQL (`registry: postgres://user@host:5432/db`), for several stations on
 * several machines. Same tables, same rules and the same lowest-free-port walk as the embedded
 * SQLite backend; only the locking differs.
 *
 * Atomic reservation: every reservation is one READ COMMITTED transaction that first takes a
 * transaction-scoped advisory lock (`pg_advisory_xact_lock`, one key per database). Stations
 * therefore reserve one at a time, like SQLite's BEGIN IMMEDIATE; each statement after the lock
 * sees everything the previous holder committed (PostgreSQL publishes a commit before it drops
 * the holder's locks), so the name counter and the lowest free port are read fresh. The lock
 * ends with COMMIT or ROLLBACK, and a station that dies (SIGKILL, power, network) has its
 * transaction rolled back and the lock dropped when the server sees the connection close.
 * UNIQUE ports, fingerprints and host names stay in the schema as the second guard.
 *
 * The tables live in their own PostgreSQL schema (`mkoverlay`), created and migrated by
 * mkoverlay under a second advisory lock; `mkoverlay.meta` holds `schema_version` and `seq`.
 * This module imports `pg`, so `open.ts` loads it only for a postgres:// registry.
 */
import { hostname as osHostname } from "node:os";
import pg from "pg";
import { renderHostname } from "../config/rules.js";
import { UserError } from "../errors.js";
import type { PortRow, Snapshot } from "./copy.js";
import { DEVICE_KEYS, hostnameTaken, keyTaken, noFreePort, pendingRow, toRecord, type DeviceRow } from "./rows.js";
import { displayLocation } from "./open.js";
import type { DeviceRecord, Registry, ReserveRequest } from "./types.js";

export const PG_SCHEMA_VERSION = 2;

/**
 * Bastion agents LISTEN here. Every change NOTIFYs it inside its own transaction (so the
 * notice is sent only if the change commits), with the device's hostname as payload ('*':
 * the whole registry was replaced).
 */
export const CHANGES_CHANNEL = "mkoverlay_changes";

/** Advisory lock keys: (namespace, purpose). Advisory locks are per database. */
const LOCK_NS = 0x6d6b6f76; // "mkov"
const LOCK_SCHEMA = 1;
const LOCK_RESERVE = 2;

const CONNECT_TIMEOUT_MS = 10_000;
/** Like the SQLite busy timeout: how long a station waits for another's reservation. */
const LOCK_TIMEOUT_MS = 30_000;

/** MIGRATIONS[v] takes a registry from schema version v to v + 1. */
const MIGRATIONS: string[] = [
  `
  CREATE SCHEMA IF NOT EXISTS mkoverlay;
  CREATE TABLE mkoverlay.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
  CREATE TABLE mkoverlay.devices (
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
    updated     TEXT NOT NULL
  );
  CREATE TABLE mkoverlay.ports (
    port     INTEGER PRIMARY KEY,
    hostname TEXT NOT NULL REFERENCES mkoverlay.devices(hostname) ON DELETE CASCADE,
    purpose  TEXT NOT NULL
  );
  CREATE INDEX ports_by_host ON mkoverlay.ports(hostname);
  INSERT INTO mkoverlay.meta(key, value) VALUES ('seq', '0');
  `,
  // v2: the key a rotation replaced, kept for its grace period (rotate --grace).
  `
  ALTER TABLE mkoverlay.devices ADD COLUMN prev_public_key TEXT, ADD COLUMN prev_fingerprint TEXT, ADD COLUMN prev_until TEXT;
  `,
];

const DEVICE_COLUMNS = DEVICE_KEYS.join(", ");

interface PgError extends Error {
  code?: string;
  detail?: string;
}

function oneLine(s: string): string {
  return s.replace(/\s*\n\s*/g, " ").trim();
}

/**
 * Turns what `pg` and the server throw into one-line user errors: unreachable server, refused
 * login, missing database, lost connection, lock timeout. Anything else (an SQL bug) is
 * returned unchanged and reported as a bug.
 */
export function pgUserError(location: string, e: unknown): unknown {
  if (e instanceof UserError || !(e instanceof Error)) return e;
  const err = e as PgError;
  const where = `registry ${displayLocation(location)}`;
  const code = err.code ?? "";
  const msg = oneLine(err.message);
  let target = "the server";
  try {
    const u = new URL(location);
    target = `${u.hostname || "localhost"}:${u.port || "5432"}`;
  } catch {
    // keep the generic wording
  }
  const reach = { hint: "is the PostgreSQL server running, and may this station reach it? (check the registry URL)" };
  const login = { hint: "check the user and password in the registry URL (or PGPASSWORD / ~/.pgpass) and the server's pg_hba.conf" };
  switch (code) {
    case "ECONNREFUSED":
      return new UserError(`${where}: cannot connect to PostgreSQL at ${target} (connection refused)`, reach);
    case "ENOTFOUND":
    case "EAI_AGAIN":
      return new UserError(`${where}: cannot resolve the host name of ${target}`, reach);
    case "ETIMEDOUT":
    case "EHOSTUNREACH":
    case "ENETUNREACH":
      return new UserError(`${where}: cannot reach PostgreSQL at ${target} (${code})`, reach);
    case "ECONNRESET":
    case "EPIPE":
      return new UserError(`${where}: the connection to PostgreSQL at ${target} was lost (${code})`, reach);
    case "28P01":
      return new UserError(`${where}: login refused: ${msg}`, login);
    case "28000":
      return new UserError(`${where}: the server refused this login: ${msg}`, login);
    case "3D000":
      return new UserError(`${where}: ${msg}`, { hint: "create it (createdb) or fix the database name in the registry URL" });
    case "42501":
      return new UserError(`${where}: ${msg}`, { hint: "the registry's user needs to own the database (or have CREATE on it) and use the mkoverlay schema" });
    case "55P03":
      return new UserError(`${where}: another station held the registry lock for over ${LOCK_TIMEOUT_MS / 1000}s`, { hint: "try again; if it persists, look for a stuck session in pg_stat_activity" });
    case "25006":
      return new UserError(`${where}: the server is read-only (a standby?)`, { hint: "point the registry URL at the primary" });
    case "23505":
      return new UserError(`${where}: conflicting change from another station (${oneLine(err.detail ?? msg)})`, { hint: "try again" });
    case "57P01":
    case "57P02":
    case "57P03":
    case "53300":
      return new UserError(`${where}: ${msg}`, reach);
  }
  if (code.startsWith("08")) return new UserError(`${where}: connection problem: ${msg}`, reach);
  if (/client password must be a string|password must be a string/i.test(msg)) {
    return new UserError(`${where}: the server wants a password and the registry URL gives none`, login);
  }
  if (/timeout expired|connection timeout/i.test(msg)) {
    return new UserError(`${where}: no answer from PostgreSQL at ${target} within ${CONNECT_TIMEOUT_MS / 1000}s`, reach);
  }
  if (/Connection terminated|not queryable|Client has encountered a connection error/i.test(msg)) {
    return new UserError(`${where}: the connection to PostgreSQL at ${target} was lost (${msg})`, reach);
  }
  if (/SSL|certificate/i.test(msg)) return new UserError(`${where}: TLS problem: ${msg}`, reach);
  return e;
}

export class PostgresRegistry implements Registry {
  private readonly station = `${osHostname()}:${process.pid}`;
  /** One client, one transaction at a time: calls are queued. */
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(
    readonly location: string,
    private readonly client: pg.Client,
  ) {}

  /** Connects, then creates or migrates the schema (refusing one from a newer mkoverlay). */
  static async open(location: string): Promise<PostgresRegistry> {
    const client = new pg.Client({
      connectionString: location,
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      application_name: "mkoverlay",
      lock_timeout: LOCK_TIMEOUT_MS,
      keepAlive: true,
    });
    // An idle connection that drops emits 'error'; the next query reports it as a user error.
    client.on("error", () => undefined);
    try {
      await client.connect();
    } catch (e) {
      await client.end().catch(() => undefined);
      throw pgUserError(location, e);
    }
    const r = new PostgresRegistry(location, client);
    try {
      await r.migrate();
    } catch (e) {
      await client.end().catch(() => undefined);
      throw pgUserError(location, e);
    }
    return r;
  }

  private get where(): string {
    return `registry ${displayLocation(this.location)}`;
  }

  private async q<T extends pg.QueryResultRow = Record<string, unknown>>(text: string, values: unknown[] = []): Promise<T[]> {
    return (await this.client.query<T>(text, values)).rows;
  }

  /** Runs `fn` when every earlier call has finished; maps errors to user errors. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new Error("registry used after close()"));
    const p = this.queue.then(fn, fn);
    this.queue = p.catch(() => undefined);
    return p.catch((e: unknown) => {
      throw pgUserError(this.location, e);
    });
  }

  private async notify(hostname: string): Promise<void> {
    await this.q("SELECT pg_notify($1, $2)", [CHANGES_CHANNEL, hostname]);
  }

  private async tx<T>(fn: () => Promise<T>): Promise<T> {
    await this.q("BEGIN");
    try {
      const r = await fn();
      await this.q("COMMIT");
      return r;
    } catch (e) {
      await this.q("ROLLBACK").catch(() => undefined);
      throw e;
    }
  }

  private async version(): Promise<number | undefined> {
    const rows = await this.q<{ value: string }>("SELECT value FROM mkoverlay.meta WHERE key = 'schema_version'");
    return rows[0] ? Number(rows[0].value) : undefined;
  }

  private checkVersion(version: number): void {
    if (version > PG_SCHEMA_VERSION) {
      throw new UserError(`${this.where}: schema version ${version} was written by a newer mkoverlay (this one knows ${PG_SCHEMA_VERSION})`, {
        hint: "upgrade mkoverlay on this station",
      });
    }
  }

  private async migrate(): Promise<void> {
    // Fast path, no lock: an up-to-date registry (the common case) costs one query.
    try {
      const v = await this.version();
      if (v === PG_SCHEMA_VERSION) return;
      if (v !== undefined) this.checkVersion(v);
    } catch (e) {
      const code = (e as PgError).code;
      if (code !== "42P01" && code !== "3F000") throw e; // no table / no schema yet: create below
    }
    await this.tx(async () => {
      await this.q("SELECT pg_advisory_xact_lock($1, $2)", [LOCK_NS, LOCK_SCHEMA]);
      const [state] = await this.q<{ meta: boolean; tables: string }>(
        `SELECT to_regclass('mkoverlay.meta') IS NOT NULL AS meta,
                (SELECT count(*) FROM pg_tables WHERE schemaname = 'mkoverlay') AS tables`,
      );
      let version = 0;
      if (state?.meta) {
        const v = await this.version();
        if (v === undefined || !Number.isInteger(v) || v < 1) {
          throw new UserError(`${this.where}: the 'mkoverlay' schema has no valid schema_version; not touching it`);
        }
        version = v;
        this.checkVersion(version);
      } else if (Number(state?.tables ?? 0) > 0) {
        throw new UserError(`${this.where}: the database has a 'mkoverlay' schema that is not an mkoverlay registry; left untouched`);
      }
      for (let v = version; v < PG_SCHEMA_VERSION; v++) await this.q(MIGRATIONS[v]!);
      if (version < PG_SCHEMA_VERSION) {
        await this.q(
          `INSERT INTO mkoverlay.meta(key, value) VALUES ('schema_version', $1)
           ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value`,
          [String(PG_SCHEMA_VERSION)],
        );
      }
    });
  }

  reserve(req: ReserveRequest): Promise<DeviceRecord> {
    return this.exclusive(() =>
      this.tx(async (): Promise<DeviceRecord> => {
        await this.q("SELECT pg_advisory_xact_lock($1, $2)", [LOCK_NS, LOCK_RESERVE]);
        let name = req.hostname;
        if (name === undefined) {
          const [row] = await this.q<{ value: string }>("SELECT value FROM mkoverlay.meta WHERE key = 'seq'");
          let seq = Number(row?.value ?? 0);
          do {
            seq += 1;
            name = renderHostname(req.hostnameTemplate, seq);
          } while ((await this.q("SELECT 1 FROM mkoverlay.devices WHERE hostname = $1", [name])).length > 0);
          await this.q("UPDATE mkoverlay.meta SET value = $1 WHERE key = 'seq'", [String(seq)]);
        } else {
          const [taken] = await this.q<{ status: string }>("SELECT status FROM mkoverlay.devices WHERE hostname = $1", [name]);
          if (taken) throw hostnameTaken(name, taken.status);
        }
        const [dup] = await this.q<{ hostname: string }>("SELECT hostname FROM mkoverlay.devices WHERE fingerprint = $1", [req.fingerprint]);
        if (dup) throw keyTaken(dup.hostname);
        const port = await this.lowestFreePort(req.range.lo, req.range.hi);
        if (port === undefined) throw noFreePort(req.range);
        const row = pendingRow(req, name, port, this.station);
        await this.q(
          `INSERT INTO mkoverlay.devices (${DEVICE_COLUMNS}) VALUES (${DEVICE_KEYS.map((_, i) => `$${i + 1}`).join(", ")})`,
          DEVICE_KEYS.map((k) => row[k]),
        );
        await this.q("INSERT INTO mkoverlay.ports (port, hostname, purpose) VALUES ($1, $2, 'ssh')", [port, name]);
        const services: Record<string, number> = {};
        for (const svc of req.services) {
          const p = await this.lowestFreePort(req.serviceRange.lo, req.serviceRange.hi);
          if (p === undefined) throw noFreePort(req.serviceRange, svc);
          await this.q("INSERT INTO mkoverlay.ports (port, hostname, purpose) VALUES ($1, $2, $3)", [p, name, `service:${svc}`]);
          services[svc] = p;
        }
        await this.notify(name);
        return toRecord(row, services);
      }),
    );
  }

  /** Lowest port in [lo, hi] with no row in `ports`: the same walk as the SQLite backend. */
  private async lowestFreePort(lo: number, hi: number): Promise<number | undefined> {
    if ((await this.q("SELECT 1 FROM mkoverlay.ports WHERE port = $1", [lo])).length === 0) return lo;
    const [r] = await this.q<{ free: number }>(
      `SELECT p.port + 1 AS free FROM mkoverlay.ports p
       WHERE p.port >= $1 AND p.port < $2 AND NOT EXISTS (SELECT 1 FROM mkoverlay.ports q WHERE q.port = p.port + 1)
       ORDER BY p.port LIMIT 1`,
      [lo, hi],
    );
    return r?.free;
  }

  activate(hostname: string): Promise<void> {
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q("UPDATE mkoverlay.devices SET status = 'active', updated = $1 WHERE hostname = $2 AND status = 'pending'", [new Date().toISOString(), hostname]);
        await this.notify(hostname);
      }),
    );
  }

  abandon(hostname: string): Promise<void> {
    // Its ports go with it (ON DELETE CASCADE); a device that is no longer pending is kept whole.
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q("DELETE FROM mkoverlay.devices WHERE hostname = $1 AND status = 'pending'", [hostname]);
        await this.notify(hostname);
      }),
    );
  }

  updateDevice(hostname: string, f: { board: string; os: string; bastions: string[]; overlay: string }): Promise<void> {
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q("UPDATE mkoverlay.devices SET board = $1, os = $2, bastions = $3, overlay = $4, updated = $5 WHERE hostname = $6", [
          f.board,
          f.os,
          f.bastions.join(","),
          f.overlay,
          new Date().toISOString(),
          hostname,
        ]);
        await this.notify(hostname);
      }),
    );
  }

  revoke(hostname: string): Promise<void> {
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q("UPDATE mkoverlay.devices SET status = 'revoked', updated = $1 WHERE hostname = $2", [new Date().toISOString(), hostname]);
        await this.notify(hostname);
      }),
    );
  }

  release(hostname: string): Promise<void> {
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q("DELETE FROM mkoverlay.devices WHERE hostname = $1", [hostname]);
        await this.notify(hostname);
      }),
    );
  }

  rotate(hostname: string, publicKey: string, fingerprint: string, overlay: string, graceUntil?: string): Promise<void> {
    // SET reads the row as it was: the replaced key moves to prev_* in the same statement.
    const keep =
      graceUntil === undefined
        ? "prev_public_key = NULL, prev_fingerprint = NULL, prev_until = NULL"
        : "prev_public_key = public_key, prev_fingerprint = fingerprint, prev_until = $6";
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q(`UPDATE mkoverlay.devices SET ${keep}, public_key = $1, fingerprint = $2, overlay = $3, updated = $4 WHERE hostname = $5`, [
          publicKey,
          fingerprint,
          overlay,
          new Date().toISOString(),
          hostname,
          ...(graceUntil === undefined ? [] : [graceUntil]),
        ]);
        await this.notify(hostname);
      }),
    );
  }

  private async withServices(rows: DeviceRow[]): Promise<DeviceRecord[]> {
    if (rows.length === 0) return [];
    const ports =
      rows.length === 1
        ? await this.q<PortRow>("SELECT port, hostname, purpose FROM mkoverlay.ports WHERE hostname = $1 AND purpose LIKE 'service:%' ORDER BY port", [rows[0]!.hostname])
        : await this.q<PortRow>("SELECT port, hostname, purpose FROM mkoverlay.ports WHERE purpose LIKE 'service:%' ORDER BY port");
    const svc = new Map<string, Record<string, number>>();
    for (const p of ports) {
      const m = svc.get(p.hostname) ?? {};
      m[p.purpose.slice("service:".length)] = p.port;
      svc.set(p.hostname, m);
    }
    return rows.map((r) => toRecord(r, svc.get(r.hostname)));
  }

  pending(): Promise<DeviceRecord[]> {
    return this.exclusive(async () => this.withServices(await this.q<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM mkoverlay.devices WHERE status = 'pending' ORDER BY port`)));
  }

  get(hostname: string): Promise<DeviceRecord | undefined> {
    return this.exclusive(async () => {
      const rows = await this.q<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM mkoverlay.devices WHERE hostname = $1`, [hostname]);
      return (await this.withServices(rows))[0];
    });
  }

  getByFingerprint(fp: string): Promise<DeviceRecord | undefined> {
    return this.exclusive(async () => {
      const rows = await this.q<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM mkoverlay.devices WHERE fingerprint = $1`, [fp]);
      return (await this.withServices(rows))[0];
    });
  }

  list(): Promise<DeviceRecord[]> {
    return this.exclusive(async () => this.withServices(await this.q<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM mkoverlay.devices ORDER BY port`)));
  }

  // --- Whole-registry copy (mkoverlay registry migrate) ---

  private async readSnapshot(): Promise<Snapshot> {
    const [seq] = await this.q<{ value: string }>("SELECT value FROM mkoverlay.meta WHERE key = 'seq'");
    return {
      seq: Number(seq?.value ?? 0),
      devices: await this.q<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM mkoverlay.devices ORDER BY hostname`),
      ports: await this.q<PortRow>("SELECT port, hostname, purpose FROM mkoverlay.ports ORDER BY port"),
    };
  }

  /** A consistent copy of everything; no station can write until `fn` has finished. */
  withFrozenSnapshot<T>(fn: (s: Snapshot) => Promise<T>): Promise<T> {
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q("LOCK TABLE mkoverlay.meta, mkoverlay.devices, mkoverlay.ports IN EXCLUSIVE MODE");
        return fn(await this.readSnapshot());
      }),
    );
  }

  snapshot(): Promise<Snapshot> {
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ");
        return this.readSnapshot();
      }),
    );
  }

  /**
   * Replaces the whole content with `s` in one transaction. Refuses a registry that holds
   * devices or has handed out names, unless `force`.
   */
  replaceAll(s: Snapshot, force: boolean): Promise<void> {
    return this.exclusive(() =>
      this.tx(async () => {
        await this.q("SELECT pg_advisory_xact_lock($1, $2)", [LOCK_NS, LOCK_RESERVE]);
        await this.q("LOCK TABLE mkoverlay.meta, mkoverlay.devices, mkoverlay.ports IN EXCLUSIVE MODE");
        const [n] = await this.q<{ devices: string; seq: string }>(
          "SELECT (SELECT count(*) FROM mkoverlay.devices) AS devices, (SELECT value FROM mkoverlay.meta WHERE key = 'seq') AS seq",
        );
        const devices = Number(n?.devices ?? 0);
        const seq = Number(n?.seq ?? 0);
        if (!force && (devices > 0 || seq > 0)) {
          throw new UserError(`${this.where}: not empty (${devices} device(s), name counter at ${seq}); nothing copied`, {
            hint: "pass --force to replace its whole content",
          });
        }
        await this.q("DELETE FROM mkoverlay.ports");
        await this.q("DELETE FROM mkoverlay.devices");
        const col = <K extends keyof DeviceRow>(k: K) => s.devices.map((d) => d[k]);
        await this.q(
          `INSERT INTO mkoverlay.devices (${DEVICE_COLUMNS})
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                                $13::text[], $14::text[], $15::text[])`,
          [
            col("hostname"),
            col("board"),
            col("os"),
            col("bastions"),
            col("port"),
            col("public_key"),
            col("fingerprint"),
            col("status"),
            col("overlay"),
            col("station"),
            col("created"),
            col("updated"),
            col("prev_public_key"),
            col("prev_fingerprint"),
            col("prev_until"),
          ],
        );
        await this.q("INSERT INTO mkoverlay.ports (port, hostname, purpose) SELECT * FROM unnest($1::int[], $2::text[], $3::text[])", [
          s.ports.map((p) => p.port),
          s.ports.map((p) => p.hostname),
          s.ports.map((p) => p.purpose),
        ]);
        await this.q("UPDATE mkoverlay.meta SET value = $1 WHERE key = 'seq'", [String(s.seq)]);
        await this.notify("*");
      }),
    );
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.queue;
    this.closed = true;
    await this.client.end().catch(() => undefined);
  }
}
