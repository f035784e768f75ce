/**
 * `mkoverlay bastion install --bastion NAME [--root DIR]`: sets this host (or a mounted image)
 * up as the bastion (bastion/install.ts). On a running systemd host it then reloads systemd,
 * (re)starts the agent and reloads sshd, in that order: the agent's key directory is already
 * filled when sshd starts asking it. Without systemd it prints the agent's exact command.
 * `--dry-run` prints what would change, as a diff, and changes nothing.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, realpathSync } from "node:fs";
import { isAbsolute, resolve } from "node:path";
import { imageHasSystemd, install, systemdRunning } from "../../bastion/install.js";
import { agentUnit, fleetCopy } from "../../bastion/paths.js";
import { RootFs } from "../../bastion/rootfs.js";
import { sshdLogFile } from "../../bastion/sshd-log.js";
import { tunnelSshdConfigPath, tunnelSshdUnit } from "../../bastion/tunnel-sshd.js";
import { agentCommand, unitPathProblem } from "../../bastion/unit.js";
import type { Fleet } from "../../config/fleet.js";
import { configPath, loadFleet, parseFleet } from "../../config/load.js";
import { resolveBastions } from "../../device/inputs.js";
import { isRegistryUrl } from "../../config/registry-location.js";
import { UserError } from "../../util/errors.js";
import { out, stderrLog } from "../../util/log.js";
import { openRegistry } from "../../registry/open.js";

/** The config this bastion was installed with last time (what devices from before schema 6 dial), if readable. */
async function previousFleet(path: string): Promise<Fleet | undefined> {
  if (!existsSync(path)) return undefined;
  try {
    return await parseFleet(readFileSync(path, "utf8"), path);
  } catch {
    return undefined;
  }
}

function systemctl(args: string[]): { ok: boolean; err: string } {
  const r = spawnSync("systemctl", args, { encoding: "utf8" });
  return { ok: r.status === 0, err: (r.stderr || r.error?.message || "").trim().split("\n")[0] ?? "" };
}

export interface InstallOpts {
  bastion?: string;
  root?: string;
  registry?: string;
  createUser?: boolean;
  mkoverlay?: string;
  takeOverUser?: string;
  dryRun?: boolean;
  config?: string;
  json?: boolean;
  forceConfigChange?: boolean;
  sshdVersion?: string;
}

/** Where the install goes and what the bastion will run: checked before anything is read or written. */
interface Target {
  root: string;
  /** Installing into a mounted image (`--root`), not this host. */
  image: boolean;
  /** The registry location the agent will use: on this host a relative file path is taken from here. */
  registry: string;
  /** mkoverlay's command as the bastion will run it. */
  exec: string[];
}

function targetOf(opts: InstallOpts, fleet: Fleet): Target {
  const root = resolve(opts.root ?? "/");
  const image = root !== "/";
  // Into an image, nothing of this station may be written: what the bastion will see must be said.
  if (image && opts.mkoverlay === undefined) {
    throw new UserError("--root: give --mkoverlay PATH, mkoverlay's executable as the bastion will run it (e.g. /usr/local/bin/mkoverlay)", { hint: "this station's path to mkoverlay means nothing inside the image" });
  }
  if (image && opts.registry === undefined) {
    throw new UserError("--root: give --registry LOCATION, the registry as the bastion's agent will reach it (e.g. postgres://mkoverlay_bastion@db/fleet)", { hint: "the config's registry is this station's" });
  }
  if (image && !isRegistryUrl(opts.registry!) && !isAbsolute(opts.registry!)) {
    throw new UserError(`--registry ${opts.registry}: with --root, give the registry file's absolute path on the bastion`);
  }
  const registry = opts.registry === undefined ? fleet.registry : isRegistryUrl(opts.registry) || image ? opts.registry : resolve(opts.registry);
  const exec = opts.mkoverlay ? [opts.mkoverlay] : [process.execPath, realpathSync(process.argv[1]!)];
  return { root, image, registry, exec };
}

export async function bastionInstallCommand(opts: InstallOpts): Promise<void> {
  const file = configPath(opts.config);
  const fleet = await loadFleet(file);
  const bs = resolveBastions(fleet, opts.bastion);
  if (bs.length !== 1) throw new UserError(`--bastion ${opts.bastion}: name exactly one bastion`);
  const bastion = bs[0]!;
  const target = targetOf(opts, fleet);
  const { root, image, exec } = target;
  const logger = stderrLog(Boolean(opts.json));
  const log = (m: string) => logger.info(m);
  const r = await install({
    fleet,
    bastion,
    root,
    registry: target.registry,
    openRegistry,
    createUser: opts.createUser !== false,
    exec,
    configText: readFileSync(file, "utf8"),
    takeOverUser: opts.takeOverUser,
    dryRun: Boolean(opts.dryRun),
    log,
    warn: (m) => logger.warn(m),
    onSkip: (s) => logger.warn(`left out ${JSON.stringify(s.hostname)}: ${s.reason}`),
    forceConfigChange: Boolean(opts.forceConfigChange),
    sshdVersion: opts.sshdVersion,
    // Read inside the root, as every path of an image is (a link may not lead to the host).
    previousFleet: await previousFleet(new RootFs(root).resolve(fleetCopy(bastion.name))),
  });
  // Without systemd (on this host, or in the image) the agent is the administrator's to start.
  const fs = new RootFs(root);
  const withSystemd = image ? imageHasSystemd(fs) : systemdRunning();
  let command: string | null = null;
  if (!withSystemd) {
    const logFile = sshdLogFile(fs);
    command = agentCommand(exec, bastion.name, logFile && !unitPathProblem(logFile) ? logFile : "none");
  }
  // What --json reports: what was done here (or would be), and whether the services were (re)started.
  const report = (started: boolean) =>
    opts.json &&
    out(
      JSON.stringify({
        bastion: bastion.name, root, dryRun: r.dryRun, createdUsers: r.createdUsers, written: r.written, unchanged: r.unchanged, initialKeys: r.initialKeys ?? null, live: r.live, mode: r.mode, started,
        agentCommand: command, diff: r.diff,
      }),
    );
  if (r.dryRun) {
    if (!opts.json) process.stdout.write(r.diff);
    log(r.diff ? `dry run: nothing was changed; the diff above is what the install would do` : `dry run: already installed, nothing would change`);
    report(false);
    return;
  }
  for (const u of r.createdUsers) log(`created system user ${u}`);
  for (const f of r.written) log(`installed ${f}`);
  if (r.written.length === 0) log(`already installed: ${r.unchanged.length} file(s) unchanged`);
  if (r.initialKeys !== undefined) log(`key directory filled from the registry: ${r.initialKeys} key(s)`);
  if (command !== null) {
    log(`${image ? `${root} has no systemd` : "systemd is not running here"}: start the agent with this command (under your service supervisor), then reload sshd:`);
    logger.info(`  ${command}`);
    if (r.mode === "tunnel") log(`and the tunnels' sshd after the agent: /usr/sbin/sshd -D -f ${tunnelSshdConfigPath(bastion.name)}`);
    if (command.endsWith("--auth-log none'")) log("sshd does not log to a file (-E FILE) here, so the agent cannot see logins: a rotated device's old key then lasts until its grace ends; run sshd with -E FILE and give the agent --auth-log FILE");
    report(false);
    return;
  }
  if (image) {
    log(`installed into ${root}; on first boot systemd starts ${agentUnit(bastion.name)} (enabled)${r.mode === "tunnel" ? `, then ${tunnelSshdUnit(bastion.name)} (enabled)` : ""} and sshd reads the drop-in`);
    report(false);
    return;
  }
  startServices(bastion.name, r.mode, bastion.port, log);
  report(true);
}

/**
 * On a running systemd host: the agent first (its key directory is what the tunnels' sshd
 * asks), then the tunnels' sshd (reload-or-restart starts it the first time and re-reads a
 * changed config without ending sessions), then the administrators' sshd reads the drop-in.
 */
function startServices(name: string, mode: string, port: number, log: (m: string) => void): void {
  const unit = agentUnit(name);
  const tunnelUnit = tunnelSshdUnit(name);
  const steps: [string[], string][] = [
    [["daemon-reload"], "systemctl daemon-reload"],
    [["restart", unit], `systemctl restart ${unit}`],
    ...(mode === "tunnel" ? ([[["reload-or-restart", tunnelUnit], `systemctl reload-or-restart ${tunnelUnit}`]] as [string[], string][]) : []),
  ];
  for (const [args, what] of steps) {
    const s = systemctl(args);
    if (!s.ok) throw new UserError(`${what} failed: ${s.err}`, { hint: `the files are in place; see journalctl -u ${unit}`, exitCode: 1 });
  }
  const sshUnit = systemctl(["cat", "ssh.service"]).ok ? "ssh.service" : "sshd.service";
  const reload = systemctl(["reload-or-restart", sshUnit]);
  if (!reload.ok) throw new UserError(`systemctl reload-or-restart ${sshUnit} failed: ${reload.err}`, { hint: "the files are in place and sshd -t accepted them", exitCode: 1 });
  log(`started ${unit}; ${mode === "tunnel" ? `started ${tunnelUnit} (the tunnels' sshd on port ${port}); ` : ""}reloaded ${sshUnit}`);
}
