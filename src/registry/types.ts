/**
 * The registry: the fleet's source of truth for names, ports and public keys. It never holds
 * a private key. Backends (embedded SQLite today) implement this one interface.
 */
import type { PortRange } from "../config/fleet.js";
import type { UserError } from "../errors.js";

export type DeviceStatus = "pending" | "active" | "revoked";

export interface DeviceRecord {
  hostname: string;
  board: string;
  os: string;
  bastions: string[];
  port: number;
  /** Service tunnel ports by forward name (from ports.services). */
  services: Record<string, number>;
  publicKey: string;
  fingerprint: string;
  /** The key a rotation replaced: bastions keep accepting it until `until` (`rotate --grace`). */
  previous?: { publicKey: string; fingerprint: string; until: string };
  status: DeviceStatus;
  /** Where the overlay was written (for `registry doctor` to finish or reclaim a build). */
  overlay: string | null;
  /** host:pid of the station that reserved it. */
  station: string;
  created: string;
  updated: string;
}

export interface ReserveRequest {
  /** Explicit --hostname, or undefined to take the next name from the template. */
  hostname: string | undefined;
  hostnameTemplate: string;
  range: PortRange;
  /** Names of service forwards that each need a port from serviceRange. */
  services: string[];
  serviceRange: PortRange;
  /** Build time: recorded as `created`, and the anchor of a duration expiry. */
  now: Date;
  board: string;
  os: string;
  bastions: string[];
  publicKey: string;
  fingerprint: string;
  /** Computes the overlay path from the final hostname (recorded for the doctor). */
  overlayPath: (hostname: string) => string;
}

export interface Registry {
  /** Picks the name and the lowest free port and records a `pending` device, atomically. */
  reserve(req: ReserveRequest): Promise<DeviceRecord>;
  /** The build finished: the device becomes live. */
  activate(hostname: string): Promise<void>;
  /** The build failed after reserving: forget the pending device and free its port. */
  abandon(hostname: string): Promise<void>;
  /** Re-flash of a registered device: update board/os/bastions/overlay, keep name, key, port. */
  updateDevice(hostname: string, fields: { board: string; os: string; bastions: string[]; overlay: string }): Promise<void>;
  /**
   * Several reservations in one transaction (a batch): each request succeeds or fails on its
   * own — a failure is returned in its place and reserves nothing. Optional: without it a
   * batch reserves one by one.
   */
  reserveMany?(reqs: ReserveRequest[]): Promise<(DeviceRecord | UserError)[]>;
  /** Activates several devices in one transaction. Optional, like reserveMany. */
  activateMany?(hostnames: string[]): Promise<void>;
  /** The device leaves every export; its ports stay reserved (quarantined) until released. */
  revoke(hostname: string): Promise<void>;
  /** Frees a revoked device's ports and forgets it. */
  release(hostname: string): Promise<void>;
  /**
   * A new key for the same device (name and ports kept). With `graceUntil` (an ISO time) the
   * replaced key is kept as `previous` until then; without it, any previous key is dropped.
   */
  rotate(hostname: string, publicKey: string, fingerprint: string, overlay: string, graceUntil?: string): Promise<void>;
  /** Devices left `pending` by builds that never finished. */
  pending(): Promise<DeviceRecord[]>;
  get(hostname: string): Promise<DeviceRecord | undefined>;
  getByFingerprint(fp: string): Promise<DeviceRecord | undefined>;
  list(): Promise<DeviceRecord[]>;
  close(): Promise<void>;
}
