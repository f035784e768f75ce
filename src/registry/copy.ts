/**
 * `registry migrate --to URL|FILE`: copies the registry in use into another one, on either
 * database. It only coordinates: reading everything while no station can write, replacing the
 * target's content in one transaction, reading it back and comparing, are the registry core's.
 * A non-empty target is refused unless `force`; a target file this run created is removed
 * again if the copy fails.
 */
import { existsSync, realpathSync, rmSync, statSync } from "node:fs";
import { UserError } from "../util/errors.js";
import { DEVICE_KEYS } from "./rows.js";
import { displayLocation, isRegistryUrl } from "../config/registry-location.js";
import { openRegistry } from "./open.js";
import { OBSERVATION_COLUMNS, type DeviceStatus, type Registry, type Snapshot } from "./types.js";

/** Rows in one order and one shape, whatever the backend's collation and driver. */
function canonical(s: Snapshot): string {
  const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
  return JSON.stringify({
    seq: s.seq,
    devices: [...s.devices].sort((a, b) => cmp(a.hostname, b.hostname)).map((d) => DEVICE_KEYS.map((k) => d[k] ?? null)),
    ports: [...s.ports].sort((a, b) => a.port - b.port).map((p) => [Number(p.port), p.hostname, p.purpose]),
    attributes: [...s.attributes].map((a) => [a.hostname, a.key, a.value]).sort((a, b) => cmp(a.join("\0"), b.join("\0"))),
    observations: OBSERVATION_COLUMNS.map(([table, cols]) =>
      (s.observations[table] ?? []).map((r) => cols.map((c) => (r[c] === null || r[c] === undefined ? null : String(r[c])))).sort((a, b) => cmp(a.join("\0"), b.join("\0"))),
    ),
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

/** A registry file that does not exist yet (or is empty): opening it creates a registry. */
function isNewFile(location: string): boolean {
  return !isRegistryUrl(location) && (!existsSync(location) || (statSync(location).isFile() && statSync(location).size === 0));
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
  if (same) throw new UserError(`registry migrate: the target ${displayLocation(to)} is the registry in use`, { hint: "give --to another file or database" });
  if (isNewFile(from)) throw new UserError(`registry ${from}: does not exist (or is empty); nothing to copy`);
  const created = isNewFile(to);
  const source = await openRegistry(from);
  let target: Registry | undefined;
  let copied = false;
  try {
    const t = (target = await openRegistry(to));
    const s = await source.withFrozenSnapshot(async (snap) => {
      await t.replaceAll(snap, opts.force);
      if (canonical(await t.snapshot()) !== canonical(snap)) throw new Error(`registry migrate: ${t.where} does not read back what was copied from ${source.where}`);
      return snap;
    });
    copied = true;
    const statuses: Record<DeviceStatus, number> = { pending: 0, active: 0, revoked: 0 };
    for (const d of s.devices) statuses[d.status] += 1;
    return { from: source.where, to: t.where, devices: s.devices.length, ports: s.ports.length, seq: s.seq, statuses };
  } finally {
    await source.close();
    await target?.close();
    if (!copied && created) for (const f of [to, `${to}-wal`, `${to}-shm`]) rmSync(f, { force: true });
  }
}
