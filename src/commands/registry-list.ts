/**
 * `mkoverlay registry list`: the port allocation table. Factory data (the extra columns of a
 * `batch --hosts` CSV, or `--attr`) follows as one column per name, so the list goes back into
 * the spreadsheet it came from.
 */
import { withFleetRegistry } from "../context.js";
import { UserError } from "../errors.js";
import { out } from "../output.js";
import type { DeviceRecord } from "../registry/types.js";

const COLUMNS = ["hostname", "bastions", "port", "services", "fingerprint", "board", "os", "status", "created"] as const;
type Column = (typeof COLUMNS)[number];

function cell(d: DeviceRecord, c: Column): string {
  if (c === "bastions") return d.bastions.join(",");
  if (c === "services") return Object.entries(d.services).map(([k, v]) => `${k}=${v}`).join(",");
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

export function renderTable(devices: DeviceRecord[], format: string): string {
  const extra = attributeColumns(devices);
  const header = [...COLUMNS, ...extra.map((e) => e.header)];
  const rows = devices.map((d) => [...COLUMNS.map((c) => cell(d, c)), ...extra.map((e) => d.attributes[e.key] ?? "")]);
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

/** A device as `--json` shows it: no station id or overlay path (they are the station's own). */
export function deviceJson({ station: _s, overlay: _o, ...d }: DeviceRecord): Omit<DeviceRecord, "station" | "overlay"> {
  return d;
}

export async function registryListCommand(opts: { json?: boolean; format?: string; config?: string }): Promise<void> {
  const format = opts.format ?? "table";
  // Reject a bad --format before touching the registry.
  if (!opts.json) renderTable([], format);
  const devices = await withFleetRegistry(opts.config, (_f, r) => r.list());
  out(opts.json ? JSON.stringify(devices.map(deviceJson)) : devices.length === 0 && format === "table" ? "(no devices registered)" : renderTable(devices, format));
}
