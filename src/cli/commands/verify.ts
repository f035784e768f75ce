/**
 * `mkoverlay verify OVERLAY…`: checks overlays (archives, folders, disk images, .img.zst, cards;
 * an image is read from its root partition, never mounted) before they are flashed.
 * With a fleet config: against the registry and against what this mkoverlay builds for the
 * device each belongs to. Without one (none found, or --offline): each overlay against itself —
 * the device it describes is read from it and built again (overlay/infer.ts), and what only the
 * registry can tell is listed as not checked.
 */
import { existsSync } from "node:fs";
import { configPath, DEFAULT_CONFIG, loadFleet } from "../../config/load.js";
import { isUserError, UserError } from "../../util/errors.js";
import { inspectOverlay } from "../../device/inspect.js";
import { out, stderrLog, type Log } from "../../util/log.js";
import { inspectOffline, NEEDS_REGISTRY } from "../../overlay/infer.js";
import { withOverlay } from "../../image/open.js";
import type { Check } from "../../overlay/verify.js";
import { loadProfiles } from "../../config/profiles.js";
import { openRegistry } from "../../registry/open.js";
import type { Registry } from "../../registry/types.js";
import { rootPartitionFlag } from "../../device/station.js";

export interface VerifyOptions {
  config?: string;
  offline?: boolean;
  json?: boolean;
  quiet?: boolean;
  /** For images: the root partition's number (default: found by type, label and file system). */
  rootPartition?: string;
}

export interface VerifyResult {
  overlay: string;
  hostname: string | null;
  ok: boolean;
  /** "registry": checked against the fleet config and registry; "offline": against itself. */
  mode: "registry" | "offline";
  checks: Check[];
  /** Offline: what was not checked (it needs the registry). */
  notChecked: string[];
  /** The overlay could not be read (not an overlay, missing, unreadable). */
  error?: string;
}

/** Offline when asked, or when no config was named and ./mkoverlay.yaml is not there. */
function offlineMode(opts: VerifyOptions): boolean {
  if (opts.offline) return true;
  return !opts.config && !process.env.MKOVERLAY_CONFIG && !existsSync(DEFAULT_CONFIG);
}

/** Every overlay's result, in order; nothing printed (the API's verify). */
export async function runVerify(paths: string[], opts: VerifyOptions, log?: Log): Promise<VerifyResult[]> {
  if (paths.length === 0) throw new UserError("verify: name at least one overlay");
  const offline = offlineMode(opts);
  if (offline && !opts.offline) log?.info(`no fleet config (./${DEFAULT_CONFIG}): offline checks only; the registry checks need --config FILE`);
  const fleet = offline ? undefined : await loadFleet(configPath(opts.config));
  const profiles = await loadProfiles();
  const rootPartition = rootPartitionFlag(opts.rootPartition);
  const registry: Registry | undefined = fleet ? await openRegistry(fleet.registry) : undefined;
  const results: VerifyResult[] = [];
  try {
    for (const path of paths) {
      const base = { overlay: path, mode: offline ? ("offline" as const) : ("registry" as const), notChecked: offline ? NEEDS_REGISTRY : [] };
      try {
        const { hostname, checks } = await withOverlay(path, rootPartition === undefined ? {} : { rootPartition }, (view) =>
          fleet && registry ? inspectOverlay(view, fleet, profiles, registry) : inspectOffline(view, profiles),
        );
        results.push({ ...base, hostname: hostname ?? null, ok: checks.every((c) => c.ok), checks });
      } catch (e) {
        // One unreadable overlay does not hide the verdicts on the others.
        if (!isUserError(e) || paths.length === 1) throw e;
        results.push({ ...base, hostname: null, ok: false, checks: [], error: e.message });
      }
    }
  } finally {
    await registry?.close();
  }
  return results;
}

const line = (c: Check): string => `${c.ok ? "ok  " : "FAIL"} ${c.what}${c.detail && !c.ok ? `: ${c.detail}` : ""}`;

export async function verifyCommand(pathsArg: string[] | string, opts: VerifyOptions): Promise<void> {
  const paths = Array.isArray(pathsArg) ? pathsArg : [pathsArg];
  const log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json));
  const results = await runVerify(paths, opts, log);
  const many = paths.length > 1;
  const lines: string[] = [];
  for (const r of results) {
    if (opts.json) {
      out(JSON.stringify(r));
      continue;
    }
    if (r.error !== undefined) {
      lines.push(`${many ? `${r.overlay}: ` : ""}FAIL cannot read it: ${r.error}`);
      continue;
    }
    if (opts.quiet) {
      for (const c of r.checks) if (!c.ok) lines.push(`${many ? `${r.overlay}: ` : ""}${line(c)}`);
      continue;
    }
    if (many) lines.push(`${lines.length > 0 ? "\n" : ""}# ${r.overlay}`);
    lines.push(...r.checks.map(line), ...r.notChecked.map((n) => `skip ${n} (needs the fleet config and the registry)`));
  }
  if (lines.length > 0) out(lines.join("\n"));
  const unreadable = results.filter((r) => r.error !== undefined).length;
  const failed = results.filter((r) => !r.ok).length;
  if (!many && failed > 0) throw new UserError(`${paths[0]}: ${results[0]!.checks.filter((c) => !c.ok).length} check(s) failed`, { exitCode: 1 });
  if (many) log.info(`verified ${results.length} overlay(s): ${results.length - failed} passed, ${failed - unreadable} failed, ${unreadable} unreadable`);
  if (unreadable > 0) throw new UserError(`${unreadable} of ${results.length} overlay(s) could not be read (see above)`, { exitCode: 2 });
  if (failed > 0) throw new UserError(`${failed} of ${results.length} overlay(s) failed verification`, { exitCode: 1 });
}
