/**
 * A device as the user names it on the command line: its hostname, or `KEY=VALUE` of its
 * factory data (`serial=SN0042`) — a factory knows its devices by serial, not by hostname.
 * A hostname never holds '=', so the two cannot be confused. A lookup resolves to exactly one
 * device, or says why not (none, or several, named).
 */
import { UserError } from "../util/errors.js";
import { attributeName, attributeNameProblem, attributeProblem } from "./attributes.js";
import type { DeviceRecord, DeviceStatus, Registry } from "../registry/types.js";

export interface AttributeQuery {
  key: string;
  value: string;
}

/**
 * `serial=SN0042` → { key: "serial", value: "SN0042" }; anything else → undefined, to be taken
 * as a hostname (and refused as one, with the hostname's own message, if it is not one). With
 * `strict` (--attr), a name that cannot be a factory data name is an error of its own.
 */
export function attributeQuery(arg: string, flag: string, strict = false): AttributeQuery | undefined {
  const eq = arg.indexOf("=");
  if (eq < 0) return undefined;
  const key = attributeName(arg.slice(0, eq));
  const value = arg.slice(eq + 1);
  const bad = attributeNameProblem(key);
  if (bad && !strict) return undefined;
  if (bad) throw new UserError(`${flag} ${JSON.stringify(arg)}: '${arg.slice(0, eq)}' ${bad}`, { hint: "name a device by its hostname, or by KEY=VALUE of its factory data (e.g. serial=SN0042)" });
  if (value === "") throw new UserError(`${flag} ${JSON.stringify(arg)}: no value after '='`, { hint: `e.g. ${key}=SN0042` });
  const p = attributeProblem(key, value);
  if (p) throw new UserError(`${flag} ${JSON.stringify(arg)}: ${p}`);
  return { key, value };
}

/**
 * The one device `arg` names. With `accept`, a query that matches several devices is narrowed
 * to those in an accepted status (a revoked device and its replacement may share a serial).
 */
export async function findDevice(registry: Registry, arg: string, flag: string, accept?: DeviceStatus[]): Promise<DeviceRecord> {
  const q = attributeQuery(arg, flag);
  if (!q || q.key === "hostname") {
    const name = q ? q.value : arg;
    const d = await registry.get(name);
    if (!d) throw new UserError(`${flag} ${name}: no such device in the registry`, { hint: "see 'mkoverlay registry list'" });
    return d;
  }
  let found = await registry.findByAttribute(q.key, q.value);
  if (found.length > 1 && accept) {
    const narrowed = found.filter((d) => accept.includes(d.status));
    if (narrowed.length > 0) found = narrowed;
  }
  if (found.length === 1) return found[0]!;
  if (found.length === 0) {
    const keys = [...new Set((await registry.list()).flatMap((d) => Object.keys(d.attributes)))].sort();
    throw new UserError(`${flag} ${q.key}=${q.value}: no device has ${q.key} = ${JSON.stringify(q.value)}`, {
      hint: keys.length === 0 ? "no device has factory data (batch --hosts CSV columns, or --attr)" : `factory data recorded: ${keys.join(", ")} (see 'mkoverlay registry list')`,
    });
  }
  const names = found.map((d) => `${d.hostname} (${d.status})`);
  throw new UserError(`${flag} ${q.key}=${q.value}: ${found.length} devices have it: ${names.slice(0, 10).join(", ")}${names.length > 10 ? ", …" : ""}`, {
    hint: "name the device by its hostname",
  });
}

/** `--attr KEY=VALUE` flags → factory data (names normalised as CSV headers are). */
export function parseAttrFlags(flags: string[] | undefined): Record<string, string> {
  const attrs: Record<string, string> = {};
  for (const f of flags ?? []) {
    const q = attributeQuery(f, "--attr", true);
    if (!q) throw new UserError(`--attr ${JSON.stringify(f)}: write KEY=VALUE (e.g. serial=SN0042)`);
    if (q.key === "hostname") throw new UserError("--attr hostname=…: the hostname is the device's name, not factory data", { hint: "use --hostname" });
    if (q.key in attrs && attrs[q.key] !== q.value) throw new UserError(`--attr ${q.key} is given twice`);
    attrs[q.key] = q.value;
  }
  return attrs;
}
