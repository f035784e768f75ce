/**
 * `mkoverlay bastion agent --bastion NAME`: the long-running process of
 * mkoverlay-bastion@NAME.service. Foreground; one log line per event on stderr (under systemd
 * with a syslog priority prefix, so the journal shows warnings and errors as such).
 */
import { spawnSync } from "node:child_process";
import { isAbsolute } from "node:path";
import { Agent, type Level } from "../bastion/agent.js";
import { stateDir } from "../bastion/paths.js";
import { configPath, loadFleet } from "../config/load.js";
import { resolveBastions } from "../device.js";
import { UserError } from "../errors.js";
import { isPostgresUrl } from "../registry/location.js";
import { openRegistry } from "../registry/open.js";

/** uid of a local user, or undefined (getent: the user may come from any NSS source). */
export function userId(name: string): number | undefined {
  const r = spawnSync("getent", ["passwd", name], { encoding: "utf8" });
  if (r.status !== 0) return undefined;
  const uid = Number(r.stdout.split(":")[2]);
  return Number.isInteger(uid) ? uid : undefined;
}

export function seconds(flag: string, value: string): number {
  if (!/^\d{1,6}$/.test(value) || Number(value) < 1) throw new UserError(`${flag} ${JSON.stringify(value)}: a whole number of seconds (at least 1)`);
  return Number(value);
}

const PRIORITY: Record<Level, number> = { error: 3, warn: 4, info: 6 };

export async function bastionAgentCommand(opts: { bastion?: string; config?: string; stateDir?: string; authLog?: string; resync?: string }): Promise<void> {
  const fleet = await loadFleet(configPath(opts.config));
  const bs = resolveBastions(fleet, opts.bastion);
  if (bs.length !== 1) throw new UserError(`--bastion ${opts.bastion}: name exactly one bastion`);
  const bastion = bs[0]!;
  const dir = opts.stateDir ?? stateDir(bastion.name);
  if (!isAbsolute(dir)) throw new UserError(`--state-dir ${JSON.stringify(dir)}: give an absolute path`);
  const authLog = opts.authLog ?? "journal";
  if (authLog !== "journal" && authLog !== "none" && !isAbsolute(authLog)) {
    throw new UserError(`--auth-log ${JSON.stringify(authLog)}: 'journal', 'none', or the absolute path of the file sshd logs to`);
  }
  const resync = opts.resync === undefined ? (isPostgresUrl(fleet.registry) ? 60 : 10) : seconds("--resync", opts.resync);
  const uid = userId(bastion.user);
  if (uid === undefined) {
    throw new UserError(`bastion '${bastion.name}': its tunnel user '${bastion.user}' does not exist on this host`, { hint: `mkoverlay bastion install --bastion ${bastion.name} creates it` });
  }
  const journal = Boolean(process.env.JOURNAL_STREAM);
  const log = (level: Level, msg: string) => {
    process.stderr.write(journal ? `<${PRIORITY[level]}>${msg}\n` : `mkoverlay agent[${bastion.name}]: ${level === "info" ? "" : `${level}: `}${msg}\n`);
  };
  const agent = new Agent({ fleet, bastion, stateDir: dir, registry: fleet.registry, openRegistry, tunnelUid: uid, resyncMs: resync * 1000, authLog, log });
  await agent.start();
  await new Promise<void>((resolve) => {
    const stop = (sig: string) => {
      log("info", `${sig}: stopping`);
      void agent.stop().then(resolve);
    };
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
  });
}
