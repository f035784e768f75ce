/**
 * The archive form (the default): `<out>/<host>.overlay.tar.gz`, 0600 (it holds the private
 * key), and the lines file beside it. Staged as one group of temp files (fsutil's
 * StagedGroups), so a batch chunk can stage many devices and sync them together.
 */
import { join } from "node:path";
import { removeFiles, StagedGroups, type PendingFile } from "../../util/fsutil.js";
import type { DeviceOutput, Rendered } from "./form.js";

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

export function tarOutput(outDir: string): DeviceOutput {
  return {
    path: (hostname) => join(outDir, `${hostname}.overlay.tar.gz`),
    async place(r, ready) {
      const staged = new StagedGroups([pendingFiles(r)]);
      try {
        await ready();
        const err = staged.commit(0);
        if (err) throw err;
        staged.finish();
      } finally {
        staged.discardRest();
      }
    },
    remove: (r) => removeFiles([r.overlay, r.authorizedKeysFile]),
  };
}
