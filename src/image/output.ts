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
 * - `stageImageChunk`, a batch's chunk: every image made through one scratch copy of the base
 *   (scratch.ts) and made durable with one syncfs; each device then succeeds or fails alone at
 *   commit, as a chunk of archives does.
 */
import { spawnSync } from "node:child_process";
import { closeSync, existsSync, fsyncSync, openSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import { UserError } from "../errors.js";
import { pathError, tempNameFor, writeFileAtomic } from "../fsutil.js";
import { cacheDir } from "../cache.js";
import type { Entry } from "../overlay/tree.js";
import type { ImageForm } from "../pipeline.js";
import { baseBmap, stageImage, type StagedImage } from "./build.js";
import { checkNotInUse } from "./busy.js";
import { checkIdentity, identityOf } from "./identity.js";
import { checkConflicts, preflight } from "./lay.js";
import { ImageTreeView } from "./reader.js";
import { findRoot } from "./root.js";
import { Scratch } from "./scratch.js";
import { track } from "./temps.js";

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
  await checkConflicts(root, entries);
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
    ...(form.compress ? { compress: form.compress } : {}),
  });
}

/** One device of a chunk: where its image goes, what it holds, its bastion lines. */
export interface ChunkItem {
  overlay: string;
  entries: readonly import("../overlay/tree.js").Entry[];
  authorizedKeysFile: string;
  text: string;
}

/** What batch.ts's chunk flow needs of its staged outputs (fsutil's StagedGroups has the same). */
export interface StagedChunk {
  commit(k: number): unknown;
  discard(k: number): void;
  discardRest(): void;
}

/** One syncfs for many files (coreutils `sync -f`), else one fsync each, as fsutil does for archives. */
function syncFiles(files: string[], dir: string): void {
  if (files.length === 0) return;
  if (process.env.MKOVERLAY_SYNCFS !== "0" && spawnSync("sync", ["-f", dir], { stdio: "ignore" }).status === 0) return;
  for (const f of files) {
    const fd = openSync(f, "r");
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }
}

export async function stageImageChunk(form: ImageForm, outDir: string, items: readonly ChunkItem[], epoch: number): Promise<StagedChunk> {
  if (!form.scratch) {
    const root = findRoot(form.base, form.rootPartition === undefined ? {} : { rootPartition: form.rootPartition });
    form.scratch = new Scratch(form.base, root, outDir);
  }
  const scratch = form.scratch as Scratch;
  const staged: (StagedImage | undefined)[] = [];
  const lines: (string | undefined)[] = [];
  const errors: unknown[] = [];
  const untrack: (() => void)[] = [];
  try {
    for (const [k, it] of items.entries()) {
      try {
        const s = await scratch.stage({ image: it.overlay.replace(/\.zst$/, ""), entries: it.entries, epoch, ...(form.baseMap ? { baseMap: form.baseMap } : {}), ...(form.compress ? { compress: form.compress } : {}) });
        staged[k] = s;
        const tmp = tempNameFor(it.authorizedKeysFile);
        untrack.push(track(tmp));
        writeFileAtomic(tmp, it.text, { mode: 0o644, durable: false });
        lines[k] = tmp;
      } catch (e) {
        errors[k] = e instanceof UserError ? e : pathError(e, it.overlay);
      }
    }
    if (!(await scratch.isClean())) {
      // An undo log missed a block: no image of this chunk can be trusted.
      const e = new UserError("the scratch copy of the base differs from the base after laying overlays (debugfs wrote a block its undo log does not name); no image of this chunk is kept", { exitCode: 1 });
      items.forEach((_, k) => {
        staged[k]?.discard();
        staged[k] = undefined;
        errors[k] ??= e;
      });
    }
    const files = staged.flatMap((s, k) => (s ? [...(s.files ?? []), lines[k]!] : []));
    syncFiles(files, outDir);
  } catch (e) {
    for (const s of staged) s?.discard();
    for (const l of lines) if (l) rmSync(l, { force: true });
    untrack.forEach((u) => u());
    throw pathError(e, outDir);
  }
  const fsyncDir = (): void => {
    try {
      const fd = openSync(outDir, "r");
      try {
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    } catch {
      // some file systems refuse fsync on a directory; the renames are still atomic
    }
  };
  const drop = (k: number): void => {
    staged[k]?.discard();
    staged[k] = undefined;
    if (lines[k]) rmSync(lines[k]!, { force: true });
    lines[k] = undefined;
  };
  return {
    commit(k) {
      if (errors[k] !== undefined) return errors[k];
      const s = staged[k];
      if (!s) return undefined;
      let imageIn = false;
      try {
        s.commit();
        imageIn = true;
        renameSync(lines[k]!, items[k]!.authorizedKeysFile);
        lines[k] = undefined;
        fsyncDir();
        return undefined;
      } catch (e) {
        // All of a device or nothing: an image without its lines file is taken back.
        if (imageIn) for (const p of [s.result.image, s.result.bmap]) rmSync(p, { force: true });
        return pathError(e, items[k]!.overlay);
      } finally {
        drop(k);
      }
    },
    discard: drop,
    discardRest() {
      items.forEach((_, k) => drop(k));
      untrack.forEach((u) => u());
    },
  };
}
