/**
 * The embedded registry's adapter: one SQLite file (better-sqlite3) shared by the station's
 * processes. WAL mode plus a busy timeout; a `write` transaction is BEGIN IMMEDIATE, so two
 * builds never see the same free port. Everything else is the registry core's.
 */
import Database from "better-sqlite3";
import { closeSync, existsSync, openSync, readSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { errnoCode, UserError } from "../util/errors.js";
import { QueuedDriver, type Queryable, type SqlDriver, type TxMode, type TxOptions } from "./sql.js";

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
const BUSY_MS = 30_000;

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

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

export class SqliteDriver extends QueuedDriver implements SqlDriver {
  readonly dialect = "sqlite";
  readonly nowMs = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)";
  private readonly db: Database.Database;
  private readonly statements = new Map<string, Database.Statement>();
  protected readonly q: Queryable;

  constructor(readonly where: string) {
    super();
    checkIsDatabase(where);
    try {
      this.db = new Database(where, { timeout: BUSY_MS, ...nativeBinding() });
    } catch (e) {
      throw new UserError(`registry ${where}: cannot open (${(e as Error).message})`);
    }
    try {
      // Switching a new file to WAL needs a moment alone with it: when stations start together
      // it answers SQLITE_BUSY at once (the busy timeout does not cover it), so retry briefly.
      for (const deadline = Date.now() + BUSY_MS; ; ) {
        try {
          this.db.pragma("journal_mode = WAL");
          break;
        } catch (e) {
          if ((e as { code?: string }).code !== "SQLITE_BUSY" || Date.now() > deadline) throw e;
          sleepSync(10 + Math.random() * 20);
        }
      }
      this.db.pragma("foreign_keys = ON");
      this.db.pragma("synchronous = FULL");
    } catch (e) {
      this.db.close();
      throw this.userError(e);
    }
    const stmt = (sql: string) => this.stmt(sql);
    this.q = {
      all: async <T>(sql: string, params: readonly unknown[] = []) => stmt(sql).all(...params) as T[],
      get: async <T>(sql: string, params: readonly unknown[] = []) => stmt(sql).get(...params) as T | undefined,
      run: async (sql: string, params: readonly unknown[] = []) => stmt(sql).run(...params).changes,
    };
  }

  /** Prepared once per connection: a batch runs the same few statements thousands of times. */
  private stmt(sql: string): Database.Statement {
    let st = this.statements.get(sql);
    if (!st) {
      st = this.db.prepare(sql);
      this.statements.set(sql, st);
    }
    return st;
  }

  protected userError(e: unknown): unknown {
    if (e instanceof UserError || !(e instanceof Error)) return e;
    const code = (e as { code?: string }).code ?? "";
    if (code === "SQLITE_BUSY") return new UserError(`registry ${this.where}: another station held the registry for over ${BUSY_MS / 1000}s`, { hint: "try again" });
    if (/^SQLITE_(CANTOPEN|READONLY|IOERR|FULL|NOTADB|CORRUPT|PERM)/.test(code)) return new UserError(`registry ${this.where}: unusable (${e.message})`);
    return e;
  }

  transaction<T>(mode: TxMode, fn: (q: Queryable) => Promise<T>, opts: TxOptions = {}): Promise<T> {
    return this.exclusive(async () => {
      const relaxed = opts.durable === false;
      if (relaxed) this.db.pragma("synchronous = NORMAL");
      try {
        this.db.exec(mode === "read" ? "BEGIN" : "BEGIN IMMEDIATE");
        try {
          const r = await fn(this.q);
          this.db.exec("COMMIT");
          return r;
        } catch (e) {
          if (this.db.inTransaction) this.db.exec("ROLLBACK");
          throw e;
        }
      } finally {
        if (relaxed) this.db.pragma("synchronous = FULL");
      }
    });
  }

  async ddl(_q: Queryable, statements: readonly string[]): Promise<void> {
    for (const s of statements) this.db.exec(s);
  }

  async tables(q: Queryable): Promise<string[]> {
    return (await q.all<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")).map((r) => r.name);
  }

  /** Bastions on this machine watch the file itself: nothing to announce. */
  async notify(): Promise<void> {}

  protected async release(): Promise<void> {
    if (this.db.open) this.db.close();
  }
}
