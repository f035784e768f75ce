/**
 * `mkoverlay registry doctor`: finishes or reclaims work that stations started and never
 * finished — builds (`pending` devices) and key rotations. Work is left alone while its lease
 * runs (the station that started it is still working on it); once the lease has run out (plus
 * --grace), or at once when the station is a process of this host that no longer runs, the
 * doctor looks at the output: a complete overlay with the expected key is finished (the device
 * activated, the rotation committed), anything else is reclaimed (the port given back, the
 * pending key dropped). Each step is a compare-and-set on the lease it saw. Without --fix it
 * only reports.
 */
import { configPath, loadFleet } from "../../config/load.js";
import { durationFlag } from "../../util/duration.js";
import { overlayComplete } from "../../device/inspect.js";
import { out } from "../../util/log.js";
import { withOverlay } from "../../image/open.js";
import { loadProfiles } from "../../config/profiles.js";
import { stationIsDead } from "../../registry/core.js";
import { openRegistry } from "../../registry/open.js";
import type { Unfinished } from "../../registry/types.js";

export interface DoctorOptions {
  config?: string;
  fix?: boolean;
  grace?: string;
  json?: boolean;
}

type Action = "activated" | "rotated" | "reclaimed" | "waiting" | "changed";

/** Whether the work is no longer its station's: lease (plus grace) run out, or station dead. */
function abandoned(u: Unfinished, graceMs: number): boolean {
  if (stationIsDead(u.device.station)) return true;
  if (u.leaseUntil === null) return Date.parse(u.device.updated) + graceMs <= Date.now();
  return u.leaseUntil + graceMs <= u.dbNow;
}

export async function doctorCommand(opts: DoctorOptions): Promise<void> {
  // A bare number is seconds, as this flag has always taken (src/util/duration.ts).
  const graceMs = durationFlag("--grace", opts.grace ?? "60", { zero: true, bareSeconds: true, examples: "60, 90s, 5min, 1h", zeroMeans: "0 to act as soon as a lease runs out" });
  const fleet = await loadFleet(configPath(opts.config));
  const profiles = await loadProfiles();
  const registry = await openRegistry(fleet.registry);
  const report: { hostname: string; port: number; work: "build" | "rotate"; action: Action; fixed: boolean }[] = [];
  try {
    for (const u of await registry.unfinished()) {
      const d = u.device;
      let action: Action = "waiting";
      if (abandoned(u, graceMs)) {
        const fp = u.kind === "build" ? d.fingerprint : (d.rotating?.fingerprint ?? "");
        let complete = false;
        try {
          // An image (`mkoverlay image`) is read like an archive: its root partition, no mount.
          complete = d.overlay !== null && (await withOverlay(d.overlay, {}, (view) => overlayComplete(view, fleet, profiles, d, fp)));
        } catch {
          complete = false; // missing, unreadable or not an overlay: not complete
        }
        action = complete ? (u.kind === "build" ? "activated" : "rotated") : "reclaimed";
        if (opts.fix && !(await (complete ? registry.finish(u) : registry.reclaim(u)))) action = "changed";
      }
      report.push({ hostname: d.hostname, port: d.port, work: u.kind, action, fixed: Boolean(opts.fix) && action !== "waiting" && action !== "changed" });
    }
  } finally {
    await registry.close();
  }
  if (opts.json) {
    out(JSON.stringify(report));
    return;
  }
  if (report.length === 0) {
    out("registry is healthy: no unfinished builds or rotations");
    return;
  }
  for (const r of report) {
    const what = {
      activated: "overlay was written; device is live",
      rotated: "new overlay was written; the new key is the device's",
      reclaimed: r.work === "build" ? "build never finished; port given back" : "rotation never finished; the pending key was dropped",
      waiting: "still being worked on (its station holds the lease); left alone",
      changed: "changed while the doctor looked; left alone",
    }[r.action];
    out(`${r.hostname}\tport ${r.port}\t${r.fixed || r.action === "waiting" || r.action === "changed" ? "" : "would be: "}${what}`);
  }
  if (!opts.fix && report.some((r) => r.action !== "waiting")) out("run with --fix to apply");
}
