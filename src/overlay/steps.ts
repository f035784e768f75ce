/**
 * The build as a list of named steps. Each adds entries to the tree and reads only its
 * inputs, so each can be tested alone; `buildOverlay` runs them in order.
 */
import type { Bastion, Operators } from "../config/fleet.js";
import type { TunnelPlan } from "../forwards.js";
import { deterministicCheckInt, encodePrivateKey, publicKeyLine, type Ed25519Key } from "../keys/ed25519.js";
import type { Board, OsProfile } from "../profiles.js";
import { layerFile, layerFiles } from "./layers.js";
import * as P from "./paths.js";
import { enableUnit, installSection, maskUnit } from "./systemd.js";
import { Tree } from "./tree.js";

export interface DeviceSpec {
  hostname: string;
  board: Board;
  os: OsProfile;
  /** One tunnel per chosen bastion, in the order given, with its reserved ports. */
  tunnels: TunnelPlan[];
  key: Ed25519Key;
  /** Who may log in; undefined when the image brings its own access (`operators: none`). */
  operators: Operators | undefined;
}

const COMMON = "common";

function fromLayer(tree: Tree, layer: string, absPath: string): string {
  const f = layerFile(layer, absPath.replace(/^\//, ""));
  tree.file(absPath, f.content, f.mode);
  return f.content.toString("utf8");
}

/** The device's ed25519 key: sshd's host key and the tunnel's identity. */
export function hostKeyStep(tree: Tree, d: DeviceSpec): void {
  // 0755 like /etc/ssh: sshd reads the operator files in here as the login user; the private
  // key itself is 0600.
  tree.dir(P.KEY_DIR, 0o755);
  // A check integer derived from the key keeps the file byte-identical across rebuilds.
  tree.file(P.HOST_KEY, encodePrivateKey(d.key, `root@${d.hostname}`, deterministicCheckInt(d.key)), 0o600);
  tree.file(P.HOST_KEY_PUB, publicKeyLine(d.key.pub, `root@${d.hostname}`) + "\n", 0o644);
}

/** sshd uses the key above (a HostKey line replaces sshd's default list) and starts at boot. */
export function sshServerStep(tree: Tree, d: DeviceSpec): void {
  fromLayer(tree, COMMON, P.SSHD_DROPIN);
  const target = `${d.os.unitDir}/${d.os.ssh.unit}`;
  enableUnit(tree, d.os.ssh.unit, target, { wantedBy: d.os.ssh.wantedBy, alias: d.os.ssh.aliases });
}

/** What keeps this OS's first boot from replacing the identity (FACTS.md table). */
export function firstBootGuardsStep(tree: Tree, d: DeviceSpec): void {
  for (const unit of d.os.firstBoot.mask) maskUnit(tree, unit);
  for (const layer of d.os.firstBoot.layers) {
    for (const f of layerFiles(layer)) tree.file(f.path, f.content, f.mode);
  }
}

/** Values in the env file were validated (host, user, ports are plain tokens), never escaped. */
export function tunnelEnvFile(t: TunnelPlan): string {
  const b = t.bastion;
  return [
    `# Reverse tunnel to bastion '${b.name}' (written by mkoverlay; read by reverse-ssh@${b.name}.service)`,
    `BASTION_HOST=${b.host}`,
    `BASTION_PORT=${b.port}`,
    `BASTION_USER=${b.user}`,
    `TUNNEL_PORT=${t.port}`,
    `EXTRA_FORWARDS=${t.extraArgs.join(" ")}`,
    "",
  ].join("\n");
}

/** One template unit; one enabled instance and env file per bastion. */
export function tunnelStep(tree: Tree, d: DeviceSpec): void {
  const unit = fromLayer(tree, COMMON, P.TUNNEL_TEMPLATE);
  const install = installSection(unit);
  tree.dir(P.TUNNEL_ENV_DIR, 0o755);
  for (const t of d.tunnels) {
    tree.file(P.tunnelEnv(t.bastion.name), tunnelEnvFile(t), 0o644);
    enableUnit(tree, P.tunnelUnit(t.bastion.name), P.TUNNEL_TEMPLATE, install);
  }
}

/** The monitor restarts instances that gave up; its timer is enabled. */
export function monitorStep(tree: Tree): void {
  fromLayer(tree, COMMON, P.MONITOR_SCRIPT);
  fromLayer(tree, COMMON, P.MONITOR_SERVICE);
  const timer = fromLayer(tree, COMMON, P.MONITOR_TIMER);
  enableUnit(tree, "reverse-ssh-monitor.timer", P.MONITOR_TIMER, installSection(timer));
}

/** `host` or `[host]:port`, as ssh looks a bastion up in known_hosts. */
export function knownHostsPattern(b: Bastion): string {
  return b.port === 22 ? b.host : `[${b.host}]:${b.port}`;
}

/** A bastion's pinned keys as known_hosts lines (`@cert-authority` kept); the operators' file has the same. */
export function bastionKnownHosts(b: Bastion): string[] {
  return b.hostKeys.map((k) => {
    const ca = k.startsWith("@cert-authority ");
    const key = (ca ? k.slice("@cert-authority ".length) : k).trim().split(/\s+/).slice(0, 2).join(" ");
    return `${ca ? "@cert-authority " : ""}${knownHostsPattern(b)} ${key}`;
  });
}

/** Pins every bastion's host key: the tunnel runs with StrictHostKeyChecking=yes against this. */
export function knownHostsStep(tree: Tree, d: DeviceSpec): void {
  const lines = ["# Pinned bastion host keys (written by mkoverlay)"];
  for (const { bastion: b } of d.tunnels) lines.push(...bastionKnownHosts(b));
  tree.file(P.KNOWN_HOSTS, lines.join("\n") + "\n", 0o644);
}

/**
 * Operator access, without touching /root or /home: a drop-in adds mkoverlay's own
 * authorized_keys file to the default list and, with a CA, trusts certificates for the listed
 * principals. Password logins are off; root may log in with keys only.
 */
export function operatorsStep(tree: Tree, d: DeviceSpec): void {
  const o = d.operators;
  if (!o) return;
  const lines = [
    "# Installed by mkoverlay: who may log in to this gateway (fleet config `operators:`).",
    "# Included before the rest of sshd_config, so these values win.",
    `AuthorizedKeysFile .ssh/authorized_keys .ssh/authorized_keys2 ${P.OPERATOR_KEYS_DIR}/%u`,
  ];
  if (o.userCA) lines.push(`TrustedUserCAKeys ${P.USER_CA}`, `AuthorizedPrincipalsFile ${P.PRINCIPALS_DIR}/%u`);
  lines.push("PasswordAuthentication no", "KbdInteractiveAuthentication no");
  if (o.user === "root") lines.push("PermitRootLogin prohibit-password");
  tree.file(P.OPERATORS_DROPIN, lines.join("\n") + "\n", 0o644);
  tree.dir(P.OPERATOR_KEYS_DIR, 0o755);
  const keys = ["# Operator keys for this gateway (written by mkoverlay)", ...o.authorizedKeys];
  tree.file(`${P.OPERATOR_KEYS_DIR}/${o.user}`, keys.join("\n") + "\n", 0o644);
  if (o.userCA) {
    tree.file(P.USER_CA, o.userCA + "\n", 0o644);
    tree.dir(P.PRINCIPALS_DIR, 0o755);
    tree.file(`${P.PRINCIPALS_DIR}/${o.user}`, o.principals.join("\n") + "\n", 0o644);
  }
}

export function hostnameStep(tree: Tree, d: DeviceSpec): void {
  tree.file("/etc/hostname", `${d.hostname}\n`, 0o644);
  // Debian's stock /etc/hosts with the new name, so sudo and friends resolve it.
  tree.file(
    "/etc/hosts",
    `127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n\n127.0.1.1\t${d.hostname}\n`,
    0o644,
  );
}

export const STEPS: readonly [string, (tree: Tree, d: DeviceSpec) => void][] = [
  ["host key", hostKeyStep],
  ["ssh server", sshServerStep],
  ["first-boot guards", firstBootGuardsStep],
  ["tunnel units", tunnelStep],
  ["monitor", (t) => monitorStep(t)],
  ["bastion known_hosts", knownHostsStep],
  ["operator access", operatorsStep],
  ["hostname", hostnameStep],
];

export function buildOverlay(d: DeviceSpec): Tree {
  const tree = new Tree();
  for (const [, step] of STEPS) step(tree, d);
  return tree;
}
