/**
 * `mkoverlay registry migrate --to postgres://user@host/db` (or `--to FILE`): copies the
 * registry in use (config `registry:` or $MKOVERLAY_REGISTRY) into another backend — every
 * device with its ports, key and status, and the name counter. A target that already holds
 * devices is refused without --force. The config is not changed: point `registry:` at the
 * target afterwards.
 */
import { resolve } from "node:path";
import { configPath, loadFleet } from "../../config/load.js";
import { UserError } from "../../util/errors.js";
import { out, stderrLog } from "../../util/log.js";
import { copyRegistry } from "../../registry/copy.js";
import { displayLocation, isRegistryUrl } from "../../config/registry-location.js";

export interface MigrateOptions {
  to?: string;
  force?: boolean;
  config?: string;
  json?: boolean;
  quiet?: boolean;
}

export async function registryMigrateCommand(opts: MigrateOptions): Promise<void> {
  if (!opts.to) throw new UserError("registry migrate: --to is required (postgres://user@host:5432/db or a registry file)");
  const fleet = await loadFleet(configPath(opts.config));
  const to = isRegistryUrl(opts.to) ? opts.to : resolve(opts.to);
  const r = await copyRegistry(fleet.registry, to, { force: Boolean(opts.force) });
  if (opts.json) {
    out(JSON.stringify(r));
    return;
  }
  const s = r.statuses;
  out(`copied ${r.devices} device(s) (${s.active} active, ${s.pending} pending, ${s.revoked} revoked), ${r.ports} port(s), name counter ${r.seq}: ${r.from} -> ${r.to}`);
  stderrLog(Boolean(opts.quiet)).info(`the config still points at ${r.from}; set 'registry: ${displayLocation(to)}' (or MKOVERLAY_REGISTRY) to use the copy`);
}
