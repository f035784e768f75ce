/** The validated fleet config as the rest of mkoverlay sees it: resolved paths, parsed ranges. */
import { isAbsolute, resolve } from "node:path";
import { isRegistryUrl } from "./registry-location.js";
import { PORT_RANGE } from "../util/validate.js";
import type { FleetRaw } from "./schema.js";

export interface PortRange {
  lo: number;
  hi: number;
}

export interface Bastion {
  name: string;
  host: string;
  port: number;
  user: string;
  hostKeys: string[];
  from: string[] | undefined;
  /** As written in the config; resolved against the build time when a line is made. */
  expiry: string | undefined;
  /** Extra time, up to this, per device on a duration expiry (config/expiry.ts); undefined: the default. */
  expirySpread?: string | number | undefined;
  /** With a duration expiry: how long a device seen connected keeps its key after (config/expiry.ts). */
  expiryRenewal?: string | undefined;
  jumpUser: string | undefined;
}

type Forward =
  | { type: "remote"; name: string; local: number }
  | { type: "local"; name: string; bastion: string; listen: number; to: string }
  | { type: "socks"; name: string; bastion: string; listen: number; allow: string[] };

/** Who may log in to the devices; `undefined` when the config says `operators: none`. */
export interface Operators {
  user: string;
  authorizedKeys: string[];
  userCA: string | undefined;
  principals: string[];
}

export interface Fleet {
  file: string;
  registry: string;
  hostnameTemplate: string;
  ports: { ssh: PortRange; services: PortRange };
  bastions: Map<string, Bastion>;
  forwards: Forward[];
  operators: Operators | undefined;
  /** What the config allows but is likely to hurt, as `file:line:col key: …` (rules.ts configWarnings). */
  warnings?: string[];
}

export function parseRange(v: string): PortRange {
  const m = PORT_RANGE.exec(v);
  if (!m) throw new Error(`not a port range: ${v}`);
  return { lo: Number(m[1]), hi: Number(m[2]) };
}

/** A registry value is a path (relative to the config file) or a URL. */
function resolveRegistry(value: string, baseDir: string): string {
  if (isRegistryUrl(value)) return value;
  return isAbsolute(value) ? value : resolve(baseDir, value);
}

export function toFleet(raw: FleetRaw, file: string, baseDir: string, warnings: string[] = []): Fleet {
  const bastions = new Map<string, Bastion>();
  // Names are plain ASCII words: a byte-order sort (localeCompare would load ICU's collation,
  // ~8 ms of every single build).
  for (const [name, b] of Object.entries(raw.bastions).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    // Every key a device trusts for this bastion, in one known_hosts list: the current ones,
    // the next ones, the host CA (rules.ts refuses duplicates).
    const hostKeys = [...b.hostKeys, ...(b.nextHostKeys ?? []), ...(b.hostCA ? [`@cert-authority ${b.hostCA}`] : [])];
    bastions.set(name, { name, host: b.host.toLowerCase(), port: b.port, user: b.user, hostKeys, from: b.from, expiry: b.expiry, expirySpread: b.expirySpread, expiryRenewal: b.expiryRenewal, jumpUser: b.jumpUser });
  }
  return {
    file,
    // $MKOVERLAY_REGISTRY (relative to the working directory) overrides the file's value.
    registry: process.env.MKOVERLAY_REGISTRY ? resolveRegistry(process.env.MKOVERLAY_REGISTRY, process.cwd()) : resolveRegistry(raw.registry, baseDir),
    hostnameTemplate: raw.hostname,
    warnings,
    ports: { ssh: parseRange(raw.ports.ssh), services: parseRange(raw.ports.services) },
    bastions,
    operators:
      raw.operators === "none"
        ? undefined
        : {
            user: raw.operators.user,
            // Written to the device as validated: `type base64 [comment]`, nothing around it.
            authorizedKeys: raw.operators.authorizedKeys ?? [],
            userCA: raw.operators.userCA,
            principals: raw.operators.principals ?? [],
          },
    // Shapes were checked by the forwards rule; this only narrows the types.
    forwards: raw.forwards.map((f): Forward => {
      if (f.type === "local") return { type: "local", name: f.name, bastion: f.bastion!, listen: f.listen!, to: f.to! };
      if (f.type === "socks") return { type: "socks", name: f.name, bastion: f.bastion!, listen: f.listen!, allow: f.allow! };
      return { type: "remote", name: f.name, local: f.local! };
    }),
  };
}
