/**
 * The one device flow, used by build, image, batch, rotate and the API: a device is claimed —
 * reserved (a new device), found (a re-flash) or put into rotation — then rendered, placed
 * under temp names by its output module (device/outputs/), and committed; or given back. The
 * rule for a failure is written once, in `settle`: an output already in place is left to the
 * doctor (giving its port back would let the next device take it), anything else gives the
 * claim back. A batch chunk (commands/batch.ts) claims, places and commits many devices at once
 * and settles each of them with the same rule.
 */
import { dialsJson } from "../config/compat.js";
import type { Bastion, Fleet } from "../config/fleet.js";
import type { DeviceKey } from "./inputs.js";
import { UserError } from "../util/errors.js";
import { serviceNames } from "../config/forwards.js";
import { publicKeyLine } from "../keys/ed25519.js";
import { buildOverlay } from "../overlay/steps.js";
import type { Entry } from "../overlay/tree.js";
import { deviceSpec, overlayPath, renderDevice, type DeviceContext, type Emitted, type OutputForm, type Rendered } from "./pipeline.js";
import type { Board, OsProfile } from "../config/profiles.js";
import { ReservationLost } from "../registry/rows.js";
import type { DeviceRecord, ReserveRequest } from "../registry/types.js";
import { Interrupted, type Station } from "./station.js";
import { outputOf, type DeviceOutput } from "./outputs/index.js";

/** One device to build, its inputs resolved (board, OS, bastions, key). */
export interface DeviceRequest {
  board: Board;
  os: OsProfile;
  bastions: Bastion[];
  hostname: string | undefined;
  dk: DeviceKey;
  /** Factory data recorded with the device (serial number, MAC, site…). */
  attributes?: Record<string, string>;
}

export function reserveRequest(st: Station, req: DeviceRequest): ReserveRequest {
  return {
    hostname: req.hostname,
    hostnameTemplate: st.fleet.hostnameTemplate,
    range: st.fleet.ports.ssh,
    services: serviceNames(st.fleet),
    serviceRange: st.fleet.ports.services,
    board: req.board.id,
    os: req.os.id,
    bastions: req.bastions.map((b) => b.name),
    publicKey: publicKeyLine(req.dk.key.pub),
    fingerprint: req.dk.fingerprint,
    overlayPath: (h) => overlayPath(st.emit, h),
    now: st.now,
    attributes: req.attributes ?? {},
    dials: dialsJson(st.fleet, req.bastions),
  };
}

export function contextOf(st: Station, device: DeviceRecord, req: Omit<DeviceRequest, "hostname">): DeviceContext {
  return { fleet: st.fleet, device, key: req.dk.key, board: req.board, os: req.os, bastions: req.bastions, emit: st.emit };
}

/** What a build reports (and `--json` prints): the registered device plus its outputs. */
export interface BuildResult extends Pick<DeviceRecord, "hostname" | "board" | "os" | "bastions" | "port" | "services" | "fingerprint" | "attributes"> {
  /** The public key line with the hostname as its comment. */
  publicKey: string;
  overlay: string;
  authorizedKeysFile: string;
  authorizedKeys: Record<string, string>;
  /** The paste-able fragment printed and written to authorizedKeysFile (not in --json). */
  authorizedKeysText: string;
  rebuilt: boolean;
}

export function buildResult(device: DeviceRecord, dk: DeviceKey, e: Emitted, rebuilt: boolean): BuildResult {
  return {
    hostname: device.hostname,
    board: device.board,
    os: device.os,
    bastions: device.bastions,
    port: device.port,
    services: device.services,
    attributes: device.attributes,
    fingerprint: dk.fingerprint,
    publicKey: publicKeyLine(dk.key.pub, device.hostname),
    overlay: e.overlay,
    authorizedKeysFile: e.authorizedKeysFile,
    authorizedKeys: e.lines,
    authorizedKeysText: e.text,
    rebuilt,
  };
}

/**
 * The overlay a device request will get, built before its port is reserved, so that an image
 * base can be checked for room (and names debugfs cannot take) with nothing reserved yet. The
 * port numbers are placeholders; they do not change the tree's size.
 */
export function provisionalEntries(fleet: Fleet, req: DeviceRequest, now: Date): Entry[] {
  const device: DeviceRecord = {
    hostname: req.hostname ?? "provisional",
    board: req.board.id,
    os: req.os.id,
    bastions: req.bastions.map((b) => b.name),
    port: fleet.ports.ssh.lo,
    services: Object.fromEntries(serviceNames(fleet).map((n) => [n, fleet.ports.services.lo])),
    publicKey: publicKeyLine(req.dk.key.pub),
    fingerprint: req.dk.fingerprint,
    status: "pending",
    overlay: null,
    station: "",
    created: now.toISOString(),
    updated: now.toISOString(),
    attributes: req.attributes ?? {},
  };
  return buildOverlay(deviceSpec({ fleet, device, key: req.dk.key, board: req.board, os: req.os, bastions: req.bastions })).list();
}

/**
 * Everything an image output can be refused for, checked before a port is reserved (and before
 * the registry is opened): see image/output.ts. `mine` is the device's key for a single build;
 * a batch passes undefined (each device brings a new key).
 */
export async function preflightImageForm(form: OutputForm, entries: readonly Entry[], mine: string | undefined, targets: string[] = [], outDir?: string): Promise<void> {
  if (form.kind !== "image") return;
  const { preflightImage } = await import("../image/output.js");
  await preflightImage(form, entries, mine, targets, outDir);
}

/** A device this station holds while it is built: how to commit it and how to give it back. */
export interface Claim {
  /** The device as it is rendered (for a rotation: with its new key). */
  device: DeviceRecord;
  /** The registry leases it to this station (a reservation, a rotation; not a re-flash). */
  leased: boolean;
  /** Records the placed output: activate, update, or switch keys. */
  commit(r: Rendered): Promise<void>;
  /** Gives the claim back (a pending row, a pending rotation); a re-flash has nothing to give. */
  giveBack(): Promise<void>;
  /** A stop asked for before the point of no return: what was (not) done. */
  notDone(why: string): Interrupted;
  /** Said when the output is in place but could not be recorded. */
  leftToDoctor: string;
}

/** A new device's reservation: activated when placed, given back otherwise. */
export function reservedClaim(st: Station, device: DeviceRecord): Claim {
  const hostname = device.hostname;
  return {
    device,
    leased: true,
    commit: () => st.registry.activate(hostname),
    giveBack: () => st.registry.abandon(hostname),
    notDone: (why) => new Interrupted(why, `interrupted by ${why}: ${hostname} was not built; its reservation was given back`),
    leftToDoctor: `${hostname} was written but not registered as built; 'mkoverlay registry doctor --fix' finishes it`,
  };
}

/**
 * The rule for a device that failed, written once. Its output in place (and the reservation
 * not lost): the row stays pending, its lease runs out and the doctor finishes it — giving the
 * port back would let the next device take a port that a complete output already carries.
 * Otherwise the claim is given back (a failure to give it back leaves the row to the doctor and
 * must not hide what went wrong). A stop asked for meanwhile is the cause (a Ctrl-C in a
 * terminal reaches the tools an image is made with, too). Returns the error to report.
 */
export async function settle(st: Station, claim: Claim, err: unknown, placed: boolean): Promise<unknown> {
  if (placed && !(err instanceof ReservationLost)) {
    st.log.warn(claim.leftToDoctor);
    return err;
  }
  await claim.giveBack().catch(() => undefined);
  // A Ctrl-C in a terminal reaches the tools an image is made with (cp, debugfs) too, and their
  // exit can be seen before our own SIGINT handler has run: one turn of the event loop lets it.
  const why = st.stopRequested() ?? (await new Promise<void>((r) => setImmediate(r)), st.stopRequested());
  if (why && !(err instanceof Interrupted) && !(err instanceof ReservationLost)) return claim.notDone(why);
  return err;
}

/**
 * A placed device whose reservation was lost before it was committed (the doctor reclaimed it):
 * its port may be another's by now, so its output is taken away again. Returns the error.
 */
export function lostAfterPlacing(output: DeviceOutput, r: Rendered, e: ReservationLost): ReservationLost {
  output.remove(r);
  return e;
}

/** Commits a placed device (`lostAfterPlacing` if the reservation was lost meanwhile). */
async function commitPlaced(claim: Claim, r: Rendered, output: DeviceOutput): Promise<void> {
  try {
    await claim.commit(r);
  } catch (e) {
    throw e instanceof ReservationLost ? lostAfterPlacing(output, r, e) : e;
  }
}

/**
 * `beforePlace` runs once the device is rendered, before its output takes its name (`flash`
 * writes and verifies the card there): if it throws, the claim is given back and nothing is placed.
 */
export interface BuildHooks {
  beforePlace?: (r: Rendered, device: DeviceRecord) => Promise<void>;
}

/**
 * Render → place → commit for one claimed device. The point of no return is just before the
 * output takes its final name: a stop asked for until then (staging an image takes seconds)
 * leaves nothing, and a leased claim must still be this station's.
 */
async function completeClaim(st: Station, claim: Claim, req: Omit<DeviceRequest, "hostname">, hooks: BuildHooks = {}): Promise<Rendered> {
  const hostname = claim.device.hostname;
  const output = outputOf(st.emit);
  if (claim.leased) st.leases.add(hostname);
  let placed = false;
  try {
    const r = await renderDevice(contextOf(st, claim.device, req));
    await hooks.beforePlace?.(r, claim.device);
    await output.place(r, async () => {
      const why = st.stopRequested();
      if (why) throw claim.notDone(why);
      if (claim.leased && !(await st.registry.confirm([hostname])).has(hostname)) throw new ReservationLost(hostname);
    });
    placed = true;
    await commitPlaced(claim, r, output);
    return r;
  } catch (err) {
    throw await settle(st, claim, err, placed);
  } finally {
    st.leases.delete(hostname);
  }
}

/**
 * A build (build, image, a batch's image and folder forms, the API): a registered key is a
 * re-flash (same device, name and ports, a fresh overlay); anything else reserves a new device.
 */
export async function buildDevice(st: Station, req: DeviceRequest, hooks: BuildHooks = {}): Promise<BuildResult> {
  const found = req.dk.imported ? await st.registry.getByFingerprint(req.dk.fingerprint) : undefined;
  const claim = found ? reflashClaim(st, found, req) : await reserveClaim(st, req);
  const r = await completeClaim(st, claim, req, hooks);
  st.log.info(`wrote ${r.overlay}`);
  return buildResult(claim.device, req.dk, r, found !== undefined);
}

async function reserveClaim(st: Station, req: DeviceRequest): Promise<Claim> {
  const why = st.stopRequested();
  if (why) throw new Interrupted(why, `interrupted by ${why} before anything was reserved`);
  const device = await st.registry.reserve(reserveRequest(st, req));
  st.log.info(`reserved port ${device.port} for ${device.hostname}`);
  return reservedClaim(st, device);
}

function reflashClaim(st: Station, found: DeviceRecord, req: DeviceRequest): Claim {
  const { board, os, bastions } = req;
  if (found.status !== "active") throw new UserError(`--host-key: the key belongs to ${found.hostname}, which is ${found.status}`);
  if (req.hostname !== undefined && req.hostname !== found.hostname) {
    throw new UserError(`--host-key: the key is registered to ${found.hostname}, not ${req.hostname}`, { hint: "drop --hostname to rebuild that device's overlay" });
  }
  if (Object.keys(req.attributes ?? {}).length > 0) throw new UserError(`--attr: ${found.hostname} is registered; a re-flash keeps the factory data it was registered with`);
  st.log.info(`${found.hostname} is registered with this key: rebuilding its overlay (port ${found.port})`);
  const device = { ...found, board: board.id, os: os.id, bastions: bastions.map((b) => b.name) };
  const hostname = device.hostname;
  return {
    device,
    leased: false,
    commit: (r) => st.registry.updateDevice(hostname, { board: board.id, os: os.id, bastions: device.bastions, overlay: r.overlay, dials: dialsJson(st.fleet, bastions, found.dials) }),
    giveBack: async () => undefined,
    notDone: (why) => new Interrupted(why, `interrupted by ${why}: ${hostname} was not built`),
    leftToDoctor: `${hostname} was written but not registered as built; 'mkoverlay registry doctor --fix' finishes it`,
  };
}

/** What a rotation reports (and `rotate --json` prints, without `text`). */
export interface RotateResult {
  hostname: string;
  port: number;
  fingerprint: string;
  previousFingerprint: string;
  graceUntil: string | null;
  overlay: string;
  authorizedKeys: Record<string, string>;
  text: string;
}

/**
 * A rotation, in two phases like a build: the new key is recorded as pending (a second rotation
 * of the same device is refused meanwhile), the new overlay is placed, and only then does the
 * registry — and so every export — switch keys, keeping the old one valid for `graceMs`.
 */
export async function rotateDevice(st: Station, d: DeviceRecord, req: Omit<DeviceRequest, "hostname" | "attributes">, graceMs: number): Promise<RotateResult> {
  const { registry, log } = st;
  const hostname = d.hostname;
  const { dk } = req;
  const publicKey = publicKeyLine(dk.key.pub);
  const stopped = st.stopRequested();
  if (stopped) throw new Interrupted(stopped, `interrupted by ${stopped}: ${hostname} was not rotated`);
  await registry.beginRotate(hostname, d.fingerprint, publicKey, dk.fingerprint, overlayPath(st.emit, hostname), dialsJson(st.fleet, req.bastions, d.dials));
  let graceUntil: Date | undefined;
  const claim: Claim = {
    device: { ...d, publicKey, fingerprint: dk.fingerprint },
    leased: true,
    commit: () => {
      graceUntil = graceMs > 0 ? new Date(Date.now() + graceMs) : undefined;
      return registry.commitRotate(hostname, dk.fingerprint, graceUntil);
    },
    giveBack: () => registry.abortRotate(hostname, dk.fingerprint),
    // Stopping before the new overlay is in place leaves the device as it was.
    notDone: (why) => new Interrupted(why, `interrupted by ${why}: ${hostname} was not rotated (it keeps its key)`),
    // The new overlay replaced the old one: dropping the new key now would lock the device out.
    leftToDoctor: `${hostname}: the new overlay was written but the rotation not recorded; 'mkoverlay registry doctor --fix' finishes it`,
  };
  const r = await completeClaim(st, claim, req);
  log.info(`rotated ${hostname}: new key ${dk.fingerprint}, port ${d.port} kept; wrote ${r.overlay}`);
  log.info(graceUntil ? `the old key stays valid until ${graceUntil.toISOString()} (or until a bastion agent sees the new one)` : "the old key is no longer valid");
  return {
    hostname,
    port: d.port,
    fingerprint: dk.fingerprint,
    previousFingerprint: d.fingerprint,
    graceUntil: graceUntil?.toISOString() ?? null,
    overlay: r.overlay,
    authorizedKeys: r.lines,
    text: r.text,
  };
}
