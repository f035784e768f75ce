/**
 * `mkoverlay registry doctor`: finishes or reclaims devices left `pending` by builds that were
 * killed. A pending device whose overlay reached its final name (with the registered key) was
 * built: it is activated. One without an overlay, older than the grace period (builds take
 * milliseconds; the grace covers builds still running), gives its ports back. Without --fix
 * it only reports.
 */
import { configPath, loadFleet } from "../config/load.js";
import { UserError } from "../errors.js";
import { out } from "../output.js";
import { readOverlay } from "../overlay/read.js";
import { HOST_KEY_PUB } from "../overlay/paths.js";
import { openRegistry } from "../registry/open.js";
import type { DeviceRecord } from "../registry/types.js";

export interface DoctorOptions {
  config?: string;
  fix?: boolean;
  grace?: string;
  json?: boolean;
}

async function overlayHasKey(d: DeviceRecord): Promise<boolean> {
  if (!d.overlay) return false;
  try {
    const tree = await readOverlay(d.overlay);
    const pub = tree.get(HOST_KEY_PUB.slice(1))?.content?.toString("utf8") ?? "";
    return pub.split(" ").slice(0, 2).join(" ") === d.publicKey;
  } catch {
    return false;
  }
}

export async function doctorCommand(opts: DoctorOptions): Promise<void> {
  const grace = Number(opts.grace ?? "60");
  if (!Number.isFinite(grace) || grace < 0) throw new UserError(`--grace ${opts.grace}: not a number of seconds`);
  const fleet = await loadFleet(configPath(opts.config));
  const registry = await openRegistry(fleet.registry);
  const report: { hostname: string; port: number; action: "activated" | "reclaimed" | "waiting"; fixed: boolean }[] = [];
  try {
    for (const d of await registry.pending()) {
      const age = (Date.now() - Date.parse(d.updated)) / 1000;
      let action: "activated" | "reclaimed" | "waiting";
      if (await overlayHasKey(d)) action = "activated";
      else if (age >= grace) action = "reclaimed";
      else action = "waiting";
      if (opts.fix && action === "activated") await registry.activate(d.hostname);
      if (opts.fix && action === "reclaimed") await registry.abandon(d.hostname);
      report.push({ hostname: d.hostname, port: d.port, action, fixed: Boolean(opts.fix) && action !== "waiting" });
    }
  } finally {
    await registry.close();
  }
  if (opts.json) {
    out(JSON.stringify(report));
    return;
  }
  if (report.length === 0) {
    out("registry is healthy: no unfinished builds");
    return;
  }
  for (const r of report) {
    const what =
      r.action === "activated"
        ? "overlay was written; device is live"
        : r.action === "reclaimed"
          ? "build never finished; port given back"
          : `build started under ${grace}s ago; left alone`;
    out(`${r.hostname}\tport ${r.port}\t${r.fixed || r.action === "waiting" ? "" : "would be: "}${what}`);
  }
  if (!opts.fix && report.some((r) => r.action !== "waiting")) out("run with --fix to apply");
}
