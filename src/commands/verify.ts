/**
 * `mkoverlay verify OVERLAY`: checks an overlay (archive or folder) against the registry and
 * against what this mkoverlay builds for the device it belongs to, before it is flashed.
 */
import { configPath, loadFleet } from "../config/load.js";
import { UserError } from "../errors.js";
import { inspectOverlay } from "../inspect.js";
import { out } from "../output.js";
import { openOverlay } from "../overlay/read.js";
import { loadProfiles } from "../profiles.js";
import { openRegistry } from "../registry/open.js";

export async function verifyCommand(path: string, opts: { config?: string; json?: boolean }): Promise<void> {
  const fleet = await loadFleet(configPath(opts.config));
  const profiles = await loadProfiles();
  const view = await openOverlay(path);
  const registry = await openRegistry(fleet.registry);
  let result;
  try {
    result = await inspectOverlay(view, fleet, profiles, registry);
  } finally {
    await registry.close();
  }
  const { hostname, checks } = result;
  const failed = checks.filter((c) => !c.ok);
  if (opts.json) out(JSON.stringify({ overlay: path, hostname: hostname ?? null, ok: failed.length === 0, checks }));
  else out(checks.map((c) => `${c.ok ? "ok  " : "FAIL"} ${c.what}${c.detail && !c.ok ? `: ${c.detail}` : ""}`).join("\n"));
  if (failed.length > 0) throw new UserError(`${path}: ${failed.length} check(s) failed`, { exitCode: 1 });
}
