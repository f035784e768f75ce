/**
 * `mkoverlay image --base BASE.img --board B --bastion eu`: one device, built and registered by
 * the same request and flow as `build` (commands/build.ts: same checks, `--attr`, `--hostname
 * serial=…` with its key for a re-flash, same reservation, lease, confirm and activation),
 * written as a disk image: DIR/H.img (0600, in a 0700 folder), the base with the overlay laid
 * into its root partition by debugfs, and DIR/H.img.bmap for bmaptool (device/outputs/image.ts).
 * Everything the base can be refused for is checked before a port is reserved.
 */
import { bmapOf } from "../../device/outputs/image.js";
import { out, stderrLog } from "../../util/log.js";
import { interruptible, type OutputOptions } from "../../device/station.js";
import { buildRequest, runBuild, type BuildOptions } from "./build.js";

export interface ImageOptions extends Omit<BuildOptions, "image" | "format" | "apply"> {
  base: string;
}

export function imageCommand(opts: ImageOptions): Promise<void> {
  return interruptible(async (stop) => {
    const { base, ...rest } = opts;
    const output: OutputOptions = { ...(rest.out !== undefined ? { out: rest.out } : {}), image: base, rootPartition: rest.rootPartition, compress: rest.compress, force: rest.force };
    const r = await runBuild(buildRequest(opts, output), { log: stderrLog(Boolean(opts.quiet) || Boolean(opts.json)), stop, imageFlag: "--base" });
    const { authorizedKeysText, ...json } = r;
    // `image` names what this command makes; `overlay` (the same path) keeps build's shape.
    out(opts.json ? JSON.stringify({ ...json, image: r.overlay, bmap: bmapOf(r.overlay) }) : authorizedKeysText);
    return `${r.hostname} was built and registered`;
  });
}
