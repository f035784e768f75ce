/**
 * An overlay (any view of it) against the registry and the fleet config: is its key a live
 * device's, and is every entry what this mkoverlay builds for that device? `verify` reports
 * it; `registry doctor` uses it to decide whether a killed build's or rotation's output is
 * complete (finish the work) or not (reclaim it).
 */
import type { Fleet } from "../config/fleet.js";
import { UserError } from "../util/errors.js";
import { fingerprint } from "../keys/ed25519.js";
import * as P from "../overlay/paths.js";
import { checkAgainstBuild, overlayKey, type Check } from "../overlay/verify.js";
import type { TreeView } from "../overlay/view.js";
import { deviceProfiles, deviceSpec } from "./pipeline.js";
import type { Profiles } from "../config/profiles.js";
import type { DeviceRecord, Registry } from "../registry/types.js";

export interface Inspection {
  hostname: string | undefined;
  checks: Check[];
}

const failed = (what: string, detail?: string): Check => (detail === undefined ? { ok: false, what } : { ok: false, what, detail });

/** Compares the overlay with what is built for `device` with the overlay's own key. */
async function againstDevice(view: TreeView, fleet: Fleet, profiles: Profiles, device: DeviceRecord, key: Parameters<typeof deviceSpec>[0]["key"]): Promise<Check[]> {
  const checks: Check[] = [];
  let board, os;
  try {
    ({ board, os } = deviceProfiles(profiles, device));
  } catch (e) {
    return [failed("board and OS profiles known", (e as Error).message)];
  }
  const bastions = device.bastions.flatMap((n) => {
    const b = fleet.bastions.get(n);
    if (!b) checks.push(failed(`bastion '${n}' of ${device.hostname} is in ${fleet.file}`, "removed from the config"));
    return b ? [b] : [];
  });
  checks.push(...(await checkAgainstBuild(view, deviceSpec({ fleet, device, key, board, os, bastions }))));
  return checks;
}

/** `verify`: whose overlay this is, and whether it is whole and current. */
export async function inspectOverlay(view: TreeView, fleet: Fleet, profiles: Profiles, registry: Registry): Promise<Inspection> {
  const k = await overlayKey(view);
  if ("problem" in k) {
    if (k.missing) throw new UserError(`${view.where}: not an mkoverlay overlay (${P.HOST_KEY} is missing)`, { hint: "give the .overlay.tar.gz or .overlay folder that mkoverlay wrote" });
    return { hostname: undefined, checks: [failed(`${P.HOST_KEY} is an ed25519 OpenSSH key`, k.problem)] };
  }
  const fp = fingerprint(k.key.pub);
  const checks: Check[] = [{ ok: true, what: `${P.HOST_KEY} is an ed25519 OpenSSH key (${fp})` }];
  const d = await registry.getByFingerprint(fp);
  if (!d) {
    checks.push(failed("the key is registered", "not in the registry (revoked and released, rotated out, or from another registry)"));
    return { hostname: undefined, checks };
  }
  checks.push({ ok: true, what: `the key is registered to ${d.hostname}` });
  checks.push(d.status === "active" ? { ok: true, what: `${d.hostname} is active in the registry` } : failed(`${d.hostname} is active in the registry`, d.status));
  checks.push(...(await againstDevice(view, fleet, profiles, d, k.key)));
  return { hostname: d.hostname, checks };
}

/**
 * The doctor's question: does `view` hold `device`'s complete overlay with the key
 * `fingerprint` (the registered key for a build, the pending one for a rotation)?
 */
export async function overlayComplete(view: TreeView, fleet: Fleet, profiles: Profiles, device: DeviceRecord, expectFingerprint: string): Promise<boolean> {
  const k = await overlayKey(view);
  if ("problem" in k || fingerprint(k.key.pub) !== expectFingerprint) return false;
  return (await againstDevice(view, fleet, profiles, device, k.key)).every((c) => c.ok);
}
