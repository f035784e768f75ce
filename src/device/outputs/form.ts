/**
 * The output forms a device can be written as, and what a rendered device holds: the types the
 * output modules (tar.ts, dir.ts, apply.ts, image.ts) and the pipeline share.
 */
import type { ImageForm } from "../../image/output.js";
import type { Tree } from "../../overlay/tree.js";

export type { ImageForm };

export type OutputForm = { kind: "tar" } | { kind: "dir" } | { kind: "apply"; root: string } | ImageForm;

export interface Emit {
  outDir: string;
  form: OutputForm;
  epoch: number;
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

/** What the device flow sees of an output form (device/outputs/index.ts picks one). */
export interface DeviceOutput {
  /** The overlay's final name for a device (what the registry records, and the doctor checks). */
  path(hostname: string): string;
  /**
   * Writes the device under temp names, awaits `ready()` (which throws when the device must not
   * be placed: a stop asked for, the reservation lost), then gives it its final names; on any
   * failure nothing stays under a final name.
   */
  place(r: Rendered, ready: () => Promise<void>): Promise<void>;
  /** Removes what `place` put in place (the reservation was lost after it). */
  remove(r: Rendered): void;
}
