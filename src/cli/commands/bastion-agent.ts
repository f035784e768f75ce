/**
 * `mkoverlay bastion agent --bastion NAME`: the long-running process of
 * mkoverlay-bastion@NAME.service. Foreground; one log line per event on stderr (under systemd
 * with a syslog priority prefix, so the journal shows warnings and errors as such).
 */
import { spawnSync } from "node:child_process";
import { createServer, type Server } from "node:http";
import { isIP } from "node:net";
import { isAbsolute } from "node:path";
import { Agent, type Level } from "../../bastion/agent.js";
import { stateDir } from "../../bastion/paths.js";
import { configPath, loadFleet } from "../../config/load.js";
import { resolveBastions } from "../../device/inputs.js";
import { UserError } from "../../util/errors.js";
import { isPostgresUrl } from "../../config/registry-location.js";
import { openRegistry } from "../../registry/open.js";
import type { FleetStatus } from "../../fleet/status.js";
import { parseAfter, parseWithin } from "../../fleet/status-options.js";
import { durationFlag } from "../../util/duration.js";
import { formatHostPort, parseHostPort } from "../../util/hostport.js";

/** uid of a local user, or undefined (getent: the user may come from any NSS source). */
export function userId(name: string): number | undefined {
  const r = spawnSync("getent", ["passwd", name], { encoding: "utf8" });
  if (r.status !== 0) return undefined;
  const uid = Number(r.stdout.split(":")[2]);
  return Number.isInteger(uid) ? uid : undefined;
}

/** `--resync`, `--interval`: whole seconds, at least 1, as a duration (a bare number is seconds). */
export function seconds(flag: string, value: string): number {
  const ms = durationFlag(flag, value, { bareSeconds: true, maxMs: 7 * 86400_000, examples: "15, 30s, 2min" });
  if (ms < 1000 || ms % 1000 !== 0) throw new UserError(`${flag} ${JSON.stringify(value)}: a whole number of seconds (at least 1)`, { hint: "e.g. 15, 30s or 2min" });
  return ms / 1000;
}

const PRIORITY: Record<Level, number> = { error: 3, warn: 4, info: 6 };

/** `--metrics-listen`: a loopback address and port (the endpoint is for a node on the bastion). */
export function loopbackEndpoint(v: string): { host: string; port: number } {
  const hp = parseHostPort(v);
  // An IPv6 address only in brackets (`::1:9273` is not read as one).
  const host = typeof hp === "string" || (isIP(hp.host) === 6 && !v.startsWith("[")) ? undefined : hp.host;
  const loopback = host === "localhost" || host === "::1" || (host !== undefined && isIP(host) === 4 && host.startsWith("127."));
  if (typeof hp === "string" || !loopback) {
    throw new UserError(`--metrics-listen ${JSON.stringify(v)}: a loopback address and port, e.g. 127.0.0.1:9273 or [::1]:9273`, { hint: "the metrics stay on the bastion; a Prometheus node there scrapes them" });
  }
  return { host, port: hp.port };
}

export async function bastionAgentCommand(opts: {
  bastion?: string;
  config?: string;
  stateDir?: string;
  authLog?: string;
  resync?: string;
  interval?: string;
  metricsListen?: string;
  neverSeenAfter?: string;
  expiringWithin?: string;
}): Promise<void> {
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
  const interval = seconds("--interval", opts.interval ?? "15");
  const metrics = opts.metricsListen === undefined ? undefined : loopbackEndpoint(opts.metricsListen);
  const neverSeenAfterMs = parseAfter(opts.neverSeenAfter ?? "24h");
  const expiringWithinMs = parseWithin(opts.expiringWithin ?? "30d");
  const uid = userId(bastion.user);
  if (uid === undefined) {
    throw new UserError(`bastion '${bastion.name}': its tunnel user '${bastion.user}' does not exist on this host`, { hint: `mkoverlay bastion install --bastion ${bastion.name} creates it` });
  }
  const journal = Boolean(process.env.JOURNAL_STREAM);
  const log = (level: Level, msg: string) => {
    process.stderr.write(journal ? `<${PRIORITY[level]}>${msg}\n` : `mkoverlay agent[${bastion.name}]: ${level === "info" ? "" : `${level}: `}${msg}\n`);
  };
  const agent = new Agent({ fleet, bastion, stateDir: dir, registry: fleet.registry, openRegistry, tunnelUid: uid, resyncMs: resync * 1000, authLog, log, observeMs: interval * 1000 });
  await agent.start();
  const server = metrics ? await serveMetrics(metrics, () => agent.status(neverSeenAfterMs, expiringWithinMs), log) : undefined;
  await new Promise<void>((resolve) => {
    const stop = (sig: string) => {
      log("info", `${sig}: stopping`);
      server?.close();
      void agent.stop().then(resolve);
    };
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
  });
}

/** GET /metrics: this bastion's view of the fleet in Prometheus's text format. */
async function serveMetrics(at: { host: string; port: number }, status: () => Promise<FleetStatus>, log: (level: Level, msg: string) => void): Promise<Server> {
  const { prometheusText } = await import("../../fleet/metrics.js");
  const server = createServer((req, res) => {
    if (req.method !== "GET" || (req.url ?? "").split("?")[0] !== "/metrics") {
      res.writeHead(404).end("not found: GET /metrics\n");
      return;
    }
    status()
      .then(prometheusText)
      .then(
        (text) => res.writeHead(200, { "content-type": "text/plain; version=0.0.4; charset=utf-8" }).end(text),
        (e: unknown) => res.writeHead(503).end(`registry unreachable: ${(e as Error).message}\n`),
      );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (e) => reject(new UserError(`--metrics-listen ${formatHostPort(at.host, at.port)}: ${(e as Error).message}`)));
    server.listen(at.port, at.host, resolve);
  });
  log("info", `metrics on http://${formatHostPort(at.host, at.port)}/metrics`);
  return server;
}
