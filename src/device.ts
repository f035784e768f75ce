/**
 * What a device build needs from the outside world, gathered and validated before anything
 * is reserved: config, profiles, bastions, hostname, key. Shared by build and batch.
 */
import { readFileSync } from "node:fs";
import type { Bastion, Fleet } from "./config/fleet.js";
import { errnoCode, UserError } from "./errors.js";
import { decodePrivateKey, fingerprint, generateEd25519, type Ed25519Key } from "./keys/ed25519.js";
import { didYouMean, hostnameProblem } from "./validate.js";

export function resolveBastions(fleet: Fleet, flag: string | undefined): Bastion[] {
  const names = (flag ?? "").split(",").map((s) => s.trim()).filter(Boolean);
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
    return b;
  });
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
