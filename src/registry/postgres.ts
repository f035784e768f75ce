/**
 * The PostgreSQL adapter (`registry: postgres://user@host:5432/db`), for several stations on
 * several machines. Everything the registry does is in core.ts; this module connects, locks,
 * announces changes and words server trouble as one-line errors. It imports `pg`, so open.ts
 * loads it only for a postgres:// registry.
 *
 * Locking: a `write` transaction first takes a transaction-scoped advisory lock
 * (`pg_advisory_xact_lock`, one key per database), the counterpart of SQLite's BEGIN IMMEDIATE:
 * stations write one at a time, and each statement after the lock sees everything the previous
 * holder committed (READ COMMITTED; PostgreSQL publishes a commit before it drops the holder's
 * locks). The lock ends with COMMIT or ROLLBACK, and a station that dies has its transaction
 * rolled back and its lock dropped when the server sees the connection close. A lock was chosen
 * over SERIALIZABLE with retries: no retry loop, waiting stations served in turn.
 *
 * The tables live in a schema of their own, `mkoverlay` (the connection's search_path), so the
 * core's unqualified SQL is the same on both databases. Changes are announced with NOTIFY on
 * `mkoverlay_changes` (payload: the host name) in the same transaction, for bastion agents.
 */
import pg from "pg";
import { UserError } from "../util/errors.js";
import { displayLocation } from "../config/registry-location.js";
import { QueuedDriver, type Queryable, type SqlDriver, type TxMode, type TxOptions } from "./sql.js";

const PG_NAMESPACE = "mkoverlay";
const CHANGES_CHANNEL = "mkoverlay_changes";

/** Advisory lock keys: (namespace, purpose). Advisory locks are per database. */
const LOCK_NS = 0x6d6b6f76; // "mkov"
const LOCK_SCHEMA = 1;
const LOCK_WRITE = 2;

const CONNECT_TIMEOUT_MS = 10_000;
/** Like the SQLite busy timeout: how long a station waits for another's write. */
const LOCK_TIMEOUT_MS = 30_000;

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
function pgUserError(location: string, e: unknown): unknown {
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

/** `?` placeholders (the core's SQL never has a `?` inside a literal) → `$1, $2, …`. */
function numbered(sql: string): string {
  let i = 0;
  return sql.replace(/\?/g, () => `$${++i}`);
}

/** A client for a registry URL, its tables first on the search path. */
function pgClient(location: string): pg.Client {
  return new pg.Client({
    connectionString: location,
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    application_name: "mkoverlay",
    lock_timeout: LOCK_TIMEOUT_MS,
    keepAlive: true,
    options: `-c search_path=${PG_NAMESPACE}`,
  });
}

export class PostgresDriver extends QueuedDriver implements SqlDriver {
  readonly dialect = "postgres";
  readonly nowMs = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";
  readonly where: string;
  protected readonly q: Queryable;

  private constructor(
    private readonly location: string,
    private readonly client: pg.Client,
  ) {
    super();
    this.where = displayLocation(location);
    const query = async <T>(sql: string, params: readonly unknown[] = []) => (await this.client.query(numbered(sql), params as unknown[])) as unknown as { rows: T[]; rowCount: number | null };
    this.q = {
      all: async <T>(sql: string, params?: readonly unknown[]) => (await query<T>(sql, params)).rows,
      get: async <T>(sql: string, params?: readonly unknown[]) => (await query<T>(sql, params)).rows[0],
      run: async (sql: string, params?: readonly unknown[]) => (await query(sql, params)).rowCount ?? 0,
    };
  }

  static async open(location: string): Promise<PostgresDriver> {
    const client = pgClient(location);
    // An idle connection that drops emits 'error'; the next query reports it as a user error.
    client.on("error", () => undefined);
    try {
      await client.connect();
    } catch (e) {
      await client.end().catch(() => undefined);
      throw pgUserError(location, e);
    }
    return new PostgresDriver(location, client);
  }

  protected userError(e: unknown): unknown {
    return pgUserError(this.location, e);
  }

  transaction<T>(mode: TxMode, fn: (q: Queryable) => Promise<T>, opts: TxOptions = {}): Promise<T> {
    return this.exclusive(async () => {
      await this.q.run(mode === "read" ? "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY" : "BEGIN");
      try {
        if (mode === "write") await this.q.run("SELECT pg_advisory_xact_lock(?, ?)", [LOCK_NS, LOCK_WRITE]);
        if (mode === "schema") {
          await this.q.run("SELECT pg_advisory_xact_lock(?, ?)", [LOCK_NS, LOCK_SCHEMA]);
          await this.q.run(`CREATE SCHEMA IF NOT EXISTS ${PG_NAMESPACE}`);
        }
        if (opts.durable === false) await this.q.run("SET LOCAL synchronous_commit = off");
        const r = await fn(this.q);
        await this.q.run("COMMIT");
        return r;
      } catch (e) {
        await this.q.run("ROLLBACK").catch(() => undefined);
        throw e;
      }
    });
  }

  async ddl(q: Queryable, statements: readonly string[]): Promise<void> {
    for (const s of statements) await q.run(s);
  }

  async tables(q: Queryable): Promise<string[]> {
    return (await q.all<{ name: string }>("SELECT tablename AS name FROM pg_tables WHERE schemaname = ?", [PG_NAMESPACE])).map((r) => r.name);
  }

  async notify(q: Queryable, hostname: string): Promise<void> {
    await q.run("SELECT pg_notify(?, ?)", [CHANGES_CHANNEL, hostname]);
  }

  protected async release(): Promise<void> {
    await this.client.end().catch(() => undefined);
  }
}
