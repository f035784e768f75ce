/** Options shared by `status` and the bastion agent's metrics. */
import { UserError } from "./errors.js";

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
