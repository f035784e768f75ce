/**
 * The registry: the fleet's source of truth for names, ports and public keys. It never holds
 * a private key. One core (core.ts) implements this interface over either database.
 */
import type { PortRange } from "../config/fleet.js";
import type { DialGroup } from "../config/compat.js";
import type { UserError } from "../util/errors.js";

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
  status: DeviceStatus;
  /** Where the overlay was written (for `registry doctor` to finish or reclaim a build). */
  overlay: string | null;
  /** The station (host:pid:nonce) that reserved it, or last changed its key. */
  station: string;
  created: string;
  updated: string;
  /** The key a rotation replaced, still accepted by bastions until `until` (rotate --grace). */
  previous?: { publicKey: string; fingerprint: string; until: string; dials?: string };
  /** A rotation in progress: the new key, not yet in any export. */
  rotating?: { publicKey: string; fingerprint: string; dials?: string };
  /** Factory data (serial number, MAC, site…), from the extra columns of a --hosts CSV. */
  attributes: Record<string, string>;
  /**
   * What the device's overlay dials (src/config/compat.ts `Dials`, as stored JSON): undefined for
   * a row from before schema 6 not yet backfilled. `previous` and `rotating` carry their own.
   */
  dials?: string;
}

/** What a resumed batch needs to know of a registered name. */
export type DeviceState = Pick<DeviceRecord, "status" | "port" | "overlay" | "attributes">;

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
  /** Factory data to record with the device (names: lower-case words). */
  attributes?: Record<string, string>;
  /** What the overlay dials (compat.ts `Dials` as JSON). */
  dials?: string;
}

/**
 * Work a station started and has not finished: a build (`pending` device) or a rotation. It is
 * the station's own while its lease runs (the station renews it while it works); after that,
 * `registry doctor` may finish or reclaim it.
 */
export interface Unfinished {
  kind: "build" | "rotate";
  device: DeviceRecord;
  /** Lease end in ms since the epoch (the database's clock); null for rows from before leases. */
  leaseUntil: number | null;
  /** The database's clock when this was read, in ms since the epoch. */
  dbNow: number;
}

export interface Registry {
  /** Where it lives, as it may be printed (no password). */
  readonly where: string;
  /** Picks the name and the lowest free port and records a `pending` device, atomically. */
  reserve(req: ReserveRequest): Promise<DeviceRecord>;
  /**
   * Several reservations in one transaction (a batch): each request succeeds or fails on its
   * own — a failure is returned in its place and reserves nothing.
   */
  reserveMany(reqs: ReserveRequest[]): Promise<(DeviceRecord | UserError)[]>;
  /** Extends the leases of this station's unfinished work (builds and rotations). */
  renew(hostnames: string[]): Promise<void>;
  /**
   * Renews and returns those of `hostnames` whose work is still this station's: called right
   * before outputs take their final names, so what it returns is safe to rename for a lease.
   */
  confirm(hostnames: string[]): Promise<Set<string>>;
  /**
   * The build finished: the device becomes live. Throws a `ReservationLost` error when the
   * reservation is no longer this station's (reclaimed by the doctor after its lease ran out).
   */
  activate(hostname: string): Promise<void>;
  /** activate() for many in one transaction; returns the hostnames whose reservation was lost. */
  activateMany(hostnames: string[]): Promise<string[]>;
  /** The build failed after reserving: forget this station's pending device and free its port. */
  abandon(hostname: string): Promise<void>;
  /** Re-flash of a registered device: update board/os/bastions/overlay, keep name, key, port. */
  updateDevice(hostname: string, fields: { board: string; os: string; bastions: string[]; overlay: string; dials?: string }): Promise<void>;
  /**
   * Starts a key rotation: records the new key as pending (refused while another rotation of
   * the device is under way, or when the device's key is no longer `expectFingerprint`).
   */
  beginRotate(hostname: string, expectFingerprint: string, publicKey: string, fingerprint: string, overlay: string, dials?: string): Promise<void>;
  /** The new overlay exists: the new key becomes the device's, the old one stays valid until `graceUntil`. */
  commitRotate(hostname: string, fingerprint: string, graceUntil: Date | undefined): Promise<void>;
  /** The rotation failed before its overlay was written: forget the pending key. */
  abortRotate(hostname: string, fingerprint: string): Promise<void>;
  /** The device leaves every export; its ports stay reserved (quarantined) until released. */
  revoke(hostname: string): Promise<void>;
  /** Frees a revoked device's ports and forgets it. */
  release(hostname: string): Promise<void>;
  /** Takes a bastion off every device that tunnels to it; returns the devices changed. */
  removeBastion(name: string): Promise<string[]>;
  /** Builds and rotations that were started and not finished, with their leases. */
  unfinished(): Promise<Unfinished[]>;
  /** The doctor finishes `u` (its output is complete); false if the work changed meanwhile. */
  finish(u: Unfinished): Promise<boolean>;
  /** The doctor gives `u`'s reservation or pending key back; false if the work changed meanwhile. */
  reclaim(u: Unfinished): Promise<boolean>;
  get(hostname: string): Promise<DeviceRecord | undefined>;
  /** Which of `hostnames` are registered, with their status, port and output (a resumed shift). */
  states(hostnames: readonly string[]): Promise<Map<string, DeviceState>>;
  getByFingerprint(fp: string): Promise<DeviceRecord | undefined>;
  /** Devices whose factory data has `key` = `value` (e.g. serial = SN0042). */
  findByAttribute(key: string, value: string): Promise<DeviceRecord[]>;
  /**
   * Records factory data on a registered device (added or replaced, others kept), in one
   * transaction; false if there is no such device.
   */
  setAttributes(hostname: string, attributes: Record<string, string>): Promise<boolean>;
  list(): Promise<DeviceRecord[]>;
  /**
   * Records what devices dial where nothing is recorded yet (rows from before schema 6); a row
   * that has its dials is left alone. Returns the number of rows written.
   */
  backfillDials(dials: { hostname: string; dials: string }[]): Promise<number>;
  /**
   * Live and pending devices grouped by what they dial and their bastions (a rotated-out key in
   * its grace counts with its own dials), with how many hold a port outside `ssh` / `services`.
   */
  dialGroups(ssh: PortRange, services: PortRange, now: Date): Promise<DialGroup[]>;
  /** Everything, consistently (registry migrate). */
  snapshot(): Promise<Snapshot>;
  /** A consistent copy of everything while no station can write; `fn` runs before writes resume. */
  withFrozenSnapshot<T>(fn: (s: Snapshot) => Promise<T>): Promise<T>;
  /**
   * Records what a bastion's agent sees: only what changed since its last look (new and gone
   * listeners) plus its heartbeat. Returns the number of rows written besides the heartbeat.
   */
  observe(o: Observation): Promise<number>;
  /** What every bastion last reported. */
  observations(): Promise<Observations>;
  /** Replaces the whole content (registry migrate); refuses a used registry unless `force`. */
  replaceAll(s: Snapshot, force: boolean): Promise<void>;
  close(): Promise<void>;
}

/** A tunnel port listening on a bastion, as its agent sees it. */
export interface Listener {
  port: number;
  /** The key that authenticated the session holding it, where sshd's log tells. */
  fingerprint?: string;
  /**
   * Held by the tunnel user's sshd session (the only holder that counts for a device); false:
   * another process holds it (a squatter), `uid` says whose. Absent: not told (older agents).
   */
  tunnel?: boolean;
  uid?: number;
}

/** One look by a bastion agent: every tunnel-range port listening there now. */
export interface Observation {
  bastion: string;
  at: Date;
  /** Seconds until the next look (a heartbeat older than three of these is stale). */
  intervalS: number;
  /** Who looked (host:pid), for the heartbeat row. */
  agent: string;
  listeners: Listener[];
}

interface Sighting {
  bastion: string;
  port: number;
  /** The device holding the port when it was first seen listening; null: nobody registered. */
  hostname: string | null;
  fingerprint: string | null;
  /** Held by the tunnel user's sshd session; null: recorded by an agent that did not tell. */
  tunnel?: boolean | null;
  /** The owner of a listener that is not the tunnel user's session. */
  uid?: number | null;
  /** Since when it listens (this connection). */
  since: string;
  /** While connected: when first seen; after: the last look that still saw it. */
  lastSeen: string;
  connected: boolean;
}

interface HistoryRow {
  hostname: string;
  bastion: string;
  firstSeen: string;
  lastSeen: string;
}

interface Heartbeat {
  bastion: string;
  at: string;
  intervalS: number;
  agent: string;
}

export interface Observations {
  sightings: Sighting[];
  history: HistoryRow[];
  heartbeats: Heartbeat[];
}

/** The stored rows, as they are copied between backends. */
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
  lease_until: number | null;
  pending_public_key: string | null;
  pending_fingerprint: string | null;
  prev_public_key: string | null;
  prev_fingerprint: string | null;
  prev_until: string | null;
  dials: string | null;
  pending_dials: string | null;
  prev_dials: string | null;
}

export interface PortRow {
  port: number;
  hostname: string;
  purpose: string;
}

export interface AttributeRow {
  hostname: string;
  key: string;
  value: string;
}

/** A row of one of the observation tables, column by column as stored. */
export type ObservationRow = Record<string, string | number | null>;

export interface Snapshot {
  seq: number;
  devices: DeviceRow[];
  ports: PortRow[];
  attributes: AttributeRow[];
  /** What the bastions saw (sightings, device_history, heartbeats), copied as stored. */
  observations: Record<(typeof OBSERVATION_COLUMNS)[number][0], ObservationRow[]>;
}

/** The observation tables and their columns, in copy order. */
export const OBSERVATION_COLUMNS = [
  ["sightings", ["bastion", "port", "hostname", "fingerprint", "since", "last_seen", "connected", "tunnel", "uid"]],
  ["device_history", ["hostname", "bastion", "first_seen", "last_seen"]],
  ["heartbeats", ["bastion", "at", "interval_s", "agent"]],
] as const;
