/**
 * One output module per form (tar.ts, dir.ts, apply.ts, image.ts), each owning its names, its
 * staging under temp names and its removal; the device flow (device/flow.ts) sees only
 * `DeviceOutput`. The lines file (`<out>/<host>.authorized_keys`) is the same for every form.
 */
import { join } from "node:path";
import { applyOutput } from "./apply.js";
import { dirOutput } from "./dir.js";
import type { DeviceOutput, Emit } from "./form.js";
import { imageOutput } from "./image.js";
import { tarOutput } from "./tar.js";

export type { DeviceOutput } from "./form.js";


export function outputOf(e: Emit): DeviceOutput {
  switch (e.form.kind) {
    case "apply":
      return applyOutput(e.form.root, e.epoch);
    case "dir":
      return dirOutput(e.outDir, e.epoch);
    case "image":
      return imageOutput(e.outDir, e.form, e.epoch);
    default:
      return tarOutput(e.outDir);
  }
}

export const authorizedKeysPath = (outDir: string, hostname: string): string => join(outDir, `${hostname}.authorized_keys`);
