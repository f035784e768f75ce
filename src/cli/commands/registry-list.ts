/**
 * `mkoverlay registry list`: the port allocation table, with what the bastions saw of each
 * device (its state now, first and last seen, the bastions it used: status.ts), then factory data
 * (the extra columns of a `batch --hosts` CSV, or `--attr`) as one column per name, so the list
 * goes back into the spreadsheet it came from. The table fits 80 columns by default (the few
 * columns a person scans, then factory data while it fits); `--columns a,b,c` picks them.
 */
import { changesFor, parseDials, type Dials } from "../../config/compat.js";
import type { Fleet } from "../../config/fleet.js";
import { withFleetRegistry } from "../context.js";
import { UserError } from "../../util/errors.js";
import { out } from "../../util/log.js";
import type { DeviceRecord } from "../../registry/types.js";
import { fleetStatus, type DeviceView } from "../../fleet/status.js";
import { parseAfter } from "../../fleet/status-options.js";
import { didYouMean } from "../../util/validate.js";

const COLUMNS = ["hostname", "bastions", "port", "services", "fingerprint", "board", "os", "status", "created", "seen", "first_seen", "last_seen", "seen_on"] as const;
type Column = (typeof COLUMNS)[number];

/** What the bastions saw of a device, as `--json` shows it. */
export interface Seen {
  state: DeviceView["state"];
  connected: DeviceView["connected"];
  firstSeen: string | null;
  lastSeen: string | null;
  seenOn: string[];
}

function cell(d: DeviceRecord, c: Column, seen: Seen | undefined): string {
  if (c === "bastions") return d.bastions.join(",");
  if (c === "services") return Object.entries(d.services).map(([k, v]) => `${k}=${v}`).join(",");
  if (c === "seen") return seen ? (seen.state === "connected" ? `connected:${seen.connected.map((x) => x.bastion).join(",")}` : seen.state) : "";
  if (c === "first_seen") return seen?.firstSeen ?? "";
  if (c === "last_seen") return seen?.lastSeen ?? "";
  if (c === "seen_on") return seen?.seenOn.join(",") ?? "";
  return String(d[c]);
}

function csvField(v: string): string {
  return /[",\n\r]/.test(v) || /^\s|\s$/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}

/** Markdown cells: a '|' would start a new column. */
const mdCell = (v: string): string => v.replace(/\\/g, "\\\\").replace(/\|/g, "\\|");

/** Every factory data name in use, in order; a name equal to a fixed column is shown as attr:NAME. */
export function attributeColumns(devices: DeviceRecord[]): { key: string; header: string }[] {
  const keys = [...new Set(devices.flatMap((d) => Object.keys(d.attributes)))].sort();
  return keys.map((key) => ({ key, header: (COLUMNS as readonly string[]).includes(key) ? `attr:${key}` : key }));
}

/**
 * The table's columns when --columns is not given: what a person scans for on an 80-column
 * terminal (the fingerprint and the timestamps alone are ~100 columns; `--format csv` and
 * `--json` carry everything). Then each factory data name, in order, whose column still fits.
 */
const TABLE_COLUMNS: readonly Column[] = ["hostname", "port", "bastions", "board", "os", "status", "seen"];
export const TABLE_WIDTH = 80;

type Picked = { header: string; value: (d: DeviceRecord, seen: Seen | undefined) => string };

const fixed = (c: Column): Picked => ({ header: c, value: (d, s) => cell(d, c, s) });
const attr = (e: { key: string; header: string }): Picked => ({ header: e.header, value: (d) => d.attributes[e.key] ?? "" });

/** `--columns a,b,c`: fixed column names and factory data names (as the header spells them). */
export function pickColumns(spec: string, devices: DeviceRecord[]): Picked[] {
  const extra = attributeColumns(devices);
  const known = [...COLUMNS, ...extra.map((e) => e.header)];
  return spec.split(",").map((raw) => {
    const name = raw.trim();
    if ((COLUMNS as readonly string[]).includes(name)) return fixed(name as Column);
    const e = extra.find((x) => x.header === name || x.key === name);
    if (e) return attr(e);
    const guess = didYouMean(name, known);
    throw new UserError(`--columns: no column ${JSON.stringify(name)}${guess ? ` (did you mean '${guess}'?)` : ""}`, { hint: `columns: ${known.join(", ")}` });
  });
}

const widthOf = (cols: readonly string[][]): number => cols.reduce((n, c) => n + Math.max(...c.map((v) => v.length)), 0) + 2 * (cols.length - 1);

/** The default table's columns: the fixed few, then each factory data column that still fits. */
function tableColumns(devices: DeviceRecord[], seen: ReadonlyMap<string, Seen>): Picked[] {
  const cols = TABLE_COLUMNS.map(fixed);
  const cells = (p: Picked) => [p.header, ...devices.map((d) => p.value(d, seen.get(d.hostname)))];
  const shown = cols.map(cells);
  for (const e of attributeColumns(devices)) {
    const p = attr(e);
    const c = cells(p);
    if (widthOf([...shown, c]) > TABLE_WIDTH) continue;
    cols.push(p);
    shown.push(c);
  }
  return cols;
}

export function renderTable(devices: DeviceRecord[], format: string, seen: ReadonlyMap<string, Seen> = new Map(), columns?: string): string {
  if (!["csv", "markdown", "table"].includes(format)) throw new UserError(`--format ${JSON.stringify(format)}: use table, csv or markdown (or --json)`);
  const extra = attributeColumns(devices);
  const picked = columns !== undefined ? pickColumns(columns, devices) : format === "table" ? tableColumns(devices, seen) : [...COLUMNS.map(fixed), ...extra.map(attr)];
  const header = picked.map((p) => p.header);
  const rows = devices.map((d) => picked.map((p) => p.value(d, seen.get(d.hostname))));
  switch (format) {
    case "csv":
      return [header.map(csvField).join(","), ...rows.map((r) => r.map(csvField).join(","))].join("\n") + "\n";
    case "markdown":
      return [`| ${header.join(" | ")} |`, `|${header.map(() => "---").join("|")}|`, ...rows.map((r) => `| ${r.map(mdCell).join(" | ")} |`)].join("\n") + "\n";
    case "table": {
      const widths = header.map((c, i) => Math.max(c.length, ...rows.map((r) => r[i]!.length)));
      const line = (r: readonly string[]) => r.map((v, i) => v.padEnd(widths[i]!)).join("  ").trimEnd();
      return [line(header), ...rows.map(line)].join("\n") + "\n";
    }
    default:
      throw new UserError(`--format ${JSON.stringify(format)}: use table, csv or markdown (or --json)`);
  }
}

/** A device as `--json` shows it: no station id or overlay path (they are the station's own); what it dials as an object. */
export function deviceJson({ station: _s, overlay: _o, dials, ...d }: DeviceRecord): Omit<DeviceRecord, "station" | "overlay" | "dials"> & { dials: Dials | null } {
  const strip = <T extends { dials?: string }>(k: T | undefined) => {
    if (!k) return undefined;
    const { dials: _d, ...rest } = k;
    return rest;
  };
  return { ...d, ...(d.previous ? { previous: strip(d.previous) as NonNullable<DeviceRecord["previous"]> } : {}), ...(d.rotating ? { rotating: strip(d.rotating) as NonNullable<DeviceRecord["rotating"]> } : {}), dials: parseDials(dials) ?? null };
}

/** The config fields whose old value the device's overlay still dials (compat.ts): empty when it is up to date. */
function oldSettings(fleet: Fleet, d: DeviceRecord): { field: string; from: string; to: string }[] {
  const dials = parseDials(d.dials);
  if (!dials || d.status === "revoked") return [];
  const inRange = (p: number, r: { lo: number; hi: number }) => p >= r.lo && p <= r.hi;
  const ports = { ssh: !inRange(d.port, fleet.ports.ssh), services: Object.values(d.services).some((p) => !inRange(p, fleet.ports.services)) };
  return changesFor(fleet, dials, d.bastions, ports).map(({ field, from, to }) => ({ field, from, to }));
}

export async function registryListCommand(opts: { json?: boolean; format?: string; columns?: string; config?: string; oldSettings?: boolean }): Promise<void> {
  const format = opts.format ?? "table";
  if (opts.json && opts.columns !== undefined) throw new UserError("--columns chooses the columns of a table, CSV or Markdown; --json has every field", { hint: "pick fields from the JSON (e.g. with jq), or use --format csv --columns …" });
  // Reject a bad --format before touching the registry.
  if (!opts.json) renderTable([], format);
  const { devices, seen, fleet } = await withFleetRegistry(opts.config, async (fleet, r) => {
    const [all, obs] = await Promise.all([r.list(), r.observations()]);
    const devices = opts.oldSettings ? all.filter((d) => oldSettings(fleet, d).length > 0) : all;
    const s = fleetStatus(devices, obs, { now: new Date(), neverSeenAfterMs: parseAfter("24h"), knownBastions: [...fleet.bastions.keys()] });
    return { fleet, devices, seen: new Map(s.devices.map((v): [string, Seen] => [v.hostname, { state: v.state, connected: v.connected, firstSeen: v.firstSeen, lastSeen: v.lastSeen, seenOn: v.seenOn }])) };
  });
  out(
    opts.json
      ? JSON.stringify(devices.map((d) => ({ ...deviceJson(d), oldSettings: oldSettings(fleet, d), seen: seen.get(d.hostname) ?? null })))
      : devices.length === 0 && format === "table"
        ? "(no devices registered)"
        : renderTable(devices, format, seen, opts.columns),
  );
}
