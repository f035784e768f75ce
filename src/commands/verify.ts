/**
 * `mkoverlay verify OVERLAY`: checks an overlay (archive, folder, disk image, .img.zst or card)
 * against the registry and against what this mkoverlay builds for the device it belongs to,
 * before it is flashed. An image is read from its root partition (no mount).
 */
import { configPath, loadFleet } from "../config/load.js";
import { UserError } from "../errors.js";
import { inspectOverlay } from "../inspect.js";
import { out } from "../output.js";
import { withOverlay } from "../overlay/read.js";
import { loadProfiles } from "../profiles.js";
import { openRegistry } from "../registry/open.js";
import { rootPartitionFlag } from "../station.js";

export async function verifyCommand(path: string, opts: { config?: string; json?: boolean; rootPartition?: string }): Promise<void> {
  const fleet = await loadFleet(configPath(opts.config));
  const profiles = await loadProfiles();
  const rootPartition = rootPartitionFlag(opts.rootPartition);
  const result = await withOverlay(path, rootPartition === undefined ? {} : { rootPartition }, async (view) => {
    const registry = await openRegistry(fleet.registry);
    try {
      return await inspectOverlay(view, fleet, profiles, registry);
    } finally {
      await registry.close();
    }
  });
  const { hostname, checks } = result;
  const failed = checks.filter((c) => !c.ok);
  if (opts.json) out(JSON.stringify({ overlay: path, hostname: hostname ?? null, ok: failed.length === 0, checks }));
  else out(checks.map((c) => `${c.ok ? "ok  " : "FAIL"} ${c.what}${c.detail && !c.ok ? `: ${c.detail}` : ""}`).join("\n"));
  if (failed.length > 0) throw new UserError(`${path}: ${failed.length} check(s) failed`, { exitCode: 1 });
}
