/**
 * The image form (`mkoverlay image --base`, `batch --image`): `<out>/<host>.img` (or `.img.zst`)
 * and its `.img.bmap` (names: image/names.ts), the base copied and the overlay laid into it
 * under temp names (image/output.ts, loaded only when an image is made: a plain build does not
 * pay for the image code), renamed once the caller says the device is still its own.
 */
import { join } from "node:path";
import { removeFiles, writeFileAtomic } from "../../util/fsutil.js";
import { imageFiles, imageFilesOf, type ImageFiles } from "../../image/names.js";
import type { DeviceOutput, ImageForm } from "./form.js";

/** The files of a device's image in `outDir`. */
const deviceImageFiles = (outDir: string, hostname: string, form: Pick<ImageForm, "compress">): ImageFiles => imageFiles(join(outDir, `${hostname}.img`), form.compress);

/** The bmap beside an image written as `file` (what `mkoverlay image --json` reports). */
export const bmapOf = (file: string): string => imageFilesOf(file).bmap;

export function imageOutput(outDir: string, form: ImageForm, epoch: number): DeviceOutput {
  return {
    path: (hostname) => deviceImageFiles(outDir, hostname, form).file,
    async place(r, ready) {
      const { stageDeviceImage } = await import("../../image/output.js");
      const staged = await stageDeviceImage(form, imageFilesOf(r.overlay), r.tree.list(), epoch);
      try {
        await ready();
        staged.commit();
      } finally {
        staged.discard();
      }
      writeFileAtomic(r.authorizedKeysFile, r.text, { mode: 0o644 });
    },
    remove(r) {
      const f = imageFilesOf(r.overlay);
      removeFiles([f.file, f.bmap, r.authorizedKeysFile]);
    },
  };
}
