/**
 * `mkoverlay init`'s answers from its flags: the bastions (`--bastion NAME=HOST[:PORT]`), their
 * host keys from the files and ssh-keyscan output the user gives (known_hosts parsing), the
 * operator keys, and the fleet's defaults. Every value is checked where it is given (a flag, a
 * file and its line). Shared by the flag path (init.ts) and the questions (init-ask.ts).
 */
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { errnoCode, UserError, UserErrors } from "../../util/errors.js";
import { lineFingerprint } from "../../keys/fingerprint.js";
import { parseHostKeyEntry, parsePublicKey } from "../../keys/pubkey.js";
import { isRegistryUrl } from "../../config/registry-location.js";
import { hostProblem, nameProblem, userProblem } from "../../util/validate.js";
import { knownHostsName, parseHostPort } from "../../util/hostport.js";

export interface InitOptions {
  bastion?: string[];
  hostKeyFile?: string[];
  hostKeys?: string;
  tunnelUser?: string;
  operatorKey?: string[];
  operatorCa?: string;
  principal?: string[];
  operatorUser?: string;
  /** false with --no-operators. */
  operators?: boolean;
  registry?: string;
  hostname?: string;
  sshPorts?: string;
  servicePorts?: string;
  force?: boolean;
  config?: string;
  json?: boolean;
}

export interface InitBastion {
  name: string;
  host: string;
  port: number;
  /** Pinned entries: `type base64` or `@cert-authority type base64`. */
  hostKeys: string[];
}

export interface InitAnswers {
  bastions: InitBastion[];
  tunnelUser: string;
  operators: { user: string; authorizedKeys: string[]; userCA: string | undefined; principals: string[] } | undefined;
  registry: string;
  hostname: string;
  sshPorts: string;
  servicePorts: string;
}

/** `eu=bastion.example.com`, `eu=host:2222`, `eu=[2001:db8::1]:2222`, `eu=2001:db8::1`. */
export function parseBastionFlag(v: string): Omit<InitBastion, "hostKeys"> {
  const flag = `--bastion ${JSON.stringify(v)}`;
  const eq = v.indexOf("=");
  if (eq < 0) throw new UserError(`${flag}: write NAME=HOST[:PORT], e.g. eu=bastion.example.com`);
  const name = v.slice(0, eq);
  const rest = v.slice(eq + 1);
  const np = nameProblem(name);
  if (np) throw new UserError(`${flag}: the name ${JSON.stringify(name)} ${np}`);
  const hostPort = parseHostPort(rest, { defaultPort: 22 });
  if (typeof hostPort === "string") throw new UserError(`${flag}: ${hostPort}`, { hint: "NAME=HOST[:PORT], IPv6 with a port as [2001:db8::1]:2222" });
  const { host, port } = hostPort;
  const hp = hostProblem(host);
  if (hp) throw new UserError(`${flag}: the host ${JSON.stringify(host)} ${hp}`, { hint: "a DNS name or an IP address (IPv6 with a port: [2001:db8::1]:2222)" });
  return { name, host: host.toLowerCase(), port };
}

/** How ssh-keyscan and known_hosts name a host: `host`, or `[host]:port` off port 22. */
const pattern = (b: { host: string; port: number }): string => knownHostsName(b.host, b.port);

/** SHA256 fingerprint of a key line, as `ssh-keygen -l` prints it. */
export function keyFingerprint(entry: string): string {
  return lineFingerprint(entry);
}

/**
 * Host key lines (ssh-keyscan output, known_hosts lines, or bare `.pub` lines) assigned to the
 * bastions: by `forBastion` when given, else by the host each line names; a bare key with no
 * host goes to the only bastion. Every problem is reported with its source and line.
 */
export function assignHostKeys(text: string, source: string, bastions: InitBastion[], forBastion: string | undefined, problems: string[]): void {
  const lines = text.split(/\r?\n/);
  lines.forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    const at = `${source}:${i + 1}`;
    const ca = line.startsWith("@cert-authority");
    const body = ca ? line.replace(/^@cert-authority\s+/, "") : line;
    let hosts: string[] | undefined;
    let keyText = body;
    if (typeof parsePublicKey(body) === "string") {
      // `host[,host…] TYPE BASE64 [comment]`, as ssh-keyscan and known_hosts write it.
      const sp = body.search(/\s/);
      hosts = sp < 0 ? [] : body.slice(0, sp).toLowerCase().split(",");
      keyText = sp < 0 ? body : body.slice(sp + 1).trim();
    }
    const entry = parseHostKeyEntry((ca ? "@cert-authority " : "") + keyText);
    if (typeof entry === "string") {
      problems.push(`${at}: not a host key line: it ${entry}`);
      return;
    }
    const pinned = `${ca ? "@cert-authority " : ""}${entry.key.text}`;
    let targets: InitBastion[];
    if (forBastion !== undefined) targets = bastions.filter((b) => b.name === forBastion);
    else if (hosts === undefined) {
      if (bastions.length !== 1) {
        problems.push(`${at}: a key with no host name, and ${bastions.length} bastions: which one is it for?`);
        return;
      }
      targets = bastions;
    } else if (hosts.some((h) => h.startsWith("|"))) {
      problems.push(`${at}: a hashed known_hosts entry names no host`);
      return;
    } else {
      targets = bastions.filter((b) => hosts!.includes(pattern(b)) || (ca && hosts!.some((h) => h.includes("*") && globMatch(h, b.host))));
      if (targets.length === 0) {
        problems.push(`${at}: a key for ${hosts.join(",")}, which is no bastion given (${bastions.map((b) => `${b.name}=${pattern(b)}`).join(", ") || "none"})`);
        return;
      }
    }
    for (const b of targets) if (!b.hostKeys.includes(pinned)) b.hostKeys.push(pinned);
  });
}

function globMatch(glob: string, host: string): boolean {
  return new RegExp("^" + glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$").test(host);
}

function readText(file: string, flag: string): string {
  try {
    return readFileSync(file.replace(/^~(?=\/)/, homedir()), "utf8");
  } catch (e) {
    const code = errnoCode(e);
    throw new UserError(`${flag} ${file}: ${code === "ENOENT" ? "no such file" : code === "EISDIR" ? "is a directory" : (e as Error).message}`);
  }
}

/** Operator public keys from files: every non-comment line must be a key. */
function operatorKeys(files: string[], problems: string[]): string[] {
  const keys: string[] = [];
  for (const f of files) {
    const lines = readText(f, "--operator-key").split(/\r?\n/);
    let n = 0;
    lines.forEach((raw, i) => {
      const line = raw.trim();
      if (line === "" || line.startsWith("#")) return;
      const k = parsePublicKey(line);
      if (typeof k === "string") {
        problems.push(`--operator-key ${f}:${i + 1}: not a public key: it ${k}${/PRIVATE KEY/.test(line) ? " (this is a private key: give the .pub file)" : ""}`);
        return;
      }
      n++;
      if (!keys.includes(k.canonical)) keys.push(k.canonical);
    });
    if (n === 0 && !problems.some((p) => p.startsWith(`--operator-key ${f}:`))) problems.push(`--operator-key ${f}: holds no public key`);
  }
  return keys;
}

/** The bastions of --bastion, with the keys of --host-keys / --host-key-file assigned. */
function bastionsFromFlags(o: InitOptions, stdin: () => string, problems: string[]): InitBastion[] {
  const bastions: InitBastion[] = (o.bastion ?? []).map((v) => ({ ...parseBastionFlag(v), hostKeys: [] }));
  const seen = new Set<string>();
  for (const b of bastions) {
    if (seen.has(b.name)) throw new UserError(`--bastion ${b.name}: given twice`);
    seen.add(b.name);
  }
  if (bastions.length === 0) throw new UserError("init: name at least one bastion: --bastion NAME=HOST[:PORT]", { hint: "e.g. --bastion eu=bastion.example.com (run on a terminal without flags to be asked)" });
  if (o.hostKeys !== undefined) {
    if (o.hostKeys !== "-") throw new UserError(`--host-keys ${JSON.stringify(o.hostKeys)}: only '-' (stdin) is read; give a file with --host-key-file`);
    assignHostKeys(stdin(), "--host-keys (stdin)", bastions, undefined, problems);
  }
  for (const v of o.hostKeyFile ?? []) {
    const m = /^([a-z0-9][a-z0-9_-]{0,31})=(.+)$/.exec(v);
    const forBastion = m && seen.has(m[1]!) ? m[1]! : undefined;
    const file = forBastion !== undefined ? m![2]! : v;
    assignHostKeys(readText(file, "--host-key-file"), `--host-key-file ${file}`, bastions, forBastion, problems);
  }
  for (const b of bastions) if (b.hostKeys.length === 0) problems.push(`bastion ${b.name} (${pattern(b)}) has no pinned host key`);
  return bastions;
}

/**
 * Everything the flags say, checked, all problems at once; stdin is read for `--host-keys -`.
 * `given`: bastions already asked for (init on a terminal).
 */
export function answersFromFlags(o: InitOptions, stdin: () => string, given?: InitBastion[]): InitAnswers {
  const problems: string[] = [];
  const bastions = given ?? bastionsFromFlags(o, stdin, problems);
  const tunnelUser = o.tunnelUser ?? "reverse-ssh";
  const up = userProblem(tunnelUser);
  if (up) problems.push(`--tunnel-user ${JSON.stringify(tunnelUser)} ${up}`);
  let operators: InitAnswers["operators"];
  if (o.operators !== false) {
    const user = o.operatorUser ?? "root";
    const op = userProblem(user);
    if (op) problems.push(`--operator-user ${JSON.stringify(user)} ${op}`);
    const authorizedKeys = operatorKeys(o.operatorKey ?? [], problems);
    let userCA: string | undefined;
    if (o.operatorCa !== undefined) {
      const text = readText(o.operatorCa, "--operator-ca").split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
      const k = text.length === 1 ? parsePublicKey(text[0]!) : `holds ${text.length} lines (one CA public key expected)`;
      if (typeof k === "string") problems.push(`--operator-ca ${o.operatorCa}: not a public key: it ${k}`);
      else userCA = k.canonical;
    }
    const principals = o.principal ?? [];
    if (o.operatorCa !== undefined && principals.length === 0) problems.push("--operator-ca needs --principal NAME (which certificate principals may log in)");
    if (principals.length > 0 && o.operatorCa === undefined) problems.push("--principal needs --operator-ca FILE");
    if (authorizedKeys.length === 0 && o.operatorCa === undefined && !problems.some((p) => p.startsWith("--operator-key"))) {
      problems.push("who may log in to the gateways? give --operator-key FILE (e.g. ~/.ssh/id_ed25519.pub), --operator-ca FILE --principal NAME, or --no-operators");
    }
    operators = { user, authorizedKeys, userCA, principals };
  }
  const registry = o.registry ?? "./mkoverlay.db";
  if (isRegistryUrl(registry)) {
    try {
      if (new URL(registry).password) problems.push("--registry: no password in the URL (the config is shared and printed); use ~/.pgpass or PGPASSWORD");
    } catch {
      problems.push(`--registry ${JSON.stringify(registry)}: not a valid URL`);
    }
  }
  if (problems.length > 0) {
    const keyHint = bastions.some((b) => b.hostKeys.length === 0)
      ? `pin each bastion's key: ssh-keyscan -t ed25519 ${bastions.map((b) => (b.port === 22 ? b.host : `-p ${b.port} ${b.host}`))[0]} | mkoverlay init … --host-keys -, or --host-key-file NAME=FILE with the bastion's /etc/ssh/ssh_host_ed25519_key.pub; mkoverlay never fetches a key by itself`
      : "fix these and run again; nothing was written";
    throw new UserErrors(problems, keyHint);
  }
  return {
    bastions,
    tunnelUser,
    operators,
    registry,
    hostname: o.hostname ?? "gw-{seq:04}",
    sshPorts: o.sshPorts ?? "21000-21999",
    servicePorts: o.servicePorts ?? "22000-22999",
  };
}
