/** Options shared by `status` and the bastion agent's metrics. */
import { UserError } from "../util/errors.js";
import type { DeviceState } from "./status.js";
import { durationFlag } from "../util/duration.js";
import { didYouMean } from "../util/validate.js";

/** `--never-seen-after`: a duration (src/util/duration.ts), or 0: never an alarm. */
export function parseAfter(v: string): number {
  const ms = durationFlag("--never-seen-after", v, { zero: true, examples: "90min, 24h, 2d, 1w", zeroMeans: "0 for never" });
  return ms === 0 ? Infinity : ms;
}

/** `--expiring-within`: a duration (src/util/duration.ts); 0: no `expiring` alarm, only `expired`. */
export function parseWithin(v: string): number {
  return durationFlag("--expiring-within", v, { zero: true, examples: "30d, 6w, 72h", zeroMeans: "0 for only `expired`" });
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
