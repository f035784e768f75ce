/**
 * Turns a registered device into its outputs: the overlay (tar.gz, a directory, or laid
 * straight over a root file system) and its bastion lines. Used by build, batch and rotate,
 * so every path writes the same thing the same way.
 */
import { rmSync } from "node:fs";
import { join } from "node:path";
import { authorizedKeysLine } from "./bastion/line.js";
import type { Bastion, Fleet } from "./config/fleet.js";
import { UserError } from "./errors.js";
import { planTunnels, type TunnelPlan } from "./forwards.js";
import { writeFileAtomic, type PendingFile } from "./fsutil.js";
import type { Ed25519Key } from "./keys/ed25519.js";
import { tarball } from "./overlay/archive.js";
import { writeTreeTo } from "./overlay/apply.js";
import { buildOverlay } from "./overlay/steps.js";
import type { Tree } from "./overlay/tree.js";
import type { Board, OsProfile, Profiles } from "./profiles.js";
import type { DeviceRecord } from "./registry/types.js";

export type OutputForm = { kind: "tar" } | { kind: "dir" } | { kind: "apply"; root: string };

export interface Emit {
  outDir: string;
  form: OutputForm;
  epoch: number;
}

export const overlayPath = (e: Emit, hostname: string): string =>
  e.form.kind === "apply" ? e.form.root : join(e.outDir, e.form.kind === "dir" ? `${hostname}.overlay` : `${hostname}.overlay.tar.gz`);
export const authorizedKeysPath = (outDir: string, hostname: string): string => join(outDir, `${hostname}.authorized_keys`);

/** The bastions a registered device tunnels to, from the current config. */
export function deviceBastions(fleet: Fleet, d: DeviceRecord): Bastion[] {
  return d.bastions.map((name) => {
    const b = fleet.bastions.get(name);
    if (!b) throw new UserError(`${d.hostname} tunnels to bastion '${name}', which is no longer in ${fleet.file}`);
    return b;
  });
}

export function deviceProfiles(p: Profiles, d: DeviceRecord): { board: Board; os: OsProfile } {
  const board = p.boards.get(d.board);
  const os = p.oses.get(d.os);
  if (!board || !os) throw new UserError(`${d.hostname} was built for board '${d.board}' / OS '${d.os}', which this installation does not know`);
  return { board, os };
}

export function tunnelsOf(fleet: Fleet, d: DeviceRecord, bastions: Bastion[] = deviceBastions(fleet, d)): TunnelPlan[] {
  return planTunnels(fleet, bastions, d.port, d.services);
}

/** One line per bastion, anchored at the device's build time (a re-export never moves expiry). */
export function deviceLines(hostname: string, pub: Buffer, tunnels: TunnelPlan[], created: Date): Record<string, string> {
  const lines: Record<string, string> = {};
  for (const t of tunnels) lines[t.bastion.name] = authorizedKeysLine({ hostname, pub, tunnel: t, now: created });
  return lines;
}

/** The lines as a paste-able authorized_keys fragment (comments say where each goes). */
export function renderLines(hostname: string, port: number, tunnels: TunnelPlan[], lines: Record<string, string>): string {
  const parts = [`# ${hostname}: tunnel port ${port}`];
  for (const { bastion: b } of tunnels) parts.push(`# bastion ${b.name}: authorized_keys of ${b.user}@${b.host}`, lines[b.name] ?? "");
  return parts.join("\n") + "\n";
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

export async function renderDevice(e: Emit, d: DeviceRecord, key: Ed25519Key, board: Board, os: OsProfile, bastions: Bastion[], fleet: Fleet): Promise<Rendered> {
  const tunnels = tunnelsOf(fleet, d, bastions);
  const tree = buildOverlay({ hostname: d.hostname, board, os, tunnels, key, operators: fleet.operators });
  const lines = deviceLines(d.hostname, key.pub, tunnels, new Date(d.created));
  return {
    tree,
    archive: e.form.kind === "tar" ? await tarball(tree, e.epoch) : undefined,
    overlay: overlayPath(e, d.hostname),
    authorizedKeysFile: authorizedKeysPath(e.outDir, d.hostname),
    lines,
    text: renderLines(d.hostname, d.port, tunnels, lines),
  };
}

/** The files of a rendered tar-form device, for writeFilesAtomic (a batch writes many at once). */
export function pendingFiles(r: Rendered): PendingFile[] {
  if (!r.archive) throw new Error("pendingFiles: not a tar-form device");
  // The archive holds the private key: 0600 from the moment it exists.
  return [
    { target: r.authorizedKeysFile, data: r.text, mode: 0o644 },
    { target: r.overlay, data: r.archive, mode: 0o600 },
  ];
}

export async function emitDevice(e: Emit, d: DeviceRecord, key: Ed25519Key, board: Board, os: OsProfile, bastions: Bastion[], fleet: Fleet): Promise<Emitted> {
  const r = await renderDevice(e, d, key, board, os, bastions, fleet);
  // The lines file is a convenience copy (the registry re-exports it any time): renamed into
  // place but not synced on its own; the archive's directory sync below covers its name too.
  writeFileAtomic(r.authorizedKeysFile, r.text, 0o644, undefined, { durable: false });
  try {
    if (r.archive) writeFileAtomic(r.overlay, r.archive, 0o600);
    else writeTreeTo(r.tree, r.overlay, { epoch: e.epoch, replaceWhole: e.form.kind === "dir" });
  } catch (err) {
    // The device is given up (a full disk…): its lines must not outlive it.
    rmSync(r.authorizedKeysFile, { force: true });
    throw err;
  }
  return { overlay: r.overlay, authorizedKeysFile: r.authorizedKeysFile, lines: r.lines, text: r.text };
}
