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
import { constants, copyFileSync, existsSync, rmSync, statfsSync, statSync } from "node:fs";
import { UserError } from "../util/errors.js";
import { tempNameFor } from "../util/fsutil.js";
import { join } from "node:path";
import { cacheDir } from "../util/cache.js";
import type { Entry } from "../overlay/tree.js";
import type { Bmap } from "./bmap.js";
import { baseBmap, stageImage, type StagedImage } from "./build.js";
import { checkNotInUse } from "./busy.js";
import { checkIdentity, identityOf } from "./identity.js";
import { checkConflicts, preflight, type Listing } from "./lay.js";
import { ImageTreeView } from "./reader.js";
import { findRoot } from "./root.js";

/**
 * A per-device disk image: the base with the overlay laid into its root partition
 * (`mkoverlay image`, `batch --image`). `baseMap` is the base's bmap, computed once per run
 * (and cached per base) before anything is reserved.
 */
export interface ImageForm {
  kind: "image";
  base: string;
  rootPartition: number | undefined;
  compress: "zstd" | undefined;
  /** --force: lay the overlay even over another device's mkoverlay identity. */
  force: boolean;
  baseMap?: Bmap;
  /** The base's listing of the overlay's directories (image/lay.ts), made by the preflight. */
  baseListing?: Map<string, Map<string, { mode: number }>>;
}

/**
 * `mine`: the device's public key line (a single build), or undefined when every device brings
 * a new key (a batch: any identity in the base is another device's). `targets`: final image
 * paths already known (an explicit --hostname), which must not be in use either.
 */
export async function preflightImage(form: ImageForm, entries: readonly Entry[], mine: string | undefined, targets: string[] = [], outDir?: string): Promise<void> {
  checkNotInUse(form.base);
  if (outDir !== undefined) checkOutputRoom(form.base, outDir);
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

/** Can `dir` hold a reflink clone of `base`? (A clone needs no room for the base's data.) */
function reflinks(base: string, dir: string): boolean {
  const probe = tempNameFor(join(dir, "reflink-probe"));
  try {
    copyFileSync(base, probe, constants.COPYFILE_FICLONE_FORCE | constants.COPYFILE_EXCL);
    return true;
  } catch {
    return false;
  } finally {
    rmSync(probe, { force: true });
  }
}

const GB = (n: number): string => `${(n / 1e9).toFixed(2)} GB`;

/**
 * The output folder must hold one image: the base's allocated bytes (a sparse copy), unless it
 * can hold a reflink clone. Checked for the next image only; in a batch, a device that finds
 * the disk full fails alone and gives its port back.
 */
function checkOutputRoom(base: string, outDir: string): void {
  const need = statSync(base).blocks * 512 + (16 << 20);
  const fs = statfsSync(outDir);
  const free = fs.bavail * fs.bsize;
  if (free >= need || reflinks(base, outDir)) return;
  throw new UserError(`--out ${outDir}: ${GB(free)} free, but an image of ${base} needs about ${GB(need)}`, { hint: "free space there, or write the images elsewhere (--out); a file system with reflinks (XFS, btrfs) needs almost none" });
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
