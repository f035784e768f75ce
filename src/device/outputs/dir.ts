/**
 * The folder form (`--format dir`, root only: outputForm says why): `<out>/<host>.overlay/`,
 * written whole under a temp name and swapped in (overlay/apply.ts), and the lines file.
 */
import { rmSync } from "node:fs";
import { join } from "node:path";
import { removeFiles, writeFileAtomic } from "../../util/fsutil.js";
import { writeTreeTo } from "../../overlay/apply.js";
import type { DeviceOutput } from "./form.js";

export function dirOutput(outDir: string, epoch: number): DeviceOutput {
  return {
    path: (hostname) => join(outDir, `${hostname}.overlay`),
    async place(r, ready) {
      await ready();
      writeTreeTo(r.tree, r.overlay, { epoch, replaceWhole: true });
      writeFileAtomic(r.authorizedKeysFile, r.text, { mode: 0o644, durable: false });
    },
    remove(r) {
      rmSync(r.overlay, { recursive: true, force: true });
      removeFiles([r.authorizedKeysFile]);
    },
  };
}
