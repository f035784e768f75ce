/** `mkoverlay registry list`: the port allocation table. */
import { withFleetRegistry } from "../context.js";
import { UserError } from "../errors.js";
import { out } from "../output.js";
import type { DeviceRecord } from "../registry/types.js";

const COLUMNS = ["hostname", "bastions", "port", "services", "fingerprint", "board", "os", "status", "created"] as const;

function cell(d: DeviceRecord, c: (typeof COLUMNS)[number]): string {
  if (c === "bastions") return d.bastions.join(",");
  if (c === "services") return Object.entries(d.services).map(([k, v]) => `${k}=${v}`).join(",");
  return String(d[c]);
}

function csvField(v: string): string {
  return /[",\n]/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}

export function renderTable(devices: DeviceRecord[], format: string): string {
  const rows = devices.map((d) => COLUMNS.map((c) => cell(d, c)));
  switch (format) {
    case "csv":
      return [COLUMNS.join(","), ...rows.map((r) => r.map(csvField).join(","))].join("\n") + "\n";
    case "markdown":
      return [`| ${COLUMNS.join(" | ")} |`, `|${COLUMNS.map(() => "---").join("|")}|`, ...rows.map((r) => `| ${r.join(" | ")} |`)].join("\n") + "\n";
    case "table": {
      const widths = COLUMNS.map((c, i) => Math.max(c.length, ...rows.map((r) => r[i]!.length)));
      const line = (r: readonly string[]) => r.map((v, i) => v.padEnd(widths[i]!)).join("  ").trimEnd();
      return [line(COLUMNS), ...rows.map(line)].join("\n") + "\n";
    }
    default:
      throw new UserError(`--format ${JSON.stringify(format)}: use table, csv or markdown (or --json)`);
  }
}

export async function registryListCommand(opts: { json?: boolean; format?: string; config?: string }): Promise<void> {
  const format = opts.format ?? "table";
  // Reject a bad --format before touching the registry.
  if (!opts.json) renderTable([], format);
  const devices = await withFleetRegistry(opts.config, (_f, r) => r.list());
  out(
    opts.json
      ? JSON.stringify(devices.map(({ station: _s, overlay: _o, ...d }) => d))
      : devices.length === 0 && format === "table"
        ? "(no devices registered)"
        : renderTable(devices, format),
  );
}
