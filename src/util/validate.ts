/**
 * Small validators shared by the config schema and the CLI flags. Everything that ends up in
 * an authorized_keys option, a unit file or an environment file passes one of these: values
 * that could break out of their quotes or lines are rejected, never escaped.
 */
import { isIP } from "node:net";
import { addDuration, readDuration } from "./duration.js";

/** `21000-21999` */
export const PORT_RANGE = /^(\d{1,5})\s*-\s*(\d{1,5})$/;

/** RFC 1123 host name with labels ≤ 63 and total ≤ 253; lower-case only (hostnames are keys). */
export function hostnameProblem(name: string): string | undefined {
  if (name.length === 0) return "is empty";
  if (name.length > 253) return `is ${name.length} characters long (at most 253)`;
  if (/[^\x21-\x7e]/.test(name)) return "contains spaces, control or non-ASCII characters";
  for (const label of name.split(".")) {
    if (label.length === 0) return "has an empty label (leading, trailing or double dot)";
    if (label.length > 63) return `has a label of ${label.length} characters (at most 63)`;
    if (!/^[a-z0-9]([a-z0-9-]*[a-z0-9])?$/.test(label)) {
      return /[A-Z]/.test(label) && /^[A-Za-z0-9-]+$/.test(label)
        ? "has upper-case letters (use lower case)"
        : "may only use a-z, 0-9 and '-' inside dot-separated labels, not starting or ending with '-'";
    }
  }
  return undefined;
}

/** A bastion address: a DNS name (any case) or an IPv4/IPv6 literal. */
export function hostProblem(host: string): string | undefined {
  if (isIP(host)) return undefined;
  return hostnameProblem(host.toLowerCase());
}

/** POSIX-portable user name, as useradd accepts by default. */
export function userProblem(user: string): string | undefined {
  return /^[a-z_][a-z0-9_-]{0,31}$/.test(user) ? undefined : "is not a valid user name (lower-case letters, digits, '_' and '-', at most 32)";
}

/** An address as a number: 32 bits for IPv4, 128 for IPv6 (a trailing dotted quad included). */
function addressValue(addr: string, fam: 4 | 6): bigint {
  const quad = (q: string) => q.split(".").reduce((v, o) => (v << 8n) | BigInt(Number(o)), 0n);
  if (fam === 4) return quad(addr);
  const a = addr.replace(/%.*$/, "");
  const tail = /(\d+\.\d+\.\d+\.\d+)$/.exec(a);
  const hex = tail ? a.slice(0, -tail[1]!.length) + ((quad(tail[1]!) >> 16n).toString(16) + ":" + (quad(tail[1]!) & 0xffffn).toString(16)) : a;
  const [head = "", rest] = hex.split("::");
  const groups = (s: string) => (s ? s.split(":") : []);
  const h = groups(head);
  const t = rest === undefined ? [] : groups(rest);
  const all = rest === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill("0"), ...t];
  return all.reduce((v, g) => (v << 16n) | BigInt(parseInt(g, 16)), 0n);
}

/** Hex groups with the longest run (two or more) of zero groups written as `::` (RFC 5952). */
function compressGroups(g: number[]): string {
  let best = { at: -1, len: 1 };
  for (let i = 0; i < g.length; i++) {
    let j = i;
    while (j < g.length && g[j] === 0) j++;
    if (j - i > best.len) best = { at: i, len: j - i };
    i = Math.max(i, j - 1);
  }
  const hex = g.map((x) => x.toString(16));
  return best.at < 0 ? hex.join(":") : `${hex.slice(0, best.at).join(":")}::${hex.slice(best.at + best.len).join(":")}`;
}

/** An address value as text: IPv4 dotted; IPv6 compressed, with a dotted tail if the input had one. */
function formatAddress(v: bigint, fam: 4 | 6, dottedTail: boolean): string {
  const quad = (x: bigint) => [24n, 16n, 8n, 0n].map((s) => String((x >> s) & 0xffn)).join(".");
  if (fam === 4) return quad(v);
  const g = Array.from({ length: 8 }, (_, i) => Number((v >> BigInt(16 * (7 - i))) & 0xffffn));
  if (!dottedTail) return compressGroups(g);
  const head = compressGroups(g.slice(0, 6));
  return `${head}${head.endsWith("::") ? "" : ":"}${quad(v & 0xffffffffn)}`;
}

/**
 * An address or CIDR for `from="…"`, optionally negated with '!'. A CIDR with host bits set
 * (127.0.0.1/8) is refused: sshd rejects such an entry and with it every connection
 * (addrmatch.c), so the message names the network address to write instead.
 */
export function cidrProblem(value: string): string | undefined {
  const neg = value.startsWith("!") ? "!" : "";
  const v = value.slice(neg.length);
  const [addr = "", bits, ...rest] = v.split("/");
  if (rest.length > 0) return "is not a CIDR";
  const fam = isIP(addr);
  if (fam === 0) return "is not an IP address or CIDR";
  if (bits === undefined) return undefined;
  if (!/^\d{1,3}$/.test(bits)) return "is not a CIDR";
  const max = fam === 4 ? 32 : 128;
  if (Number(bits) > max) return `is not a CIDR (prefix /${bits} is longer than ${max})`;
  if (addr.includes("%")) return "is not a CIDR (a zone index such as %eth0 cannot take a prefix)";
  const n = addressValue(addr, fam as 4 | 6);
  const hostBits = BigInt(max - Number(bits));
  const network = (n >> hostBits) << hostBits;
  if (network !== n) {
    return `has host bits set after /${Number(bits)}, so sshd would refuse every connection: write ${neg}${formatAddress(network, fam as 4 | 6, /\.\d+$/.test(addr))}/${Number(bits)} (the network), or ${neg}${addr} alone (the one host)`;
  }
  return undefined;
}

/** A bastion or forward name: becomes a systemd instance name and a file name. */
export function nameProblem(name: string): string | undefined {
  return /^[a-z0-9][a-z0-9_-]{0,31}$/.test(name) ? undefined : "must be 1-32 of a-z, 0-9, '-' and '_', starting with a letter or digit";
}

/** A number and letters (`365d`, `12m`): meant as a duration, so read (or refused) as one. */
export function looksLikeDuration(value: string): boolean {
  return /^\d+[a-z]+$/.test(value);
}

/**
 * The last instant `expiry-time="YYYYMMDDHHMM"` can name: its year has four digits, and sshd
 * drops a line whose time it cannot parse (a five-digit year, or the NaN a Date overflow gives).
 * A real sshd accepts a key with exactly this expiry (test/bastion-options.test.ts).
 */
export const LATEST_EXPIRY = new Date(Date.UTC(9999, 11, 31, 23, 59, 59, 999));

const TOO_LATE = "lands after 9999-12-31 23:59 UTC, the last time authorized_keys expiry-time can hold (a four-digit year): use a nearer date or a shorter duration";

/**
 * `expiry:` as a date (`2027-12-31`, `2027-12-31T18:00`) or a duration from now in the one
 * grammar (src/util/duration.ts, calendar lengths allowed: `365d`, `12w`, `12months`, `1y`).
 * Returns the instant, or a reason. A date in the past is returned as it is: only a new
 * authorized_keys line needs a future one (resolveBastions checks it there).
 */
export function parseExpiry(value: string, now: Date): Date | string {
  if (looksLikeDuration(value)) {
    const d = readDuration(value, { calendar: true });
    if (typeof d === "string") return d;
    if (d.n <= 0) return "is not a positive duration";
    const t = addDuration(now, d);
    return Number.isNaN(t.getTime()) || t > LATEST_EXPIRY ? TOO_LATE : t;
  }
  const m = /^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?$/.exec(value);
  if (!m) return "is neither a date (YYYY-MM-DD[THH:MM]) nor a duration (e.g. 365d, 12w, 12months, 1y; README.md, Durations)";
  const [, y, mo, da, h = "00", mi = "00", s = "00"] = m;
  const t = new Date(Date.UTC(2000, Number(mo) - 1, Number(da), Number(h), Number(mi), Number(s)));
  // setUTCFullYear, not Date.UTC(y, …): Date.UTC reads years 0-99 as 1900-1999.
  t.setUTCFullYear(Number(y), Number(mo) - 1, Number(da));
  if (
    Number.isNaN(t.getTime()) ||
    t.getUTCFullYear() !== Number(y) ||
    t.getUTCMonth() !== Number(mo) - 1 ||
    t.getUTCDate() !== Number(da) ||
    Number(h) > 23 || Number(mi) > 59 || Number(s) > 59
  ) {
    return "is not a real date";
  }
  // Before the epoch sshd's mktime() fails and the line is dropped; such a date is a typo anyway.
  if (t.getTime() < 0) return "is before 1970";
  return t > LATEST_EXPIRY ? TOO_LATE : t;
}

/**
 * `expiry-time="YYYYMMDDHHMM"`. No trailing `Z`: OpenSSH before 9.1 drops the whole line for
 * it (docs/facts.md), and sshd then reads the time in the bastion's zone — run bastions in UTC.
 */
export function expiryTimeOption(t: Date): string {
  // parseExpiry keeps every instant inside this range; anything else is a bug, not a line.
  if (Number.isNaN(t.getTime()) || t.getTime() < 0 || t > LATEST_EXPIRY) throw new Error(`expiryTimeOption: ${String(t)} is outside 1970-9999`);
  const p = (n: number, w = 2) => String(n).padStart(w, "0");
  return `${p(t.getUTCFullYear(), 4)}${p(t.getUTCMonth() + 1)}${p(t.getUTCDate())}${p(t.getUTCHours())}${p(t.getUTCMinutes())}`;
}

/** Values that go inside `option="…"`: the only escape sshd knows is \", so refuse instead. */
export function quotedValueProblem(value: string): string | undefined {
  // eslint-disable-next-line no-control-regex -- rejecting control characters is the point
  return /["\\\x00-\x1f\x7f]/.test(value) ? "contains a quote, backslash or control character" : undefined;
}

/** Levenshtein distance, for "did you mean" hints. */
export function editDistance(a: string, b: string): number {
  const dp = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = dp[0]!;
    dp[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = dp[j]!;
      dp[j] = Math.min(dp[j]! + 1, dp[j - 1]! + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = tmp;
    }
  }
  return dp[b.length]!;
}

export function didYouMean(word: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const c of candidates) {
    const d = editDistance(word.toLowerCase(), c.toLowerCase());
    if (d < bestD) {
      bestD = d;
      best = c;
    }
  }
  return best !== undefined && bestD <= Math.max(2, Math.floor(word.length / 3)) ? best : undefined;
}
