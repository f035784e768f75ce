/**
 * The registry, once: schema and its versions, the reservation algorithm, leases on unfinished
 * work, key rotation, revocation, the doctor's compare-and-set steps, snapshot and replace. It
 * runs on the small SQL interface of sql.ts; sqlite.ts and postgres.ts only connect, lock and
 * word their errors.
 *
 * Reservations: every write runs in a `write` transaction, which every station of the registry
 * takes in turn (SQLite BEGIN IMMEDIATE; PostgreSQL an advisory lock), so what a reservation
 * reads — the name counter, the lowest free port — stays true until it commits. UNIQUE ports,
 * fingerprints and host names stay in the schema as a second guard.
 *
 * Leases: a reservation (`pending` device) or a rotation (pending key) belongs to the station
 * that started it while its lease runs; the station renews it while it works and confirms it
 * right before its output takes its final name. `registry doctor` only touches work whose lease
 * ran out (or whose station is a dead process on this host), and only by compare-and-set on the
 * lease it saw, so it can never take back a reservation that is still being built.
 */
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { hostname as osHostname } from "node:os";
import { renderHostname } from "../config/rules.js";
import type { PortRange } from "../config/fleet.js";
import type { DialGroup } from "../config/compat.js";
import { UserError } from "../util/errors.js";
import { DEVICE_COLUMNS, DEVICE_KEYS, hostnameTaken, keyTaken, noFreePort, normalizeRow, ReservationLost, toRecord } from "./rows.js";
import { MIGRATIONS, SCHEMA_VERSION } from "./schema.js";
import { savepoint, type Queryable, type SqlDriver } from "./sql.js";
import { testOnlyPause } from "./test-pause.js";
import { OBSERVATION_COLUMNS, type AttributeRow, type DeviceRecord, type DeviceRow, type DeviceState, type Observation, type ObservationRow, type Observations, type PortRow, type Registry, type ReserveRequest, type Snapshot, type Unfinished } from "./types.js";

/** How long unfinished work stays a station's own without a renewal. */
export function leaseMs(): number {
  const v = Number(process.env.MKOVERLAY_LEASE_SECONDS);
  return Number.isFinite(v) && v > 0 ? v * 1000 : 120_000;
}

/** This boot of this machine (random per boot, so two cloned stations never share it). */
export function bootId(): string {
  try {
    return readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim().replace(/-/g, "").slice(0, 12);
  } catch {
    return "noboot";
  }
}

/** The start time of process `pid`, in clock ticks since boot (field 22 of /proc/PID/stat). */
function startTime(pid: number | string): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

/**
 * This process, as recorded on its work: host name, pid, the pid's start time (pids are reused)
 * and the boot id (host names are not unique: stations cloned from one image share theirs).
 */
function stationId(): string {
  return `${osHostname()}:${process.pid}:${startTime(process.pid) ?? randomBytes(4).toString("hex")}:${bootId()}`;
}

/**
 * True when `station` is a process of this very boot of this machine that no longer runs (its
 * work is abandoned for sure). False when it runs, or when this machine cannot tell (another
 * machine or boot, an older format).
 */
export function stationIsDead(station: string): boolean {
  const [host, pid, start, boot] = station.split(":");
  if (host !== osHostname() || boot !== bootId() || !/^\d+$/.test(pid ?? "") || !/^\d+$/.test(start ?? "")) return false;
  return startTime(pid!) !== start;
}

const SEQ = "SELECT value FROM meta WHERE key = 'seq'";
const UPSERT_META = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
const HINT = "free_from:";
/** Rows per INSERT when a whole registry is copied in. */
const BULK = 200;

const iso = (d: Date = new Date()): string => d.toISOString();
/** PostgreSQL gives BIGINT and count() as text: numeric-looking numbers back to numbers. */
const numbersAsNumbers = (r: ObservationRow): ObservationRow =>
  Object.fromEntries(Object.entries(r).map(([k, v]) => [k, typeof v === "string" && /^(port|interval_s|connected)$/.test(k) ? Number(v) : v]));
const marks = (n: number): string => Array.from({ length: n }, () => "?").join(", ");

export class RegistryCore implements Registry {
  readonly station = stationId();

  private constructor(private readonly db: SqlDriver) {}

  /** Opens a registry on `db`: creates or migrates its tables, refusing what is not a registry. */
  static async open(db: SqlDriver): Promise<RegistryCore> {
    const r = new RegistryCore(db);
    try {
      await r.migrate();
    } catch (e) {
      await db.close();
      throw e;
    }
    return r;
  }

  get where(): string {
    return this.db.where;
  }

  // --- schema ---

  private async migrate(): Promise<void> {
    // The common case, an up-to-date registry, costs one read and no lock.
    if ((await this.db.transaction("read", (q) => this.version(q))) === SCHEMA_VERSION) return;
    await this.db.transaction("schema", async (q) => {
      const from = await this.version(q);
      for (let v = from; v < SCHEMA_VERSION; v++) await this.db.ddl(q, MIGRATIONS[v]!);
      if (from < SCHEMA_VERSION) await q.run(UPSERT_META, ["schema_version", String(SCHEMA_VERSION)]);
    });
  }

  /** The schema version: 0 for an empty database. Refuses foreign or newer content, untouched. */
  private async version(q: Queryable): Promise<number> {
    const tables = await this.db.tables(q);
    if (!tables.includes("meta")) {
      if (tables.length > 0) throw new UserError(`registry ${this.where}: a database, but not an mkoverlay registry (it holds other tables); left untouched`);
      return 0;
    }
    const v = Number((await q.get<{ value: string }>("SELECT value FROM meta WHERE key = 'schema_version'"))?.value);
    if (!Number.isInteger(v) || v < 1) throw new UserError(`registry ${this.where}: no valid schema_version; not an mkoverlay registry, left untouched`);
    if (v > SCHEMA_VERSION) {
      throw new UserError(`registry ${this.where}: schema version ${v} was written by a newer mkoverlay (this one knows ${SCHEMA_VERSION})`, {
        hint: "upgrade mkoverlay on this station",
      });
    }
    return v;
  }

  // --- reservations ---

  /** Refuses a key that is any device's current, previous (in grace) or pending key. */
  private async checkKeyFree(q: Queryable, fp: string): Promise<void> {
    const hit = await q.get<{ hostname: string; how: string }>(
      `SELECT hostname, 'already registered to' AS how FROM devices WHERE fingerprint = ?
       UNION ALL SELECT hostname, 'the previous key of' AS how FROM devices WHERE prev_fingerprint = ?
       UNION ALL SELECT hostname, 'being rotated in on' AS how FROM devices WHERE pending_fingerprint = ?`,
      [fp, fp, fp],
    );
    if (hit) throw keyTaken(hit.hostname, hit.how);
  }

  private async reserveOne(q: Queryable, req: ReserveRequest): Promise<DeviceRecord> {
    let name = req.hostname;
    if (name === undefined) {
      let seq = Number((await q.get<{ value: string }>(SEQ))?.value ?? 0);
      do {
        seq += 1;
        name = renderHostname(req.hostnameTemplate, seq);
      } while (await q.get("SELECT 1 AS taken FROM devices WHERE hostname = ?", [name]));
      await q.run("UPDATE meta SET value = ? WHERE key = 'seq'", [String(seq)]);
    } else {
      const taken = await q.get<{ status: string }>("SELECT status FROM devices WHERE hostname = ?", [name]);
      if (taken) throw hostnameTaken(name, taken.status);
    }
    await this.checkKeyFree(q, req.fingerprint);
    const port = await this.lowestFreePort(q, req.range);
    if (port === undefined) throw noFreePort(req.range);
    const now = iso(req.now);
    const row: DeviceRow = {
      hostname: name,
      board: req.board,
      os: req.os,
      bastions: req.bastions.join(","),
      port,
      public_key: req.publicKey,
      fingerprint: req.fingerprint,
      status: "pending",
      overlay: req.overlayPath(name),
      station: this.station,
      created: now,
      updated: now,
      lease_until: null,
      pending_public_key: null,
      pending_fingerprint: null,
      prev_public_key: null,
      prev_fingerprint: null,
      prev_until: null,
      dials: req.dials ?? null,
      pending_dials: null,
      prev_dials: null,
    };
    const cols = DEVICE_KEYS.filter((k) => k !== "lease_until");
    await q.run(`INSERT INTO devices (${cols.join(", ")}, lease_until) VALUES (${marks(cols.length)}, ${this.db.nowMs} + ?)`, [...cols.map((k) => row[k]), leaseMs()]);
    await q.run("INSERT INTO ports (port, hostname, purpose) VALUES (?, ?, 'ssh')", [port, name]);
    const services: Record<string, number> = {};
    for (const svc of req.services) {
      const p = await this.lowestFreePort(q, req.serviceRange);
      if (p === undefined) throw noFreePort(req.serviceRange, svc);
      await q.run("INSERT INTO ports (port, hostname, purpose) VALUES (?, ?, ?)", [p, name, `service:${svc}`]);
      services[svc] = p;
    }
    const attributes = req.attributes ?? {};
    for (const [k, v] of Object.entries(attributes)) await q.run("INSERT INTO attributes (hostname, key, value) VALUES (?, ?, ?)", [name, k, v]);
    await testOnlyPause("in-reserve", name); // inert unless a test sets its variable
    return toRecord(row, services, attributes);
  }

  async reserve(req: ReserveRequest): Promise<DeviceRecord> {
    const d = await this.db.transaction("write", (q) => this.reserveOne(q, req));
    await testOnlyPause("reserved", d.hostname); // inert unless a test sets its variable
    return d;
  }

  reserveMany(reqs: ReserveRequest[]): Promise<(DeviceRecord | UserError)[]> {
    // One write transaction (one sync) for the lot; each device in its own savepoint, so a
    // device that fails leaves no trace and the others stand.
    return this.db.transaction("write", async (q) => {
      const out: (DeviceRecord | UserError)[] = [];
      for (const req of reqs) {
        try {
          out.push(await savepoint(q, () => this.reserveOne(q, req)));
        } catch (e) {
          if (!(e instanceof UserError)) throw e;
          out.push(e);
        }
      }
      return out;
    });
  }

  /**
   * Lowest port in [lo, hi] with no row in `ports`. A hint per range (meta `free_from:LO-HI`)
   * records that every port below it is taken, so the walk starts there instead of at `lo`:
   * the cost of a reservation does not grow with the fleet. Freeing a port lowers the hint, and
   * a hint that finds nothing is checked once from `lo`, so a stale hint can never make a range
   * look full.
   */
  private async lowestFreePort(q: Queryable, range: PortRange): Promise<number | undefined> {
    const key = `${HINT}${range.lo}-${range.hi}`;
    const hint = Number((await q.get<{ value: string }>("SELECT value FROM meta WHERE key = ?", [key]))?.value ?? range.lo);
    const from = Math.max(range.lo, Number.isInteger(hint) ? hint : range.lo);
    let port = await this.firstFree(q, from, range.hi);
    if (port === undefined && from > range.lo) port = await this.firstFree(q, range.lo, range.hi);
    if (port !== undefined) await q.run(UPSERT_META, [key, String(port + 1)]);
    return port;
  }

  private async firstFree(q: Queryable, lo: number, hi: number): Promise<number | undefined> {
    if (lo > hi) return undefined;
    if (!(await q.get("SELECT 1 AS taken FROM ports WHERE port = ?", [lo]))) return lo;
    const r = await q.get<{ free: number }>(
      `SELECT p.port + 1 AS free FROM ports p
       WHERE p.port >= ? AND p.port < ? AND NOT EXISTS (SELECT 1 FROM ports n WHERE n.port = p.port + 1)
       ORDER BY p.port LIMIT 1`,
      [lo, hi],
    );
    return r ? Number(r.free) : undefined;
  }

  /** Ports are about to be freed: every range hint above one of them comes down to it. */
  private async lowerHints(q: Queryable, ports: number[]): Promise<void> {
    if (ports.length === 0) return;
    for (const { key, value } of await q.all<{ key: string; value: string }>(`SELECT key, value FROM meta WHERE key LIKE '${HINT}%'`)) {
      const [lo = 0, hi = 0] = key.slice(HINT.length).split("-").map(Number);
      const inRange = ports.filter((p) => p >= lo && p <= hi);
      if (inRange.length > 0 && Math.min(...inRange) < Number(value)) await q.run("UPDATE meta SET value = ? WHERE key = ?", [String(Math.min(...inRange)), key]);
    }
  }

  private async portsOf(q: Queryable, hostname: string): Promise<number[]> {
    return (await q.all<{ port: number }>("SELECT port FROM ports WHERE hostname = ?", [hostname])).map((r) => Number(r.port));
  }

  // --- leases and activation ---

  // Lease renewals need not wait for the disk: one lost in a power cut only makes the lease
  // look older, and the work it covers is then finished or reclaimed by the doctor anyway.
  async renew(hostnames: string[]): Promise<void> {
    if (hostnames.length === 0) return;
    await this.db.transaction(
      "write",
      (q) =>
        q.run(
          `UPDATE devices SET lease_until = ${this.db.nowMs} + ?
         WHERE station = ? AND (status = 'pending' OR pending_fingerprint IS NOT NULL) AND hostname IN (${marks(hostnames.length)})`,
          [leaseMs(), this.station, ...hostnames],
        ),
      { durable: false },
    );
  }

  /**
   * Renews and returns those of `hostnames` whose work is still this station's. Called right
   * before outputs take their final names: what is returned is safe to rename for a whole lease.
   */
  async confirm(hostnames: string[]): Promise<Set<string>> {
    if (hostnames.length === 0) return new Set();
    return this.db.transaction("write", async (q) => {
      const held = new Set<string>();
      for (let i = 0; i < hostnames.length; i += BULK) {
        const part = hostnames.slice(i, i + BULK);
        const rows = await q.all<{ hostname: string }>(
          `SELECT hostname FROM devices WHERE station = ? AND (status = 'pending' OR pending_fingerprint IS NOT NULL) AND hostname IN (${marks(part.length)})`,
          [this.station, ...part],
        );
        for (const r of rows) held.add(r.hostname);
      }
      if (held.size > 0) {
        await q.run(`UPDATE devices SET lease_until = ${this.db.nowMs} + ? WHERE station = ? AND hostname IN (${marks(held.size)})`, [leaseMs(), this.station, ...held]);
      }
      return held;
    }, { durable: false });
  }

  /** Activates one device of this station inside `q`; false when the reservation is gone. */
  private async activateOne(q: Queryable, hostname: string, at: string): Promise<boolean> {
    const n = await q.run("UPDATE devices SET status = 'active', lease_until = NULL, updated = ? WHERE hostname = ? AND status = 'pending' AND station = ?", [at, hostname, this.station]);
    if (n === 0) {
      // Already active under this station: the doctor finished it (its output was complete).
      const row = await q.get<{ status: string; station: string }>("SELECT status, station FROM devices WHERE hostname = ?", [hostname]);
      if (row?.status !== "active" || row.station !== this.station) return false;
    }
    await this.db.notify(q, hostname);
    return true;
  }

  async activate(hostname: string): Promise<void> {
    // Not synced on its own: if power fails before the commit reaches the disk, the device is
    // still `pending` with its overlay in place, and `registry doctor` activates it. The
    // reservation itself (which must never be lost once an overlay carries its port) is durable.
    const ok = await this.db.transaction("write", (q) => this.activateOne(q, hostname, iso()), { durable: false });
    if (!ok) throw new ReservationLost(hostname);
  }

  activateMany(hostnames: string[]): Promise<string[]> {
    return this.db.transaction(
      "write",
      async (q) => {
        const at = iso();
        const lost: string[] = [];
        for (const h of hostnames) if (!(await this.activateOne(q, h, at))) lost.push(h);
        return lost;
      },
      { durable: false },
    );
  }

  abandon(hostname: string): Promise<void> {
    // Only this station's pending device: an active one (the doctor racing a build that just
    // finished), or one reclaimed and reserved again by someone else, is kept whole.
    return this.db.transaction("write", async (q) => {
      const mine = await q.get("SELECT 1 AS mine FROM devices WHERE hostname = ? AND status = 'pending' AND station = ?", [hostname, this.station]);
      if (mine) await this.forget(q, hostname);
    });
  }

  /** Deletes a device and its ports, lowering the free-port hints. */
  private async forget(q: Queryable, hostname: string): Promise<void> {
    await this.lowerHints(q, await this.portsOf(q, hostname));
    await q.run("DELETE FROM ports WHERE hostname = ?", [hostname]);
    await q.run("DELETE FROM attributes WHERE hostname = ?", [hostname]);
    await q.run("DELETE FROM device_history WHERE hostname = ?", [hostname]);
    await q.run("DELETE FROM devices WHERE hostname = ?", [hostname]);
    await this.db.notify(q, hostname);
  }

  updateDevice(hostname: string, f: { board: string; os: string; bastions: string[]; overlay: string; dials?: string }): Promise<void> {
    return this.db.transaction("write", async (q) => {
      // The fresh overlay dials what the config says now.
      await q.run("UPDATE devices SET board = ?, os = ?, bastions = ?, overlay = ?, dials = COALESCE(?, dials), updated = ? WHERE hostname = ?", [
        f.board,
        f.os,
        f.bastions.join(","),
        f.overlay,
        f.dials ?? null,
        iso(),
        hostname,
      ]);
      await this.db.notify(q, hostname);
    });
  }

  // --- rotation ---

  beginRotate(hostname: string, expectFingerprint: string, publicKey: string, fingerprint: string, overlay: string, dials?: string): Promise<void> {
    return this.db.transaction("write", async (q) => {
      const row = await this.row(q, hostname);
      if (!row) throw new UserError(`rotate ${hostname}: no such device in the registry`);
      if (row.status !== "active") throw new UserError(`rotate ${hostname}: the device is ${row.status}`);
      if (row.fingerprint !== expectFingerprint) throw new UserError(`rotate ${hostname}: its key changed meanwhile (another rotation finished); nothing written`, { hint: "run the rotation again if it is still wanted" });
      const dbNow = await this.dbNow(q);
      if (row.pending_fingerprint && (row.lease_until ?? 0) > dbNow && !stationIsDead(row.station)) {
        throw new UserError(`rotate ${hostname}: a rotation is already under way (station ${row.station}); nothing written`, {
          hint: "wait for it to finish; 'mkoverlay registry doctor' clears one that was killed",
        });
      }
      await this.checkKeyFree(q, fingerprint);
      await q.run(
        `UPDATE devices SET pending_public_key = ?, pending_fingerprint = ?, pending_dials = ?, overlay = ?, station = ?, lease_until = ${this.db.nowMs} + ?, updated = ? WHERE hostname = ?`,
        [publicKey, fingerprint, dials ?? null, overlay, this.station, leaseMs(), iso(), hostname],
      );
    });
  }

  private async commitRotateIn(q: Queryable, hostname: string, fingerprint: string, station: string, graceUntil: Date | undefined, lease?: number | null): Promise<boolean> {
    const until = graceUntil ? iso(graceUntil) : null;
    const n = await q.run(
      `UPDATE devices SET
         prev_public_key = CASE WHEN CAST(? AS TEXT) IS NULL THEN NULL ELSE public_key END,
         prev_fingerprint = CASE WHEN CAST(? AS TEXT) IS NULL THEN NULL ELSE fingerprint END,
         prev_until = ?,
         prev_dials = CASE WHEN CAST(? AS TEXT) IS NULL THEN NULL ELSE dials END,
         public_key = pending_public_key, fingerprint = pending_fingerprint, dials = COALESCE(pending_dials, dials),
         pending_public_key = NULL, pending_fingerprint = NULL, pending_dials = NULL, lease_until = NULL, updated = ?
       WHERE hostname = ? AND pending_fingerprint = ? AND station = ?${lease === undefined ? "" : " AND COALESCE(lease_until, -1) = ?"}`,
      [until, until, until, until, iso(), hostname, fingerprint, station, ...(lease === undefined ? [] : [lease ?? -1])],
    );
    if (n > 0) await this.db.notify(q, hostname);
    return n > 0;
  }

  async commitRotate(hostname: string, fingerprint: string, graceUntil: Date | undefined): Promise<void> {
    const ok = await this.db.transaction("write", (q) => this.commitRotateIn(q, hostname, fingerprint, this.station, graceUntil));
    if (!ok) throw new ReservationLost(hostname);
  }

  abortRotate(hostname: string, fingerprint: string): Promise<void> {
    return this.db.transaction("write", async (q) => {
      await q.run("UPDATE devices SET pending_public_key = NULL, pending_fingerprint = NULL, pending_dials = NULL, lease_until = NULL WHERE hostname = ? AND pending_fingerprint = ? AND station = ?", [
        hostname,
        fingerprint,
        this.station,
      ]);
    });
  }

  // --- lifecycle ---

  revoke(hostname: string): Promise<void> {
    // Both keys go at once: a rotation's old key in its grace period is revoked too.
    return this.db.transaction("write", async (q) => {
      await q.run(
        `UPDATE devices SET status = 'revoked', prev_public_key = NULL, prev_fingerprint = NULL, prev_until = NULL, prev_dials = NULL,
           pending_public_key = NULL, pending_fingerprint = NULL, pending_dials = NULL, lease_until = NULL, updated = ? WHERE hostname = ?`,
        [iso(), hostname],
      );
      await this.db.notify(q, hostname);
    });
  }

  release(hostname: string): Promise<void> {
    return this.db.transaction("write", (q) => this.forget(q, hostname));
  }

  removeBastion(name: string): Promise<string[]> {
    return this.db.transaction("write", async (q) => {
      const changed: string[] = [];
      for (const r of await q.all<{ hostname: string; bastions: string }>("SELECT hostname, bastions FROM devices ORDER BY port")) {
        const list = r.bastions ? r.bastions.split(",") : [];
        if (!list.includes(name)) continue;
        await q.run("UPDATE devices SET bastions = ?, updated = ? WHERE hostname = ?", [list.filter((b) => b !== name).join(","), iso(), r.hostname]);
        await this.db.notify(q, r.hostname);
        changed.push(r.hostname);
      }
      return changed;
    });
  }

  // --- the doctor ---

  private async dbNow(q: Queryable): Promise<number> {
    return Number((await q.get<{ now: number }>(`SELECT ${this.db.nowMs} AS now`))!.now);
  }

  unfinished(): Promise<Unfinished[]> {
    return this.db.transaction("read", async (q) => {
      const dbNow = await this.dbNow(q);
      const rows = (await q.all<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM devices WHERE status = 'pending' OR pending_fingerprint IS NOT NULL ORDER BY port`)).map(normalizeRow);
      return (await this.withServices(q, rows)).map((device, i) => ({
        kind: rows[i]!.status === "pending" ? "build" : "rotate",
        device,
        leaseUntil: rows[i]!.lease_until,
        dbNow,
      }));
    });
  }

  finish(u: Unfinished): Promise<boolean> {
    const d = u.device;
    return this.db.transaction("write", async (q) => {
      if (u.kind === "rotate") return this.commitRotateIn(q, d.hostname, d.rotating?.fingerprint ?? "", d.station, defaultGrace(), u.leaseUntil);
      const n = await q.run("UPDATE devices SET status = 'active', lease_until = NULL, updated = ? WHERE hostname = ? AND status = 'pending' AND station = ? AND COALESCE(lease_until, -1) = ?", [
        iso(),
        d.hostname,
        d.station,
        u.leaseUntil ?? -1,
      ]);
      if (n > 0) await this.db.notify(q, d.hostname);
      return n > 0;
    });
  }

  reclaim(u: Unfinished): Promise<boolean> {
    const d = u.device;
    return this.db.transaction("write", async (q) => {
      const same = "station = ? AND COALESCE(lease_until, -1) = ?";
      const args = [d.station, u.leaseUntil ?? -1];
      if (u.kind === "rotate") {
        return (await q.run(`UPDATE devices SET pending_public_key = NULL, pending_fingerprint = NULL, pending_dials = NULL, lease_until = NULL WHERE hostname = ? AND pending_fingerprint = ? AND ${same}`, [d.hostname, d.rotating?.fingerprint ?? "", ...args])) > 0;
      }
      if (!(await q.get(`SELECT 1 AS still FROM devices WHERE hostname = ? AND status = 'pending' AND ${same}`, [d.hostname, ...args]))) return false;
      await this.forget(q, d.hostname);
      return true;
    });
  }

  // --- reading ---

  private async row(q: Queryable, hostname: string): Promise<DeviceRow | undefined> {
    const r = await q.get<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM devices WHERE hostname = ?`, [hostname]);
    return r && normalizeRow(r);
  }

  /** Records for rows, with their service ports and factory data (one query each, whatever the count). */
  private async withServices(q: Queryable, rows: DeviceRow[]): Promise<DeviceRecord[]> {
    if (rows.length === 0) return [];
    const one = rows.length === 1 ? [rows[0]!.hostname] : [];
    const ports = await q.all<PortRow>(`SELECT port, hostname, purpose FROM ports WHERE purpose LIKE 'service:%'${one.length ? " AND hostname = ?" : ""} ORDER BY port`, one);
    const attrs = await q.all<AttributeRow>(`SELECT hostname, key, value FROM attributes${one.length ? " WHERE hostname = ?" : ""} ORDER BY key`, one);
    const svc = new Map<string, Record<string, number>>();
    for (const p of ports) {
      const m = svc.get(p.hostname) ?? {};
      m[p.purpose.slice("service:".length)] = Number(p.port);
      svc.set(p.hostname, m);
    }
    const data = new Map<string, Record<string, string>>();
    for (const a of attrs) {
      const m = data.get(a.hostname) ?? {};
      m[a.key] = a.value;
      data.set(a.hostname, m);
    }
    return rows.map((r) => toRecord(r, svc.get(r.hostname), data.get(r.hostname)));
  }

  private async one(where: string, value: string): Promise<DeviceRecord | undefined> {
    return this.db.transaction("read", async (q) => {
      const r = await q.get<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM devices WHERE ${where} = ?`, [value]);
      return r ? (await this.withServices(q, [normalizeRow(r)]))[0] : undefined;
    });
  }

  get(hostname: string): Promise<DeviceRecord | undefined> {
    return this.one("hostname", hostname);
  }

  states(hostnames: readonly string[]): Promise<Map<string, DeviceState>> {
    return this.db.transaction("read", async (q) => {
      const out = new Map<string, DeviceState>();
      // Chunks well under SQLite's and PostgreSQL's bound-parameter limits.
      for (let i = 0; i < hostnames.length; i += 500) {
        const part = hostnames.slice(i, i + 500);
        const rows = await q.all<{ hostname: string; status: DeviceState["status"]; port: number | string; overlay: string | null }>(
          `SELECT hostname, status, port, overlay FROM devices WHERE hostname IN (${part.map(() => "?").join(", ")})`,
          part,
        );
        for (const r of rows) out.set(r.hostname, { status: r.status, port: Number(r.port), overlay: r.overlay, attributes: {} });
        if (rows.length === 0) continue;
        const found = rows.map((r) => r.hostname);
        for (const a of await q.all<AttributeRow>(`SELECT hostname, key, value FROM attributes WHERE hostname IN (${found.map(() => "?").join(", ")})`, found)) {
          out.get(a.hostname)!.attributes[a.key] = a.value;
        }
      }
      return out;
    });
  }

  getByFingerprint(fp: string): Promise<DeviceRecord | undefined> {
    return this.one("fingerprint", fp);
  }

  findByAttribute(key: string, value: string): Promise<DeviceRecord[]> {
    return this.db.transaction("read", async (q) =>
      this.withServices(
        q,
        (await q.all<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM devices WHERE hostname IN (SELECT hostname FROM attributes WHERE key = ? AND value = ?) ORDER BY port`, [key, value])).map(normalizeRow),
      ),
    );
  }

  setAttributes(hostname: string, attributes: Record<string, string>): Promise<boolean> {
    return this.db.transaction("write", async (q) => {
      if (!(await q.get("SELECT 1 AS found FROM devices WHERE hostname = ?", [hostname]))) return false;
      for (const [k, v] of Object.entries(attributes)) {
        await q.run("DELETE FROM attributes WHERE hostname = ? AND key = ?", [hostname, k]);
        await q.run("INSERT INTO attributes (hostname, key, value) VALUES (?, ?, ?)", [hostname, k, v]);
      }
      // Factory data is in no export: the bastions' agents need no word of it.
      return true;
    });
  }

  list(): Promise<DeviceRecord[]> {
    return this.db.transaction("read", async (q) => this.withServices(q, (await q.all<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM devices ORDER BY port`)).map(normalizeRow)));
  }

  backfillDials(dials: { hostname: string; dials: string }[]): Promise<number> {
    if (dials.length === 0) return Promise.resolve(0);
    return this.db.transaction("write", async (q) => {
      let n = 0;
      for (const d of dials) n += await q.run("UPDATE devices SET dials = ? WHERE hostname = ? AND dials IS NULL", [d.dials, d.hostname]);
      return n;
    });
  }

  dialGroups(ssh: PortRange, services: PortRange, now: Date): Promise<DialGroup[]> {
    return this.db.transaction("read", async (q) => {
      const groups = new Map<string, DialGroup>();
      const key = (dials: string | null, bastions: string) => `${dials}\0${bastions}`;
      const live = "status <> 'revoked'";
      const grace = `${live} AND prev_dials IS NOT NULL AND prev_until > ?`;
      for (const [col, where, args] of [
        ["dials", live, []],
        ["prev_dials", grace, [iso(now)]],
      ] as const) {
        for (const r of await q.all<{ dials: string | null; bastions: string; n: number; sample: string }>(
          `SELECT ${col} AS dials, bastions, count(*) AS n, min(hostname) AS sample FROM devices WHERE ${where} GROUP BY ${col}, bastions`,
          [...args],
        )) {
          const k = key(r.dials, r.bastions);
          const g = groups.get(k);
          if (g) {
            g.devices += Number(r.n);
            if (r.sample < g.sample) g.sample = r.sample;
          } else groups.set(k, { dials: r.dials, bastions: r.bastions, devices: Number(r.n), outsideSsh: 0, outsideServices: 0, sample: r.sample });
        }
        // Ports outside the ranges: two range scans of a unique index, usually empty.
        const outside = [
          [`SELECT d.${col} AS dials, d.bastions AS bastions, count(*) AS n FROM devices d WHERE ${where.replace(/(status|prev_dials|prev_until)/g, "d.$1")} AND (d.port < ? OR d.port > ?) GROUP BY d.${col}, d.bastions`, ssh, "outsideSsh"],
          [
            `SELECT d.${col} AS dials, d.bastions AS bastions, count(DISTINCT d.hostname) AS n FROM ports p JOIN devices d ON d.hostname = p.hostname
             WHERE ${where.replace(/(status|prev_dials|prev_until)/g, "d.$1")} AND p.purpose LIKE 'service:%' AND (p.port < ? OR p.port > ?) GROUP BY d.${col}, d.bastions`,
            services,
            "outsideServices",
          ],
        ] as const;
        for (const [sql, r, field] of outside) {
          for (const o of await q.all<{ dials: string | null; bastions: string; n: number }>(sql, [...args, r.lo, r.hi])) {
            const g = groups.get(key(o.dials, o.bastions));
            if (g) g[field] += Number(o.n);
          }
        }
      }
      return [...groups.values()];
    });
  }

  // --- what the bastions see ---

  observe(o: Observation): Promise<number> {
    return this.db.transaction("write", async (q) => {
      const at = iso(o.at);
      // A listener gone since the last look was last seen at that look.
      const prevAt = (await q.get<{ at: string }>("SELECT at FROM heartbeats WHERE bastion = ?", [o.bastion]))?.at ?? at;
      const before = new Map(
        (await q.all<{ port: number; hostname: string | null; fingerprint: string | null; tunnel: number | null; uid: number | null }>("SELECT port, hostname, fingerprint, tunnel, uid FROM sightings WHERE bastion = ? AND connected = 1", [o.bastion])).map((r) => [
          Number(r.port),
          r,
        ]),
      );
      const now = new Map(o.listeners.map((l) => [l.port, l]));
      let written = 0;
      for (const l of now.values()) {
        const tunnel = l.tunnel === undefined ? null : l.tunnel ? 1 : 0;
        const uid = l.tunnel === false ? (l.uid ?? null) : null;
        let was = before.get(l.port);
        // Another holder (a squatter replaced by the tunnel, or the other way round) is another
        // listener: a sighting of its own, since now; the device's own was last seen before.
        if (was && ((was.tunnel === null ? null : Number(was.tunnel)) !== tunnel || (was.uid === null ? null : Number(was.uid)) !== uid)) {
          if (was.hostname && Number(was.tunnel ?? 1) !== 0) await q.run("UPDATE device_history SET last_seen = ? WHERE hostname = ? AND bastion = ?", [prevAt, was.hostname, o.bastion]);
          was = undefined;
        }
        if (was) {
          if (l.fingerprint && l.fingerprint !== was.fingerprint) {
            await q.run("UPDATE sightings SET fingerprint = ? WHERE bastion = ? AND port = ?", [l.fingerprint, o.bastion, l.port]);
            written++;
          }
          continue;
        }
        const owner = (await q.get<{ hostname: string }>("SELECT hostname FROM ports WHERE port = ?", [l.port]))?.hostname ?? null;
        await q.run(
          `INSERT INTO sightings (bastion, port, hostname, fingerprint, since, last_seen, connected, tunnel, uid) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)
           ON CONFLICT (bastion, port) DO UPDATE SET hostname = excluded.hostname, fingerprint = excluded.fingerprint, since = excluded.since, last_seen = excluded.last_seen, connected = 1, tunnel = excluded.tunnel, uid = excluded.uid`,
          [o.bastion, l.port, owner, l.fingerprint ?? null, at, at, tunnel, uid],
        );
        // Only the tunnel's own session is the device having been seen.
        if (owner && tunnel !== 0) {
          await q.run(
            `INSERT INTO device_history (hostname, bastion, first_seen, last_seen) VALUES (?, ?, ?, ?)
             ON CONFLICT (hostname, bastion) DO UPDATE SET last_seen = excluded.last_seen`,
            [owner, o.bastion, at, at],
          );
        }
        written++;
      }
      for (const [port, was] of before) {
        if (now.has(port)) continue;
        await q.run("UPDATE sightings SET connected = 0, last_seen = ? WHERE bastion = ? AND port = ?", [prevAt, o.bastion, port]);
        if (was.hostname && Number(was.tunnel ?? 1) !== 0) await q.run("UPDATE device_history SET last_seen = ? WHERE hostname = ? AND bastion = ?", [prevAt, was.hostname, o.bastion]);
        written++;
      }
      await q.run(
        `INSERT INTO heartbeats (bastion, at, interval_s, agent) VALUES (?, ?, ?, ?)
         ON CONFLICT (bastion) DO UPDATE SET at = excluded.at, interval_s = excluded.interval_s, agent = excluded.agent`,
        [o.bastion, at, o.intervalS, o.agent],
      );
      return written;
    });
  }

  observations(): Promise<Observations> {
    return this.db.transaction("read", async (q) => ({
      sightings: (await q.all<{ bastion: string; port: number; hostname: string | null; fingerprint: string | null; since: string; last_seen: string; connected: number; tunnel: number | null; uid: number | null }>(
        "SELECT bastion, port, hostname, fingerprint, since, last_seen, connected, tunnel, uid FROM sightings ORDER BY bastion, port",
      )).map((r) => ({
        bastion: r.bastion,
        port: Number(r.port),
        hostname: r.hostname,
        fingerprint: r.fingerprint,
        tunnel: r.tunnel === null ? null : Number(r.tunnel) === 1,
        uid: r.uid === null ? null : Number(r.uid),
        since: r.since,
        lastSeen: r.last_seen,
        connected: Number(r.connected) === 1,
      })),
      history: (await q.all<{ hostname: string; bastion: string; first_seen: string; last_seen: string }>("SELECT hostname, bastion, first_seen, last_seen FROM device_history ORDER BY hostname, bastion")).map((r) => ({
        hostname: r.hostname,
        bastion: r.bastion,
        firstSeen: r.first_seen,
        lastSeen: r.last_seen,
      })),
      heartbeats: (await q.all<{ bastion: string; at: string; interval_s: number; agent: string }>("SELECT bastion, at, interval_s, agent FROM heartbeats ORDER BY bastion")).map((r) => ({
        bastion: r.bastion,
        at: r.at,
        intervalS: Number(r.interval_s),
        agent: r.agent,
      })),
    }));
  }

  // --- whole-registry copy ---

  private async readAll(q: Queryable): Promise<Snapshot> {
    return {
      seq: Number((await q.get<{ value: string }>(SEQ))?.value ?? 0),
      devices: (await q.all<DeviceRow>(`SELECT ${DEVICE_COLUMNS} FROM devices ORDER BY hostname`)).map(normalizeRow),
      ports: (await q.all<PortRow>("SELECT port, hostname, purpose FROM ports ORDER BY port")).map((p) => ({ ...p, port: Number(p.port) })),
      attributes: await q.all<AttributeRow>("SELECT hostname, key, value FROM attributes ORDER BY hostname, key"),
      observations: Object.fromEntries(
        await Promise.all(
          OBSERVATION_COLUMNS.map(async ([table, cols]) => [
            table,
            (await q.all<ObservationRow>(`SELECT ${cols.join(", ")} FROM ${table} ORDER BY ${cols.slice(0, 2).join(", ")}`)).map((r) => numbersAsNumbers(r)),
          ]),
        ),
      ) as Snapshot["observations"],
    };
  }

  /** Rows into `table`, many to a statement. */
  private async bulkInsert(q: Queryable, table: string, cols: readonly string[], rows: readonly Record<string, unknown>[]): Promise<void> {
    for (let i = 0; i < rows.length; i += BULK) {
      const part = rows.slice(i, i + BULK);
      await q.run(`INSERT INTO ${table} (${cols.join(", ")}) VALUES ${part.map(() => `(${marks(cols.length)})`).join(", ")}`, part.flatMap((r) => cols.map((c) => r[c] ?? null)));
    }
  }

  snapshot(): Promise<Snapshot> {
    return this.db.transaction("read", (q) => this.readAll(q));
  }

  withFrozenSnapshot<T>(fn: (s: Snapshot) => Promise<T>): Promise<T> {
    // A write transaction that writes nothing: every other station waits until fn is done.
    return this.db.transaction("write", async (q) => fn(await this.readAll(q)));
  }

  replaceAll(s: Snapshot, force: boolean): Promise<void> {
    return this.db.transaction("write", async (q) => {
      const devices = Number((await q.get<{ n: number }>("SELECT count(*) AS n FROM devices"))?.n ?? 0);
      const seq = Number((await q.get<{ value: string }>(SEQ))?.value ?? 0);
      if (!force && (devices > 0 || seq > 0)) {
        throw new UserError(`registry ${this.where}: not empty (${devices} device(s), name counter at ${seq}); nothing copied`, {
          hint: "pass --force to replace its whole content",
        });
      }
      await q.run("DELETE FROM ports");
      await q.run("DELETE FROM attributes");
      await q.run("DELETE FROM devices");
      for (const [table] of OBSERVATION_COLUMNS) await q.run(`DELETE FROM ${table}`);
      // The free-port hints described the old content.
      await q.run(`DELETE FROM meta WHERE key LIKE '${HINT}%'`);
      await this.bulkInsert(q, "devices", DEVICE_KEYS, s.devices as unknown as Record<string, unknown>[]);
      await this.bulkInsert(q, "ports", ["port", "hostname", "purpose"], s.ports as unknown as Record<string, unknown>[]);
      await this.bulkInsert(q, "attributes", ["hostname", "key", "value"], s.attributes as unknown as Record<string, unknown>[]);
      for (const [table, cols] of OBSERVATION_COLUMNS) await this.bulkInsert(q, table, cols, s.observations[table] ?? []);
      await q.run(UPSERT_META, ["seq", String(s.seq)]);
      await this.db.notify(q, "*");
    });
  }

  close(): Promise<void> {
    return this.db.close();
  }
}

/** The grace a rotation finished by the doctor gives the old key (the rotate command's default). */
function defaultGrace(now: Date = new Date()): Date {
  return new Date(now.getTime() + 7 * 86400_000);
}
