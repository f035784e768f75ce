/** Options shared by `status` and the bastion agent's metrics. */
import { UserError } from "../util/errors.js";
import type { DeviceState } from "./status.js";
import { didYouMean } from "../util/validate.js";

/** `--never-seen-after`: N followed by s, m, h, d or w (or 0: never an alarm). */
export function parseAfter(v: string): number {
  if (v === "0") return Infinity;
  const m = /^(\d{1,6})([smhdw])$/.exec(v);
  if (!m) throw new UserError(`--never-seen-after ${JSON.stringify(v)}: a duration such as 90m, 24h, 2d or 1w (or 0 for never)`);
  return Number(m[1]) * { s: 1000, m: 60_000, h: 3600_000, d: 86400_000, w: 7 * 86400_000 }[m[2] as "s" | "m" | "h" | "d" | "w"];
}

/** `--expiring-within`: N followed by h, d or w (0: no `expiring` alarm, only `expired`). */
export function parseWithin(v: string): number {
  if (v === "0") return 0;
  const m = /^(\d{1,5})([hdw])$/.exec(v);
  if (!m) throw new UserError(`--expiring-within ${JSON.stringify(v)}: a duration such as 30d, 6w or 72h (or 0 for only \`expired\`)`);
  return Number(m[1]) * { h: 3600_000, d: 86400_000, w: 7 * 86400_000 }[m[2] as "h" | "d" | "w"];
}

/** The states `status --state` filters by (status.ts's DeviceState). */
export const STATES = ["connected", "offline", "never-seen", "new", "unknown"] as const satisfies readonly DeviceState[];

/** `--state connected` or `--state offline,never-seen`: the device rows to show. */
export function parseStates(v: string): DeviceState[] {
  const words = v.split(",").map((w) => w.trim());
  for (const w of words) {
    if (!(STATES as readonly string[]).includes(w)) {
      const guess = didYouMean(w, STATES);
      throw new UserError(`--state ${JSON.stringify(w)}: not a device state${guess ? ` (did you mean '${guess}'?)` : ""}`, { hint: `one or more of ${STATES.join(", ")}, comma-separated` });
    }
  }
  return [...new Set(words as DeviceState[])];
}
