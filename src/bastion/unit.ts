/**
 * The agent's systemd unit: one template for every bastion this host serves
 * (mkoverlay-bastion@NAME.service), hardened like the device's tunnel unit. What the agent
 * needs and nothing more:
 *
 * - it runs as root only to own the key directory; of root's capabilities it keeps CAP_KILL
 *   (end the tunnel user's sessions) and CAP_SYS_PTRACE (read their /proc/PID/fd links: sshd
 *   makes session processes non-dumpable, so nothing less can) — checked with setpriv on
 *   OpenSSH 9.2: without CAP_SYS_PTRACE readlink fails, without CAP_KILL kill fails;
 * - it writes only its state directory (and, for a registry file on this host, that file's
 *   directory, in a per-instance drop-in);
 * - it needs the network (the registry) and /proc of other users (ProtectProc stays default).
 *
 * The template is the same for every bastion and every install: what differs per bastion (its
 * ExecStart, ProtectHome when mkoverlay lives below /home) is in the instance's own drop-in
 * (`renderExecDropin`), so installing bastion B never changes what A runs. An instance without
 * its drop-in has no ExecStart, and systemd refuses to start it.
 *
 * Every directive carries a comment saying why (as the device units do).
 */
import { agentEnv, fleetCopy, localEnv, stateDir } from "./paths.js";

export interface UnitInput {
  /** ExecStart's command before the arguments: `/usr/bin/node /opt/mkoverlay/bin/mkoverlay`. */
  exec: string[];
  /** ProtectHome=yes hides /home and /root: read-only when mkoverlay itself lives there. */
  homeReadOnly: boolean;
}

/** Absolute paths only, nothing systemd or a shell would interpret. */
export function unitPathProblem(p: string): string | undefined {
  if (!p.startsWith("/")) return "is not an absolute path";
  if (!/^[A-Za-z0-9._/+@-]+$/.test(p)) return "may only contain letters, digits and . _ / + @ - (no spaces, quotes, % or $)";
  return undefined;
}

function checkExec(exec: string[]): void {
  for (const p of exec) {
    const problem = unitPathProblem(p);
    if (problem) throw new Error(`unit ExecStart path ${JSON.stringify(p)} ${problem}`);
  }
}

/** The agent's arguments after mkoverlay's executable (`name`: the bastion, or %i in a unit). */
const agentArgs = (name: string): string[] => ["bastion", "agent", "--bastion", name, "--config", fleetCopy(name)];

/** The instance's own settings: what it runs. */
export function renderExecDropin(u: UnitInput): string {
  checkExec(u.exec);
  return `# Installed by mkoverlay (bastion install) for this bastion only; the template is shared.
[Service]
# The config is mkoverlay's own copy (re-run the install after changing the fleet config).
ExecStart=${u.exec.join(" ")} ${agentArgs("%i").join(" ")} $MKOVERLAY_AGENT_ARGS
${u.homeReadOnly ? "# mkoverlay is installed below /home, /root or /run/user: readable, not writable.\nProtectHome=read-only\n" : ""}`;
}

/**
 * Without systemd: the agent as the unit runs it, one sh command line. agent.env's values are
 * single-quoted, which systemd's EnvironmentFile= and sh read alike; nothing secret is printed.
 */
export function agentCommand(exec: string[], name: string, authLog: string): string {
  checkExec([...exec, ...(authLog === "none" ? [] : [authLog])]);
  return `sh -c 'set -a; . ${agentEnv(name)}; if [ -f ${localEnv(name)} ]; then . ${localEnv(name)}; fi; set +a; exec ${exec.join(" ")} ${agentArgs(name).join(" ")} --auth-log ${authLog}'`;
}

// One template literal, the unit file as it lands, commented line by line: it is long because the
// unit is, and splitting it would only scatter one file's text over functions.
export function renderAgentUnit(): string {
  // %i is the bastion's name (a-z, 0-9, '-', '_': nothing to escape).
  const i = "%i";
  return `# Installed by mkoverlay (bastion install). One template for every bastion this host serves:
# the instance name (%i) is the bastion's name, e.g. mkoverlay-bastion@eu.service; what an
# instance runs is in its own drop-in, mkoverlay-bastion@%i.service.d/40-exec.conf.
# Do not edit: re-run 'mkoverlay bastion install'. Hardening: docs/bastion.md.

[Unit]
# Shows which bastion an instance keeps in sync in \`systemctl status\`.
Description=mkoverlay bastion agent for %i: sshd's tunnel keys follow the registry
# How the key lookup works.
Documentation=man:sshd_config(5)
# The registry is usually on another host.
After=network-online.target
# Pull network-online.target in, otherwise After= alone waits for nothing.
Wants=network-online.target
# Never stop restarting: a bastion without its agent stops following revocations.
StartLimitIntervalSec=0

[Service]
# The agent runs in the foreground until stopped; "exec" reports a missing binary as a failure.
Type=exec
# MKOVERLAY_REGISTRY (the registry it reads) and MKOVERLAY_CACHE.
EnvironmentFile=${agentEnv(i)}
# Optional, the administrator's own (never written by mkoverlay): PGPASSWORD, PGSSLMODE, and
# MKOVERLAY_AGENT_ARGS for more agent options (e.g. --metrics-listen 127.0.0.1:9273 --interval 30).
EnvironmentFile=-${localEnv(i)}
# ExecStart= is per bastion (40-exec.conf in the instance's drop-in directory).
# Whatever stopped it (a crash, the registry's client library), start again.
Restart=always
# Soon, but not in a tight loop.
RestartSec=5

# --- Sandboxing. Root only to own the key directory; two capabilities, one writable directory.
# Ending the tunnel user's sessions (kill) and reading their /proc/PID/fd links (ptrace access).
CapabilityBoundingSet=CAP_KILL CAP_SYS_PTRACE
# Nothing is handed to child processes (journalctl) beyond that.
AmbientCapabilities=
# setuid/setgid binaries and file capabilities give nothing.
NoNewPrivileges=yes
# The whole file system is read-only ...
ProtectSystem=strict
# ... except the key directory and the agent's state.
ReadWritePaths=${stateDir(i)}
# /home, /root and /run/user: invisible (an instance whose mkoverlay lives there reads them).
ProtectHome=yes
# A private /tmp and /var/tmp.
PrivateTmp=yes
# Only pseudo devices.
PrivateDevices=yes
# /proc/sys, /sys and friends are read-only.
ProtectKernelTunables=yes
# No kernel module loading.
ProtectKernelModules=yes
# No access to the kernel log buffer.
ProtectKernelLogs=yes
# The cgroup tree is read-only.
ProtectControlGroups=yes
# The clock cannot be changed.
ProtectClock=yes
# The host name cannot be changed.
ProtectHostname=yes
# Unix sockets (journal, NSS), IPv4 and IPv6 for the registry; nothing else.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# No new namespaces.
RestrictNamespaces=yes
# No realtime scheduling.
RestrictRealtime=yes
# Cannot create setuid/setgid files.
RestrictSUIDSGID=yes
# The execution domain is fixed.
LockPersonality=yes
# Only the native system call ABI.
SystemCallArchitectures=native
# The usual system calls of a service ...
SystemCallFilter=@system-service
# ... minus privileged and resource-changing ones.
SystemCallFilter=~@privileged @resources
# A blocked system call fails with EPERM instead of killing the agent.
SystemCallErrorNumber=EPERM
# Key files must be readable by sshd's command user: 0644 files, 0711 directories.
UMask=0022
# No access to other units' kernel keyrings.
KeyringMode=private
# Mounts stay private.
PrivateMounts=yes

[Install]
# Started at every boot with the rest of the multi-user system.
WantedBy=multi-user.target
`;
}

/** For a registry file on this host: the agent also writes its directory (SQLite's -wal/-shm). */
export function renderRegistryDropin(registryDir: string): string {
  const problem = unitPathProblem(registryDir);
  if (problem) throw new Error(`registry directory ${JSON.stringify(registryDir)} ${problem}`);
  return `# Installed by mkoverlay (bastion install): the registry is a SQLite file on this host.
[Service]
# SQLite writes its -wal and -shm files beside the database, even to read it.
ReadWritePaths=${registryDir}
`;
}
