/**
 * Cross-field rules the schema cannot express. Each rule returns problems with the path they
 * belong to; all are collected so the user fixes everything in one pass.
 */
import { UserError } from "../util/errors.js";
import { hostnameProblem, hostProblem, parseExpiry, quotedValueProblem } from "../util/validate.js";
import { isDurationExpiry, parseSpread } from "./expiry.js";
import { parseRange } from "./fleet.js";
import type { Path } from "./positions.js";
import type { FleetRaw } from "./schema.js";

export interface Problem {
  path: Path;
  message: string;
}

const TEMPLATE_FIELD = /\{([^}]*)\}/g;

/**
 * The highest device number a template must render a valid name for: the registry's counter
 * grows with every reservation (abandoned and revoked devices included), so a fleet of a few
 * thousand gateways can pass 100,000 over the years; ten million (7 digits) leaves room.
 */
export const MAX_SEQ = 9_999_999;

/** `gw-{seq:04}` filled in, unchecked; throws on an unknown placeholder (the rule checks first). */
function fillTemplate(template: string, seq: number): string {
  return template.replace(TEMPLATE_FIELD, (_, field: string) => {
    const m = /^seq(?::(0?)(\d+))?$/.exec(field);
    if (!m) throw new Error(`unknown placeholder {${field}}`);
    const width = m[2] ? Number(m[2]) : 0;
    return String(seq).padStart(width, m[1] === "0" ? "0" : " ");
  });
}

/**
 * The name of device number `seq`. The registries call this while reserving: a name that is
 * not a valid host name (a counter past MAX_SEQ on a long template) is a user error there,
 * before anything is written, never a device with a bad name.
 */
export function renderHostname(template: string, seq: number): string {
  const name = fillTemplate(template, seq);
  const p = hostnameProblem(name);
  if (p) {
    throw new UserError(`hostname template ${JSON.stringify(template)} gives device number ${seq} the name ${JSON.stringify(name)}, which ${p}`, {
      hint: "shorten the template (hostname: in the fleet config), or name this device with --hostname",
    });
  }
  return name;
}

function hostnameTemplateRule(raw: FleetRaw): Problem[] {
  const t = raw.hostname;
  const fields = [...t.matchAll(TEMPLATE_FIELD)].map((m) => m[1] ?? "");
  const bad = fields.find((f) => !/^seq(?::0\d+)?$/.test(f));
  if (bad !== undefined) return [{ path: ["hostname"], message: `unknown placeholder {${bad}} (use {seq} or {seq:04})` }];
  if (fields.length === 0) return [{ path: ["hostname"], message: `${JSON.stringify(t)} has no {seq} placeholder, so every device would get the same name` }];
  // A name's validity depends only on how many digits the number has: try the first number of
  // each length up to MAX_SEQ and report the first that fails.
  for (let seq = 1; seq <= MAX_SEQ; seq *= 10) {
    const sample = fillTemplate(t, seq);
    const p = hostnameProblem(sample);
    if (!p) continue;
    return [
      {
        path: ["hostname"],
        message:
          seq === 1
            ? `renders names like ${JSON.stringify(sample)} that ${p}`
            : `renders ${JSON.stringify(sample)} for device number ${seq}, which ${p} (a template must give valid names up to ${MAX_SEQ.toLocaleString("en")})`,
      },
    ];
  }
  return [];
}

/** The first port an unprivileged user may bind (Linux's net.ipv4.ip_unprivileged_port_start default). */
const FIRST_UNPRIVILEGED_PORT = 1024;
/** Linux's default ephemeral port range (net.ipv4.ip_local_port_range). */
const EPHEMERAL = { lo: 32768, hi: 60999 };

function portRangesRule(raw: FleetRaw): Problem[] {
  const out: Problem[] = [];
  const ssh = parseRange(raw.ports.ssh);
  const svc = parseRange(raw.ports.services);
  if (ssh.lo <= svc.hi && svc.lo <= ssh.hi) {
    out.push({ path: ["ports", "services"], message: `${raw.ports.services} overlaps ports.ssh ${raw.ports.ssh}` });
  }
  // The bastion's sshd binds a device's -R port as the tunnel user, who is not root: below 1024
  // sshd logs "remote port forwarding failed for listen port 500" and the device never connects.
  for (const key of ["ssh", "services"] as const) {
    if (parseRange(raw.ports[key]).lo >= FIRST_UNPRIVILEGED_PORT || raw.ports.allowPrivileged !== undefined) continue;
    out.push({
      path: ["ports", key],
      message:
        `${raw.ports[key]} reaches below ${FIRST_UNPRIVILEGED_PORT}: the tunnel user is not root and cannot bind those ports on the bastion ` +
        `(its sshd says "remote port forwarding failed for listen port …"); use ports from ${FIRST_UNPRIVILEGED_PORT} up (e.g. 21000-21999), ` +
        `or, if your bastions let unprivileged users bind them, say why in ports.allowPrivileged: "…"`,
    });
  }
  return out;
}

/**
 * What is allowed but likely to hurt, with the path it belongs to: printed as warnings by the
 * commands that hand out ports (build, batch, image, rotate) and by init, never refused.
 */
export function configWarnings(raw: FleetRaw): Problem[] {
  const out: Problem[] = [];
  for (const key of ["ssh", "services"] as const) {
    const r = parseRange(raw.ports[key]);
    if (r.lo > EPHEMERAL.hi || r.hi < EPHEMERAL.lo) continue;
    out.push({
      path: ["ports", key],
      message:
        `${raw.ports[key]} overlaps Linux's default ephemeral ports ${EPHEMERAL.lo}-${EPHEMERAL.hi} (net.ipv4.ip_local_port_range): ` +
        `an outgoing connection of the bastion can hold a device's port, and that device's tunnel then fails to bind it; ` +
        `move the range below ${EPHEMERAL.lo} (e.g. 21000-21999), or narrow the bastions' ip_local_port_range`,
    });
  }
  return out;
}

function bastionsRule(raw: FleetRaw, now: Date): Problem[] {
  const out: Problem[] = [];
  const names = Object.keys(raw.bastions);
  if (names.length === 0) out.push({ path: ["bastions"], message: "no bastion defined" });
  // Only the form is checked here. A date that has passed must not stop the commands that
  // read existing devices (list, revoke, exports): it is refused where a new line is made.
  for (const [name, b] of Object.entries(raw.bastions)) {
    if (b.expiry !== undefined) {
      const t = parseExpiry(b.expiry, now);
      if (typeof t === "string") out.push({ path: ["bastions", name, "expiry"], message: `${JSON.stringify(b.expiry)} ${t}` });
    }
    // The same key twice in a known_hosts list is harmless to ssh but a sign of a rollover that
    // was not thought through (a "next" key that is already the current one).
    const seen = new Map<string, string>();
    const pinned: { entry: string; path: Path; label: string }[] = [
      ...b.hostKeys.map((entry, i) => ({ entry, path: ["bastions", name, "hostKeys", i] as Path, label: `hostKeys[${i}]` })),
      ...(b.nextHostKeys ?? []).map((entry, i) => ({ entry, path: ["bastions", name, "nextHostKeys", i] as Path, label: `nextHostKeys[${i}]` })),
      ...(b.hostCA ? [{ entry: `@cert-authority ${b.hostCA}`, path: ["bastions", name, "hostCA"] as Path, label: "hostCA" }] : []),
    ];
    for (const { entry, path, label } of pinned) {
      // `[@cert-authority] type base64`: the comment does not make another key.
      const id = entry.split(/\s+/).slice(0, entry.startsWith("@") ? 3 : 2).join(" ");
      const first = seen.get(id);
      if (first !== undefined) out.push({ path, message: `is the same key as ${first}: pin each key once` });
      else seen.set(id, label);
    }
    if (b.expirySpread !== undefined) {
      const s = parseSpread(b.expirySpread);
      const at: Path = ["bastions", name, "expirySpread"];
      if (typeof s === "string") out.push({ path: at, message: `${JSON.stringify(b.expirySpread)} ${s}` });
      else if (b.expiry === undefined) out.push({ path: at, message: "needs a duration `expiry` (e.g. 365d) to spread" });
      else if (!isDurationExpiry(b.expiry)) out.push({ path: at, message: `only spreads a duration expiry; ${JSON.stringify(b.expiry)} is a date, the same instant for every device (remove expirySpread, or use a duration)` });
    }
    if (b.expiryRenewal !== undefined) {
      const at: Path = ["bastions", name, "expiryRenewal"];
      const r = isDurationExpiry(b.expiryRenewal) ? parseExpiry(b.expiryRenewal, now) : "is not a duration (e.g. 90d, 12w, 3months, 1y; README.md, Durations)";
      if (typeof r === "string") out.push({ path: at, message: `${JSON.stringify(b.expiryRenewal)} ${r}` });
      else if (b.expiry === undefined) out.push({ path: at, message: "needs a duration `expiry` (e.g. 365d) to renew" });
      else if (!isDurationExpiry(b.expiry)) out.push({ path: at, message: `only renews a duration expiry; ${JSON.stringify(b.expiry)} is a date, the same instant for every device (remove expiryRenewal, or use a duration)` });
    }
  }
  return out;
}

/** `host:port` as permitopen takes it: a literal host (no lookup happens) and a port or `*`. */
function destinationProblem(v: string): string | undefined {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d{1,5}|\*)$/.exec(v);
  if (!m) return "is not host:port (e.g. localhost:4505)";
  const host = m[1]!.replace(/^\[|\]$/g, "");
  if (host === "*" || host.toLowerCase() === "any") return "opens every destination; name the hosts";
  const hp = hostProblem(host);
  if (hp) return `host ${hp}`;
  if (m[2] !== "*" && (Number(m[2]) < 1 || Number(m[2]) > 65535)) return "port must be 1-65535";
  return quotedValueProblem(v);
}

function forwardsRule(raw: FleetRaw): Problem[] {
  const out: Problem[] = [];
  const names = new Map<string, number>();
  const listens = new Map<number, number>();
  let deviceSide: { i: number; bastion: string } | undefined;
  raw.forwards.forEach((f, i) => {
    const at = (k?: string): Path => (k ? ["forwards", i, k] : ["forwards", i]);
    if (names.has(f.name)) out.push({ path: at("name"), message: `'${f.name}' is already the name of forwards[${names.get(f.name)}]` });
    names.set(f.name, i);
    const allowed: Record<string, string[]> = { remote: ["local"], local: ["bastion", "listen", "to"], socks: ["bastion", "listen", "allow"] };
    for (const k of ["local", "bastion", "listen", "to", "allow"] as const) {
      const has = f[k] !== undefined;
      const want = allowed[f.type]!.includes(k);
      if (want && !has) out.push({ path: at(), message: `a ${f.type} forward needs '${k}'` });
      if (!want && has) out.push({ path: at(k), message: `'${k}' does not apply to a ${f.type} forward` });
    }
    if (f.type === "remote") return;
    if (f.bastion !== undefined && !(f.bastion in raw.bastions)) out.push({ path: at("bastion"), message: `no bastion '${f.bastion}' in bastions` });
    if (f.listen !== undefined) {
      if (listens.has(f.listen)) out.push({ path: at("listen"), message: `port ${f.listen} is already used by forwards[${listens.get(f.listen)}]` });
      listens.set(f.listen, i);
    }
    if (f.to !== undefined) {
      const p = destinationProblem(f.to);
      if (p) out.push({ path: at("to"), message: `${JSON.stringify(f.to)} ${p}` });
    }
    (f.allow ?? []).forEach((a, j) => {
      const p = destinationProblem(a);
      if (p) out.push({ path: ["forwards", i, "allow", j], message: `${JSON.stringify(a)} ${p}` });
    });
    if (f.allow !== undefined && f.allow.length === 0) out.push({ path: at("allow"), message: "needs at least one destination" });
    // -L and -D bind ports on the device: two tunnels carrying them would fight over the same
    // port ("bind: Address already in use"), so only one bastion's tunnel may carry them.
    if (f.bastion !== undefined) {
      if (deviceSide && deviceSide.bastion !== f.bastion) {
        out.push({
          path: at("bastion"),
          message: `local (-L) and SOCKS (-D) forwards bind ports on the device, so only one tunnel may carry them: forwards[${deviceSide.i}] is on '${deviceSide.bastion}', this one on '${f.bastion}'`,
        });
      }
      deviceSide ??= { i, bastion: f.bastion };
    }
  });
  return out;
}

function operatorsRule(raw: FleetRaw): Problem[] {
  const o = raw.operators;
  if (o === "none") return [];
  if (!o.authorizedKeys?.length && !o.userCA) {
    return [{ path: ["operators"], message: "lists nobody: add authorizedKeys or a userCA (or write `operators: none` if the image brings its own access)" }];
  }
  if (o.userCA && !o.principals) return [{ path: ["operators"], message: "a userCA needs `principals` (the certificate principals that may log in)" }];
  if (o.principals && !o.userCA) return [{ path: ["operators", "principals"], message: "only applies with a userCA" }];
  return [];
}

export function crossCheck(raw: FleetRaw, now: Date): Problem[] {
  return [...hostnameTemplateRule(raw), ...portRangesRule(raw), ...bastionsRule(raw, now), ...forwardsRule(raw), ...operatorsRule(raw)];
}
