/**
 * `mkoverlay status`: which gateways are online now, through which bastion, since when; which
 * were flashed and never phoned home; which dropped off and when they were last seen; and the
 * alarms (a revoked device still connected, an unknown listener in the tunnel range, a silent
 * bastion agent). Read from the registry, where every bastion's agent records what it sees.
 */
import { withFleetRegistry } from "../context.js";
import { UserError } from "../../util/errors.js";
import { out } from "../../util/log.js";
import { fleetStatus, type DeviceView, type FleetStatus } from "../../fleet/status.js";
import { parseAfter, parseStates, parseWithin } from "../../fleet/status-options.js";
import { nameProblem } from "../../util/validate.js";
import { findDevice } from "../../device/lookup.js";

export interface StatusOptions {
  bastion?: string;
  json?: boolean;
  format?: string;
  check?: boolean;
  neverSeenAfter?: string;
  expiringWithin?: string;
  /** Only devices in these states (comma-separated): connected, offline, never-seen, new, unknown. */
  state?: string;
  config?: string;
}

function when(iso: string | null, now: Date): string {
  if (!iso) return "-";
  const s = Math.max(0, Math.round((now.getTime() - Date.parse(iso)) / 1000));
  const rel = s < 90 ? `${s}s ago` : s < 5400 ? `${Math.round(s / 60)}m ago` : s < 172800 ? `${Math.round(s / 3600)}h ago` : `${Math.round(s / 86400)}d ago`;
  return `${iso.slice(0, 19).replace("T", " ")}Z (${rel})`;
}

function row(d: DeviceView, now: Date): string[] {
  const state = d.status === "revoked" ? `${d.state}, revoked` : d.state;
  return [d.hostname, state, d.connected.map((c) => c.bastion).join(",") || "-", d.connected.length > 0 ? when(d.connected[0]!.since, now) : "-", d.state === "new" || d.state === "never-seen" ? `never (built ${when(d.created, now)})` : when(d.lastSeen, now)];
}

export function renderStatusTable(s: FleetStatus): string {
  const now = new Date(s.at);
  // Factory data (serial number, MAC, site…) follows as one column per name.
  const keys = [...new Set(s.devices.flatMap((d) => Object.keys(d.attributes)))].sort();
  const head = ["HOSTNAME", "STATE", "BASTION", "CONNECTED SINCE", "LAST SEEN", ...keys.map((k) => k.toUpperCase())];
  const rows = s.devices.map((d) => [...row(d, now), ...keys.map((k) => d.attributes[k] ?? "-")]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((v, i) => v.padEnd(widths[i]!)).join("  ").trimEnd();
  const out = [line(head), ...rows.map(line)];
  out.push("");
  for (const b of s.bastions) {
    const keys = b.expiring + b.expired > 0 ? `; keys: ${b.expiring} expiring, ${b.expired} expired` : "";
    out.push(`bastion ${b.name}: ${b.connected} of ${b.expected} connected${keys}; agent ${b.heartbeat ? `reported ${when(b.heartbeat, now)}` : "never reported"}${b.fresh ? "" : " (STALE)"}`);
  }
  for (const a of s.alarms) out.push(`ALARM ${a.kind}: ${a.message}`);
  if (s.alarms.length === 0) out.push("no alarms");
  return out.join("\n") + "\n";
}

/**
 * `status [DEVICE]`: DEVICE (a hostname, or `serial=SN0042`) narrows the view to that device
 * and the alarms about it; the bastions' lines stay (they say whether the view is fresh).
 */
export async function statusCommand(device: string | undefined, opts: StatusOptions): Promise<void> {
  const format = opts.json ? "json" : (opts.format ?? "table");
  if (!["table", "json", "prometheus"].includes(format)) throw new UserError(`--format ${JSON.stringify(format)}: use table, json or prometheus`);
  if (opts.bastion !== undefined && nameProblem(opts.bastion)) throw new UserError(`--bastion ${JSON.stringify(opts.bastion)}: not a bastion name`);
  const neverSeenAfterMs = parseAfter(opts.neverSeenAfter ?? "24h");
  const expiringWithinMs = parseWithin(opts.expiringWithin ?? "30d");
  const states = opts.state === undefined ? undefined : parseStates(opts.state);
  // Metrics count the whole fleet: a filtered set of gauges would read as a fleet that shrank.
  if (states && format === "prometheus") throw new UserError("--state filters the table and JSON, not --format prometheus", { hint: "the metrics carry every state as a label: filter in the query" });
  const s = await withFleetRegistry(opts.config, async (fleet, registry) => {
    if (opts.bastion !== undefined && !fleet.bastions.has(opts.bastion)) throw new UserError(`--bastion ${opts.bastion}: no such bastion in ${fleet.file}`);
    const one = device === undefined ? undefined : (await findDevice(registry, device, "status")).hostname;
    const [devices, obs] = await Promise.all([registry.list(), registry.observations()]);
    const all = fleetStatus(devices, obs, { now: new Date(), neverSeenAfterMs, ...(opts.bastion ? { bastion: opts.bastion } : {}), knownBastions: [...fleet.bastions.keys()], expiry: fleet.bastions, expiringWithinMs });
    return one === undefined ? all : { ...all, devices: all.devices.filter((d) => d.hostname === one), alarms: all.alarms.filter((a) => a.hostname === one) };
  }).then((all) => (states ? { ...all, devices: all.devices.filter((d) => states.includes(d.state)) } : all));
  if (format === "json") out(JSON.stringify(s));
  else if (format === "prometheus") out(await (await import("../../fleet/metrics.js")).prometheusText(s));
  else out(renderStatusTable(s));
  if (opts.check && s.alarms.length > 0) throw new UserError(`${s.alarms.length} alarm(s): ${[...new Set(s.alarms.map((a) => a.kind))].join(", ")}`, { exitCode: 1 });
}
