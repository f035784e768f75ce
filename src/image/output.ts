/**
 * The image output form at the station's edges (station.ts loads this module only when
 * `--image`/`mkoverlay image` is used, so a plain build never pays for it):
 *
 * - `preflightImage`, before any port is reserved: the base is not in use, is a disk image
 *   whose root file system debugfs may write and that has room for the overlay, carries no
 *   other device's identity (identity.ts), and has nothing whose type clashes with the overlay; the base's bmap is computed once (and cached per
 *   base), so each device's bmap costs only the chunks its overlay changed.
 * - `stageDeviceImage`, per device: the image and its bmap under temp names (build.ts), renamed
 *   by the station once the registry confirmed the reservation.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { cacheDir } from "../cache.js";
import type { Entry } from "../overlay/tree.js";
import type { ImageForm } from "../pipeline.js";
import { baseBmap, stageImage, type StagedImage } from "./build.js";
import { checkNotInUse } from "./busy.js";
import { checkIdentity, identityOf } from "./identity.js";
import { checkConflicts, preflight, type Listing } from "./lay.js";
import { ImageTreeView } from "./reader.js";
import { findRoot } from "./root.js";

/**
 * `mine`: the device's public key line (a single build), or undefined when every device brings
 * a new key (a batch: any identity in the base is another device's). `targets`: final image
 * paths already known (an explicit --hostname), which must not be in use either.
 */
export async function preflightImage(form: ImageForm, entries: readonly Entry[], mine: string | undefined, targets: string[] = []): Promise<void> {
  checkNotInUse(form.base);
  const root = findRoot(form.base, form.rootPartition === undefined ? {} : { rootPartition: form.rootPartition });
  preflight(root, entries);
  checkIdentity(root.where, await identityOf(new ImageTreeView(root)), mine, form.force);
  form.baseListing = await checkConflicts(root, entries);
  for (const t of targets) if (existsSync(t)) checkNotInUse(t);
  if (!form.baseMap) {
    const dir = cacheDir();
    form.baseMap = await baseBmap(form.base, dir === undefined ? undefined : join(dir, "bmap"));
  }
}

export async function stageDeviceImage(form: ImageForm, finalPath: string, entries: readonly Entry[], epoch: number): Promise<StagedImage> {
  // A previous image of this device may be under that name: refuse to replace one in use.
  if (existsSync(finalPath)) checkNotInUse(finalPath);
  return stageImage({
    base: form.base,
    image: finalPath.replace(/\.zst$/, ""),
    entries,
    epoch,
    ...(form.rootPartition === undefined ? {} : { rootPartition: form.rootPartition }),
    ...(form.baseMap ? { baseMap: form.baseMap } : {}),
    ...(form.baseListing ? { baseListing: form.baseListing as Listing } : {}),
    ...(form.compress ? { compress: form.compress } : {}),
  });
}
