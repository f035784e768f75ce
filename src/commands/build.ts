/**
 * `mkoverlay [build] --board B --bastion eu[,us]`: one device end to end. Everything the user
 * can get wrong is checked first; then the port is reserved (pending), the overlay written
 * atomically, and the device activated. A failure after the reservation gives the port back.
 */
import { join, resolve } from "node:path";
import { authorizedKeysLine } from "../bastion/line.js";
import { configPath, loadFleet } from "../config/load.js";
import { checkHostnameFlag, loadOrGenerateKey, resolveBastions } from "../device.js";
import { UserError } from "../errors.js";
import { prepareOutDir, removeIfEmpty, writeFileAtomic } from "../fsutil.js";
import type { Bastion, Fleet } from "../config/fleet.js";
import type { Board, OsProfile } from "../profiles.js";
import type { DeviceKey } from "../device.js";
import type { Log } from "../output.js";
import { publicKeyLine } from "../keys/ed25519.js";
import { out, stderrLog } from "../output.js";
import { archiveEpoch, tarball } from "../overlay/archive.js";
import { buildOverlay } from "../overlay/steps.js";
import { loadProfiles, resolveBoardOs } from "../profiles.js";
import { openRegistry } from "../registry/open.js";
import type { DeviceRecord } from "../registry/types.js";

export interface BuildOptions {
  board: string;
  bastion?: string;
  os?: string;
  hostname?: string;
  hostKey?: string;
  out?: string;
  config?: string;
  json?: boolean;
  quiet?: boolean;
}

export interface BuildResult {
  hostname: string;
  board: string;
  os: string;
  bastions: string[];
  port: number;
  fingerprint: string;
  publicKey: string;
  overlay: string;
  authorizedKeysFile: string;
  authorizedKeys: Record<string, string>;
  /** The paste-able fragment written to authorizedKeysFile and printed. */
  authorizedKeysText: string;
  rebuilt: boolean;
}

export const overlayFile = (outDir: string, hostname: string): string => join(outDir, `${hostname}.overlay.tar.gz`);
export const authorizedKeysFile = (outDir: string, hostname: string): string => join(outDir, `${hostname}.authorized_keys`);

export async function runBuild(opts: BuildOptions): Promise<BuildResult> {
  const log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json));
  const now = new Date();
  const fleet = loadFleet(configPath(opts.config), now);
  const { board, os } = resolveBoardOs(loadProfiles(), opts.board, opts.os);
  const bastions = resolveBastions(fleet, opts.bastion);
  const wantedName = checkHostnameFlag(opts.hostname);
  const dk = loadOrGenerateKey(opts.hostKey);
  const outDir = resolve(opts.out ?? "out");
  const epoch = archiveEpoch();
  const { created } = prepareOutDir(outDir);
  try {
    return await buildInto(outDir, epoch, now, opts, { fleet, board, os, bastions, wantedName, dk, log });
  } catch (e) {
    if (created) removeIfEmpty(outDir);
    throw e;
  }
}

interface Prepared {
  fleet: Fleet;
  board: Board;
  os: OsProfile;
  bastions: Bastion[];
  wantedName: string | undefined;
  dk: DeviceKey;
  log: Log;
}

async function buildInto(outDir: string, epoch: number, now: Date, _opts: BuildOptions, p: Prepared): Promise<BuildResult> {
  const { fleet, board, os, bastions, wantedName, dk, log } = p;
  const registry = await openRegistry(fleet.registry);
  try {
    // A registered key means a re-flash: same device, same name and port, a fresh overlay.
    let device: DeviceRecord | undefined = dk.imported ? await registry.getByFingerprint(dk.fingerprint) : undefined;
    const rebuilt = device !== undefined;
    if (device) {
      if (device.status !== "active") throw new UserError(`--host-key: the key belongs to ${device.hostname}, which is ${device.status}`);
      if (wantedName !== undefined && wantedName !== device.hostname) {
        throw new UserError(`--host-key: the key is registered to ${device.hostname}, not ${wantedName}`, { hint: "drop --hostname to rebuild that device's overlay" });
      }
      log.info(`${device.hostname} is registered with this key: rebuilding its overlay (port ${device.port})`);
    } else {
      device = await registry.reserve({
        hostname: wantedName,
        hostnameTemplate: fleet.hostnameTemplate,
        range: fleet.ports.ssh,
        board: board.id,
        os: os.id,
        bastions: bastions.map((b) => b.name),
        publicKey: publicKeyLine(dk.key.pub),
        fingerprint: dk.fingerprint,
        overlayPath: (h) => overlayFile(outDir, h),
      });
      log.info(`reserved port ${device.port} for ${device.hostname}`);
    }
    const hostname = device.hostname;
    try {
      const tree = buildOverlay({ hostname, board, os, bastions, port: device.port, key: dk.key });
      const archive = await tarball(tree, epoch);
      const lines: Record<string, string> = {};
      for (const b of bastions) lines[b.name] = authorizedKeysLine({ hostname, pub: dk.key.pub, port: device.port, bastion: b, now });
      const overlay = overlayFile(outDir, hostname);
      const akFile = authorizedKeysFile(outDir, hostname);
      // The archive holds the private key: 0600 from the moment it exists.
      writeFileAtomic(overlay, archive, 0o600);
      const authorizedKeysText = renderLines(hostname, device.port, bastions, lines);
      writeFileAtomic(akFile, authorizedKeysText, 0o644);
      if (rebuilt) await registry.updateDevice(hostname, { board: board.id, os: os.id, bastions: bastions.map((b) => b.name), overlay });
      else await registry.activate(hostname);
      log.info(`wrote ${overlay}`);
      return {
        hostname,
        board: board.id,
        os: os.id,
        bastions: bastions.map((b) => b.name),
        port: device.port,
        fingerprint: dk.fingerprint,
        publicKey: publicKeyLine(dk.key.pub, hostname),
        overlay,
        authorizedKeysFile: akFile,
        authorizedKeys: lines,
        authorizedKeysText,
        rebuilt,
      };
    } catch (e) {
      if (!rebuilt) await registry.abandon(hostname);
      throw e;
    }
  } finally {
    await registry.close();
  }
}

/** The lines for the bastions, as a paste-able authorized_keys fragment (comments say where). */
export function renderLines(hostname: string, port: number, bastions: { name: string; host: string; user: string }[], lines: Record<string, string>): string {
  const parts = [`# ${hostname}: tunnel port ${port}`];
  for (const b of bastions) {
    parts.push(`# bastion ${b.name}: ~${b.user}/.ssh/authorized_keys on ${b.host}`, lines[b.name] ?? "");
  }
  return parts.join("\n") + "\n";
}

export async function buildCommand(opts: BuildOptions): Promise<void> {
  const r = await runBuild(opts);
  if (opts.json) {
    const { authorizedKeysText: _t, ...rest } = r;
    out(JSON.stringify(rest));
  } else {
    out(r.authorizedKeysText);
  }
}
