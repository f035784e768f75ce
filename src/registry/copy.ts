/**
 * Whole-registry copy between backends (`mkoverlay registry migrate`): every device row as it
 * is (ports, keys, status — pending, active, revoked/quarantined —, overlay, station, times),
 * every port row (ssh and service ports with their purpose) and the name counter `seq`.
 *
 * The source is frozen for writing while the copy runs (SQLite: BEGIN IMMEDIATE; PostgreSQL:
 * LOCK TABLE … IN EXCLUSIVE MODE), so a build on another station waits instead of slipping in
 * unseen. The target is replaced in one transaction, then read back and compared with the
 * source. A non-empty target is refused unless `force`.
 *
 * Both backends share one table layout (devices, ports, meta); the SQLite side is read and
 * written here with better-sqlite3 after `SqliteRegistry` has checked or created the file.
 */
import { existsSync, realpathSync, rmSync, statSync } from "node:fs";
import { UserError } from "../errors.js";
import { displayLocation, isPostgresUrl, isRegistryUrl } from "./open.js";
import { DEVICE_KEYS, type DeviceRow } from "./rows.js";
import type { DeviceStatus } from "./types.js";

export type { DeviceRow };

export interface PortRow {
  port: number;
  hostname: string;
  purpose: string;
}

export interface Snapshot {
  seq: number;
  devices: DeviceRow[];
  ports: PortRow[];
}

/** The SQLite table layout this module reads and writes (sqlite.ts SCHEMA_VERSION). */
const SQLITE_LAYOUT = 2;


interface CopyEnd {
  readonly display: string;
  /** A consistent read of everything; nobody can write until `fn` has finished. */
  withFrozenSnapshot<T>(fn: (s: Snapshot) => Promise<T>): Promise<T>;
  snapshot(): Promise<Snapshot>;
  replaceAll(s: Snapshot, force: boolean): Promise<void>;
  close(): Promise<void>;
  /** Removes what opening created (a new registry file), after a failed copy. */
  discard(): Promise<void>;
}

async function openPostgresEnd(url: string): Promise<CopyEnd> {
  const { PostgresRegistry } = await import("./postgres.js");
  const r = await PostgresRegistry.open(url);
  return {
    display: displayLocation(url),
    withFrozenSnapshot: (fn) => r.withFrozenSnapshot(fn),
    snapshot: () => r.snapshot(),
    replaceAll: (s, force) => r.replaceAll(s, force),
    close: () => r.close(),
    discard: async () => undefined, // the failed transaction left nothing behind
  };
}

async function openSqliteEnd(file: string, mustExist: boolean): Promise<CopyEnd> {
  const { SqliteRegistry, SCHEMA_VERSION } = await import("./sqlite.js");
  if (SCHEMA_VERSION !== SQLITE_LAYOUT) {
    throw new Error(`registry copy knows the SQLite layout of schema ${SQLITE_LAYOUT}, but sqlite.ts is at ${SCHEMA_VERSION}: update src/registry/copy.ts`);
  }
  const fresh = !existsSync(file) || (statSync(file).isFile() && statSync(file).size === 0);
  if (mustExist && fresh) throw new UserError(`registry ${file}: does not exist (or is empty); nothing to copy`);
  // Checks the file (not a registry, newer schema…) and creates the schema in a new one.
  await new SqliteRegistry(file).close();
  const { default: Database } = await import("better-sqlite3");
  let db: InstanceType<typeof Database>;
  try {
    db = new Database(file, { timeout: 30_000 });
    db.pragma("foreign_keys = ON");
    db.pragma("synchronous = FULL");
  } catch (e) {
    throw new UserError(`registry ${file}: cannot open (${(e as Error).message})`);
  }
  const read = (): Snapshot => ({
    seq: Number((db.prepare("SELECT value FROM meta WHERE key = 'seq'").get() as { value: string } | undefined)?.value ?? 0),
    devices: db.prepare(`SELECT ${DEVICE_KEYS.join(", ")} FROM devices ORDER BY hostname`).all() as DeviceRow[],
    ports: db.prepare("SELECT port, hostname, purpose FROM ports ORDER BY port").all() as PortRow[],
  });
  let open = true;
  const close = async () => {
    if (open) db.close();
    open = false;
  };
  return {
    display: file,
    async withFrozenSnapshot<T>(fn: (s: Snapshot) => Promise<T>): Promise<T> {
      db.exec("BEGIN IMMEDIATE");
      try {
        return await fn(read());
      } finally {
        db.exec("ROLLBACK"); // nothing was written: only the write lock ends
      }
    },
    snapshot: async () => db.transaction(read).deferred(),
    async replaceAll(s: Snapshot, force: boolean): Promise<void> {
      const tx = db.transaction(() => {
        const devices = (db.prepare("SELECT count(*) AS n FROM devices").get() as { n: number }).n;
        const seq = Number((db.prepare("SELECT value FROM meta WHERE key = 'seq'").get() as { value: string } | undefined)?.value ?? 0);
        if (!force && (devices > 0 || seq > 0)) {
          throw new UserError(`registry ${file}: not empty (${devices} device(s), name counter at ${seq}); nothing copied`, {
            hint: "pass --force to replace its whole content",
          });
        }
        db.exec("DELETE FROM ports; DELETE FROM devices;");
        const dev = db.prepare(`INSERT INTO devices (${DEVICE_KEYS.join(", ")}) VALUES (${DEVICE_KEYS.map((k) => `@${k}`).join(", ")})`);
        for (const d of s.devices) dev.run(d);
        const port = db.prepare("INSERT INTO ports (port, hostname, purpose) VALUES (@port, @hostname, @purpose)");
        for (const p of s.ports) port.run(p);
        db.prepare("INSERT INTO meta (key, value) VALUES ('seq', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value").run(String(s.seq));
      });
      tx.immediate();
    },
    close,
    async discard() {
      await close();
      if (fresh) for (const f of [file, `${file}-wal`, `${file}-shm`]) rmSync(f, { force: true });
    },
  };
}

async function openEnd(location: string, mustExist: boolean): Promise<CopyEnd> {
  if (isPostgresUrl(location)) return openPostgresEnd(location);
  if (isRegistryUrl(location)) {
    throw new UserError(`registry ${displayLocation(location)}: unsupported kind of registry`, {
      hint: "use a file path (embedded SQLite registry) or postgres://user@host:5432/database",
    });
  }
  return openSqliteEnd(location, mustExist);
}

/** Rows in one order and one shape, whatever the backend's collation and driver. */
function canonical(s: Snapshot): string {
  const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
  return JSON.stringify({
    seq: s.seq,
    devices: [...s.devices].sort((a, b) => cmp(a.hostname, b.hostname)).map((d) => DEVICE_KEYS.map((k) => d[k] ?? null)),
    ports: [...s.ports].sort((a, b) => a.port - b.port).map((p) => [Number(p.port), p.hostname, p.purpose]),
  });
}

/** Same server and database, whatever the user, scheme spelling or parameters. */
function sameDatabase(a: string, b: string): boolean {
  const key = (u: string) => {
    try {
      const url = new URL(u);
      const host = (url.searchParams.get("host") ?? url.hostname).toLowerCase() || "localhost";
      return `${host}:${url.port || "5432"}/${decodeURIComponent(url.pathname.slice(1))}`;
    } catch {
      return u;
    }
  };
  return key(a) === key(b);
}

function sameFile(a: string, b: string): boolean {
  const real = (f: string) => {
    try {
      return realpathSync(f);
    } catch {
      return f;
    }
  };
  return real(a) === real(b);
}

export interface CopySummary {
  from: string;
  to: string;
  devices: number;
  ports: number;
  seq: number;
  statuses: Record<DeviceStatus, number>;
}

/** Copies the registry at `from` into `to` (file path or postgres:// URL). */
export async function copyRegistry(from: string, to: string, opts: { force: boolean }): Promise<CopySummary> {
  const same = isRegistryUrl(from) || isRegistryUrl(to) ? isRegistryUrl(from) && isRegistryUrl(to) && sameDatabase(from, to) : sameFile(from, to);
  if (same) {
    throw new UserError(`registry migrate: the target ${displayLocation(to)} is the registry in use`, { hint: "give --to another file or database" });
  }
  const source = await openEnd(from, true);
  let target: CopyEnd | undefined;
  let copied = false;
  try {
    target = await openEnd(to, false);
    const t = target;
    const s = await source.withFrozenSnapshot(async (snap) => {
      await t.replaceAll(snap, opts.force);
      const back = await t.snapshot();
      if (canonical(back) !== canonical(snap)) {
        throw new Error(`registry migrate: ${t.display} does not read back what was copied from ${source.display}`);
      }
      return snap;
    });
    copied = true;
    const statuses: Record<DeviceStatus, number> = { pending: 0, active: 0, revoked: 0 };
    for (const d of s.devices) statuses[d.status] += 1;
    return { from: source.display, to: t.display, devices: s.devices.length, ports: s.ports.length, seq: s.seq, statuses };
  } finally {
    await source.close();
    if (target) {
      if (!copied) await target.discard();
      await target.close();
    }
  }
}
