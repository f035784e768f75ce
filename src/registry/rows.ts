/**
 * The stored row of a device and its mapping to a DeviceRecord, and the registry's errors (the
 * same words whichever database runs). A leaf module of the registry.
 */
import type { PortRange } from "../config/fleet.js";
import { UserError } from "../util/errors.js";
import type { DeviceRecord, DeviceRow } from "./types.js";

export const DEVICE_KEYS = [
  "hostname",
  "board",
  "os",
  "bastions",
  "port",
  "public_key",
  "fingerprint",
  "status",
  "overlay",
  "station",
  "created",
  "updated",
  "lease_until",
  "pending_public_key",
  "pending_fingerprint",
  "prev_public_key",
  "prev_fingerprint",
  "prev_until",
  "dials",
  "pending_dials",
  "prev_dials",
] as const satisfies readonly (keyof DeviceRow)[];

export const DEVICE_COLUMNS = DEVICE_KEYS.join(", ");

/** Rows as both drivers return them: PostgreSQL gives BIGINT as text. */
export function normalizeRow(r: DeviceRow): DeviceRow {
  return { ...r, port: Number(r.port), lease_until: r.lease_until === null || r.lease_until === undefined ? null : Number(r.lease_until) };
}

export function toRecord(r: DeviceRow, services: Record<string, number> = {}, attributes: Record<string, string> = {}): DeviceRecord {
  const rec: DeviceRecord = {
    hostname: r.hostname,
    board: r.board,
    os: r.os,
    bastions: r.bastions ? r.bastions.split(",") : [],
    port: Number(r.port),
    services,
    publicKey: r.public_key,
    fingerprint: r.fingerprint,
    status: r.status,
    overlay: r.overlay,
    station: r.station,
    created: r.created,
    updated: r.updated,
    attributes,
  };
  if (r.dials) rec.dials = r.dials;
  if (r.prev_public_key && r.prev_fingerprint && r.prev_until) {
    rec.previous = { publicKey: r.prev_public_key, fingerprint: r.prev_fingerprint, until: r.prev_until, ...(r.prev_dials ? { dials: r.prev_dials } : {}) };
  }
  if (r.pending_public_key && r.pending_fingerprint) rec.rotating = { publicKey: r.pending_public_key, fingerprint: r.pending_fingerprint, ...(r.pending_dials ? { dials: r.pending_dials } : {}) };
  return rec;
}

export const hostnameTaken = (name: string, status: string): UserError =>
  new UserError(`hostname ${name} is already registered (${status})`, {
    hint: "pick another --hostname, or pass its registered key with --host-key to rebuild its overlay",
  });

export const keyTaken = (hostname: string, how = "already registered to"): UserError =>
  new UserError(`this key is ${how} ${hostname}`, { hint: "each device needs its own key" });

export const noFreePort = (range: PortRange, service?: string): UserError =>
  service === undefined
    ? new UserError(`no free tunnel port left in ports.ssh ${range.lo}-${range.hi}`, {
        hint: "widen ports.ssh in the config, or release quarantined ports of revoked devices",
      })
    : new UserError(`no free service port left in ports.services ${range.lo}-${range.hi} (for forward '${service}')`, {
        hint: "widen ports.services in the config, or release quarantined ports of revoked devices",
      });

/**
 * A station's reservation is gone: its lease ran out and `registry doctor` reclaimed it while
 * the build was still running. The build must not ship: its port may already be someone else's.
 */
export class ReservationLost extends UserError {
  constructor(readonly hostname: string) {
    super(`${hostname}: the reservation was reclaimed (by 'registry doctor') before the build finished; its output was removed`, {
      hint: "build the device again; a build must not be paused for longer than the registry lease",
    });
  }
}
