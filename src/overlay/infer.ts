/**
 * `verify --offline` (or no fleet config): what an overlay says about the device it was built
 * for, read from the overlay alone — the hostname from /etc/hostname, the key from the private
 * key, the tunnels from /etc/mkoverlay/tunnels/*.env and the pinned known_hosts, the operators
 * from their files, and the OS as the profile whose ssh enablement, masks and layers the
 * overlay holds. The spec inferred is then built and compared entry by entry (verify.ts), so
 * an overlay passes only if it is exactly what this mkoverlay builds for that spec: internally
 * consistent and complete. What needs the registry (is the key registered, are these the
 * device's reserved ports and bastions, are the pins the fleet's current keys) is not checked.
 */
import type { Bastion, Operators } from "../config/fleet.js";
import { UserError } from "../util/errors.js";
import type { TunnelPlan } from "../config/forwards.js";
import { fingerprint, type Ed25519Key } from "../keys/ed25519.js";
import type { Profiles } from "../config/profiles.js";
import { hostnameProblem, hostProblem, nameProblem, userProblem } from "../util/validate.js";
import { knownHostsName } from "../util/hostport.js";
import { loadLayers } from "./layers.js";
import * as P from "./paths.js";
import type { DeviceSpec } from "./steps.js";
import { checkAgainstBuild, overlayKey, type Check } from "./verify.js";
import { getMany, type TreeView, type ViewEntry } from "./view.js";

/** What only the fleet config and the registry can tell; printed so nobody mistakes offline for complete. */
export const NEEDS_REGISTRY = [
  "the key is registered to this hostname and the device is active",
  "the tunnel port and bastions are the ones reserved for the device",
  "the bastion addresses, tunnel user and pinned host keys are the fleet's current ones",
  "the operators' keys are the fleet's current ones",
];

const rel = (abs: string): string => abs.replace(/^\//, "");
const text = (e: ViewEntry | undefined): string | undefined => (e?.type === "file" && e.content ? e.content.toString("utf8") : undefined);
const failed = (what: string, detail?: string): Check => (detail === undefined ? { ok: false, what } : { ok: false, what, detail });

function envFile(t: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of t.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const i = line.indexOf("=");
    if (i > 0) m.set(line.slice(0, i), line.slice(i + 1));
  }
  return m;
}

const FORWARD = /^(-R localhost:\d{1,5}:localhost:\d{1,5}|-L localhost:\d{1,5}:[A-Za-z0-9.:[\]-]+:\d{1,5}|-D localhost:\d{1,5})$/;

/** The known_hosts lines the tunnels pin, by `host` / `[host]:port`, in file order. */
function pinnedKeys(t: string): Map<string, string[]> {
  const by = new Map<string, string[]>();
  for (const line of t.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const ca = line.startsWith("@cert-authority ");
    const [pattern = "", type = "", b64 = ""] = (ca ? line.slice("@cert-authority ".length) : line).split(/\s+/);
    const list = by.get(pattern) ?? [];
    list.push(`${ca ? "@cert-authority " : ""}${type} ${b64}`);
    by.set(pattern, list);
  }
  return by;
}

interface Inferred {
  hostname: string;
  key: Ed25519Key;
  tunnels: TunnelPlan[];
  operators: Operators | undefined;
  checks: Check[];
}

async function infer(view: TreeView, entries: ViewEntry[]): Promise<Inferred | Check[]> {
  const k = await overlayKey(view);
  if ("problem" in k) {
    if (k.missing) throw new UserError(`${view.where}: not an mkoverlay overlay (${P.HOST_KEY} is missing)`, { hint: "give the .overlay.tar.gz or .overlay folder that mkoverlay wrote" });
    return [failed(`${P.HOST_KEY} is an ed25519 OpenSSH key`, k.problem)];
  }
  const checks: Check[] = [];
  const got = await getMany(view, ["etc/hostname", rel(P.KNOWN_HOSTS)]);
  const hostname = (text(got.get("etc/hostname")) ?? "").trim();
  const hp = hostname === "" ? "is missing or empty" : hostnameProblem(hostname);
  if (hp) return [failed("/etc/hostname names the device", hp)];

  const envs = entries.filter((e) => e.type === "file" && e.path.startsWith(`${rel(P.TUNNEL_ENV_DIR)}/`) && e.path.endsWith(".env")).map((e) => e.path);
  const envText = await getMany(view, envs);
  const pins = pinnedKeys(text(got.get(rel(P.KNOWN_HOSTS))) ?? "");
  const order = [...pins.keys()];
  const tunnels: TunnelPlan[] = [];
  for (const path of envs) {
    const name = path.slice(rel(P.TUNNEL_ENV_DIR).length + 1, -".env".length);
    const env = envFile(text(envText.get(path)) ?? "");
    const at = `/${path}`;
    const host = env.get("BASTION_HOST") ?? "";
    const port = Number(env.get("BASTION_PORT"));
    const user = env.get("BASTION_USER") ?? "";
    const tport = Number(env.get("TUNNEL_PORT"));
    const extra = (env.get("EXTRA_FORWARDS") ?? "").trim();
    const bad = [
      nameProblem(name) && `the bastion name '${name}' ${nameProblem(name)}`,
      hostProblem(host) && `BASTION_HOST ${JSON.stringify(host)} ${hostProblem(host)}`,
      !(Number.isInteger(port) && port >= 1 && port <= 65535) && `BASTION_PORT ${JSON.stringify(env.get("BASTION_PORT") ?? "")} is not a port`,
      userProblem(user) && `BASTION_USER ${JSON.stringify(user)} ${userProblem(user)}`,
      !(Number.isInteger(tport) && tport >= 1 && tport <= 65535) && `TUNNEL_PORT ${JSON.stringify(env.get("TUNNEL_PORT") ?? "")} is not a port`,
    ].filter((x): x is string => typeof x === "string");
    const args = extra === "" ? [] : extra.split(/\s+/);
    const pairs = args.flatMap((a, i) => (i % 2 === 0 ? [`${a} ${args[i + 1] ?? ""}`] : []));
    for (const f of pairs) if (!FORWARD.test(f)) bad.push(`EXTRA_FORWARDS has ${JSON.stringify(f)}, which mkoverlay does not write`);
    if (bad.length > 0) {
      checks.push(...bad.map((b) => failed(`${at}: ${b}`)));
      continue;
    }
    const pattern = knownHostsName(host, port);
    const hostKeys = pins.get(pattern) ?? [];
    if (hostKeys.length === 0) checks.push(failed(`bastion '${name}' (${pattern}) has a pinned host key in ${P.KNOWN_HOSTS}`, "none: the tunnel would refuse to connect"));
    const bastion: Bastion = { name, host, port, user, hostKeys, from: undefined, expiry: undefined, jumpUser: undefined };
    tunnels.push({ bastion, port: tport, extraArgs: args, extraListen: [], permitOpen: [] });
  }
  if (envs.length === 0) checks.push(failed(`a tunnel in ${P.TUNNEL_ENV_DIR}/`, "none: the device would keep no tunnel"));
  // The known_hosts lines follow the order the bastions were given in; so do the tunnels here.
  const rank = (t: TunnelPlan): number => {
    const i = order.indexOf(knownHostsName(t.bastion.host, t.bastion.port));
    return i < 0 ? order.length : i;
  };
  tunnels.sort((a, b) => rank(a) - rank(b) || a.bastion.name.localeCompare(b.bastion.name));
  const ports = [...new Set(tunnels.map((t) => t.port))];
  if (ports.length > 1) checks.push(failed("one tunnel port for every bastion", `the env files say ${ports.join(", ")}`));

  let operators: Operators | undefined;
  if (entries.some((e) => e.path === rel(P.OPERATORS_DROPIN))) {
    const users = entries.filter((e) => e.type === "file" && e.path.startsWith(`${rel(P.OPERATOR_KEYS_DIR)}/`)).map((e) => e.path.slice(rel(P.OPERATOR_KEYS_DIR).length + 1));
    if (users.length !== 1) checks.push(failed(`one operator key file in ${P.OPERATOR_KEYS_DIR}/`, `found ${users.length}`));
    const user = users[0] ?? "root";
    const files = await getMany(view, [`${rel(P.OPERATOR_KEYS_DIR)}/${user}`, rel(P.USER_CA), `${rel(P.PRINCIPALS_DIR)}/${user}`]);
    const lines = (p: string): string[] => (text(files.get(p)) ?? "").split("\n").filter((l) => l && !l.startsWith("#"));
    const ca = text(files.get(rel(P.USER_CA)))?.trim();
    operators = { user, authorizedKeys: lines(`${rel(P.OPERATOR_KEYS_DIR)}/${user}`), userCA: ca || undefined, principals: lines(`${rel(P.PRINCIPALS_DIR)}/${user}`) };
    if (operators.authorizedKeys.length === 0 && !operators.userCA) checks.push(failed("operators: somebody may log in", "the drop-in is there, but no key and no CA"));
  }
  return { hostname, key: k.key, tunnels, operators, checks };
}

function describe(i: Inferred, os: string): string {
  const tunnels = i.tunnels.map((t) => `${t.bastion.name} ${t.bastion.user}@${t.bastion.host}${t.bastion.port === 22 ? "" : `:${t.bastion.port}`}`).join(", ");
  const ops = i.operators ? `operators ${i.operators.user} (${i.operators.authorizedKeys.length} key(s)${i.operators.userCA ? ", a CA" : ""})` : "no operator access";
  return `read from the overlay: ${i.hostname} (key ${fingerprint(i.key.pub)}), OS ${os}, port ${i.tunnels[0]?.port ?? "?"}, tunnel(s) to ${tunnels || "none"}, ${ops}`;
}

/** The offline verdict: inferred facts, then every build step compared with the overlay. */
export async function inspectOffline(view: TreeView, profiles: Profiles): Promise<{ hostname: string | undefined; checks: Check[] }> {
  if (!view.list) {
    throw new UserError(`${view.where}: offline checks need an overlay archive or folder (a root file system cannot say which files are the overlay's)`, {
      hint: "give the fleet config (--config FILE) for the registry checks",
    });
  }
  const entries = await view.list();
  const r = await infer(view, entries);
  if (Array.isArray(r)) return { hostname: undefined, checks: r };
  // The OS is the profile whose build matches best: fewest problems, then the most entries
  // its own steps account for (Debian's set is a subset of Raspberry Pi OS's).
  let best: { os: string; checks: Check[]; score: [number, number] } | undefined;
  for (const os of profiles.oses.values()) {
    const board = [...profiles.boards.values()].find((b) => b.defaultOs === os.id) ?? [...profiles.boards.values()][0]!;
    const spec: DeviceSpec = { hostname: r.hostname, board, os, tunnels: r.tunnels, key: r.key, operators: r.operators, layers: loadLayers(os.firstBoot.layers) };
    const checks = await checkAgainstBuild(view, spec);
    const specific = os.firstBoot.mask.length + os.firstBoot.layers.length + os.ssh.aliases.length;
    const score: [number, number] = [checks.filter((c) => !c.ok).length, -specific];
    if (!best || score[0] < best.score[0] || (score[0] === best.score[0] && score[1] < best.score[1])) best = { os: os.id, checks, score };
  }
  const head: Check = { ok: true, what: describe(r, best!.os) };
  return { hostname: r.hostname, checks: [head, ...r.checks, ...best!.checks] };
}
