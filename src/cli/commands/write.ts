/**
 * `mkoverlay write OVERLAY (--image IMG | --device /dev/sdX [--base BASE.img])`: lays an overlay
 * that already exists (an archive or folder mkoverlay wrote, perhaps on another station) into a
 * disk image in place, or into a card already flashed with the base; with `--base`, the base's
 * used blocks are written to the card first, in the same step. No config or registry is
 * needed: a re-flash can happen anywhere the archive is.
 *
 * Refused with nothing written (exit 2): a target in use (mounted, attached, opened
 * exclusively), a root file system debugfs must not write or without room, and a root that
 * carries another device's identity (unless --force). A failed write or read-back exits 1.
 */
import { closeSync, existsSync, openSync, readSync } from "node:fs";
import { UserError } from "../../util/errors.js";
import { out, stderrLog } from "../../util/log.js";
import { archiveEpoch } from "../../overlay/archive.js";
import { HOST_KEY_PUB } from "../../overlay/paths.js";
import { withOverlay } from "../../image/open.js";
import { entriesOf } from "../../image/lay.js";
import { checkIdentity, identityOf } from "../../image/identity.js";
import { ImageTreeView } from "../../image/reader.js";
import type { RootFs } from "../../image/root.js";
import { rootPartitionFlag } from "../../device/station.js";

export interface WriteOptions {
  image?: string;
  device?: string;
  base?: string;
  rootPartition?: string;
  force?: boolean;
  json?: boolean;
  quiet?: boolean;
}

function refuseCompressed(path: string, flag: string): void {
  if (!existsSync(path)) return;
  const b = Buffer.alloc(4);
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return; // the library names the problem (permission, not a file…)
  }
  try {
    readSync(fd, b, 0, 4, 0);
  } finally {
    closeSync(fd);
  }
  if (b.readUInt32LE(0) === 0xfd2fb528) throw new UserError(`${flag} ${path}: a zstd-compressed image cannot be written in place`, { hint: "decompress it first: zstd -d" });
}

export async function writeCommand(overlay: string, opts: WriteOptions): Promise<void> {
  const log = stderrLog(Boolean(opts.quiet) || Boolean(opts.json));
  if ((opts.image === undefined) === (opts.device === undefined)) throw new UserError("write needs exactly one of --image IMG or --device /dev/sdX");
  if (opts.base !== undefined && opts.device === undefined) throw new UserError("--base goes with --device (an image file already holds its base)", { hint: "for an image, copy the base and write into the copy: or use 'mkoverlay image'" });
  const rootPartition = rootPartitionFlag(opts.rootPartition);
  const rp = rootPartition === undefined ? {} : { rootPartition };
  const entries = await withOverlay(overlay, {}, (view) => entriesOf(view, overlay));
  const pub = entries.find((e) => e.path === HOST_KEY_PUB.slice(1));
  const mine = pub?.type === "file" ? pub.content.toString("utf8") : undefined;
  if (!mine) throw new UserError(`${overlay}: not an mkoverlay overlay (${HOST_KEY_PUB} is missing)`, { hint: "give the .overlay.tar.gz or .overlay folder that mkoverlay wrote" });
  const check = async (root: RootFs): Promise<void> => checkIdentity(root.where, await identityOf(new ImageTreeView(root)), mine, Boolean(opts.force));
  const epoch = archiveEpoch();
  const t0 = performance.now();
  if (opts.image !== undefined) {
    refuseCompressed(opts.image, "--image");
    const { writeIntoImage } = await import("../../image/build.js");
    // The image's bmap is updated, or made when it has none (bmaptool copy then writes only the used blocks).
    const hadBmap = existsSync(`${opts.image}.bmap`);
    const r = await writeIntoImage({ image: opts.image, entries, epoch, ...rp, check });
    const ms = Math.round(performance.now() - t0);
    log.info(`laid ${entries.length} entries into ${opts.image} (${r.created} created, ${r.replaced} replaced, ${r.kept} directories kept; ${ms} ms)${r.bmap ? `; ${hadBmap ? "refreshed" : "made"} ${r.bmap}` : ""}`);
    if (opts.json) out(JSON.stringify({ overlay, image: opts.image, created: r.created, replaced: r.replaced, kept: r.kept, bmap: r.bmap ?? null }));
    return;
  }
  if (opts.base !== undefined) refuseCompressed(opts.base, "--base");
  const { resolveDevice, writeDevice } = await import("../../image/device.js");
  // A symbolic link (/dev/disk/by-id/…) is followed; say which device that is before writing it.
  const real = resolveDevice(opts.device!);
  if (real !== opts.device) log.info(`--device ${opts.device}: a symbolic link to ${real}; writing ${real}`);
  const r = await writeDevice({ device: opts.device!, entries, epoch, ...rp, ...(opts.base === undefined ? {} : { base: opts.base }), check });
  const ms = Math.round(performance.now() - t0);
  const shown = r.device === opts.device ? r.device : `${opts.device} (${r.device})`;
  log.info(`${opts.base ? `wrote ${r.baseBytes} bytes of ${opts.base}, then ` : ""}laid ${entries.length} entries into ${shown} (${ms} ms)`);
  if (opts.json) out(JSON.stringify({ overlay, device: opts.device, realDevice: r.device, baseBytes: r.baseBytes, created: r.created, replaced: r.replaced, kept: r.kept }));
}
