/**
 * Where things land on the device. The key lives in /etc/ssh/mkoverlay/, outside every
 * first-boot deletion pattern (Raspberry Pi OS: /etc/ssh/ssh_host_*_key*, cloud-init:
 * /etc/ssh/ssh_host_*key*, Armbian: /etc/ssh/ssh_host*), and sshd is pointed at it by a
 * HostKey line in sshd_config.d.
 */
export const KEY_DIR = "/etc/ssh/mkoverlay";
export const HOST_KEY = `${KEY_DIR}/ssh_host_ed25519_key`;
export const HOST_KEY_PUB = `${HOST_KEY}.pub`;
export const KNOWN_HOSTS = `${KEY_DIR}/known_hosts`;
/** Operator access, next to the HostKey drop-in. sshd reads the files below as the target user. */
export const OPERATORS_DROPIN = "/etc/ssh/sshd_config.d/51-mkoverlay-operators.conf";
export const OPERATOR_KEYS_DIR = `${KEY_DIR}/authorized_keys`;
export const USER_CA = `${KEY_DIR}/user_ca.pub`;
export const PRINCIPALS_DIR = `${KEY_DIR}/principals`;
export const TUNNEL_ENV_DIR = "/etc/mkoverlay/tunnels";
export const TUNNEL_TEMPLATE = "/etc/systemd/system/reverse-ssh@.service";
export const MONITOR_TIMER = "/etc/systemd/system/reverse-ssh-monitor.timer";

export const tunnelUnit = (bastion: string): string => `reverse-ssh@${bastion}.service`;
export const tunnelEnv = (bastion: string): string => `${TUNNEL_ENV_DIR}/${bastion}.env`;
