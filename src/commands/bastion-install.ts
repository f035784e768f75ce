/**
 * `mkoverlay bastion install --bastion NAME [--root DIR]`: sets this host (or a mounted image)
 * up as the bastion (bastion/install.ts). On a running systemd host it then reloads systemd,
 * (re)starts the agent and reloads sshd, in that order: the agent's key directory is already
 * filled when sshd starts asking it.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, realpathSync } from "node:fs";
import { join, resolve } from "node:path";
import { install, systemdRunning } from "../bastion/install.js";
import { agentUnit, fleetCopy } from "../bastion/paths.js";
import type { Fleet } from "../config/fleet.js";
import { configPath, loadFleet, parseFleet } from "../config/load.js";
import { resolveBastions } from "../device.js";
import { UserError } from "../errors.js";
import { out, stderrLog } from "../output.js";
import { openRegistry } from "../registry/open.js";

/** The config this bastion was installed with last time (what devices from before schema 5 dial), if readable. */
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

export async function bastionInstallCommand(opts: {
  bastion?: string;
  root?: string;
  registry?: string;
  createUser?: boolean;
  mkoverlay?: string;
  config?: string;
  json?: boolean;
  forceConfigChange?: boolean;
}): Promise<void> {
  const file = configPath(opts.config);
  const fleet = await loadFleet(file);
  const bs = resolveBastions(fleet, opts.bastion);
  if (bs.length !== 1) throw new UserError(`--bastion ${opts.bastion}: name exactly one bastion`);
  const bastion = bs[0]!;
  const root = resolve(opts.root ?? "/");
  // The registry location the agent will use: a relative file path is taken from here.
  const registry = opts.registry === undefined ? fleet.registry : /^[a-z][a-z0-9+.-]*:\/\//i.test(opts.registry) ? opts.registry : resolve(opts.registry);
  const exec = opts.mkoverlay ? [opts.mkoverlay] : [process.execPath, realpathSync(process.argv[1]!)];
  const logger = stderrLog(Boolean(opts.json));
  const log = (m: string) => logger.info(m);
  const r = await install({
    fleet,
    bastion,
    root,
    registry,
    openRegistry,
    createUser: opts.createUser !== false,
    exec,
    configText: readFileSync(file, "utf8"),
    log,
    onSkip: (s) => logger.warn(`left out ${JSON.stringify(s.hostname)}: ${s.reason}`),
    forceConfigChange: Boolean(opts.forceConfigChange),
    previousFleet: await previousFleet(join(root, fleetCopy(bastion.name))),
    warn: (m) => logger.warn(m),
  });
  // What --json reports: what was done here, and whether the services were (re)started.
  const report = (started: boolean) =>
    opts.json &&
    out(JSON.stringify({ bastion: bastion.name, root, createdUsers: r.createdUsers, written: r.written, unchanged: r.unchanged, initialKeys: r.initialKeys ?? null, live: r.live, started }));
  for (const u of r.createdUsers) log(`created system user ${u}`);
  for (const f of r.written) log(`installed ${f}`);
  if (r.written.length === 0) log(`already installed: ${r.unchanged.length} file(s) unchanged`);
  if (r.initialKeys !== undefined) log(`key directory filled from the registry: ${r.initialKeys} key(s)`);
  const unit = agentUnit(bastion.name);
  if (!r.live) {
    log(`installed into ${root}; on first boot systemd starts ${unit} (enabled) and sshd reads the drop-in`);
    report(false);
    return;
  }
  if (!systemdRunning()) {
    log(`systemd is not running here: start the agent (${unit}) and reload sshd yourself`);
    report(false);
    return;
  }
  const steps: [string[], string][] = [
    [["daemon-reload"], "systemctl daemon-reload"],
    [["restart", unit], `systemctl restart ${unit}`],
  ];
  for (const [args, what] of steps) {
    const s = systemctl(args);
    if (!s.ok) throw new UserError(`${what} failed: ${s.err}`, { hint: `the files are in place; see journalctl -u ${unit}`, exitCode: 1 });
  }
  const sshUnit = systemctl(["cat", "ssh.service"]).ok ? "ssh.service" : "sshd.service";
  const reload = systemctl(["reload-or-restart", sshUnit]);
  if (!reload.ok) throw new UserError(`systemctl reload-or-restart ${sshUnit} failed: ${reload.err}`, { hint: "the files are in place and sshd -t accepted them", exitCode: 1 });
  log(`started ${unit}; reloaded ${sshUnit}`);
  report(true);
}
