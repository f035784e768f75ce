/**
 * The typed requests of the device flow: what build, image, batch and rotate take, whether the
 * CLI parsed them from flags (commands/*.ts) or the API was handed them (api.ts). No flag
 * strings past this point: bastions are a list, factory data a record, a count a number.
 */
import type { OutputOptions } from "./station.js";

/** What every device-building request has: the config, where the output goes, the override. */
interface StationRequest {
  /** The fleet config: this file, else $MKOVERLAY_CONFIG, else ./mkoverlay.yaml. */
  config?: string | undefined;
  output: OutputOptions;
  /** Build even though the config would lock out registered devices (compat.ts). */
  forceConfigChange?: boolean | undefined;
}

/** One device (build, image): a new one, or a re-flash when its registered key is given. */
export interface BuildRequest extends StationRequest {
  board: string;
  os?: string | undefined;
  bastions: string[];
  /** Its name (default: the template); `KEY=VALUE` names a registered device (a re-flash). */
  hostname?: string | undefined;
  /** A private key file to use instead of a new key (a registered key re-flashes its device). */
  hostKey?: string | undefined;
  attributes?: Record<string, string> | undefined;
}

/** Many devices: `count` named by the template, or the rows of a `hosts` file. */
export interface BatchRequest extends StationRequest {
  board: string;
  os?: string | undefined;
  bastions: string[];
  count?: number | undefined;
  hosts?: string | undefined;
  /** Factory data for every device (a hosts file's columns add to it). */
  attributes?: Record<string, string> | undefined;
}

/** A new key for a registered device (named by hostname or `KEY=VALUE`), same name and ports. */
export interface RotateRequest extends StationRequest {
  device: string;
  hostKey?: string | undefined;
  /** How long the old key stays valid, in milliseconds (0: not at all). */
  graceMs: number;
}
