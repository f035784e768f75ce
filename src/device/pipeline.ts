/**
 * A registered device → its outputs. One device context (the fleet, the device's record, key,
 * profiles and bastions, and how to write) goes through every stage: the spec the build steps
 * take, the rendered tree and archive, the bastion lines, and the files staged for writing.
 * Used by build, batch and rotate, so every path writes the same thing the same way.
 */
import { deviceLines, renderLines } from "../bastion/line.js";
import type { Bastion, Fleet } from "../config/fleet.js";
import { UserError } from "../util/errors.js";
import { planTunnels, type TunnelPlan } from "../config/forwards.js";
import type { Ed25519Key } from "../keys/ed25519.js";
import { tarball } from "../overlay/archive.js";
import { loadLayers } from "../overlay/layers.js";
import { buildOverlay, type DeviceSpec } from "../overlay/steps.js";
import { authorizedKeysPath, outputOf } from "./outputs/index.js";
import type { Emit, Rendered } from "./outputs/form.js";
import type { Board, OsProfile, Profiles } from "../config/profiles.js";
import type { DeviceRecord } from "../registry/types.js";

export type { Emit, Emitted, OutputForm, Rendered } from "./outputs/form.js";

/** The overlay's final name for a device in this output form (its output module's). */
export const overlayPath = (e: Emit, hostname: string): string => outputOf(e).path(hostname);

/** Everything one device's outputs are made from. */
export interface DeviceContext {
  fleet: Fleet;
  device: DeviceRecord;
  key: Ed25519Key;
  board: Board;
  os: OsProfile;
  /** The bastions it tunnels to (all in the config). */
  bastions: Bastion[];
  emit: Emit;
}

/** The bastions a registered device tunnels to, from the current config. */
export function deviceBastions(fleet: Fleet, d: DeviceRecord): Bastion[] {
  return d.bastions.map((name) => {
    const b = fleet.bastions.get(name);
    if (!b) {
      throw new UserError(`${d.hostname} tunnels to bastion '${name}', which is no longer in ${fleet.file}`, {
        hint: `add it back, or take it off the registered devices with 'mkoverlay registry remove-bastion ${name}'`,
      });
    }
    return b;
  });
}

export function deviceProfiles(p: Profiles, d: DeviceRecord): { board: Board; os: OsProfile } {
  const board = p.boards.get(d.board);
  const os = p.oses.get(d.os);
  if (!board || !os) throw new UserError(`${d.hostname} was built for board '${d.board}' / OS '${d.os}', which this installation does not know`);
  return { board, os };
}

function tunnelsOf(c: Pick<DeviceContext, "fleet" | "device" | "bastions">): TunnelPlan[] {
  return planTunnels(c.fleet, c.bastions, c.device.port, c.device.services);
}

/** What the build steps take (the layers are read here, at the edge, once per process). */
export function deviceSpec(c: Omit<DeviceContext, "emit">): DeviceSpec {
  return {
    hostname: c.device.hostname,
    board: c.board,
    os: c.os,
    tunnels: tunnelsOf(c),
    key: c.key,
    operators: c.fleet.operators,
    layers: loadLayers(c.os.firstBoot.layers),
  };
}

export async function renderDevice(c: DeviceContext): Promise<Rendered> {
  const spec = deviceSpec(c);
  const tree = buildOverlay(spec);
  const lines = deviceLines(c.device.hostname, c.key.pub, spec.tunnels, new Date(c.device.created));
  return {
    tree,
    archive: c.emit.form.kind === "tar" ? await tarball(tree, c.emit.epoch) : undefined,
    overlay: overlayPath(c.emit, c.device.hostname),
    authorizedKeysFile: authorizedKeysPath(c.emit.outDir, c.device.hostname),
    lines,
    text: renderLines(c.device.hostname, c.device.port, spec.tunnels, lines),
  };
}
