/**
 * mkoverlay as a library, for factory software written in Node:
 *
 *   import { build, batch, verify, UserError } from "mkoverlay";
 *
 * The same flows as the commands (same config lookup, registry, checks and files), without a
 * process around them: nothing is printed, nothing exits, no signal handler is installed (pass
 * an AbortSignal to stop a batch cleanly). Anything the caller can fix — a bad option, config or
 * overlay, a full disk — is thrown as a UserError with `message`, `hint` and the `exitCode` the
 * CLI would use; any other error is a bug in mkoverlay.
 *
 * The types below are the public contract and are written out here (not re-exported from the
 * internals), so the published declarations stay small and stable; the API test compiles a
 * separate package against them.
 */
import { runBatch } from "./cli/commands/batch.js";
import { runBuild } from "./cli/commands/build.js";
import { runVerify } from "./cli/commands/verify.js";
import { UserError } from "./util/errors.js";
import { quietLog } from "./util/log.js";
import type { BuildResult as InternalBuildResult } from "./device/station.js";

export { UserError } from "./util/errors.js";

/** Where the fleet config is: this file, else $MKOVERLAY_CONFIG, else ./mkoverlay.yaml. */
export interface ConfigOption {
  config?: string;
}

/** How and where the overlay is written (as the CLI's --out, --format, --apply). */
export interface OutputOptions {
  /** Output directory, created 0700 (default "out", relative to the working directory). */
  out?: string;
  /** "tar" (default: OUT/HOST.overlay.tar.gz) or "dir" (OUT/HOST.overlay/). */
  format?: "tar" | "dir";
  /** Lay the overlay over this mounted root file system instead (needs root). */
  apply?: string;
}

export interface BuildOptions extends ConfigOption, OutputOptions {
  /** Board profile id, e.g. "rpi4" (`mkoverlay boards`). */
  board: string;
  /** Bastion name(s) from the config. */
  bastion: string | string[];
  /** OS profile id, instead of the board's default. */
  os?: string;
  /** The device's name (default: the config's template); `KEY=VALUE` names a registered device for a re-flash. */
  hostname?: string;
  /** An unencrypted ed25519 OpenSSH private key file to use instead of a new key (a registered key re-flashes its device). */
  hostKey?: string;
  /** Factory data recorded with the device (serial number, MAC…); names are lower-case words. */
  attributes?: Record<string, string>;
  /** Stops before the point of no return (the device is then not built, nothing reserved). */
  signal?: AbortSignal;
  /** Warnings the CLI would print (e.g. an expired bastion); ignored if absent. */
  onWarning?: (message: string) => void;
}

/** A built device. */
export interface BuildResult {
  hostname: string;
  board: string;
  os: string;
  bastions: string[];
  /** The tunnel port reserved on the bastions. */
  port: number;
  /** Service tunnel ports by forward name. */
  services: Record<string, number>;
  attributes: Record<string, string>;
  /** SHA256 fingerprint of the device key. */
  fingerprint: string;
  /** The device's public key line. */
  publicKey: string;
  /** The overlay written (archive, folder or root). */
  overlay: string;
  /** The file holding the bastion lines. */
  authorizedKeysFile: string;
  /** The bastion authorized_keys line, by bastion name. */
  authorizedKeys: Record<string, string>;
  /** A registered device's overlay built again (its key was given). */
  rebuilt: boolean;
}

export interface BatchOptions extends ConfigOption, OutputOptions {
  board: string;
  bastion: string | string[];
  os?: string;
  /** This many devices named by the template… */
  count?: number;
  /** …or the devices of this file (one name a line, or CSV with a hostname column; other columns become attributes). */
  hosts?: string;
  /** Factory data recorded with every device. */
  attributes?: Record<string, string>;
  /** Stops the batch cleanly: devices in flight are finished or given back; see `stopped`. */
  signal?: AbortSignal;
  /** Each device as it is built (the batch keeps going). */
  onDevice?: (device: BuildResult) => void;
  /** Each device that failed (the batch keeps going; it reserved nothing). */
  onFailure?: (failure: BatchFailure) => void;
  onWarning?: (message: string) => void;
}

export interface BatchFailure {
  /** The hostname asked for, or null for a device named by the template. */
  hostname: string | null;
  error: string;
}

export interface BatchResult {
  total: number;
  built: BuildResult[];
  failed: BatchFailure[];
  /** Rows of `hosts` already built by an earlier run of the shift (their output in place): not built again. */
  skipped: { hostname: string; port: number; overlay: string }[];
  /** Devices not built because the batch was stopped (nothing is reserved for them). */
  notBuilt: { count: number; hostnames: string[] };
  /** `hosts`: the file of rows not built (stopped or failed), next to the outputs; feed it back to finish. */
  remaining: string | null;
  /** Why the batch stopped early (the abort reason), or null when it ran to the end. */
  stopped: string | null;
}

export interface VerifyOptions extends ConfigOption {
  /** Check each overlay against itself only (no config or registry); also the default when no config is found. */
  offline?: boolean;
}

export interface VerifyCheck {
  ok: boolean;
  what: string;
  detail?: string;
}

export interface VerifyResult {
  overlay: string;
  hostname: string | null;
  ok: boolean;
  /** "registry": against the fleet config and the registry; "offline": against itself. */
  mode: "registry" | "offline";
  checks: VerifyCheck[];
  /** Offline: what was not checked, since it needs the registry. */
  notChecked: string[];
  /** Set when this overlay could not be read at all (the others are still checked). */
  error?: string;
}

const bastionFlag = (b: string | string[]): string => (Array.isArray(b) ? b.join(",") : b);
const attrFlags = (a: Record<string, string> | undefined): string[] => Object.entries(a ?? {}).map(([k, v]) => `${k}=${v}`);

function publicResult(r: InternalBuildResult): BuildResult {
  return {
    hostname: r.hostname,
    board: r.board,
    os: r.os,
    bastions: r.bastions,
    port: r.port,
    services: r.services,
    attributes: r.attributes,
    fingerprint: r.fingerprint,
    publicKey: r.publicKey,
    overlay: r.overlay,
    authorizedKeysFile: r.authorizedKeysFile,
    authorizedKeys: r.authorizedKeys,
    rebuilt: r.rebuilt,
  };
}

function need(value: unknown, what: string): void {
  if (value === undefined || value === null || value === "") throw new UserError(`${what} is required`);
}

/** Builds one device: reserves its port, writes its overlay and lines, registers it. */
export async function build(options: BuildOptions): Promise<BuildResult> {
  need(options?.board, "build: board");
  need(options?.bastion, "build: bastion");
  const r = await runBuild(
    {
      board: options.board,
      bastion: bastionFlag(options.bastion),
      ...(options.os !== undefined ? { os: options.os } : {}),
      ...(options.hostname !== undefined ? { hostname: options.hostname } : {}),
      ...(options.hostKey !== undefined ? { hostKey: options.hostKey } : {}),
      attr: attrFlags(options.attributes),
      ...(options.out !== undefined ? { out: options.out } : {}),
      ...(options.format !== undefined ? { format: options.format } : {}),
      ...(options.apply !== undefined ? { apply: options.apply } : {}),
      ...(options.config !== undefined ? { config: options.config } : {}),
    },
    quietLog(options.onWarning),
    options.signal,
  );
  return publicResult(r);
}

/** Builds many devices; one device failing does not stop the others. */
export async function batch(options: BatchOptions): Promise<BatchResult> {
  need(options?.board, "batch: board");
  need(options?.bastion, "batch: bastion");
  const built: BuildResult[] = [];
  const s = await runBatch(
    {
      board: options.board,
      bastion: bastionFlag(options.bastion),
      ...(options.os !== undefined ? { os: options.os } : {}),
      ...(options.count !== undefined ? { count: String(options.count) } : {}),
      ...(options.hosts !== undefined ? { hosts: options.hosts } : {}),
      attr: attrFlags(options.attributes),
      ...(options.out !== undefined ? { out: options.out } : {}),
      ...(options.format !== undefined ? { format: options.format } : {}),
      ...(options.config !== undefined ? { config: options.config } : {}),
    },
    {
      built(r) {
        const p = publicResult(r);
        built.push(p);
        options.onDevice?.(p);
      },
      failed(f) {
        options.onFailure?.({ hostname: f.hostname, error: f.error });
      },
      log: quietLog(options.onWarning),
    },
    options.signal,
  );
  return { total: s.total, built, skipped: s.skipped, failed: s.failed.map((f) => ({ hostname: f.hostname, error: f.error })), notBuilt: s.notBuilt, remaining: s.remaining, stopped: s.stopped };
}

/** Checks overlays (archives or folders); one result per overlay, in order. */
export async function verify(overlays: string | string[], options: VerifyOptions = {}): Promise<VerifyResult[]> {
  const paths = Array.isArray(overlays) ? overlays : [overlays];
  return runVerify(paths, { ...(options.config !== undefined ? { config: options.config } : {}), ...(options.offline ? { offline: true } : {}) });
}
