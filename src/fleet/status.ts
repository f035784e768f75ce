/**
 * The fleet as the bastions see it, computed from the registry alone (devices, and what each
 * bastion's agent last recorded): for every device whether it is connected now, where and since
 * when, when it was last seen, whether it never came online; and the alarms — a revoked device
 * still connected, a listener in the tunnel range that no device holds, a device's port held by
 * anything but the tunnel user's sshd session, a tunnel opened with another key than its
 * device's, a bastion whose agent went silent, a device never seen long after it was built, an
 * active device whose key expires on one of its bastions soon (`expiring`) or has (`expired`).
 * Pure: no I/O, the clock is given.
 *
 * A listener counts for a device only when the tunnel user's sshd session holds it (sshd lets a
 * session listen only where its key's permitlisten allows, so only the device's own keys can)
 * and, where sshd's log named the login key, that key is the device's.
 */
import { ed25519Key } from "../keys/pubkey.js";
import { keyExpiry, type ExpiryPolicy } from "../config/expiry.js";
import type { DeviceRecord, Observations } from "../registry/types.js";

export type DeviceState = "connected" | "offline" | "never-seen" | "new" | "unknown";

export interface DeviceView {
  hostname: string;
  status: DeviceRecord["status"];
  /** The bastions it tunnels to (registry). */
  bastions: string[];
  port: number;
  state: DeviceState;
  /** Where it is connected now, since when, and with which key where sshd's log said. */
  connected: { bastion: string; since: string; fingerprint?: string }[];
  firstSeen: string | null;
  lastSeen: string | null;
  /** The bastions it has ever been seen on. */
  seenOn: string[];
  created: string;
  /** When its key stops working on each of its bastions that sets an expiry (renewal included); active devices only. */
  expires: { bastion: string; at: string }[];
  attributes: Record<string, string>;
}

export type AlarmKind = "revoked-connected" | "unknown-listener" | "port-squatted" | "key-mismatch" | "bastion-silent" | "never-seen" | "expiring" | "expired";

export const ALARM_KINDS: readonly AlarmKind[] = ["revoked-connected", "unknown-listener", "port-squatted", "key-mismatch", "bastion-silent", "never-seen", "expiring", "expired"];

interface Alarm {
  kind: AlarmKind;
  bastion?: string;
  hostname?: string;
  port?: number;
  /** `port-squatted`, `unknown-listener`: the uid of the process holding the port, when known. */
  uid?: number;
  message: string;
}

interface BastionView {
  name: string;
  heartbeat: string | null;
  /** True when its agent reported within three intervals. */
  fresh: boolean;
  connected: number;
  /** Active devices that tunnel to it. */
  expected: number;
  /** Active devices whose key on it expires within the warning window / has expired. */
  expiring: number;
  expired: number;
}

export interface FleetStatus {
  at: string;
  devices: DeviceView[];
  bastions: BastionView[];
  alarms: Alarm[];
}

export interface StatusOptions {
  now: Date;
  /** A device built longer ago than this and never seen is an alarm. */
  neverSeenAfterMs: number;
  /** Only this bastion (its devices, listeners and heartbeat). */
  bastion?: string;
  /** Every bastion of the config, so one that never reported shows as silent. */
  knownBastions?: readonly string[];
  /** Each bastion's expiry policy (expiry, expirySpread, expiryRenewal) by name. */
  expiry?: ReadonlyMap<string, ExpiryPolicy>;
  /** A key that expires within this is `expiring` (default 30 days). */
  expiringWithinMs?: number;
}

const DEFAULT_EXPIRING_WITHIN_MS = 30 * 86400_000;

/**
 * When a bastion last saw each device connected: a tunnel listening now counts at its bastion's
 * last look (heartbeat), one that closed at its last sighting (device_history). Only the tunnel
 * user's session on the device's own port counts, and not one opened with another key. The
 * anchor `expiryRenewal` counts from (config/expiry.ts): the agents and `status` read the same.
 */
export function lastSightings(devices: DeviceRecord[], obs: Observations): Map<string, Date> {
  const beats = new Map(obs.heartbeats.map((h) => [h.bastion, h.at]));
  const byPort = new Map(devices.map((d) => [d.port, d]));
  const seen = new Map<string, Date>();
  const note = (hostname: string, iso: string | undefined) => {
    const t = iso === undefined ? NaN : Date.parse(iso);
    if (Number.isNaN(t)) return;
    const had = seen.get(hostname);
    if (!had || had.getTime() < t) seen.set(hostname, new Date(t));
  };
  for (const s of obs.sightings) {
    if (!s.connected || s.tunnel === false || !s.hostname) continue;
    const d = byPort.get(s.port);
    if (!d || d.hostname !== s.hostname) continue;
    if (s.fingerprint && s.fingerprint !== d.fingerprint && s.fingerprint !== d.previous?.fingerprint) continue;
    note(d.hostname, beats.get(s.bastion) ?? s.since);
  }
  for (const h of obs.history) note(h.hostname, h.lastSeen);
  return seen;
}

const ago = (now: Date, iso: string): number => now.getTime() - Date.parse(iso);

/** What every part of one status computation shares: the options, the agents' heartbeats, which bastions count. */
interface Ctx {
  o: StatusOptions;
  only: (bastion: string) => boolean;
  beats: Map<string, Observations["heartbeats"][number]>;
  /** The bastion's agent reported within three of its intervals: what it says holds now. */
  fresh: (bastion: string) => boolean;
}

/**
 * The agents' live listeners → which device is connected where. Only the tunnel user's sshd
 * session that logged in with the device's own key counts; anything else on a device's port is
 * an alarm (port-squatted, unknown-listener, key-mismatch), as is a revoked device connected.
 */
function connections(devices: DeviceRecord[], obs: Observations, c: Ctx, alarms: Alarm[]): Map<string, DeviceView["connected"]> {
  const byPort = new Map(devices.map((d) => [d.port, d]));
  const connectedOn = new Map<string, DeviceView["connected"]>();
  for (const s of obs.sightings) {
    if (!s.connected || !c.only(s.bastion) || !c.fresh(s.bastion)) continue;
    // Whose port it is now (a port released and handed out again belongs to its new device).
    const d = byPort.get(s.port);
    const holder = d ?? devices.find((x) => Object.values(x.services).includes(s.port));
    const by = typeof s.uid === "number" ? { uid: s.uid } : {};
    const who = typeof s.uid === "number" ? `uid ${s.uid}` : "a process that is not the tunnel user's sshd session";
    if (!holder) {
      alarms.push({ kind: "unknown-listener", bastion: s.bastion, port: s.port, ...(s.tunnel === false ? by : {}), message: `${s.bastion}: port ${s.port} listens since ${s.since}${s.tunnel === false ? ` (held by ${who})` : ""}, and no registered device holds it` });
      continue;
    }
    // Only the tunnel user's sshd session is the device; anything else on its port is a squatter.
    if (s.tunnel === false) {
      alarms.push({ kind: "port-squatted", bastion: s.bastion, hostname: holder.hostname, port: s.port, ...by, message: `${s.bastion}: port ${s.port} of ${holder.hostname} is held by ${who} since ${s.since}` });
      continue;
    }
    if (!d) continue;
    // sshd's log named the key that opened this tunnel: it must be the device's own.
    if (s.fingerprint && s.fingerprint !== d.fingerprint && s.fingerprint !== d.previous?.fingerprint) {
      alarms.push({ kind: "key-mismatch", bastion: s.bastion, hostname: d.hostname, port: s.port, message: `${s.bastion}: port ${s.port} of ${d.hostname} was opened with key ${s.fingerprint}, not the device's` });
      continue;
    }
    if (d.status === "revoked") alarms.push({ kind: "revoked-connected", bastion: s.bastion, hostname: d.hostname, port: s.port, message: `${d.hostname} is revoked but connected to ${s.bastion} (port ${s.port}) since ${s.since}` });
    connectedOn.set(d.hostname, [...(connectedOn.get(d.hostname) ?? []), { bastion: s.bastion, since: s.since, ...(s.fingerprint ? { fingerprint: s.fingerprint } : {}) }]);
  }
  return connectedOn;
}

/** When each bastion stops accepting a device's key (the minute its expiry-time holds), for an active device. */
function expiriesOf(d: DeviceRecord, c: Ctx, sighted: Map<string, Date>): DeviceView["expires"] {
  // Only an active device's key is served by the bastions.
  const pub = c.o.expiry && d.status === "active" ? ed25519Key(d.publicKey) : "";
  if (typeof pub === "string") return [];
  const out: DeviceView["expires"] = [];
  for (const b of d.bastions) {
    const p = c.o.expiry!.get(b);
    const t = p && c.only(b) ? keyExpiry(p, new Date(d.created), pub, sighted.get(d.hostname)) : undefined;
    // The minute expiry-time holds (the line truncates): when sshd starts refusing.
    if (t instanceof Date) out.push({ bastion: b, at: new Date(Math.floor(t.getTime() / 60_000) * 60_000).toISOString() });
  }
  return out;
}

/** `expired` after a bastion's expiry, `expiring` within `--expiring-within` of it. */
function expiryAlarms(d: DeviceRecord, expires: DeviceView["expires"], c: Ctx, alarms: Alarm[]): void {
  if (d.status !== "active") return;
  const within = c.o.expiringWithinMs ?? DEFAULT_EXPIRING_WITHIN_MS;
  for (const e of expires) {
    const left = Date.parse(e.at) - c.o.now.getTime();
    if (left <= 0) alarms.push({ kind: "expired", bastion: e.bastion, hostname: d.hostname, message: `${d.hostname}: its key expired on ${e.bastion} at ${e.at}` });
    else if (left <= within) alarms.push({ kind: "expiring", bastion: e.bastion, hostname: d.hostname, message: `${d.hostname}: its key expires on ${e.bastion} at ${e.at} (in ${left < 172_800_000 ? `${Math.ceil(left / 3600_000)}h` : `${Math.floor(left / 86400_000)}d`})` });
  }
}

export function fleetStatus(devices: DeviceRecord[], obs: Observations, o: StatusOptions): FleetStatus {
  const only = (b: string) => o.bastion === undefined || o.bastion === b;
  const beats = new Map(obs.heartbeats.map((h) => [h.bastion, h]));
  const fresh = (b: string): boolean => {
    const h = beats.get(b);
    return h !== undefined && ago(o.now, h.at) <= 3 * h.intervalS * 1000;
  };
  const c: Ctx = { o, only, beats, fresh };
  const alarms: Alarm[] = [];
  const connectedOn = connections(devices, obs, c, alarms);
  const history = new Map<string, Observations["history"]>();
  for (const h of obs.history) if (only(h.bastion)) history.set(h.hostname, [...(history.get(h.hostname) ?? []), h]);
  const sighted = o.expiry && o.expiry.size > 0 ? lastSightings(devices, obs) : new Map<string, Date>();
  const views: DeviceView[] = [];
  for (const d of devices) {
    if (d.status === "pending") continue;
    if (o.bastion !== undefined && !d.bastions.includes(o.bastion) && !connectedOn.has(d.hostname)) continue;
    const hist = history.get(d.hostname) ?? [];
    const conn = connectedOn.get(d.hostname) ?? [];
    const lastSeen = conn.length > 0 ? (conn.map((x) => beats.get(x.bastion)!.at).sort().at(-1) ?? null) : (hist.map((h) => h.lastSeen).sort().at(-1) ?? null);
    const firstSeen = hist.map((h) => h.firstSeen).sort()[0] ?? null;
    const anyFresh = d.bastions.some((b) => only(b) && fresh(b));
    let state: DeviceState;
    if (conn.length > 0) state = "connected";
    else if (hist.length > 0) state = anyFresh ? "offline" : "unknown";
    else if (ago(o.now, d.created) > o.neverSeenAfterMs) state = "never-seen";
    else state = "new";
    if (state === "never-seen" && d.status === "active") {
      alarms.push({ kind: "never-seen", hostname: d.hostname, message: `${d.hostname} was built ${d.created} and has never connected` });
    }
    const expires = expiriesOf(d, c, sighted);
    expiryAlarms(d, expires, c, alarms);
    views.push({ hostname: d.hostname, status: d.status, bastions: d.bastions, port: d.port, state, connected: conn, firstSeen, lastSeen, seenOn: [...new Set(hist.map((h) => h.bastion))], created: d.created, expires, attributes: d.attributes });
  }
  return { at: o.now.toISOString(), devices: views, bastions: bastionViews(devices, views, obs, c, alarms), alarms };
}

/** Per bastion: its agent's last report (a silent one is an alarm), devices connected and expected, keys expiring. */
function bastionViews(devices: DeviceRecord[], views: DeviceView[], obs: Observations, c: Ctx, alarms: Alarm[]): BastionView[] {
  const names = [...new Set([...(c.o.knownBastions ?? []), ...obs.heartbeats.map((h) => h.bastion)])].filter(c.only).sort();
  return names.map((name): BastionView => {
    const h = c.beats.get(name);
    if (!c.fresh(name)) alarms.push({ kind: "bastion-silent", bastion: name, message: h ? `${name}: no report from its agent since ${h.at}` : `${name}: its agent has never reported` });
    return {
      name,
      heartbeat: h?.at ?? null,
      fresh: c.fresh(name),
      connected: views.filter((v) => v.connected.some((x) => x.bastion === name)).length,
      expected: devices.filter((d) => d.status === "active" && d.bastions.includes(name)).length,
      expiring: alarms.filter((a) => a.kind === "expiring" && a.bastion === name).length,
      expired: alarms.filter((a) => a.kind === "expired" && a.bastion === name).length,
    };
  });
}
