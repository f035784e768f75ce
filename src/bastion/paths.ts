/**
 * Where mkoverlay's own files land on a bastion (`bastion install`), one set per bastion name
 * so one host can serve several. Everything else on the bastion is the administrator's:
 * mkoverlay never edits sshd_config, only adds its drop-in.
 */
import { KEYS_COMMAND_PATH } from "./keys-command.js";

export { KEYS_COMMAND_PATH };

/** The fleet config copy and the agent's environment (registry location). */
export const configDir = (bastion: string): string => `/etc/mkoverlay/bastion/${bastion}`;
export const fleetCopy = (bastion: string): string => `${configDir(bastion)}/fleet.yaml`;
export const agentEnv = (bastion: string): string => `${configDir(bastion)}/agent.env`;
/** The administrator's additions to the agent's environment (a password, TLS settings); never written. */
export const localEnv = (bastion: string): string => `${configDir(bastion)}/local.env`;
/** The agent's state: keys/ (what sshd's command reads) and retired.json. */
export const STATE_ROOT = "/var/lib/mkoverlay/bastion";
export const stateDir = (bastion: string): string => `${STATE_ROOT}/${bastion}`;
export const keysDir = (bastion: string): string => `${stateDir(bastion)}/keys`;
/**
 * The sshd drop-in. Debian's sshd_config includes sshd_config.d/*.conf at its top; a Match
 * block in an included file ends with that file (OpenSSH ≥ 8.2 restores the Match state after
 * each Include), so it never swallows what follows.
 */
const SSHD_DROPIN_DIR = "/etc/ssh/sshd_config.d";
export const sshdDropin = (bastion: string): string => `${SSHD_DROPIN_DIR}/60-mkoverlay-bastion-${bastion}.conf`;
export const AGENT_TEMPLATE = "/etc/systemd/system/mkoverlay-bastion@.service";
export const agentUnit = (bastion: string): string => `mkoverlay-bastion@${bastion}.service`;
/**
 * Per bastion, never in the shared template: its ExecStart (mkoverlay's executable as this
 * bastion's install named it), and for a SQLite registry on the host its directory.
 */
export const agentExecDropin = (bastion: string): string => `/etc/systemd/system/${agentUnit(bastion)}.d/40-exec.conf`;
export const registryDropin = (bastion: string): string => `/etc/systemd/system/${agentUnit(bastion)}.d/50-registry.conf`;
/** sshd runs the keys command as this user: it can read the key files, nothing else. */
export const KEYS_USER = "mkoverlay-keys";
