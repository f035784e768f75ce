/**
 * The bastion agent: keeps the bastion's key directory (keystore.ts) equal to what the registry
 * authorizes for this bastion, live.
 *
 * - Push, not poll: on PostgreSQL a LISTEN connection hears each committed change (payload: the
 *   hostname) and the agent re-reads that one device; on SQLite a file watch triggers a re-read.
 *   A full re-read every `resyncMs` is the safety net (and catches up after an outage).
 * - Revocation is immediate and follows the key: when a key file goes, every tunnel session that
 *   logged in with that key (sshd's log line for its client connection) is ended, and so is any
 *   session on its ports whose login was not seen, and any listener on a port no key allows
 *   (sessions.ts). A full re-read also ends tunnel-user listeners no key allows and sessions
 *   whose login key is no longer accepted.
 * - A stale session gives way: when a key logs in again, its older session on the same ports
 *   (a device that lost power keeps its port until the keepalive gives up) is ended.
 * - Registry down ≠ bastion down: the directory is the last known good state. A registry error
 *   never changes it; the outage is logged once, retried with backoff, and a full re-read
 *   catches up afterwards. A full read that finds no device at all while keys are authorized is
 *   treated as suspect (a new or wrong database) and not applied: a legitimate "nobody may
 *   connect" still has its revoked rows.
 * - Rotation: a rotated device's old key stays until its grace ends (a timer removes it, and its
 *   line carries expiry-time, so sshd enforces the end anyway) or until sshd's log shows the new
 *   key logging in (authlog.ts) — then it is retired at once, on this bastion.
 * - Corrupt or hostile rows are skipped with a log line (export.ts), never written.
 * - Expiry renewal (`expiryRenewal`): each full re-read also reads when every device was last
 *   seen connected (the agents' own records) and writes the renewed expiry-time into the key
 *   file of a device seen since its anchor day changed; the device is never touched.
 *
 * - What it sees (issue 13): every `observeMs` it lists the loopback listeners in the fleet's
 *   tunnel ranges (any user's: a stray listener is an alarm too) and records them in the
 *   registry — only changes plus a heartbeat — with the key each tunnel's login used where
 *   sshd's log tells (the client address and port of the "Accepted publickey" line, matched to
 *   the connection the listening session process holds).
 *
 * All work runs one step at a time on one queue. The registry is read, and written only in the
 * observation tables (the agent's PostgreSQL role may write those and nothing else).
 */
import { existsSync, readFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import type { Bastion, Fleet } from "../config/fleet.js";
import { writeFileAtomic } from "../util/fsutil.js";
import { displayLocation, isPostgresUrl } from "../config/registry-location.js";
import type { DeviceRecord, Listener, Registry } from "../registry/types.js";
import { renewalAnchor } from "../config/expiry.js";
import { fleetStatus, lastSightings, type FleetStatus } from "../fleet/status.js";
import { followFile, followJournal, parseAccepted, type Follower } from "./authlog.js";
import { bastionEntries, type BastionEntry } from "./export.js";
import { KeyStore, listenPorts } from "./keystore.js";
import { allTunnelSessions, endProcesses, endSessions, isTunnelSession, loopbackListeners, peersOf, tunnelSessions, type TunnelSession } from "./sessions.js";
import { listenPostgres, watchSqlite, type Watch } from "./watch.js";

export type Level = "info" | "warn" | "error";

export interface AgentConfig {
  fleet: Fleet;
  bastion: Bastion;
  /** Holds `keys/` (the directory sshd's command reads) and `retired.json`. */
  stateDir: string;
  /** Registry location (file or postgres:// URL). */
  registry: string;
  openRegistry: (location: string) => Promise<Registry>;
  /** uid of the tunnel user: only its sessions are ever ended. */
  tunnelUid: number;
  /** Full re-read period. */
  resyncMs: number;
  /** `journal`, `none`, or a file sshd logs to (-E). */
  authLog: string;
  log: (level: Level, msg: string) => void;
  now?: () => Date;
  /** A registry call that takes longer counts as an outage (a dead TCP connection can hang). */
  callTimeoutMs?: number;
  /** Longest wait between reconnection attempts. */
  maxBackoffMs?: number;
  /** How often to record what this bastion sees (0: never). */
  observeMs?: number;
}

/** The channel stations NOTIFY (postgres.ts CHANGES_CHANNEL; not imported, to keep pg out of SQLite agents). */
const CHANNEL = "mkoverlay_changes";
/** More changed devices than this at once: one full re-read is cheaper than one query each. */
const FULL_SYNC_ABOVE = 200;
const MAX_TIMER_MS = 2 ** 31 - 1;
/** A session is older than a login when its process started this long before the login's line was read. */
const STALE_MARGIN_MS = 2500;

class RegistryDown extends Error {}

interface Retired {
  fingerprint: string;
  hostname: string;
  until: string;
}

/** What of a row decides its lines: unchanged rows are not rendered again. */
function signature(d: DeviceRecord): string {
  return JSON.stringify([d.status, d.bastions, d.port, d.services, d.publicKey, d.fingerprint, d.previous ?? null, d.created, d.hostname]);
}

export class Agent {
  private store!: KeyStore;
  private readonly rows = new Map<string, { sig: string; record: DeviceRecord }>();
  private readonly byHost = new Map<string, BastionEntry[]>();
  private readonly owner = new Map<string, string>();
  private readonly skipLogged = new Map<string, string>();
  private retired = new Map<string, Retired>();
  private registry: Registry | undefined;
  private watcher: Watch | undefined;
  private follower: Follower | undefined;
  private state: "starting" | "up" | "down" = "starting";
  private downSince = 0;
  private backoffMs = 1000;
  private chain: Promise<void> = Promise.resolve();
  private readonly pending = new Set<string>();
  /** A re-read for notices is waiting (timer or queue): new notices join it. */
  private noticeQueued = false;
  private flushTimer: NodeJS.Timeout | undefined;
  private resyncTimer: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private expiryTimer: NodeJS.Timeout | undefined;
  private observeTimer: NodeJS.Timeout | undefined;
  /** Recent logins of the tunnel user: client `address:port` → the key's fingerprint. */
  private readonly accepted = new Map<string, string>();
  /** Logins not yet checked for stale sessions: fingerprint → the latest login's client, and when its line was read. */
  private readonly logins = new Map<string, { peer: string; readAt: number }>();
  private loginsQueued = false;
  private loginsTimer: NodeJS.Timeout | undefined;
  private stopped = false;
  private suspectLogged = false;
  /** The last apply failed half-way (e.g. a full disk): the next full re-read redoes everything. */
  private dirty = false;
  /** With expiryRenewal: when a bastion last saw each device connected (read at each full re-read). */
  private sighted = new Map<string, Date>();

  constructor(private readonly c: AgentConfig) {}

  private get now(): Date {
    return this.c.now?.() ?? new Date();
  }

  private get where(): string {
    return `registry ${displayLocation(this.c.registry)}`;
  }

  get keysDir(): string {
    return join(this.c.stateDir, "keys");
  }

  async start(): Promise<void> {
    this.store = KeyStore.open(this.keysDir);
    this.loadRetired();
    this.c.log("info", `bastion '${this.c.bastion.name}': ${this.store.size} key(s) in ${this.keysDir} (last known good state); following ${this.where}`);
    this.followAuthLog();
    await this.connect();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const t of [this.flushTimer, this.resyncTimer, this.retryTimer, this.expiryTimer, this.observeTimer, this.loginsTimer]) if (t) clearTimeout(t);
    this.follower?.stop();
    await this.chain.catch(() => undefined);
    await this.disconnect();
  }

  // --- connection and outages ---

  private async connect(): Promise<void> {
    if (this.stopped) return;
    try {
      // openRegistry would create a missing SQLite file: an empty new registry is not the fleet.
      if (!isPostgresUrl(this.c.registry) && !existsSync(this.c.registry)) throw new Error(`${this.c.registry} does not exist`);
      this.registry = await this.timed(this.c.openRegistry(this.c.registry));
      if (isPostgresUrl(this.c.registry)) {
        this.watcher = await this.timed(listenPostgres(this.c.registry, CHANNEL, (p) => this.onNotice(p), (e) => this.down(e)));
      } else {
        this.watcher = watchSqlite(this.c.registry, () => this.onNotice("*"));
      }
    } catch (e) {
      this.down(e);
      return;
    }
    this.enqueue(() => this.fullSync());
  }

  private async disconnect(): Promise<void> {
    const w = this.watcher;
    const r = this.registry;
    this.watcher = undefined;
    this.registry = undefined;
    await w?.close().catch(() => undefined);
    await r?.close().catch(() => undefined);
  }

  private down(e: unknown): void {
    if (this.stopped) return;
    const msg = (e as Error)?.message ?? String(e);
    if (this.state !== "down") {
      this.c.log("error", `${this.where} unreachable: ${msg.split("\n")[0]}; keeping the last known ${this.store.size} key(s) and retrying`);
      this.state = "down";
      this.downSince = Date.now();
      this.backoffMs = 1000;
    }
    if (this.resyncTimer) clearTimeout(this.resyncTimer);
    this.resyncTimer = undefined;
    if (this.retryTimer) return;
    void this.disconnect();
    const wait = this.backoffMs;
    this.backoffMs = Math.min(this.backoffMs * 2, this.c.maxBackoffMs ?? 30_000);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      void this.connect();
    }, wait);
  }

  private timed<T>(p: Promise<T>): Promise<T> {
    const ms = this.c.callTimeoutMs ?? 30_000;
    let t: NodeJS.Timeout | undefined;
    return Promise.race([
      p,
      new Promise<T>((_, rej) => {
        t = setTimeout(() => rej(new Error(`no answer within ${ms / 1000}s`)), ms);
      }),
    ]).finally(() => clearTimeout(t));
  }

  /** A registry call; any failure is an outage, never a reason to change the keys. */
  private async db<T>(fn: (r: Registry) => Promise<T>): Promise<T> {
    const r = this.registry;
    if (!r) throw new RegistryDown("not connected");
    try {
      return await this.timed(fn(r));
    } catch (e) {
      throw new RegistryDown((e as Error)?.message ?? String(e));
    }
  }

  private enqueue(step: () => Promise<void> | void): void {
    this.chain = this.chain
      .then(step)
      .catch((e: unknown) => {
        if (e instanceof RegistryDown) this.down(e);
        else this.c.log("error", `cannot update ${this.keysDir}: ${(e as Error)?.message ?? String(e)}`);
      });
  }

  // --- changes ---

  /**
   * Notices are coalesced: at most one re-read is ever waiting. A notice that arrives while one
   * waits joins it; one that arrives while one runs makes (at most) the next. So a NOTIFY flood —
   * any role that may NOTIFY can send one — costs back-to-back re-reads at worst, never a queue.
   */
  private onNotice(payload: string): void {
    if (this.pending.size <= FULL_SYNC_ABOVE) this.pending.add(payload);
    if (this.noticeQueued) return;
    this.noticeQueued = true;
    // A short wait gathers a burst (a batch on a station) into the one step.
    this.flushTimer = setTimeout(() => {
      this.flushTimer = undefined;
      this.enqueue(() => {
        this.noticeQueued = false;
        const hosts = [...this.pending];
        this.pending.clear();
        return hosts.includes("*") || hosts.length > FULL_SYNC_ABOVE ? this.fullSync() : this.syncHosts(hosts);
      });
    }, 20);
  }

  private async syncHosts(hosts: string[]): Promise<void> {
    // Not connected: the full re-read that follows the reconnection covers these.
    if (!this.registry) return;
    const got: [string, DeviceRecord | undefined][] = [];
    for (const h of hosts) got.push([h, await this.db((r) => r.get(h))]);
    for (const [h, d] of got) {
      if (d) this.rows.set(h, { sig: this.signature(d), record: d });
      else this.rows.delete(h);
    }
    await this.apply(hosts);
  }

  /** A row's signature, with the day its expiry is renewed from (a renewal rewrites the line). */
  private signature(d: DeviceRecord): string {
    const seen = this.sighted.get(d.hostname);
    return seen ? `${signature(d)} ${renewalAnchor(seen).toISOString()}` : signature(d);
  }

  private async fullSync(): Promise<void> {
    if (this.stopped || !this.registry) return;
    const [devices, obs] = await this.db((r) => Promise.all([r.list(), this.c.bastion.expiryRenewal ? r.observations() : undefined]));
    // expiryRenewal: a device seen connected (on any bastion) gets its renewed expiry-time here,
    // at the latest one re-read after the sighting is recorded; nothing on the device changes.
    if (obs) this.sighted = lastSightings(devices, obs);
    if (devices.length === 0 && this.store.size > 0) {
      if (!this.suspectLogged) {
        this.c.log("error", `${this.where} holds no device at all while ${this.store.size} key(s) are authorized: not applied (a new or wrong database?); keeping them`);
        this.suspectLogged = true;
      }
    } else {
      this.suspectLogged = false;
      const seen = new Set<string>();
      const changed: string[] = [];
      for (const d of devices) {
        seen.add(d.hostname);
        const sig = this.signature(d);
        if (this.dirty || this.rows.get(d.hostname)?.sig !== sig) changed.push(d.hostname);
        this.rows.set(d.hostname, { sig, record: d });
      }
      for (const h of [...this.rows.keys()]) {
        if (seen.has(h)) continue;
        this.rows.delete(h);
        changed.push(h);
      }
      // Keys on disk that no row explains (the directory outlived its registry view).
      for (const fp of this.store.fingerprints()) if (!this.owner.has(fp)) changed.push(`\0${fp}`);
      await this.apply(changed);
      await this.sweep();
    }
    if (this.state !== "up") {
      this.scheduleObserve(0);
      this.c.log("info", this.state === "down" ? `${this.where} reachable again after ${Math.round((Date.now() - this.downSince) / 1000)}s; caught up: ${this.store.size} key(s)` : `in sync: ${this.store.size} key(s)`);
      this.state = "up";
    }
    if (this.resyncTimer) clearTimeout(this.resyncTimer);
    this.resyncTimer = setTimeout(() => {
      this.resyncTimer = undefined;
      this.enqueue(() => this.fullSync());
    }, this.c.resyncMs);
  }

  /** Recomputes the entries of `hosts` from `rows` and brings the directory in line. */
  private async apply(hosts: string[]): Promise<void> {
    const now = this.now;
    const touched = new Set<string>();
    this.dirty = true;
    for (const h of hosts) {
      if (h.startsWith("\0")) {
        touched.add(h.slice(1)); // an orphan key file: removed below, since nobody owns it
        continue;
      }
      for (const e of this.byHost.get(h) ?? []) {
        if (this.owner.get(e.fingerprint) === h) this.owner.delete(e.fingerprint);
        touched.add(e.fingerprint);
      }
      this.byHost.delete(h);
      const row = this.rows.get(h)?.record;
      if (!row) continue;
      const { entries, skipped } = bastionEntries(this.c.fleet, this.c.bastion, [row], now, this.sighted);
      const reasons = skipped.map((s) => s.reason).join("; ");
      if (reasons && this.skipLogged.get(h) !== reasons) this.c.log("warn", `skipped ${JSON.stringify(h)}: ${reasons}`);
      if (reasons) this.skipLogged.set(h, reasons);
      else this.skipLogged.delete(h);
      const kept: BastionEntry[] = [];
      for (const e of entries) {
        if (e.previous && this.retired.has(e.fingerprint)) continue;
        const other = this.owner.get(e.fingerprint);
        if (other !== undefined && other !== h) {
          this.c.log("warn", `skipped ${JSON.stringify(h)}: key ${e.fingerprint} is already authorized for ${other}`);
          continue;
        }
        this.owner.set(e.fingerprint, h);
        touched.add(e.fingerprint);
        kept.push(e);
      }
      if (kept.length > 0) this.byHost.set(h, kept);
    }
    const freed: number[] = [];
    /** Keys that left the accepted set, with the ports they allowed. */
    const gone = new Map<string, number[]>();
    const events: string[] = [];
    let added = 0;
    let removed = 0;
    for (const fp of touched) {
      const h = this.owner.get(fp);
      const e = h === undefined ? undefined : this.byHost.get(h)?.find((x) => x.fingerprint === fp);
      if (e) {
        if (this.store.put(fp, `${e.line}\n`)) {
          added += 1;
          events.push(`${e.hostname}: ${e.previous ? `previous key ${fp} accepted until ${e.until?.toISOString()}` : `key ${fp} authorized`} (port(s) ${e.ports.join(", ")})`);
        }
      } else {
        const had = this.store.remove(fp);
        if (had !== undefined) {
          removed += 1;
          events.push(`${had.trim().split(" ").pop()}: key ${fp} removed`);
          freed.push(...listenPorts(had));
          gone.set(fp, listenPorts(had));
        }
      }
    }
    // One line per change, unless a re-read brings thousands (the first start of a big fleet).
    if (events.length <= 20) for (const ev of events) this.c.log("info", ev);
    else this.c.log("info", `applied: ${added} key(s) written, ${removed} removed; ${this.store.size} in total`);
    await this.endSessionsOn(freed.filter((p) => !this.store.allows(p)), "its key was removed");
    await this.endSessionsOfKeys(gone);
    this.dirty = false;
    this.scheduleExpiry();
  }

  /** Ends tunnel-user sessions listening on `ports` (no key allows them any more). */
  private async endSessionsOn(ports: number[], why: string): Promise<void> {
    if (ports.length === 0) return;
    const r = await endSessions(ports, this.c.tunnelUid);
    for (const e of r.ended) this.c.log("info", `ended the session on port ${e.port} (pid ${e.pid}): ${why}`);
    if (r.denied > 0) this.c.log("error", `could not read the file descriptors of ${r.denied} tunnel session(s): the agent needs CAP_SYS_PTRACE to end revoked sessions`);
    for (const p of r.unowned) this.c.log("warn", `port ${p} is still listening but no session of the tunnel user holds it`);
  }

  private get ranges() {
    return [this.c.fleet.ports.ssh, this.c.fleet.ports.services];
  }

  /** Just these ports, or the whole tunnel ranges when there are many (each range is checked per socket). */
  private rangesFor(ports: Iterable<number>) {
    const list = [...ports];
    return list.length > 64 ? this.ranges : list.map((p) => ({ lo: p, hi: p }));
  }

  /** The key a tunnel session logged in with, where sshd's log told (its client's login line). */
  private keyOf(s: TunnelSession): string | undefined {
    for (const p of s.peers) {
      const fp = this.accepted.get(p);
      if (fp !== undefined) return fp;
    }
    return undefined;
  }

  /**
   * Revocation follows the key, not only the port (issue 19): after a rotation the new key allows
   * the same port, so a session of the old key must be found by its login. Ends every tunnel
   * session that logged in with a key in `gone`, and every session on one of their ports whose
   * login key is unknown (logged in before the agent started, or its line not read yet): a
   * device whose key is still accepted comes back within seconds, while a session the agent
   * cannot tell apart from the removed key's must not keep the port.
   */
  private async endSessionsOfKeys(gone: Map<string, number[]>): Promise<void> {
    if (gone.size === 0) return;
    const ports = new Set([...gone.values()].flat());
    const hit: { s: TunnelSession; fp: string | undefined }[] = [];
    // Listening or not: an authenticated session may ask for a forward at any time.
    for (const s of allTunnelSessions(this.ranges, this.c.tunnelUid)) {
      const fp = this.keyOf(s);
      if (fp !== undefined ? gone.has(fp) && !this.store.get(fp) : s.ports.some((p) => ports.has(p))) hit.push({ s, fp });
    }
    await this.endTunnelSessions(hit, "its key was removed");
  }

  private async endTunnelSessions(hit: { s: TunnelSession; fp: string | undefined }[], why: string): Promise<void> {
    if (hit.length === 0) return;
    const ended = new Set(await endProcesses(hit.map((h) => h.s.pid), this.c.tunnelUid));
    for (const { s, fp } of hit) {
      if (ended.has(s.pid)) this.c.log("info", `ended the session ${s.ports.length > 0 ? `on port ${s.ports.join(", ")}` : "holding no port"} (pid ${s.pid}, ${fp === undefined ? "login key unknown" : `key ${fp}`}): ${why}`);
    }
  }

  /**
   * Tunnel-user listeners in the fleet's ranges that no key allows, and sessions whose login key
   * is no longer accepted (e.g. revoked or rotated while the agent was down).
   */
  private async sweep(): Promise<void> {
    const stray = loopbackListeners(this.ranges, { uid: this.c.tunnelUid }).filter((l) => !this.store.allows(l.port));
    await this.endSessionsOn([...new Set(stray.map((l) => l.port))], "no key allows this port");
    const hit: { s: TunnelSession; fp: string | undefined }[] = [];
    for (const s of allTunnelSessions(this.ranges, this.c.tunnelUid)) {
      const fp = this.keyOf(s);
      if (fp !== undefined && !this.store.get(fp)) hit.push({ s, fp });
    }
    await this.endTunnelSessions(hit, "its login key is no longer accepted");
  }

  // --- what this bastion sees (issue 13) ---

  private scheduleObserve(delayMs: number): void {
    const every = this.c.observeMs ?? 0;
    if (every <= 0 || this.stopped || this.observeTimer) return;
    this.observeTimer = setTimeout(() => {
      this.observeTimer = undefined;
      this.enqueue(() => this.observe());
      this.scheduleObserve(every);
    }, delayMs);
  }

  /** Records the tunnel ports listening now (a heartbeat when nothing changed). */
  private async observe(): Promise<void> {
    if (!this.registry) return; // down: the heartbeat stops, and status says this bastion is silent
    const listeners = loopbackListeners(this.ranges, { withPids: true });
    // Who holds each listener (issue 19): only the tunnel user's sshd session counts for a
    // device; any other process on a tunnel port is recorded with its uid, and is an alarm.
    const tunnel = new Set(listeners.flatMap((l) => (l.uid === this.c.tunnelUid && l.pid !== undefined && isTunnelSession(l.pid, this.c.tunnelUid) ? [l.pid] : [])));
    const peers = peersOf([...tunnel]);
    const byPort = new Map<number, Listener>();
    for (const l of listeners) {
      const had = byPort.get(l.port) ?? { port: l.port, tunnel: true };
      if (l.pid !== undefined && tunnel.has(l.pid)) {
        const fp = (peers.get(l.pid) ?? []).map((p) => this.accepted.get(p)).find((x) => x !== undefined);
        byPort.set(l.port, fp && !had.fingerprint ? { ...had, fingerprint: fp } : had);
      } else if (had.tunnel) {
        // Another user's listener (or one whose process could not be found) wins: it is the alarm.
        byPort.set(l.port, { port: l.port, tunnel: false, uid: l.uid });
      }
    }
    await this.db((r) =>
      r.observe({
        bastion: this.c.bastion.name,
        at: this.now,
        intervalS: Math.max(1, Math.round((this.c.observeMs ?? 15_000) / 1000)),
        agent: `${hostname()}:${process.pid}`,
        listeners: [...byPort.values()],
      }),
    );
  }

  /** This bastion's view of the fleet, for the metrics endpoint. */
  async status(neverSeenAfterMs: number, expiringWithinMs?: number): Promise<FleetStatus> {
    const [devices, obs] = await this.db((r) => Promise.all([r.list(), r.observations()]));
    const b = this.c.bastion;
    return fleetStatus(devices, obs, { now: this.now, neverSeenAfterMs, bastion: b.name, knownBastions: [b.name], expiry: new Map([[b.name, b]]), ...(expiringWithinMs === undefined ? {} : { expiringWithinMs }) });
  }

  // --- rotation ---

  private followAuthLog(): void {
    const onLine = (line: string) => {
      const a = parseAccepted(line);
      if (!a || a.user !== this.c.bastion.user) return;
      this.accepted.delete(`${a.address}:${a.port}`);
      this.accepted.set(`${a.address}:${a.port}`, a.fingerprint);
      // Bounded: the oldest logins go first (a live tunnel's is looked up within an interval).
      if (this.accepted.size > 100_000) this.accepted.delete(this.accepted.keys().next().value!);
      this.noteLogin(a.fingerprint, `${a.address}:${a.port}`);
      this.enqueue(() => this.onAccepted(a.fingerprint));
    };
    const onError = (e: Error) => this.c.log("warn", `sshd log: ${e.message}`);
    if (this.c.authLog === "none") return;
    this.follower = this.c.authLog === "journal" ? followJournal(onLine, { onError }) : followFile(this.c.authLog, onLine, { onError });
  }

  /**
   * A key logged in from `peer`: its stale sessions give way (issue 20). After a power cut the
   * bastion keeps the old session, and its port, until the keepalive gives up, so the device's
   * reconnects fail ("remote port forwarding failed"). Logins are gathered for a moment and
   * checked together — one look at /proc for a whole reconnect storm, not one per login.
   */
  private noteLogin(fp: string, peer: string): void {
    this.logins.delete(fp);
    if (this.logins.size < 100_000) this.logins.set(fp, { peer, readAt: Date.now() }); // the latest login of each key
    if (this.loginsQueued || this.stopped) return;
    this.loginsQueued = true;
    this.loginsTimer = setTimeout(() => {
      this.loginsTimer = undefined;
      this.enqueue(() => {
        this.loginsQueued = false;
        const batch = [...this.logins];
        this.logins.clear();
        return this.replaceStale(batch);
      });
    }, 200);
  }

  /**
   * For each key's latest login, any older session on that key's ports that logged in with the
   * same key, or whose login the agent did not see, is ended; the device's next try binds. (A
   * session of the device's other key is not stale: rotation and retirement deal with it.)
   * Older: its process started well before the login's line was read (STALE_MARGIN_MS: the
   * log's delay, and /proc's boot time in whole seconds) — a session that logged in after the
   * login, but whose own line is not read yet, is never taken for stale.
   */
  private async replaceStale(batch: [string, { peer: string; readAt: number }][]): Promise<void> {
    const wanted = new Map<number, { fp: string; peer: string; readAt: number; host: string }>();
    for (const [fp, { peer, readAt }] of batch) {
      const h = this.owner.get(fp);
      const e = h === undefined ? undefined : this.byHost.get(h)?.find((x) => x.fingerprint === fp);
      for (const p of e?.ports ?? []) wanted.set(p, { fp, peer, readAt, host: h! });
    }
    if (wanted.size === 0) return;
    const hit: { s: TunnelSession; fp: string | undefined }[] = [];
    let why = "";
    for (const s of tunnelSessions(this.rangesFor(wanted.keys()), this.c.tunnelUid)) {
      const fp = this.keyOf(s);
      const older = (w: { readAt: number }) => s.startedAt !== undefined && s.startedAt < w.readAt - STALE_MARGIN_MS;
      const login = s.ports.map((p) => wanted.get(p)).find((w) => w !== undefined && !s.peers.includes(w.peer) && (fp === undefined || fp === w.fp) && older(w));
      if (!login) continue;
      hit.push({ s, fp });
      why = `${login.host} logged in again with the same key (${login.peer}): the stale session gives way`;
    }
    if (hit.length === 1) await this.endTunnelSessions(hit, why);
    else if (hit.length > 1) await this.endTunnelSessions(hit, "their devices logged in again with the same key: stale sessions give way");
  }

  /** A device's new key logged in: its previous key is retired at once (on this bastion). */
  private async onAccepted(fp: string): Promise<void> {
    const h = this.owner.get(fp);
    if (h === undefined) return;
    const entries = this.byHost.get(h) ?? [];
    if (!entries.some((e) => e.fingerprint === fp && !e.previous)) return;
    const old = entries.filter((e) => e.previous);
    if (old.length === 0) return;
    for (const e of old) this.retired.set(e.fingerprint, { fingerprint: e.fingerprint, hostname: h, until: e.until?.toISOString() ?? "" });
    this.saveRetired();
    this.c.log("info", `${h}: new key ${fp} logged in; retiring its previous key ${old.map((e) => e.fingerprint).join(", ")}`);
    await this.apply([h]);
  }

  private get retiredFile(): string {
    return join(this.c.stateDir, "retired.json");
  }

  private loadRetired(): void {
    try {
      const data = JSON.parse(readFileSync(this.retiredFile, "utf8")) as { retired?: Retired[] };
      const now = this.now.getTime();
      // Past its grace end a key is gone anyway: forget it.
      for (const r of data.retired ?? []) if (Date.parse(r.until) > now) this.retired.set(r.fingerprint, r);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") this.c.log("warn", `${this.retiredFile}: ${(e as Error).message}; starting with no retired keys`);
    }
  }

  private saveRetired(): void {
    const now = this.now.getTime();
    const list = [...this.retired.values()].filter((r) => Date.parse(r.until) > now);
    writeFileAtomic(this.retiredFile, JSON.stringify({ retired: list }, null, 1) + "\n", { mode: 0o644 });
  }

  /** Re-evaluates devices when the earliest grace period ends. */
  private scheduleExpiry(): void {
    if (this.expiryTimer) clearTimeout(this.expiryTimer);
    this.expiryTimer = undefined;
    let next = Infinity;
    for (const es of this.byHost.values()) for (const e of es) if (e.until && e.until.getTime() < next) next = e.until.getTime();
    if (next === Infinity || this.stopped) return;
    const wait = Math.min(Math.max(next - this.now.getTime(), 0) + 50, MAX_TIMER_MS);
    this.expiryTimer = setTimeout(() => {
      this.expiryTimer = undefined;
      const t = this.now.getTime();
      const due = [...this.byHost.entries()].filter(([, es]) => es.some((e) => e.until && e.until.getTime() <= t)).map(([h]) => h);
      this.enqueue(() => this.apply(due));
    }, wait);
  }
}
