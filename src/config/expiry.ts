/**
 * A bastion's `expiry:` for one device, with the spread that keeps a shift's builds from all
 * expiring in the same minute. A duration expiry (`365d`) counts from the build; every device
 * then gets a deterministic extra of up to `expirySpread` (derived from its public key, so a
 * re-export gives the same instant). The spread only ever adds: no key expires earlier than the
 * config says. A date expiry (`2027-12-31`) is one instant for every device and is never spread.
 * Default spread: a tenth of the duration, at most 30 days (`expirySpread: 0` turns it off).
 */
import { createHash } from "node:crypto";
import { durationMs } from "../util/duration.js";
import { LATEST_EXPIRY, looksLikeDuration, parseExpiry } from "../util/validate.js";

const MINUTE = 60_000;
const DAY = 24 * 60 * MINUTE;
/** The default spread is this share of the duration ... */
const DEFAULT_SHARE = 10;
/** ... and at most this long. */
const DEFAULT_MAX_MS = 30 * DAY;

/** A spread is a fixed length (no calendar): at most ten years. */
const MAX_SPREAD_MS = 3650 * DAY;

/** `expirySpread:` in milliseconds (`0`, `36h`, `14d`, `2w`: src/util/duration.ts), or why it is not one. */
export function parseSpread(value: string | number): number | string {
  if (value === 0) return 0;
  const ms = typeof value === "string" ? durationMs(value, { zero: true, maxMs: MAX_SPREAD_MS }) : "is not a duration";
  if (typeof ms !== "string") return ms;
  if (ms.startsWith("is not a duration here: ")) return `is not a spread: ${ms.slice("is not a duration here: ".length)}`;
  if (ms.startsWith("is not a duration")) return "is not a spread: write 0 (none) or a duration (36h, 14d, 2w; README.md, Durations)";
  return ms;
}

/** Whether `expiry:` is a duration from the build (which is spread) rather than a date. */
export function isDurationExpiry(value: string): boolean {
  return looksLikeDuration(value);
}

/** The fraction of the spread this device gets, in [0, 1): the same key always gets the same. */
function spreadFraction(pub: Buffer): number {
  const h = createHash("sha256").update("mkoverlay expiry spread\0").update(pub).digest();
  return h.readUIntBE(0, 6) / 2 ** 48;
}

/**
 * When the device's key stops working on a bastion with this `expiry:`, built at `built`, or a
 * reason. Whole minutes (what expiry-time holds); never before the unspread instant.
 */
export function deviceExpiry(expiry: string, spread: string | number | undefined, built: Date, pub: Buffer): Date | string {
  const base = parseExpiry(expiry, built);
  if (typeof base === "string" || !isDurationExpiry(expiry)) return base;
  let ms: number;
  if (spread === undefined) {
    ms = Math.min(DEFAULT_MAX_MS, Math.floor((base.getTime() - built.getTime()) / DEFAULT_SHARE));
  } else {
    const s = parseSpread(spread);
    if (typeof s === "string") return s;
    ms = s;
  }
  const extra = Math.floor((spreadFraction(pub) * ms) / MINUTE) * MINUTE;
  const t = new Date(base.getTime() + extra);
  return t > LATEST_EXPIRY ? LATEST_EXPIRY : t;
}

/** What of a bastion decides a device key's expiry. */
export interface ExpiryPolicy {
  expiry?: string | undefined;
  expirySpread?: string | number | undefined;
  /** With a duration expiry: a device seen connected keeps its key at least this long after. */
  expiryRenewal?: string | undefined;
}

const DAY_MS = DAY;

/** The start (00:00 UTC) of the day of `t`: the renewal anchor, so a line changes at most daily. */
export function renewalAnchor(t: Date): Date {
  return new Date(Math.floor(t.getTime() / DAY_MS) * DAY_MS);
}

/**
 * When a device's key stops working on a bastion with this policy, or a reason; undefined when
 * the bastion sets no expiry. Built at `built`, last seen connected (on any bastion) at `seen`.
 *
 * `expiryRenewal` (only with a duration expiry) moves the end forward for a device that is seen:
 * the key then lasts until the renewal duration after the day it was last seen (plus its share
 * of the spread), if that is later than the build-time expiry. It never shortens, and a device
 * that is not seen again keeps the expiry it has: a lost or stolen device still dies. A date
 * expiry is one instant for everyone and is never renewed.
 */
export function keyExpiry(p: ExpiryPolicy, built: Date, pub: Buffer, seen?: Date | null): Date | string | undefined {
  if (p.expiry === undefined) return undefined;
  const base = deviceExpiry(p.expiry, p.expirySpread, built, pub);
  if (typeof base === "string" || !p.expiryRenewal || !isDurationExpiry(p.expiry) || !seen || seen <= built) return base;
  const renewed = deviceExpiry(p.expiryRenewal, p.expirySpread, renewalAnchor(seen), pub);
  if (typeof renewed === "string") return `expiryRenewal ${renewed}`;
  return renewed > base ? renewed : base;
}
