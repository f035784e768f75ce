/**
 * The one duration grammar of mkoverlay, for every flag and config key that takes a length of
 * time (README.md, "Durations"): an integer and a unit, no space —
 *
 *   s (seconds), min or m (minutes), h (hours), d (days), w (weeks)
 *
 * and, only where a length is counted from a date on the calendar (`expiry:`, `expiryRenewal:`),
 * `month`/`months` and `y` (calendar months and years: `1y` after 2028-02-29 is 2029-03-01).
 * Elsewhere a month or a year is refused with the days to write instead: a grace period or a
 * spread has no calendar to count on, and "30 days" says what it means.
 *
 * `m` is a minute everywhere. `expiry:` once read `6m` as six months; there `Nm` (and in
 * `expiryRenewal:`) is refused with the fix rather than silently read as minutes, so an old
 * config cannot quietly give its devices keys that die within the hour.
 *
 * `0` (or `0` with a unit) is accepted only where zero means something (`--grace 0`), and a bare
 * number only where a flag has always taken seconds (`registry doctor --grace`, the agent's
 * `--interval` and `--resync`).
 */
import { UserError } from "./errors.js";

type Unit = "s" | "min" | "h" | "d" | "w" | "month" | "y";

export interface Duration {
  n: number;
  unit: Unit;
}

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

/** Milliseconds of each fixed unit (months and years depend on the date they count from). */
const FIXED: Record<Exclude<Unit, "month" | "y">, number> = { s: SECOND, min: MINUTE, h: HOUR, d: DAY, w: 7 * DAY };

const WORDS: Record<string, Unit> = { s: "s", m: "min", min: "min", h: "h", d: "d", w: "w", month: "month", months: "month", y: "y" };

/** The grammar in one line, for messages and help. */
const DURATION_GRAMMAR = "an integer and a unit: s, min (or m), h, d or w, e.g. 90s, 30min, 12h, 7d, 2w";

/** Where the grammar is written down, for hints. */
const DURATION_DOCS = "README.md, Durations";

/** The longest duration any setting takes (Date arithmetic stays exact, far past any use). */
const MAX_DURATION_MS = 100 * 365 * DAY;

export interface DurationRules {
  /** `0` (or `0d`…) is a valid value. */
  zero?: boolean;
  /** A bare number is seconds (flags that always took seconds); decimals allowed. */
  bareSeconds?: boolean;
  /** Calendar months and years (`12months`, `1y`) are accepted; `Nm` is then refused as ambiguous. */
  calendar?: boolean;
  /** At most this many milliseconds (default MAX_DURATION_MS). */
  maxMs?: number;
}

/**
 * `text` read by the grammar, or why not (a phrase that follows the quoted value: `"7x" is not
 * a duration: …`).
 */
export function readDuration(text: string, rules: DurationRules = {}): Duration | string {
  const m = /^(\d+)([a-z]+)$/.exec(text);
  const unit = m ? WORDS[m[2]!] : undefined;
  if (!m || unit === undefined) return `is not a duration (${DURATION_GRAMMAR})`;
  const n = Number(m[1]);
  if (rules.calendar && m[2] === "m") {
    const days = n % 12 === 0 ? (n / 12) * 365 : n * 30;
    return `is ambiguous: \`m\` is a minute in mkoverlay, and here it used to mean a month: write ${n}months (or ${days}d)`;
  }
  if (!rules.calendar && (unit === "month" || unit === "y")) {
    return `is not a duration here: months and years count on a calendar, which only expiry and expiryRenewal have; write days (${unit === "y" ? `${n * 365}d` : `${n * 30}d`})`;
  }
  return { n, unit };
}

/** `t` plus the duration (calendar months and years as the calendar has them, in UTC). */
export function addDuration(t: Date, d: Duration): Date {
  const r = new Date(t.getTime());
  if (d.unit === "month") r.setUTCMonth(r.getUTCMonth() + d.n);
  else if (d.unit === "y") r.setUTCFullYear(r.getUTCFullYear() + d.n);
  else r.setTime(r.getTime() + d.n * FIXED[d.unit]);
  return r;
}

/** A fixed-length duration in milliseconds, or why not. */
export function durationMs(text: string, rules: DurationRules = {}): number | string {
  if (rules.bareSeconds && /^\d+(\.\d+)?$/.test(text)) {
    const ms = Math.round(Number(text) * SECOND);
    return ms === 0 && !rules.zero ? "is not a positive duration" : ms > (rules.maxMs ?? MAX_DURATION_MS) ? tooLong(rules) : ms;
  }
  if (text === "0" && rules.zero) return 0;
  const d = readDuration(text, { calendar: false });
  if (typeof d === "string") return d;
  const ms = d.n * FIXED[d.unit as keyof typeof FIXED];
  if (ms === 0 && !rules.zero) return "is not a positive duration";
  if (ms > (rules.maxMs ?? MAX_DURATION_MS)) return tooLong(rules);
  return ms;
}

function tooLong(rules: DurationRules): string {
  const max = rules.maxMs ?? MAX_DURATION_MS;
  return `is longer than ${max % (365 * DAY) === 0 ? `${max / (365 * DAY)} years` : `${max / DAY} days`}`;
}

export interface FlagRules extends DurationRules {
  /** Examples for the hint, e.g. "12h, 7d, 2w". */
  examples: string;
  /** What 0 means, when `zero` (for the hint): "0 to stop accepting the old key at once". */
  zeroMeans?: string;
  /** What a bare number means, when `bareSeconds` (for the hint). */
  bareMeans?: string;
}

/**
 * A duration flag's value in milliseconds; a UserError naming the flag otherwise:
 * `--grace "soon": not a duration` with the examples and the grammar as the hint.
 */
export function durationFlag(flag: string, value: string, rules: FlagRules): number {
  const ms = durationMs(value, rules);
  if (typeof ms === "number") return ms;
  const why = ms.startsWith("is not a duration (") ? "not a duration" : ms.replace(/^is /, "");
  const zero = rules.zero && rules.zeroMeans ? `, or ${rules.zeroMeans}` : "";
  const bare = rules.bareSeconds ? `; ${rules.bareMeans ?? "a bare number is seconds"}` : "";
  throw new UserError(`${flag} ${JSON.stringify(value)}: ${why}`, {
    hint: `use e.g. ${rules.examples}${zero}${bare}; units: s, min (or m), h, d, w (${DURATION_DOCS})`,
  });
}
