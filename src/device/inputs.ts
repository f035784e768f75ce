/**
 * What a device build needs from the outside world, gathered and validated before anything
 * is reserved: config, profiles, bastions, hostname, key. Shared by build and batch.
 */
import { readFileSync } from "node:fs";
import type { Bastion, Fleet } from "../config/fleet.js";
import { errnoCode, UserError } from "../util/errors.js";
import { decodePrivateKey, fingerprint, generateEd25519, type Ed25519Key } from "../keys/ed25519.js";
import { didYouMean, hostnameProblem, parseExpiry } from "../util/validate.js";
import { stderrLog } from "../util/log.js";

/**
 * The bastions named by --bastion. With `newLinesAt` (a build: new authorized_keys lines are
 * made at that time) a bastion whose `expiry:` date has passed is refused, since the line would
 * be dead on arrival. Without it (exports, ssh-config: existing devices, whose lines carry
 * their own expiry and which sshd refuses by itself once expired) it is only a warning.
 */
export function resolveBastions(fleet: Fleet, given: string | string[] | undefined, newLinesAt?: Date): Bastion[] {
  const names = bastionNames(given);
  const flag = names.join(",");
  if (names.length === 0) {
    throw new UserError("--bastion is required", { hint: `name one or more of: ${[...fleet.bastions.keys()].join(", ")} (e.g. --bastion eu,us)` });
  }
  const seen = new Set<string>();
  return names.map((n) => {
    if (seen.has(n)) throw new UserError(`--bastion ${flag}: '${n}' is named twice`);
    seen.add(n);
    const b = fleet.bastions.get(n);
    if (!b) {
      const guess = didYouMean(n, [...fleet.bastions.keys()]);
      throw new UserError(`--bastion ${JSON.stringify(n)}: no such bastion in ${fleet.file}${guess ? ` (did you mean '${guess}'?)` : ""}`, {
        hint: `defined bastions: ${[...fleet.bastions.keys()].join(", ")}`,
      });
    }
    const passed = expiryPassed(b, newLinesAt ?? new Date());
    if (passed && newLinesAt) {
      throw new UserError(`${fleet.file} bastions.${n}.expiry: ${passed}: a new device's key would be refused by that bastion from the start`, {
        hint: `set a later date (or a duration such as 365d) for bastion '${n}'`,
      });
    }
    if (passed) stderrLog(false).warn(`${fleet.file} bastions.${n}.expiry: ${passed}: the lines of its devices are expired and sshd refuses them`);
    return b;
  });
}

/** `--bastion eu,us` (or the API's list) → the names, in order. */
export function bastionNames(given: string | string[] | undefined): string[] {
  return (Array.isArray(given) ? given : (given ?? "").split(",")).map((s) => s.trim()).filter(Boolean);
}

/** Why a bastion's `expiry:` is over at `at` (a date that has passed), or undefined. */
function expiryPassed(b: Bastion, at: Date): string | undefined {
  if (b.expiry === undefined) return undefined;
  const t = parseExpiry(b.expiry, at);
  // A malformed value is the config rules' to report (with its position); it has not "passed".
  return typeof t !== "string" && t.getTime() <= at.getTime() ? `${JSON.stringify(b.expiry)} has passed` : undefined;
}

export function checkHostnameFlag(name: string | undefined): string | undefined {
  if (name === undefined) return undefined;
  const p = hostnameProblem(name);
  if (p) throw new UserError(`--hostname ${JSON.stringify(name)}: ${p}`, { hint: "use a lower-case RFC 1123 name such as gw-0042" });
  return name;
}

export interface DeviceKey {
  key: Ed25519Key;
  fingerprint: string;
  imported: boolean;
}

export function loadOrGenerateKey(file: string | undefined): DeviceKey {
  if (file === undefined) {
    const key = generateEd25519();
    return { key, fingerprint: fingerprint(key.pub), imported: false };
  }
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    const code = errnoCode(e);
    throw new UserError(`--host-key ${file}: ${code === "ENOENT" ? "no such file" : code === "EISDIR" ? "is a directory" : (e as Error).message}`);
  }
  const { key } = decodePrivateKey(text, `--host-key ${file}`);
  return { key, fingerprint: fingerprint(key.pub), imported: true };
}
