/**
 * The apply form (`--apply ROOT`): the overlay laid over a mounted root file system, file by
 * file under temp names (overlay/apply.ts); the lines file goes to `--out`. What it replaced
 * in ROOT cannot be taken back, so removal leaves ROOT as it is.
 */
import { writeFileAtomic } from "../../util/fsutil.js";
import { writeTreeTo } from "../../overlay/apply.js";
import type { DeviceOutput } from "./form.js";

export function applyOutput(root: string, epoch: number): DeviceOutput {
  return {
    path: () => root,
    async place(r, ready) {
      await ready();
      writeTreeTo(r.tree, r.overlay, { epoch, replaceWhole: false });
      writeFileAtomic(r.authorizedKeysFile, r.text, { mode: 0o644, durable: false });
    },
    remove() {
      // The files it laid over ROOT replaced others': nothing to put back.
    },
  };
}
