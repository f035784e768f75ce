/**
 * Which registered devices a config would lock out. A device's overlay dials what the config
 * said when it was built (recorded in the registry as its `Dials`): per bastion the tunnel user,
 * host, port, pinned host keys and `from:`, and the ranges its ports came from. A later config
 * that renames the user, moves the bastion, drops every key the device pinned, narrows `from:`
 * or moves the port ranges past the device's ports leaves that device behind. This module
 * compares, field by field, with counts; builds and `bastion install` refuse on it unless
 * `--force-config-change`, and then the bastion serves what it can side by side (`servable`):
 * old tunnel users keep their Match block, an old device keeps its `from=` and its port. A
 * changed host, port or host key cannot be served by the bastion: the old endpoint must be kept
 * running (docs/bastion.md, "Changing a fleet's settings").
 *
 * Pure: no registry, no yaml (the position of a field is looked up only when refusing).
 */
import { isIP } from "node:net";
import { UserError } from "../util/errors.js";
import { lineFingerprint } from "../keys/fingerprint.js";
import type { Bastion, Fleet, PortRange } from "./fleet.js";

interface BastionDial {
  user: string;
  host: string;
  port: number;
  /** SHA256 fingerprints of the pinned host keys (`@cert-authority SHA256:…` for a CA). */
  hostKeys: string[];
  /** The bastion's `from:` when the device was built (null: any source address). */
  from: string[] | null;
}

/** What a device's overlay dials, as recorded in the registry (JSON). */
export interface Dials {
  /** ports.ssh and ports.services, `LO-HI`, when its ports were reserved. */
  ssh: string;
  services: string;
  bastions: Record<string, BastionDial>;
}

const rangeText = (r: PortRange): string => `${r.lo}-${r.hi}`;

/** `SHA256:…` of a canonical host key entry (`[@cert-authority ]TYPE BASE64`). */
export function hostKeyFingerprint(entry: string): string {
  return lineFingerprint(entry, { keepCA: true });
}

function bastionDial(b: Bastion): BastionDial {
  return { user: b.user, host: b.host, port: b.port, hostKeys: b.hostKeys.map(hostKeyFingerprint), from: b.from ?? null };
}

/** What an overlay built now for these bastions dials. */
function dialsOf(fleet: Fleet, bastions: readonly Bastion[]): Dials {
  return { ssh: rangeText(fleet.ports.ssh), services: rangeText(fleet.ports.services), bastions: Object.fromEntries(bastions.map((b) => [b.name, bastionDial(b)])) };
}

/**
 * As JSON, for the registry. `was`: the device's recorded dials, for a re-flash or a rotation —
 * its ports do not move, so the ranges they came from stay recorded.
 */
export function dialsJson(fleet: Fleet, bastions: readonly Bastion[], was?: string): string {
  const d = dialsOf(fleet, bastions);
  const old = parseDials(was);
  return JSON.stringify(old ? { ...d, ssh: old.ssh, services: old.services } : d);
}

/** The stored JSON read back; undefined for anything that is not one (a hostile row is ignored, not trusted). */
export function parseDials(text: string | null | undefined): Dials | undefined {
  if (!text) return undefined;
  try {
    const d = JSON.parse(text) as Dials;
    if (typeof d !== "object" || d === null || typeof d.ssh !== "string" || typeof d.services !== "string" || typeof d.bastions !== "object" || d.bastions === null) return undefined;
    for (const b of Object.values(d.bastions)) {
      if (typeof b?.user !== "string" || typeof b.host !== "string" || !Number.isInteger(b.port) || !Array.isArray(b.hostKeys)) return undefined;
      if (b.from !== null && !(Array.isArray(b.from) && b.from.every((f) => typeof f === "string"))) return undefined;
    }
    return d;
  } catch {
    return undefined;
  }
}

export function parseRangeText(v: string): PortRange | undefined {
  const m = /^(\d{1,5})-(\d{1,5})$/.exec(v);
  return m ? { lo: Number(m[1]), hi: Number(m[2]) } : undefined;
}

// --- `from:` coverage ---

function cidr(v: string): { fam: 4 | 6; net: bigint; bits: number } | undefined {
  const [addr = "", bits] = v.split("/");
  const fam = isIP(addr);
  if (fam === 0 || addr.includes("%")) return undefined;
  const max = fam === 4 ? 32 : 128;
  let n = 0n;
  if (fam === 4) for (const part of addr.split(".")) n = (n << 8n) | BigInt(Number(part));
  else {
    let full = addr;
    if (full.includes(".")) {
      // ::ffff:1.2.3.4
      const i = full.lastIndexOf(":");
      const v4 = full.slice(i + 1).split(".").map(Number);
      full = `${full.slice(0, i + 1)}${((v4[0]! << 8) | v4[1]!).toString(16)}:${((v4[2]! << 8) | v4[3]!).toString(16)}`;
    }
    const [head = "", tail] = full.split("::");
    const h = head ? head.split(":") : [];
    const t = tail === undefined ? [] : tail ? tail.split(":") : [];
    const groups = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill("0"), ...t];
    for (const g of groups) n = (n << 16n) | BigInt(parseInt(g || "0", 16));
  }
  const b = bits === undefined ? max : Number(bits);
  return { fam: fam as 4 | 6, net: n >> BigInt(max - b), bits: b };
}

/** Whether pattern `inner` admits only addresses `outer` admits too. */
function within(inner: string, outer: string): boolean {
  if (inner === outer) return true;
  const a = cidr(inner);
  const b = cidr(outer);
  if (!a || !b || a.fam !== b.fam || a.bits < b.bits) return false;
  return a.net >> BigInt(a.bits - b.bits) === b.net;
}

/** True when `next` refuses a source `prev` accepted (a narrowed `from:`). */
export function fromNarrowed(prev: string[] | null, next: readonly string[] | undefined): boolean {
  if (!next) return false;
  if (!prev) return true;
  const pos = (l: readonly string[]) => l.filter((p) => !p.startsWith("!"));
  const neg = (l: readonly string[]) => l.filter((p) => p.startsWith("!")).map((p) => p.slice(1));
  // Every address the old list let in is in some new entry, and no new exclusion cuts into it.
  if (!pos(prev).every((p) => pos(next).some((q) => within(p, q)))) return true;
  return neg(next).some((x) => !neg(prev).some((y) => within(x, y)));
}

// --- the comparison ---

export interface Change {
  /** The config field, `bastions.eu.user` or `ports.ssh`. */
  field: string;
  path: (string | number)[];
  /** The recorded value and the config's, as printed. */
  from: string;
  to: string;
  /** The bastion can serve the old value beside the new one (a second Match block, the old `from=`, the old port). */
  servable: boolean;
}

/** What a device with these dials on these bastions would lose under `fleet`. */
export function changesFor(fleet: Fleet, dials: Dials, bastions: readonly string[], ports: { ssh: boolean; services: boolean }): Change[] {
  const out: Change[] = [];
  // A port outside the range it was recorded with is a corrupt row (export.ts leaves it out), not a config change.
  if (ports.ssh && dials.ssh !== rangeText(fleet.ports.ssh)) out.push({ field: "ports.ssh", path: ["ports", "ssh"], from: dials.ssh, to: rangeText(fleet.ports.ssh), servable: true });
  if (ports.services && dials.services !== rangeText(fleet.ports.services)) out.push({ field: "ports.services", path: ["ports", "services"], from: dials.services, to: rangeText(fleet.ports.services), servable: true });
  for (const [name, old] of Object.entries(dials.bastions)) {
    const b = fleet.bastions.get(name);
    // A bastion the device no longer tunnels to, or one gone from the config, is not a lockout
    // this module judges (`registry remove-bastion`).
    if (!b || !bastions.includes(name)) continue;
    const at = (k: string) => ({ field: `bastions.${name}.${k}`, path: ["bastions", name, k] });
    if (old.user !== b.user) out.push({ ...at("user"), from: old.user, to: b.user, servable: true });
    if (old.host !== b.host) out.push({ ...at("host"), from: old.host, to: b.host, servable: false });
    if (old.port !== b.port) out.push({ ...at("port"), from: String(old.port), to: String(b.port), servable: false });
    const now = b.hostKeys.map(hostKeyFingerprint);
    if (!old.hostKeys.some((k) => now.includes(k))) out.push({ ...at("hostKeys"), from: old.hostKeys.join(", "), to: now.join(", "), servable: false });
    if (fromNarrowed(old.from, b.from)) out.push({ ...at("from"), from: old.from ? old.from.join(",") : "(any address)", to: (b.from ?? []).join(","), servable: true });
  }
  return out;
}

/** Registered devices that share what they dial (one registry row group). */
export interface DialGroup {
  /** Stored JSON, or null for rows from before schema 6. */
  dials: string | null;
  /** The device's bastions as stored (comma-separated). */
  bastions: string;
  devices: number;
  /** How many of them hold a tunnel port outside the config's ports.ssh / a service port outside ports.services. */
  outsideSsh: number;
  outsideServices: number;
  /** One of them, for the message. */
  sample: string;
}

export interface Lockout extends Change {
  devices: number;
  sample: string;
}

/** Every lockout `fleet` would cause, per field and old value, with counts; `only`: one bastion. */
export function lockouts(fleet: Fleet, groups: readonly DialGroup[], only?: string): Lockout[] {
  const found = new Map<string, Lockout>();
  const add = (c: Change, n: number, sample: string) => {
    if (n === 0) return;
    const k = `${c.field}\0${c.from}`;
    const was = found.get(k);
    if (was) {
      was.devices += n;
      if (sample < was.sample) was.sample = sample;
    } else found.set(k, { ...c, devices: n, sample });
  };
  for (const g of groups) {
    const d = parseDials(g.dials);
    if (!d) continue;
    const bastions = g.bastions ? g.bastions.split(",") : [];
    for (const c of changesFor(fleet, d, bastions, { ssh: g.outsideSsh > 0, services: g.outsideServices > 0 })) {
      if (only !== undefined && c.field.startsWith("bastions.") && c.path[1] !== only) continue;
      if (only !== undefined && c.field.startsWith("ports.") && !bastions.includes(only)) continue;
      add(c, c.field === "ports.ssh" ? g.outsideSsh : c.field === "ports.services" ? g.outsideServices : g.devices, g.sample);
    }
  }
  return [...found.values()].sort((a, b) => (a.field < b.field ? -1 : a.field > b.field ? 1 : b.devices - a.devices));
}

/** The tunnel users of `bastion` that registered devices still dial besides the config's own. */
function oldTunnelUsers(fleet: Fleet, groups: readonly DialGroup[], bastion: string): string[] {
  const now = fleet.bastions.get(bastion)?.user;
  const users = new Set<string>();
  for (const g of groups) {
    const u = g.bastions.split(",").includes(bastion) ? parseDials(g.dials)?.bastions[bastion]?.user : undefined;
    if (u !== undefined && u !== now) users.add(u);
  }
  return [...users].sort();
}

/** Groups from device records (bastion install lists them anyway). */
export function groupsOf(fleet: Fleet, devices: readonly { hostname: string; status: string; port: number; services: Record<string, number>; bastions: string[]; dials?: string; previous?: { until: string; dials?: string } }[], now: Date): DialGroup[] {
  const inRange = (p: number, r: PortRange) => p >= r.lo && p <= r.hi;
  const groups = new Map<string, DialGroup>();
  for (const d of devices) {
    if (d.status === "revoked") continue;
    const variants = [d.dials ?? null];
    if (d.previous?.dials && new Date(d.previous.until) > now) variants.push(d.previous.dials);
    for (const dials of variants) {
      const bastions = d.bastions.join(",");
      const k = `${dials}\0${bastions}`;
      const g = groups.get(k) ?? { dials, bastions, devices: 0, outsideSsh: 0, outsideServices: 0, sample: d.hostname };
      g.devices++;
      if (!inRange(d.port, fleet.ports.ssh)) g.outsideSsh++;
      if (Object.values(d.services).some((p) => !inRange(p, fleet.ports.services))) g.outsideServices++;
      if (d.hostname < g.sample) g.sample = d.hostname;
      groups.set(k, g);
    }
  }
  return [...groups.values()];
}

const FORCE_FLAG = "--force-config-change";

/** One line per lockout, `file:line: field changed from A to B: N registered devices dial A`. */
export function lockoutLines(fleet: Fleet, found: readonly Lockout[], where: (path: (string | number)[]) => string): string[] {
  return found.map((l) => {
    const n = l.devices === 1 ? `1 registered device (${l.sample})` : `${l.devices} registered devices (${l.sample}, …)`;
    const what = l.field.startsWith("ports.")
      ? `${l.field} changed from ${l.from} to ${l.to}: ${n} hold${l.devices === 1 ? "s" : ""} a port of ${l.from} outside ${l.to}`
      : l.field.endsWith(".from")
        ? `${l.field} narrowed from ${l.from} to ${l.to}: ${n} dial${l.devices === 1 ? "s" : ""} from ${l.from}`
        : `${l.field} changed from ${l.from} to ${l.to}: ${n} dial${l.devices === 1 ? "s" : ""} ${l.from}`;
    return `${where(l.path)}: ${what}${l.servable ? "" : "; the bastion cannot serve both: keep the old one running until they are re-flashed"}`;
  });
}

/** What a forced change means for one lockout, after its line. */
export const forcedNote = (l: Lockout): string => (l.servable ? " (--force-config-change: served side by side until they are rotated)" : " (--force-config-change)");

/** The refusal: every lockout named, how to get past it. */
export function lockoutError(fleet: Fleet, found: readonly Lockout[], where: (path: (string | number)[]) => string): UserError {
  const lines = lockoutLines(fleet, found, where);
  return new UserError(lines.join("\n"), {
    hint: `rotate them first (mkoverlay rotate DEVICE ${FORCE_FLAG}), or pass ${FORCE_FLAG} to serve the old and new settings side by side; see docs/bastion.md "Changing a fleet's settings". Nothing was changed`,
  });
}

/** `file:line` of a field in the config (the YAML is read again only to refuse). */
export async function fieldWhere(file: string): Promise<(path: (string | number)[]) => string> {
  try {
    const [yaml, { readFileSync }, { positionOf }] = await Promise.all([import("yaml"), import("node:fs"), import("./positions.js")]);
    // The bundle gives the CommonJS build's exports on `default`.
    const { LineCounter, parseDocument } = (yaml as unknown as { default?: typeof yaml }).default ?? yaml;
    const lc = new LineCounter();
    const doc = parseDocument(readFileSync(file, "utf8"), { lineCounter: lc });
    return (path) => `${file}:${positionOf(doc, lc, path, true).split(":")[0]}`;
  } catch {
    return () => file;
  }
}

/**
 * `bastion install`'s check for one bastion, over the registry's devices. A device with no
 * recorded dials (a registry from before schema 6, read with the agent's read-only role) is
 * taken to dial what the previously installed config of this bastion said (`previous`, the
 * copy install keeps on the bastion), or else the config being installed. Refuses unless
 * `force`; returns the old tunnel users still dialled (they keep a Match block) and the
 * lockouts, to be reported.
 */
export async function bastionLockouts(
  fleet: Fleet,
  bastion: Bastion,
  devices: readonly Parameters<typeof groupsOf>[1][number][],
  previous: Fleet | undefined,
  force: boolean,
  now: Date = new Date(),
): Promise<{ oldUsers: string[]; lines: string[] }> {
  const base = previous ?? fleet;
  const filled = devices.map((d) => (d.dials !== undefined ? d : { ...d, dials: dialsJson(base, d.bastions.flatMap((n) => base.bastions.get(n) ?? [])) }));
  const groups = groupsOf(fleet, filled, now);
  const found = lockouts(fleet, groups, bastion.name);
  if (found.length === 0) return { oldUsers: [], lines: [] };
  const where = await fieldWhere(fleet.file);
  if (!force) throw lockoutError(fleet, found, where);
  const lines = lockoutLines(fleet, found, where);
  return { oldUsers: oldTunnelUsers(fleet, groups, bastion.name), lines: lines.map((l, k) => l + forcedNote(found[k]!)) };
}
