/**
 * `mkoverlay init`: a commented fleet config from flags (or, on a terminal, answers). Every
 * value is checked where it is given (a flag, a file and its line), the text is then loaded by
 * the same validator as every command, and only then written — atomically, never over an
 * existing file without --force.
 *
 * init never fetches a bastion's host key: what the gateways will trust is the user's decision.
 * It reads keys the user got (ssh-keyscan output on stdin, a known_hosts or .pub file) and
 * prints their fingerprints to compare with the bastion's own.
 */
import { existsSync, linkSync, readFileSync, unlinkSync } from "node:fs";
import { homedir } from "node:os";
import { basename, dirname } from "node:path";
import { configPath, parseFleet } from "../config/load.js";
import { errnoCode, UserError, UserErrors } from "../errors.js";
import { pathError, tempNameFor, writeFileAtomic } from "../fsutil.js";
import { lineFingerprint } from "../keys/fingerprint.js";
import { parseHostKeyEntry, parsePublicKey } from "../keys/pubkey.js";
import { out, stderrLog, type Log } from "../output.js";
import { isRegistryUrl } from "../registry/location.js";
import { resourceDir } from "../resources.js";
import { knownHostsName, parseHostPort } from "../util/hostport.js";
import { hostProblem, nameProblem, userProblem } from "../validate.js";

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

/** A YAML scalar: plain when that is safe, else double-quoted (JSON strings are YAML). */
function scalar(v: string): string {
  return /^[A-Za-z0-9_./][A-Za-z0-9_./@+= -]*$/.test(v) && !/^(true|false|yes|no|on|off|null|~|-?\d[\d.]*)$/i.test(v) && !/\s$/.test(v) ? v : JSON.stringify(v);
}

/** The config text: every section commented, optional keys shown commented out. */
export function renderConfig(a: InitAnswers, now: Date): string {
  const L: string[] = [
    `# yaml-language-server: $schema=${resourceDir("schema", "mkoverlay.schema.json")}`,
    `# mkoverlay fleet config, written by 'mkoverlay init' on ${now.toISOString().slice(0, 10)}.`,
    "# Every key is checked when mkoverlay loads this file (unknown keys are errors); the schema",
    "# line above lets editors complete and check it too. 'mkoverlay --help' lists the commands.",
    "",
    "# The port registry: an embedded SQLite file (relative to this file), or",
    "# postgres://user@host:5432/db shared by several stations. $MKOVERLAY_REGISTRY overrides it.",
    `registry: ${scalar(a.registry)}`,
    "",
    "# Names of devices built without --hostname: {seq} or {seq:0N} is the next number.",
    `hostname: ${scalar(a.hostname)}`,
    "",
    "ports:",
    `  ssh: ${scalar(a.sshPorts)}        # one tunnel port per device, forwarded to its sshd (-R)`,
    `  services: ${scalar(a.servicePorts)}   # ports for service tunnels (forwards:)`,
    "",
    "# The bastions the gateways keep a reverse tunnel to; --bastion picks them.",
    "bastions:",
  ];
  for (const b of a.bastions) {
    L.push(
      `  ${b.name}:`,
      `    host: ${scalar(b.host)}`,
      `    port: ${b.port}`,
      `    user: ${scalar(a.tunnelUser)}             # the tunnel user on the bastion`,
      "    # The gateways trust only these keys (StrictHostKeyChecking=yes). Fingerprints, to",
      "    # compare with 'ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub' on the bastion:",
      ...b.hostKeys.map((k) => `    #   ${keyFingerprint(k)} (${k.split(/\s+/).slice(0, -1).join(" ")})`),
      "    hostKeys:",
      ...b.hostKeys.map((k) => `      - ${scalar(k)}`),
      "    # from: [198.51.100.0/24]       # optional: where gateways connect from (authorized_keys from=)",
      "    # expiry: 365d                  # optional: the device key stops working a year after the build",
      "    # jumpUser: alice               # optional: operators' own account here, for 'mkoverlay ssh-config'",
    );
  }
  L.push(
    "",
    "# Service tunnels besides sshd, e.g. the device's port 80 published on the bastion:",
    "#   - {name: http, local: 80}",
    "forwards: []",
    "",
    "# Who may log in to the gateways (through the tunnel): keys, and/or certificates from a CA.",
  );
  const o = a.operators;
  if (!o) L.push("# `none`: the OS image brings its own login access; mkoverlay adds none.", "operators: none");
  else {
    L.push("operators:", `  user: ${scalar(o.user)}`);
    if (o.authorizedKeys.length > 0) L.push("  authorizedKeys:", ...o.authorizedKeys.map((k) => `    - ${scalar(k)}`));
    else L.push("  # authorizedKeys: [ssh-ed25519 AAAA... alice]");
    if (o.userCA) L.push(`  userCA: ${scalar(o.userCA)}`, `  principals: [${o.principals.map(scalar).join(", ")}]`);
    else L.push("  # userCA: ssh-ed25519 AAAA... fleet-ca   # certificates it signs for `principals` get in", "  # principals: [fleet-ops]");
  }
  return L.join("\n") + "\n";
}

/** Where a config problem came from, as the flag the user gave. */
const FLAG_OF: [RegExp, string][] = [
  [/ ports\.ssh\b/, "--ssh-ports"],
  [/ ports\.services\b/, "--service-ports"],
  [/ hostname\b/, "--hostname"],
  [/ registry\b/, "--registry"],
];

/** Writes `text` to `file` unless something is there (no check-then-write race: a hard link fails on an existing name). */
function writeNew(file: string, text: string): void {
  const tmp = tempNameFor(file);
  try {
    writeFileAtomic(tmp, text, { mode: 0o644 });
    linkSync(tmp, file);
  } catch (e) {
    if (errnoCode(e) === "EEXIST" && existsSync(file)) throw new UserError(`${file}: already exists`, { hint: "use --force to replace it, or --config FILE to write another" });
    throw pathError(e, file);
  } finally {
    try {
      unlinkSync(tmp);
    } catch {
      // not created
    }
  }
}

export interface InitResult {
  file: string;
  bastions: { name: string; host: string; port: number; hostKeys: { key: string; fingerprint: string }[] }[];
  operators: { user: string; authorizedKeys: number; userCA: boolean } | null;
  registry: string;
  replaced: boolean;
}

/** Checks, renders, validates like every command would, writes. */
export async function writeInit(file: string, a: InitAnswers, force: boolean, now = new Date()): Promise<InitResult> {
  const text = renderConfig(a, now);
  let warnings: string[] = [];
  try {
    warnings = (await parseFleet(text, file, now)).warnings ?? [];
  } catch (e) {
    if (!(e instanceof UserError)) throw e;
    const lines = (e instanceof UserErrors ? e.problems : [e.message]).map((p) => {
      const flag = FLAG_OF.find(([re]) => re.test(p));
      return flag ? `${flag[1]}: ${p.replace(/^\S+:\d+:\d+ /, "")}` : p;
    });
    throw new UserErrors(lines, "nothing was written");
  }
  const replaced = existsSync(file);
  if (replaced && !force) throw new UserError(`${file}: already exists`, { hint: "use --force to replace it, or --config FILE to write another" });
  if (force) {
    try {
      writeFileAtomic(file, text, { mode: 0o644 });
    } catch (e) {
      throw pathError(e, file);
    }
  } else writeNew(file, text);
  // Allowed, but likely to hurt (a port range among the bastions' ephemeral ports): said once, here.
  for (const w of warnings) stderrLog(false).warn(w);
  return {
    file,
    bastions: a.bastions.map((b) => ({ name: b.name, host: b.host, port: b.port, hostKeys: b.hostKeys.map((k) => ({ key: k, fingerprint: keyFingerprint(k) })) })),
    operators: a.operators ? { user: a.operators.user, authorizedKeys: a.operators.authorizedKeys.length, userCA: a.operators.userCA !== undefined } : null,
    registry: a.registry,
    replaced,
  };
}

function readStdin(): string {
  try {
    return readFileSync(0, "utf8");
  } catch (e) {
    throw new UserError(`--host-keys -: cannot read stdin (${(e as Error).message})`);
  }
}

function report(r: InitResult, log: Log): void {
  log.info(`${r.replaced ? "replaced" : "wrote"} ${r.file}`);
  for (const b of r.bastions) {
    for (const k of b.hostKeys) log.info(`pinned for ${b.name} (${b.host}${b.port === 22 ? "" : `:${b.port}`}): ${k.fingerprint} ${k.key.split(/\s+/)[k.key.startsWith("@") ? 1 : 0]}`);
  }
  log.info("compare those fingerprints with the bastion's own (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on it)");
  const first = r.bastions[0]!.name;
  const cfg = basename(r.file) === "mkoverlay.yaml" && dirname(r.file) === process.cwd() ? "" : ` --config ${r.file}`;
  log.info(`next: mkoverlay${cfg} --board rpi4 --bastion ${first}   (boards: 'mkoverlay boards')`);
}

export async function initCommand(opts: InitOptions): Promise<void> {
  const log = stderrLog(Boolean(opts.json));
  const file = configPath(opts.config);
  // Refused before any question is asked.
  if (existsSync(file) && !opts.force) throw new UserError(`${file}: already exists`, { hint: "use --force to replace it, or --config FILE to write another" });
  let answers: InitAnswers;
  const interactive = (opts.bastion ?? []).length === 0 && process.stdin.isTTY === true && process.stderr.isTTY === true && opts.hostKeys === undefined;
  if (interactive) answers = await (await import("./init-ask.js")).askAnswers(opts);
  else answers = answersFromFlags(opts, readStdin);
  const r = await writeInit(file, answers, Boolean(opts.force));
  if (opts.json) out(JSON.stringify(r));
  report(r, log);
}
