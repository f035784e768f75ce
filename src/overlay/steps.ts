/**
 * The build as a list of named steps. Each adds entries to the tree from its inputs alone (no
 * disk, no clock), so each can be tested alone; `buildOverlay` runs them in order, and `verify`
 * walks the same list (overlay/verify.ts): a step cannot be forgotten by one and not the other.
 * A step may add a `check` for what "the entries are as built" does not say.
 */
import type { Bastion, Operators } from "../config/fleet.js";
import type { TunnelPlan } from "../config/forwards.js";
import { deterministicCheckInt, encodePrivateKey, publicKeyLine, type Ed25519Key } from "../keys/ed25519.js";
import type { Board, OsProfile } from "../config/profiles.js";
import { COMMON, layerText, type Layers } from "./layers.js";
import * as P from "./paths.js";
import { enableUnit, installSection, maskUnit } from "./systemd.js";
import { Tree } from "./tree.js";
import { knownHostsName } from "../util/hostport.js";

export interface DeviceSpec {
  hostname: string;
  board: Board;
  os: OsProfile;
  /** One tunnel per chosen bastion, in the order given, with its reserved ports. */
  tunnels: TunnelPlan[];
  key: Ed25519Key;
  /** Who may log in; undefined when the image brings its own access (`operators: none`). */
  operators: Operators | undefined;
  /** The static layers (overlays/…): `common` and the OS's own, loaded at the edge. */
  layers: Layers;
}

export interface Step {
  name: string;
  build(tree: Tree, d: DeviceSpec): void;
  /** Problems of the whole built overlay beyond its entries (e.g. a path this OS deletes on first boot). */
  check?(built: Tree, d: DeviceSpec): string[];
}

function layLayer(tree: Tree, d: DeviceSpec, name: string): void {
  const files = d.layers.get(name);
  if (!files) throw new Error(`overlay layer '${name}' was not loaded`);
  for (const f of files) tree.file(f.path, f.content, f.mode);
}

/** The device's ed25519 key: sshd's host key and the tunnel's identity. */
function hostKeyStep(tree: Tree, d: DeviceSpec): void {
  // 0755 like /etc/ssh: sshd reads the operator files in here as the login user; the private
  // key itself is 0600.
  tree.dir(P.KEY_DIR, 0o755);
  // A check integer derived from the key keeps the file byte-identical across rebuilds.
  tree.file(P.HOST_KEY, encodePrivateKey(d.key, `root@${d.hostname}`, deterministicCheckInt(d.key)), 0o600);
  tree.file(P.HOST_KEY_PUB, publicKeyLine(d.key.pub, `root@${d.hostname}`) + "\n", 0o644);
}

/** overlays/common, wholesale: the HostKey drop-in, the tunnel template, the monitor. */
function commonFilesStep(tree: Tree, d: DeviceSpec): void {
  layLayer(tree, d, COMMON);
}

/** sshd starts at boot (the HostKey drop-in came with the common files). */
function sshServerStep(tree: Tree, d: DeviceSpec): void {
  const target = `${d.os.unitDir}/${d.os.ssh.unit}`;
  enableUnit(tree, d.os.ssh.unit, target, { wantedBy: d.os.ssh.wantedBy, alias: d.os.ssh.aliases });
}

/** What keeps this OS's first boot from replacing the identity (docs/facts.md, first boot). */
function firstBootGuardsStep(tree: Tree, d: DeviceSpec): void {
  for (const unit of d.os.firstBoot.mask) maskUnit(tree, unit);
  for (const layer of d.os.firstBoot.layers) layLayer(tree, d, layer);
}

function globToRegExp(glob: string): RegExp {
  return new RegExp("^" + glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, "[^/]*").replace(/\?/g, "[^/]") + "$");
}

/** Nothing the overlay ships may match a pattern this OS deletes on first boot. */
function firstBootCheck(built: Tree, d: DeviceSpec): string[] {
  const globs = d.os.firstBoot.deletes.map(globToRegExp);
  return built
    .list()
    .filter((e) => globs.some((g) => g.test(`/${e.path}`)))
    .map((e) => `/${e.path} is deleted by ${d.os.id}'s first boot`);
}

/** Values in the env file were validated (host, user, ports are plain tokens), never escaped. */
function tunnelEnvFile(t: TunnelPlan): string {
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
function tunnelStep(tree: Tree, d: DeviceSpec): void {
  const install = installSection(layerText(d.layers, COMMON, P.TUNNEL_TEMPLATE));
  tree.dir(P.TUNNEL_ENV_DIR, 0o755);
  for (const t of d.tunnels) {
    tree.file(P.tunnelEnv(t.bastion.name), tunnelEnvFile(t), 0o644);
    enableUnit(tree, P.tunnelUnit(t.bastion.name), P.TUNNEL_TEMPLATE, install);
  }
}

/** The monitor (from the common files) restarts instances that gave up; its timer is enabled. */
function monitorStep(tree: Tree, d: DeviceSpec): void {
  enableUnit(tree, "reverse-ssh-monitor.timer", P.MONITOR_TIMER, installSection(layerText(d.layers, COMMON, P.MONITOR_TIMER)));
}

/** `host` or `[host]:port`, as ssh looks a bastion up in known_hosts. */
export function knownHostsPattern(b: Bastion): string {
  return knownHostsName(b.host, b.port);
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
function knownHostsStep(tree: Tree, d: DeviceSpec): void {
  const lines = ["# Pinned bastion host keys (written by mkoverlay)"];
  for (const { bastion: b } of d.tunnels) lines.push(...bastionKnownHosts(b));
  tree.file(P.KNOWN_HOSTS, lines.join("\n") + "\n", 0o644);
}

/**
 * Operator access, without touching /root or /home: a drop-in adds mkoverlay's own
 * authorized_keys file to the default list and, with a CA, trusts certificates for the listed
 * principals. Password logins are off; root may log in with keys only.
 */
function operatorsStep(tree: Tree, d: DeviceSpec): void {
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

function hostnameStep(tree: Tree, d: DeviceSpec): void {
  tree.file("/etc/hostname", `${d.hostname}\n`, 0o644);
  // Debian's stock /etc/hosts with the new name, so sudo and friends resolve it.
  tree.file(
    "/etc/hosts",
    `127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n\n127.0.1.1\t${d.hostname}\n`,
    0o644,
  );
}

export const STEPS: readonly Step[] = [
  { name: "host key", build: hostKeyStep },
  { name: "common files", build: commonFilesStep },
  { name: "ssh server", build: sshServerStep },
  { name: "first-boot guards", build: firstBootGuardsStep, check: firstBootCheck },
  { name: "tunnel units", build: tunnelStep },
  { name: "monitor", build: monitorStep },
  { name: "bastion known_hosts", build: knownHostsStep },
  { name: "operator access", build: operatorsStep },
  { name: "hostname", build: hostnameStep },
];

export function buildOverlay(d: DeviceSpec): Tree {
  const tree = new Tree();
  for (const step of STEPS) step.build(tree, d);
  return tree;
}
