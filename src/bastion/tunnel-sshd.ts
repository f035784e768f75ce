/**
 * The bastion's dedicated sshd for tunnels (issue 20): its own port, config, pid file and unit,
 * so fleet traffic never touches the administrators' sshd, and global settings sized for a
 * fleet behind shared NAT addresses. Pure: text in, text out; `bastion install` writes it.
 *
 *   renderTunnelSshdConfig({ fleet, bastion, version })   → the sshd_config text
 *   renderTunnelSshdUnit({ sshd })                         → the systemd template unit text
 *   parseSshdVersion(`sshd -V` output)                     → { major, minor }
 *   tunnelSshdConfigPath / tunnelSshdPidFile / tunnelSshdUnit / TUNNEL_SSHD_TEMPLATE: where
 *
 * Why each global setting (measured: bench/bastion-results.md, "tunnel sshd"; docs/bastion.md,
 * "NATs and OpenSSH 10"):
 *
 * - `PerSourcePenalties` (OpenSSH ≥ 9.8; global only, rejected inside Match): a revoked or
 *   expired device behind a NAT fails authentication every few seconds, forever; with the
 *   defaults (authfail:5s, min 15s) three of them lock the whole NAT address out, healthy
 *   devices included. Any non-zero authfail/noauth/grace-exceeded penalty scales with the number
 *   of failing devices behind one address, so they are 0 here; `crash` (an exploit attempt)
 *   keeps its default. Keys only, one user, nothing to brute-force. Not written for sshd < 9.8,
 *   which does not know the keyword (sshd -t fails on unknown keywords).
 * - `PerSourceMaxStartups none`: a NAT address is thousands of devices.
 * - `MaxStartups`: a reconnect storm (bastion restart) is every device at once; the default
 *   10:30:100 drops most of it and prolongs it.
 * - `LoginGraceTime`: a connection that has not authenticated by then is a dead one; freeing its
 *   slot sooner helps a storm.
 * - `AllowUsers` the tunnel user only: this sshd is for devices, never for a login.
 */
import type { Bastion, Fleet } from "../config/fleet.js";
import { type DropinPaths, defaultDropinPaths, renderDropin } from "./dropin.js";
import { configDir, keysDir } from "./paths.js";

export interface SshdVersion {
  major: number;
  minor: number;
}

/** The version `sshd -V` (stderr) prints: "OpenSSH_10.0p2 Debian-7~bpo12+1, OpenSSL …" → 10.0. */
export function parseSshdVersion(text: string): SshdVersion {
  const m = /OpenSSH_(\d+)\.(\d+)/.exec(text);
  if (!m) throw new Error(`not an OpenSSH version string: ${JSON.stringify(text.split("\n")[0] ?? "")}`);
  return { major: Number(m[1]), minor: Number(m[2]) };
}

const atLeast = (v: SshdVersion, major: number, minor: number): boolean => v.major > major || (v.major === major && v.minor >= minor);

/** Fleet-sized global limits. Defaults: the measured choice (bench/bastion-results.md). */
export interface TunnelSshdSizing {
  /** MaxStartups start:rate:full. */
  maxStartups: string;
  /** Seconds an unauthenticated connection may take. */
  loginGraceTime: number;
  /** PerSourcePenalties for sshd ≥ 9.8 (ignored below). */
  perSourcePenalties: string;
  /** PerSourcePenaltyExemptList (sshd ≥ 9.8): addresses/CIDRs never penalised, e.g. the fleet's NATs. */
  penaltyExempt: string[];
}

export const DEFAULT_TUNNEL_SIZING: TunnelSshdSizing = {
  maxStartups: "100:30:1000",
  loginGraceTime: 30,
  perSourcePenalties: "authfail:0s noauth:0s grace-exceeded:0s",
  penaltyExempt: [],
};

/** Where the tunnel sshd's own files live on the bastion (one set per bastion name). */
export const tunnelSshdConfigPath = (bastion: string): string => `${configDir(bastion)}/sshd_config`;
const tunnelSshdPidFile = (bastion: string): string => `/run/mkoverlay-tunnel-sshd-${bastion}.pid`;
export const TUNNEL_SSHD_TEMPLATE = "/etc/systemd/system/mkoverlay-tunnel-sshd@.service";
export const tunnelSshdUnit = (bastion: string): string => `mkoverlay-tunnel-sshd@${bastion}.service`;
/** The administrators' sshd port, which the tunnel sshd must never take. */
export const ADMIN_PORT = 22;

export interface TunnelSshdInput {
  fleet: Fleet;
  bastion: Bastion;
  /** The sshd that will run this config (`parseSshdVersion` of its `sshd -V`). */
  version: SshdVersion;
  /** Port to listen on; default the bastion's `port` from the config (what devices dial). */
  port?: number;
  /** ListenAddress lines; default none (every address, like sshd's own default). */
  listen?: string[];
  /** The bastion's host keys (private key files): the ones devices pin, shared with the admin sshd. */
  hostKeys?: string[];
  /** Keys command, key directory, keys user (default: what `bastion install` installs). */
  paths?: DropinPaths;
  pidFile?: string;
  sizing?: Partial<TunnelSshdSizing>;
}

const DEFAULT_HOST_KEYS = ["/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ecdsa_key", "/etc/ssh/ssh_host_rsa_key"];

const TOKEN = /^[A-Za-z0-9._/:+@*,-]+$/;

function checkToken(what: string, v: string): string {
  if (!TOKEN.test(v)) throw new Error(`tunnel sshd ${what} ${JSON.stringify(v)} may only contain letters, digits and . _ / : + @ * , -`);
  return v;
}

/** The tunnel sshd's whole sshd_config (not a drop-in: it includes nothing of the admin's). */
export function renderTunnelSshdConfig(i: TunnelSshdInput): string {
  const b = i.bastion;
  const port = i.port ?? b.port;
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`tunnel sshd port ${port} is not a TCP port (1-65535)`);
  if (port === ADMIN_PORT)
    throw new Error(`bastion '${b.name}': the tunnel sshd cannot listen on port ${ADMIN_PORT}, the administrators' sshd's; set bastions.${b.name}.port in the fleet config to a port of its own (e.g. 2222)`);
  const s = { ...DEFAULT_TUNNEL_SIZING, ...i.sizing };
  if (!/^\d+(:\d+:\d+)?$/.test(s.maxStartups)) throw new Error(`tunnel sshd MaxStartups ${JSON.stringify(s.maxStartups)} is not N or start:rate:full`);
  if (!Number.isInteger(s.loginGraceTime) || s.loginGraceTime < 1) throw new Error(`tunnel sshd LoginGraceTime ${s.loginGraceTime} must be a whole number of seconds ≥ 1`);
  const penalties = atLeast(i.version, 9, 8);
  const lines = [
    `# Installed by mkoverlay (bastion install --bastion ${b.name}). Do not edit: re-run the install.`,
    `# The dedicated sshd for the tunnels of bastion '${b.name}' (unit ${tunnelSshdUnit(b.name)}), written for`,
    `# OpenSSH ${i.version.major}.${i.version.minor}. The administrators' sshd (port ${ADMIN_PORT}, /etc/ssh/sshd_config) is not`,
    "# touched: fleet traffic never counts against it. Why each setting: docs/bastion.md, \"NATs and OpenSSH 10\".",
    `Port ${port}`,
    ...(i.listen ?? []).map((a) => `ListenAddress ${checkToken("ListenAddress", a)}`),
    "# The bastion's own host keys: the ones the devices pin.",
    ...(i.hostKeys ?? DEFAULT_HOST_KEYS).map((k) => `HostKey ${checkToken("HostKey", k)}`),
    `PidFile ${checkToken("PidFile", i.pidFile ?? tunnelSshdPidFile(b.name))}`,
    "# Devices only: the tunnel user with a key, nobody else, no other way in.",
    `AllowUsers ${b.user}`,
    "PermitRootLogin no",
    "PubkeyAuthentication yes",
    "PasswordAuthentication no",
    "KbdInteractiveAuthentication no",
    "HostbasedAuthentication no",
    "GSSAPIAuthentication no",
    "UsePAM no",
    "PrintMotd no",
    "PrintLastLog no",
    "# No file is read for anyone but the tunnel user (whose Match block below names the agent's keys).",
    "AuthorizedKeysFile none",
    "# Fleet sizing: a reconnect storm is every device at once (the default 10:30:100 drops most of it).",
    `MaxStartups ${s.maxStartups}`,
    "# A NAT address is thousands of devices: no per-address cap.",
    "PerSourceMaxStartups none",
    `LoginGraceTime ${s.loginGraceTime}`,
  ];
  if (penalties) {
    lines.push(
      "# OpenSSH >= 9.8 penalises a source ADDRESS for each failed login: a few revoked or expired devices",
      "# behind a NAT would lock out every device and admin behind it. Keys only, one user: no authentication",
      "# penalties; a crash (an exploit attempt) keeps its default penalty.",
      `PerSourcePenalties ${s.perSourcePenalties.split(/\s+/).map((w) => checkToken("PerSourcePenalties", w)).join(" ")}`,
    );
    if (s.penaltyExempt.length > 0) lines.push(`PerSourcePenaltyExemptList ${s.penaltyExempt.map((a) => checkToken("PerSourcePenaltyExemptList", a)).join(",")}`);
  } else {
    lines.push(`# (OpenSSH ${i.version.major}.${i.version.minor} has no PerSourcePenalties: nothing to switch off; re-run the install after upgrading sshd.)`);
  }
  lines.push("LogLevel INFO", "SyslogFacility AUTH", "");
  // The tunnel user's block, exactly as the admin sshd's drop-in would have it (dropin.ts).
  return lines.join("\n") + renderDropin(i.fleet, b, i.paths ?? defaultDropinPaths(b.name));
}

export interface TunnelUnitInput {
  /** The sshd binary (default /usr/sbin/sshd). */
  sshd?: string;
}

/** The systemd template: mkoverlay-tunnel-sshd@NAME.service runs the tunnel sshd of bastion NAME. */
export function renderTunnelSshdUnit(u: TunnelUnitInput = {}): string {
  const sshd = u.sshd ?? "/usr/sbin/sshd";
  if (!/^\/[A-Za-z0-9._/+-]+$/.test(sshd)) throw new Error(`tunnel sshd binary ${JSON.stringify(sshd)} must be an absolute path of letters, digits and . _ / + -`);
  const cfg = tunnelSshdConfigPath("%i");
  return `# Installed by mkoverlay (bastion install). One template for every bastion this host serves:
# mkoverlay-tunnel-sshd@eu.service is the tunnels' sshd of bastion 'eu'. Do not edit: re-run
# 'mkoverlay bastion install'. The administrators' ssh.service is a different unit, unchanged.

[Unit]
# Shows whose tunnels this sshd carries in \`systemctl status\`.
Description=mkoverlay tunnel sshd for bastion %i (devices only; admins use ssh.service)
Documentation=man:sshd(8) man:sshd_config(5)
# Listening needs the network up; auditd (if any) before logins, like ssh.service.
After=network.target auditd.service
# The agent keeps the key directory this sshd's keys command reads: start it too, and start
# after it. Wants=, not Requires=: restarting the agent must not restart the tunnels' sshd.
Wants=${"mkoverlay-bastion@%i.service"}
After=${"mkoverlay-bastion@%i.service"}
# Never give up restarting: a bastion without it carries no tunnels.
StartLimitIntervalSec=0

[Service]
# sshd in the foreground; "exec" reports a missing binary as a failure.
Type=exec
# The key directory must exist (bastion install fills it; the agent keeps it): without it every
# device would be refused. Then the configuration must pass sshd's own check.
ExecStartPre=/usr/bin/test -d ${keysDir("%i")}
ExecStartPre=${sshd} -t -f ${cfg}
ExecStart=${sshd} -D -f ${cfg}
ExecReload=${sshd} -t -f ${cfg}
ExecReload=/bin/kill -HUP $MAINPID
# Stopping or restarting the listener leaves the tunnels' sessions running (like ssh.service).
KillMode=process
# Every tunnel is two processes in this unit's cgroup (UsePAM no: no logind session takes them),
# and systemd's DefaultTasksMax (15 % of the smaller of pid_max and threads-max) would cap the
# bastion at a few thousand tunnels without a word. The kernel's limits are the real ones:
# bastion install warns when they are too small for the bastion's share (docs/bastion.md, sizing).
TasksMax=infinity
Restart=always
RestartSec=2
# sshd's privilege-separation directory. Shared with ssh.service: never removed when this unit stops.
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes

[Install]
WantedBy=multi-user.target
`;
}
