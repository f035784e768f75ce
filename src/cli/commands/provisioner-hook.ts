/**
 * `mkoverlay provisioner-hook BOOT ROOT`: the body of a `rootfs-mounted` hook for Raspberry Pi's
 * factory provisioner (rpi-sb-provisioner). The provisioner mounts its per-device copy of the OS
 * image, runs `/etc/rpi-sb-provisioner/scripts/<mode>-rootfs-mounted.sh BOOT ROOT` from `/` with
 * TARGET_DEVICE_SERIAL in the environment, and fails the device on a non-zero exit (see
 * docs/facts.md). This command lays the device with that serial into ROOT:
 *
 * - no live device has the serial: a new device is built onto ROOT with `serial=` as its factory
 *   data (reserve → place → commit, the build flow; nothing pending on failure);
 * - one has, and its recorded output is an overlay archive still on disk (a shift planned ahead
 *   with `batch --hosts` and a serial column): that archive is laid with GNU tar, registry
 *   untouched — running it again lays the same thing again;
 * - one has, without such an archive (it was laid into an earlier image that is gone: the
 *   provisioner deletes its per-device copy once flashed): the device is rotated onto ROOT, same
 *   name and ports, a new key (the old one is no longer valid: --grace 0 by default).
 *
 * A pending device with the serial (a killed build) or several live ones are refused.
 */
import { spawnSync } from "node:child_process";
import { existsSync, realpathSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { attributeName, attributeNameProblem } from "../../device/attributes.js";
import { configPath, loadFleet } from "../../config/load.js";
import { UserError } from "../../util/errors.js";
import { out, stderrLog } from "../../util/log.js";
import { openRegistry } from "../../registry/open.js";
import type { DeviceRecord } from "../../registry/types.js";
import { interruptible } from "../../device/station.js";

export interface ProvisionerHookOptions {
  board: string;
  bastion?: string;
  os?: string;
  /** The factory data name the serial is recorded under (default `serial`). */
  serialAttr?: string;
  /** Where the lines files go (default: `out/` beside the fleet config; the hook runs in `/`). */
  out?: string;
  grace?: string;
  config?: string;
  quiet?: boolean;
}

export type HookAction = "built" | "laid" | "rotated";

/** What rpi-sb-provisioner hands a hook: TARGET_DEVICE_SERIAL, checked as a factory data value. */
export function targetSerial(env: NodeJS.ProcessEnv): string {
  const s = env.TARGET_DEVICE_SERIAL;
  if (s === undefined || s === "") {
    throw new UserError("provisioner-hook: TARGET_DEVICE_SERIAL is not set", {
      hint: "rpi-sb-provisioner sets it when it runs /etc/rpi-sb-provisioner/scripts/<mode>-rootfs-mounted.sh; to try the hook by hand: TARGET_DEVICE_SERIAL=10000000abcdef01 mkoverlay provisioner-hook BOOT ROOT …",
    });
  }
  if (!/^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$/.test(s)) {
    throw new UserError(`provisioner-hook: TARGET_DEVICE_SERIAL ${JSON.stringify(s)} is not a serial number (letters, digits, '.', '_', '-'; at most 64)`, {
      hint: "the provisioner reads it from the device (fastboot getvar serialno); nothing was built",
    });
  }
  return s;
}

/** ROOT must be a mounted root file system, never this station's own `/`. */
export function checkRoot(root: string): string {
  let real: string;
  try {
    real = realpathSync(root);
  } catch {
    throw new UserError(`provisioner-hook: root ${root}: no such directory`, { hint: "the provisioner passes the boot and root mount points as $1 and $2: pass \"$@\" on" });
  }
  if (!statSync(real).isDirectory()) throw new UserError(`provisioner-hook: root ${root}: not a directory`);
  if (real === "/") throw new UserError("provisioner-hook: root is this station's own '/'; refusing to lay a device into it", { hint: "pass the image's mounted root ($2 of a rootfs-mounted hook)" });
  if (!existsSync(join(real, "etc"))) {
    throw new UserError(`provisioner-hook: root ${root}: has no etc/, not a root file system`, { hint: "a rootfs-mounted hook gets BOOT ROOT: pass \"$@\" on, in that order" });
  }
  return real;
}

export function provisionerHookCommand(boot: string, root: string, opts: ProvisionerHookOptions): Promise<void> {
  return interruptible(async (stop) => {
    const r = await runProvisionerHook(boot, root, opts, process.env, stop);
    return `${r.hostname} was ${r.action}`;
  });
}

export async function runProvisionerHook(_boot: string, rootArg: string, opts: ProvisionerHookOptions, env: NodeJS.ProcessEnv, stop?: AbortSignal): Promise<{ action: HookAction; hostname: string }> {
  const log = stderrLog(Boolean(opts.quiet));
  const serial = targetSerial(env);
  const root = checkRoot(rootArg);
  const key = attributeName(opts.serialAttr ?? "serial");
  const bad = attributeNameProblem(key);
  if (bad) throw new UserError(`--serial-attr ${JSON.stringify(opts.serialAttr)}: ${bad}`);
  const config = configPath(opts.config);
  const outDir = resolve(opts.out ?? join(dirname(config), "out"));
  const fleet = await loadFleet(config, new Date());
  const registry = await openRegistry(fleet.registry);
  let found: DeviceRecord[];
  try {
    found = await registry.findByAttribute(key, serial);
  } finally {
    await registry.close();
  }
  const pending = found.filter((d) => d.status === "pending");
  const live = found.filter((d) => d.status === "active");
  if (pending.length > 0) {
    throw new UserError(`provisioner-hook: ${key}=${serial}: ${pending[0]!.hostname} is pending (a build that did not finish)`, {
      hint: "'mkoverlay registry doctor --fix' finishes or gives it back; then provision the device again",
    });
  }
  if (live.length > 1) {
    throw new UserError(`provisioner-hook: ${key}=${serial}: ${live.length} live devices have it: ${live.map((d) => d.hostname).join(", ")}`, {
      hint: `revoke all but one ('mkoverlay revoke HOST'), then provision the device again`,
    });
  }
  const common = { config, out: outDir, quiet: opts.quiet };
  const d = live[0];
  if (!d) {
    const { runBuild } = await import("./build.js");
    const b = await runBuild({ ...common, board: opts.board, bastion: opts.bastion, os: opts.os, attr: [`${key}=${serial}`], apply: root }, undefined, stop);
    out(b.authorizedKeysText);
    log.info(`${serial}: built ${b.hostname} (port ${b.port}) into ${root}`);
    return { action: "built", hostname: b.hostname };
  }
  if (d.overlay && /\.overlay\.tar(\.gz)?$/.test(d.overlay) && existsSync(d.overlay)) {
    layArchive(d.overlay, root);
    log.info(`${serial}: laid ${d.hostname}'s overlay ${d.overlay} into ${root}`);
    return { action: "laid", hostname: d.hostname };
  }
  const { rotate } = await import("./lifecycle.js");
  // rotate prints the new lines itself.
  await rotate(`${key}=${serial}`, { ...common, apply: root, grace: opts.grace ?? "0", quiet: true }, stop ?? new AbortController().signal);
  log.info(`${serial}: ${d.hostname} was provisioned before; rotated it onto ${root} (same name and port ${d.port}, a new key)`);
  return { action: "rotated", hostname: d.hostname };
}

/** GNU tar, as the README's recipes lay an archive: owners, modes, the root's directory symlinks kept. */
function layArchive(archive: string, root: string): void {
  const r = spawnSync("tar", ["-xpzf", archive, "--same-owner", "--numeric-owner", "--keep-directory-symlink", "-C", root], { encoding: "utf8" });
  if (r.error || r.status !== 0) {
    throw new UserError(`provisioner-hook: tar -xpzf ${archive} -C ${root} failed: ${(r.stderr || String(r.error)).trim().split("\n")[0]}`, {
      hint: "the provisioner marks the device failed; fix the cause and provision it again",
    });
  }
}
