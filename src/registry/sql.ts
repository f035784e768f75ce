/**
 * The small SQL interface the registry core runs on. Each database is an adapter of this
 * (sqlite.ts, postgres.ts): connection, placeholders, locking and error wording live there;
 * the schema, the reservation algorithm and every rule live once, in core.ts.
 *
 * SQL given to a driver uses `?` placeholders and unqualified table names; PostgreSQL's
 * adapter numbers the placeholders and keeps its tables in a schema of their own.
 */

export interface Queryable {
  all<T>(sql: string, params?: readonly unknown[]): Promise<T[]>;
  get<T>(sql: string, params?: readonly unknown[]): Promise<T | undefined>;
  /** Runs a statement; returns the number of rows it changed. */
  run(sql: string, params?: readonly unknown[]): Promise<number>;
}

/**
 * - `read`: a consistent snapshot;
 * - `write`: serialized with every other writer of this registry, on every station (SQLite
 *   `BEGIN IMMEDIATE`; PostgreSQL a transaction-scoped advisory lock), so what it reads stays
 *   true until it commits;
 * - `schema`: creating or migrating the tables (its own lock).
 */
export type TxMode = "read" | "write" | "schema";

export interface TxOptions {
  /**
   * false: the commit need not wait for the disk (SQLite `synchronous = NORMAL`, PostgreSQL
   * `synchronous_commit = off`). Only for changes whose loss the doctor repairs (activations).
   */
  durable?: boolean;
}

export interface SqlDriver extends Queryable {
  readonly dialect: "sqlite" | "postgres";
  /** Where it lives, as it may be printed (no password). */
  readonly where: string;
  /** The database's clock, in ms since the epoch, as an SQL expression. */
  readonly nowMs: string;
  /** Runs `fn` in a transaction; rolled back if it throws. Calls are queued: one at a time. */
  transaction<T>(mode: TxMode, fn: (q: Queryable) => Promise<T>, opts?: TxOptions): Promise<T>;
  /** Runs DDL statements inside a `schema` transaction. */
  ddl(q: Queryable, statements: readonly string[]): Promise<void>;
  /** Names of this registry's existing tables. */
  tables(q: Queryable): Promise<string[]>;
  /** Tells listening bastions that `hostname` changed, when the current transaction commits. */
  notify(q: Queryable, hostname: string): Promise<void>;
  close(): Promise<void>;
}

/**
 * What both adapters share: one connection, one call at a time. A call waits for the one
 * before it (a lease renewal may fire during a batch), and what it throws is the adapter's
 * user error. `q` runs on the connection directly (inside a transaction already queued).
 */
export abstract class QueuedDriver implements Queryable {
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;
  protected abstract readonly q: Queryable;
  /** The adapter's wording of a database error (a UserError), or the error as it was. */
  protected abstract userError(e: unknown): unknown;
  /** Closes the connection; called once, after the queued calls. */
  protected abstract release(): Promise<void>;

  protected exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new Error("registry used after close()"));
    const p = this.queue.then(fn, fn);
    this.queue = p.catch(() => undefined);
    return p.catch((e: unknown) => {
      throw this.userError(e);
    });
  }

  all<T>(sql: string, params?: readonly unknown[]): Promise<T[]> {
    return this.exclusive(() => this.q.all<T>(sql, params));
  }

  get<T>(sql: string, params?: readonly unknown[]): Promise<T | undefined> {
    return this.exclusive(() => this.q.get<T>(sql, params));
  }

  run(sql: string, params?: readonly unknown[]): Promise<number> {
    return this.exclusive(() => this.q.run(sql, params));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.queue;
    this.closed = true;
    await this.release();
  }
}

/** A savepoint inside a transaction: a failing `fn` leaves no trace, the transaction goes on. */
export async function savepoint<T>(q: Queryable, fn: () => Promise<T>): Promise<T> {
  await q.run("SAVEPOINT mko_one");
  try {
    const r = await fn();
    await q.run("RELEASE SAVEPOINT mko_one");
    return r;
  } catch (e) {
    await q.run("ROLLBACK TO SAVEPOINT mko_one");
    await q.run("RELEASE SAVEPOINT mko_one");
    throw e;
  }
}
