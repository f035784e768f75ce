/**
 * What both backends share: the stored row of a device, its mapping to a DeviceRecord, the row
 * a reservation inserts, and the reservation errors (the same words whichever backend runs).
 */
import type { PortRange } from "../config/fleet.js";
import { UserError } from "../errors.js";
import type { DeviceRecord, DeviceStatus, ReserveRequest } from "./types.js";

export interface DeviceRow {
  hostname: string;
  board: string;
  os: string;
  bastions: string;
  port: number;
  public_key: string;
  fingerprint: string;
  status: DeviceStatus;
  overlay: string | null;
  station: string;
  created: string;
  updated: string;
  /** The key replaced by `rotate --grace`, accepted until prev_until (schema version 2). */
  prev_public_key: string | null;
  prev_fingerprint: string | null;
  prev_until: string | null;
}

export const DEVICE_KEYS = [
  "hostname", "board", "os", "bastions", "port", "public_key", "fingerprint", "status", "overlay", "station", "created", "updated",
  "prev_public_key", "prev_fingerprint", "prev_until",
] as const;

export function toRecord(r: DeviceRow, services: Record<string, number> = {}): DeviceRecord {
  return {
    hostname: r.hostname,
    board: r.board,
    os: r.os,
    bastions: r.bastions ? r.bastions.split(",") : [],
    port: r.port,
    services,
    publicKey: r.public_key,
    fingerprint: r.fingerprint,
    status: r.status,
    overlay: r.overlay,
    station: r.station,
    created: r.created,
    updated: r.updated,
    ...(r.prev_public_key && r.prev_fingerprint && r.prev_until
      ? { previous: { publicKey: r.prev_public_key, fingerprint: r.prev_fingerprint, until: r.prev_until } }
      : {}),
  };
}

/** The `pending` row a reservation inserts. */
export function pendingRow(req: ReserveRequest, hostname: string, port: number, station: string): DeviceRow {
  const now = req.now.toISOString();
  return {
    hostname,
    board: req.board,
    os: req.os,
    bastions: req.bastions.join(","),
    port,
    public_key: req.publicKey,
    fingerprint: req.fingerprint,
    status: "pending",
    overlay: req.overlayPath(hostname),
    station,
    created: now,
    updated: now,
    prev_public_key: null,
    prev_fingerprint: null,
    prev_until: null,
  };
}

export const hostnameTaken = (name: string, status: string): UserError =>
  new UserError(`hostname ${name} is already registered (${status})`, {
    hint: "pick another --hostname, or pass its registered key with --host-key to rebuild its overlay",
  });

export const keyTaken = (hostname: string): UserError => new UserError(`this key is already registered to ${hostname}`, { hint: "each device needs its own key" });

export const noFreePort = (range: PortRange, service?: string): UserError =>
  service === undefined
    ? new UserError(`no free tunnel port left in ports.ssh ${range.lo}-${range.hi}`, {
        hint: "widen ports.ssh in the config, or release quarantined ports of revoked devices",
      })
    : new UserError(`no free service port left in ports.services ${range.lo}-${range.hi} (for forward '${service}')`, {
        hint: "widen ports.services in the config, or release quarantined ports of revoked devices",
      });
