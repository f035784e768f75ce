/**
 * What a bastion authorizes, from the registry: one entry per key that may open a tunnel —
 * each live device of that bastion, plus a rotated device's previous key until its grace ends
 * (with `expiry-time` at that instant, so sshd enforces the end even if nobody removes it).
 * The file export and the bastion agent's key directory are both made from these entries, with
 * the one line renderer (line.ts).
 *
 * A row that is corrupt or hostile (a key that does not decode or does not match its stored
 * fingerprint, a bad host name, a port outside the fleet's ranges, a value that could break out
 * of an option) is skipped and reported, never rendered: sshd must only ever see lines that are
 * valid by construction.
 */
import type { Bastion, Fleet, PortRange } from "../config/fleet.js";
import { planTunnel } from "../config/forwards.js";
import { fingerprint as fingerprintOf } from "../keys/ed25519.js";
import { ed25519Key } from "../keys/pubkey.js";
import type { DeviceRecord } from "../registry/types.js";
import { fromNarrowed, parseDials, parseRangeText } from "../config/compat.js";
import { cidrProblem, hostnameProblem, quotedValueProblem } from "../util/validate.js";
import { authorizedKeysLine } from "./line.js";

export interface BastionEntry {
  hostname: string;
  /** `SHA256:…`, computed from the key itself (never taken from the row). */
  fingerprint: string;
  /** The complete authorized_keys line. */
  line: string;
  /** The bastion ports the key may listen on. */
  ports: number[];
  /** A rotated-out key, accepted until `until`. */
  previous: boolean;
  until?: Date;
}

export interface Skipped {
  hostname: string;
  reason: string;
}


function devicesOf(devices: DeviceRecord[], bastion: string): DeviceRecord[] {
  return devices.filter((d) => d.status === "active" && d.bastions.includes(bastion)).sort((a, b) => a.port - b.port);
}

const inRange = (p: unknown, r: PortRange): boolean => Number.isInteger(p) && (p as number) >= r.lo && (p as number) <= r.hi;

/**
 * A range a device's ports may come from: the config's, or (a config change served side by
 * side, docs/bastion.md "Changing a fleet's settings") the one recorded when its ports were
 * reserved — never a privileged port.
 */
function recordedRange(text: string | undefined): PortRange | undefined {
  const r = text === undefined ? undefined : parseRangeText(text);
  return r && r.lo >= 1024 && r.lo <= r.hi && r.hi <= 65535 ? r : undefined;
}

/** Why a device's row cannot be trusted for this bastion, or undefined. */
function rowProblem(fleet: Fleet, d: DeviceRecord): string | undefined {
  const h = hostnameProblem(String(d.hostname));
  if (h) return `host name ${JSON.stringify(d.hostname)} ${h}`;
  const dials = parseDials(d.dials);
  const ok = (p: unknown, now: PortRange, then: string | undefined) => inRange(p, now) || (then !== undefined && inRange(p, recordedRange(then) ?? now));
  if (!ok(d.port, fleet.ports.ssh, dials?.ssh)) return `port ${JSON.stringify(d.port)} is not in ports.ssh ${fleet.ports.ssh.lo}-${fleet.ports.ssh.hi}`;
  for (const [name, p] of Object.entries(d.services ?? {})) {
    if (!ok(p, fleet.ports.services, dials?.services)) return `service port ${name}=${JSON.stringify(p)} is not in ports.services ${fleet.ports.services.lo}-${fleet.ports.services.hi}`;
  }
  return undefined;
}

/** The bastion as a key's overlay dials it: a narrowed `from:` keeps the recorded one until the device is rotated. */
function asDialled(bastion: Bastion, dials: string | undefined): Bastion {
  const then = parseDials(dials)?.bastions[bastion.name];
  if (!then || !fromNarrowed(then.from, bastion.from)) return bastion;
  if (then.from !== null && then.from.some((f) => cidrProblem(f) !== undefined || quotedValueProblem(f) !== undefined)) return bastion;
  return { ...bastion, from: then.from ?? undefined };
}

/** A key of a row: decoded, and its stored fingerprint checked against the key itself. */
function keyOf(line: string, stored: string): { pub: Buffer; fingerprint: string } | string {
  const pub = ed25519Key(line);
  if (typeof pub === "string") return `key ${pub}`;
  const fp = fingerprintOf(pub);
  if (fp !== stored) return `key does not match its stored fingerprint ${JSON.stringify(stored)}`;
  return { pub, fingerprint: fp };
}

/**
 * Every key the bastion accepts at `now`, in port order (current key before previous). `seen`:
 * when a bastion last saw each device connected (status.ts lastSightings), for `expiryRenewal`.
 */
export function bastionEntries(fleet: Fleet, bastion: Bastion, devices: DeviceRecord[], now: Date, sighted?: ReadonlyMap<string, Date>): { entries: BastionEntry[]; skipped: Skipped[] } {
  const entries: BastionEntry[] = [];
  const skipped: Skipped[] = [];
  const seen = new Set<string>();
  for (const d of devicesOf(devices, bastion.name)) {
    const hostname = String(d.hostname);
    const problem = rowProblem(fleet, d);
    if (problem) {
      skipped.push({ hostname, reason: problem });
      continue;
    }
    const tunnel = planTunnel(fleet, bastion, d.port, d.services);
    const ports = [tunnel.port, ...tunnel.extraListen];
    const keys: { line: string; fp: string; until?: Date; dials?: string }[] = [{ line: d.publicKey, fp: d.fingerprint, ...(d.dials ? { dials: d.dials } : {}) }];
    if (d.previous) {
      const until = new Date(d.previous.until);
      if (Number.isNaN(until.getTime())) skipped.push({ hostname, reason: `previous key's grace end ${JSON.stringify(d.previous.until)} is not a time` });
      else if (until > now) keys.push({ line: d.previous.publicKey, fp: d.previous.fingerprint, until, ...(d.previous.dials ? { dials: d.previous.dials } : {}) });
    }
    for (const k of keys) {
      const what = k.until ? "previous key" : "key";
      const key = keyOf(k.line, k.fp);
      if (typeof key === "string") {
        skipped.push({ hostname, reason: k.until ? `previous ${key}` : key });
        continue;
      }
      if (seen.has(key.fingerprint)) {
        skipped.push({ hostname, reason: `${what} ${key.fingerprint} is already used by another device` });
        continue;
      }
      try {
        const dialled = asDialled(bastion, k.dials);
        const line = authorizedKeysLine({ hostname, pub: key.pub, tunnel: dialled === bastion ? tunnel : { ...tunnel, bastion: dialled }, now: new Date(d.created), seen: sighted?.get(hostname) ?? null, ...(k.until ? { notAfter: k.until } : {}) });
        seen.add(key.fingerprint);
        entries.push({ hostname, fingerprint: key.fingerprint, line, ports, previous: Boolean(k.until), ...(k.until ? { until: k.until } : {}) });
      } catch (e) {
        skipped.push({ hostname, reason: `${what}: ${(e as Error).message}` });
      }
    }
  }
  return { entries, skipped };
}

export function renderAuthorizedKeys(
  fleet: Fleet,
  bastion: Bastion,
  devices: DeviceRecord[],
  version: string,
  opts: { now?: Date; onSkip?: (s: Skipped) => void; seen?: ReadonlyMap<string, Date> } = {},
): string {
  const { entries, skipped } = bastionEntries(fleet, bastion, devices, opts.now ?? new Date(), opts.seen);
  for (const s of skipped) opts.onSkip?.(s);
  const live = new Set(entries.map((e) => e.hostname)).size;
  const out = [
    `# authorized_keys for ${bastion.user}@${bastion.host} (bastion '${bastion.name}')`,
    `# Generated by mkoverlay ${version} from the fleet registry: ${live} live device(s).`,
    "# Do not edit: regenerate with `mkoverlay bastion authorized-keys --bastion " + bastion.name + " --write FILE`.",
  ];
  for (const e of entries) out.push(e.line);
  return out.join("\n") + "\n";
}
