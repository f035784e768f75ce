/**
 * A registered device → its outputs. One device context (the fleet, the device's record, key,
 * profiles and bastions, and how to write) goes through every stage: the spec the build steps
 * take, the rendered tree and archive, the bastion lines, and the files staged for writing.
 * Used by build, batch and rotate, so every path writes the same thing the same way.
 */
import { join } from "node:path";
import { deviceLines, renderLines } from "./bastion/line.js";
import type { Bastion, Fleet } from "./config/fleet.js";
import { UserError } from "./errors.js";
import { planTunnels, type TunnelPlan } from "./forwards.js";
import type { PendingFile } from "./fsutil.js";
import type { Ed25519Key } from "./keys/ed25519.js";
import { tarball } from "./overlay/archive.js";
import { loadLayers } from "./overlay/layers.js";
import { buildOverlay, type DeviceSpec } from "./overlay/steps.js";
import type { Tree } from "./overlay/tree.js";
import type { Bmap } from "./image/bmap.js";
import type { Board, OsProfile, Profiles } from "./profiles.js";
import type { DeviceRecord } from "./registry/types.js";

/**
 * A per-device disk image: the base with the overlay laid into its root partition
 * (`mkoverlay image`, `batch --image`). `baseMap` is the base's bmap, computed once per run
 * (and cached per base) before anything is reserved.
 */
export interface ImageForm {
  kind: "image";
  base: string;
  rootPartition: number | undefined;
  compress: "zstd" | undefined;
  /** --force: lay the overlay even over another device's mkoverlay identity. */
  force: boolean;
  baseMap?: Bmap;
  /** The base's listing of the overlay's directories (image/lay.ts), made by the preflight. */
  baseListing?: Map<string, Map<string, { mode: number }>>;
}

export type OutputForm = { kind: "tar" } | { kind: "dir" } | { kind: "apply"; root: string } | ImageForm;

export interface Emit {
  outDir: string;
  form: OutputForm;
  epoch: number;
}

export function overlayPath(e: Emit, hostname: string): string {
  switch (e.form.kind) {
    case "apply":
      return e.form.root;
    case "dir":
      return join(e.outDir, `${hostname}.overlay`);
    case "image":
      return join(e.outDir, `${hostname}.img${e.form.compress === "zstd" ? ".zst" : ""}`);
    default:
      return join(e.outDir, `${hostname}.overlay.tar.gz`);
  }
}
const authorizedKeysPath = (outDir: string, hostname: string): string => join(outDir, `${hostname}.authorized_keys`);

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

export interface Emitted {
  overlay: string;
  authorizedKeysFile: string;
  lines: Record<string, string>;
  text: string;
}

/** Everything a device's outputs hold, rendered in memory (nothing written yet). */
export interface Rendered extends Emitted {
  tree: Tree;
  archive: Buffer | undefined;
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

/** The files of a rendered tar-form device, to be staged and renamed together. */
export function pendingFiles(r: Rendered): PendingFile[] {
  if (!r.archive) throw new Error("pendingFiles: not a tar-form device");
  // The archive holds the private key: 0600 from the moment it exists. It is renamed first,
  // so a device whose archive cannot take its name leaves no lines file either.
  return [
    { target: r.overlay, data: r.archive, mode: 0o600 },
    // The lines file is a convenience copy (the registry re-exports it any time): not synced.
    { target: r.authorizedKeysFile, data: r.text, mode: 0o644, durable: false },
  ];
}
