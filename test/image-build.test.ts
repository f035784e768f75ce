/**
 * Per-device images end to end (buildImage): a real overlay laid into a Raspberry Pi OS–shaped
 * disk, checked with e2fsck, read back, flashed by the real `bmaptool copy` with our bmap
 * (from the .img and from the .zst) and compared byte for byte; built twice and compared;
 * refusals leave nothing behind; run as `nobody` on files it owns; `write --device` on a real
 * loop device, refused while mounted.
 *
 * The loop-device and unprivileged parts need root to set up (losetup, setpriv): the capability
 * gate (helpers/capability.ts) skips them when not root, or fails them in CI.
 */
import { createHash } from "node:crypto";
import { chmodSync, chownSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { UserError } from "../src/util/errors.js";
import { parseBmap, renderBmap, scanBmap, updateBmap } from "../src/image/bmap.js";
import { checkNotInUse, parseMountinfo } from "../src/image/busy.js";
import { baseBmap, buildImage, writeIntoImage } from "../src/image/build.js";
import { writeDevice } from "../src/image/device.js";
import { layTree, verifyLaid } from "../src/image/lay.js";
import { blocksOfBytes, dataRanges } from "../src/image/extents.js";
import { ImageTreeView } from "../src/image/reader.js";
import { findRoot } from "../src/image/root.js";
import { readUndoSpans } from "../src/image/undo.js";
import type { Entry } from "../src/overlay/tree.js";
import { requires, root } from "./helpers/capability.js";
import { baseDisks, cliOverlay, fsck, diskTools, SBIN_PATH, sh, type Fixture } from "./helpers/disk.js";
import { REPO, removeDir, run, tempDir } from "./helpers/workspace.js";


const EPOCH = 1700000000;
const dir = tempDir("mko-imgbuild-");
let overlay: Entry[] = [];
let archive = "";
let mbr: Fixture;
let gpt: Fixture;

const sha = (b: Buffer): string => createHash("sha256").update(b).digest("hex");
const shaFile = (p: string): string => sha(readFileSync(p));

async function refusal(p: Promise<unknown>): Promise<UserError> {
  const e = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(UserError);
  return e as UserError;
}

/** bmaptool copy IMG(.zst) with BMAP to a fresh file, which must equal the image wherever it matters. */
function bmaptoolCopy(img: string, bmap: string, out: string): void {
  const r = run("bmaptool", ["copy", "--bmap", bmap, img, out]);
  expect(r.code, r.stderr).toBe(0);
}

beforeAll(async () => {
  if (!diskTools.ok) return; // the gate skips (laptop) or fails (CI) every block
  ({ mbr, gpt } = baseDisks(dir));
  ({ entries: overlay, archive } = await cliOverlay(dir, EPOCH));
}, 120_000);
afterAll(() => removeDir(dir));

requires(diskTools)("buildImage: one device's image", () => {
  it.each(["mbr", "gpt"] as const)("%s: 0600 image + bmap, e2fsck clean, bmaptool copy reproduces it, no temp files left", async (scheme) => {
    const fx = scheme === "mbr" ? mbr : gpt;
    const out = join(dir, `out-${scheme}`);
    mkdirSync(out, { mode: 0o700 });
    const baseSha = shaFile(fx.path);
    const res = await buildImage({ base: fx.path, image: join(out, "gw-0001.img"), entries: overlay, epoch: EPOCH, baseMap: await baseBmap(fx.path) });
    expect(readdirSync(out).sort()).toEqual(["gw-0001.img", "gw-0001.img.bmap"]);
    expect(statSync(res.image).mode & 0o777).toBe(0o600);
    expect(statSync(res.bmap).mode & 0o777).toBe(0o600);
    expect(shaFile(fx.path)).toBe(baseSha); // the base is never written
    const f = fsck({ path: res.image, rootOffset: fx.rootOffset });
    expect(f.code, f.out).toBe(0);
    const keyPath = "etc/ssh/mkoverlay/ssh_host_ed25519_key";
    const want = overlay.find((e) => e.path === keyPath) as { content: Buffer };
    const key = await new ImageTreeView(findRoot(res.image)).get(keyPath);
    expect(key?.content?.equals(want.content)).toBe(true);
    // Flash it with the reference tool onto a file: every byte the same as the image.
    const flashed = join(dir, `flashed-${scheme}.img`);
    bmaptoolCopy(res.image, res.bmap, flashed);
    expect(shaFile(flashed)).toBe(shaFile(res.image));
  });

  it("the bmap derived from the base's (undo log) equals a full scan of the image, range for range", async () => {
    const out = join(dir, "out-derive");
    mkdirSync(out, { mode: 0o700 });
    const base = await baseBmap(mbr.path);
    const res = await buildImage({ base: mbr.path, image: join(out, "a.img"), entries: overlay, epoch: EPOCH, baseMap: base });
    const derived = parseBmap(readFileSync(res.bmap, "utf8"))!;
    const full = await scanBmap(res.image);
    // Every range the image holds data in is covered, and every range's checksum is right.
    const mapped = new Set(derived.ranges.flatMap((r) => Array.from({ length: r.last - r.first + 1 }, (_, i) => r.first + i)));
    for (const r of full.ranges) for (let b = r.first; b <= r.last; b++) expect(mapped.has(b), `block ${b}`).toBe(true);
    const rehashed = updateBmap({ imageSize: derived.imageSize, ranges: [] }, res.image, derived.ranges.map((r) => [r.first, r.last]));
    expect(rehashed.ranges).toEqual(derived.ranges);
    // The undo log named the blocks debugfs wrote: a handful, all inside the root partition.
    expect(derived.ranges.length).toBeGreaterThan(0);
    expect(parseBmap(renderBmap(derived))).toEqual(derived);
  });

  it("the undo log lists exactly the blocks that differ from the base", async () => {
    const img = join(dir, "undo-check.img");
    copyFileSync(mbr.path, img);
    const undo = join(dir, "check.e2undo");
    const { layTree } = await import("../src/image/lay.js");
    await layTree(findRoot(img), overlay, EPOCH, { undo });
    const spans = readUndoSpans(undo)!;
    expect(spans.length).toBeGreaterThan(3);
    const logged = new Set(blocksOfBytes(spans).flatMap(([a, b]) => Array.from({ length: b - a + 1 }, (_, i) => a + i)));
    const a = readFileSync(mbr.path);
    const b = readFileSync(img);
    const differ: number[] = [];
    for (let blk = 0; blk * 4096 < a.length; blk++) if (!a.subarray(blk * 4096, (blk + 1) * 4096).equals(b.subarray(blk * 4096, (blk + 1) * 4096))) differ.push(blk);
    expect(differ.length).toBeGreaterThan(3);
    for (const blk of differ) expect(logged.has(blk), `block ${blk} changed but is not in the undo log`).toBe(true);
    for (const blk of logged) expect(blk * 4096).toBeGreaterThanOrEqual(mbr.rootOffset);
    // The superblock is among them (e2fsprogs misplaces its key at an offset; undo.ts adds it).
    expect(logged.has(mbr.rootOffset / 4096)).toBe(true);
  });

  it("same base, tree and epoch: byte-identical images and bmaps", async () => {
    const outs = ["r1", "r2"].map((n) => join(dir, `out-${n}`));
    const results = [];
    for (const o of outs) {
      mkdirSync(o, { mode: 0o700 });
      results.push(await buildImage({ base: gpt.path, image: join(o, "gw.img"), entries: overlay, epoch: EPOCH, baseMap: await baseBmap(gpt.path) }));
      await new Promise((r) => setTimeout(r, 1100));
    }
    expect(shaFile(results[0]!.image)).toBe(shaFile(results[1]!.image));
    expect(readFileSync(results[0]!.bmap, "utf8")).toBe(readFileSync(results[1]!.bmap, "utf8"));
  });

  it("--compress zstd: H.img.zst (0600) that bmaptool flashes with the bmap", async () => {
    const out = join(dir, "out-zst");
    mkdirSync(out, { mode: 0o700 });
    const res = await buildImage({ base: mbr.path, image: join(out, "gw.img"), entries: overlay, epoch: EPOCH, compress: "zstd" });
    expect(readdirSync(out).sort()).toEqual(["gw.img.bmap", "gw.img.zst"]);
    expect(statSync(res.image).mode & 0o777).toBe(0o600);
    const flashed = join(dir, "flashed-zst.img");
    bmaptoolCopy(res.image, res.bmap, flashed);
    const plain = join(dir, "plain.img");
    sh("zstd", ["-q", "-d", res.image, "-o", plain]);
    expect(shaFile(flashed)).toBe(shaFile(plain));
    expect(fsck({ path: plain, rootOffset: mbr.rootOffset }).code).toBe(0);
  });

  it("a base bmap is cached beside and reused; a stale cache is not used", async () => {
    const cache = join(dir, "cache");
    mkdirSync(cache);
    const a = await baseBmap(mbr.path, cache);
    expect(readdirSync(cache)).toHaveLength(1);
    expect(await baseBmap(mbr.path, cache)).toEqual(a);
    expect(a.ranges.reduce((n, r) => n + r.last - r.first + 1, 0)).toBeLessThan(mbr.rootOffset / 4096 + mbr.rootSize / 4096);
    const ranges = await dataRanges(mbr.path, statSync(mbr.path).size);
    expect(ranges.length).toBeGreaterThan(1); // sparse: holes between the data
  });
});

requires(diskTools)("the read-back after laying (verifyLaid, one debugfs run)", () => {
  it("passes what was laid, long link targets included, and names every entry that differs", async () => {
    const img = join(dir, "readback.img");
    copyFileSync(mbr.path, img);
    const longTarget = `/usr/lib/${"x".repeat(80)}`;
    const entries: Entry[] = [...overlay, { type: "symlink", path: "etc/zz-long-link", target: longTarget }, { type: "symlink", path: "etc/zz-short-link", target: "/dev/null" }];
    const root = findRoot(img);
    await layTree(root, entries, EPOCH);
    const view = new ImageTreeView(root);
    await verifyLaid(view, root, entries); // as laid: no problem
    const spec = `${img}?offset=${mbr.rootOffset}`;
    const other = join(dir, "other-content");
    writeFileSync(other, "not what was laid\n");
    const cmds = [
      "sif /etc/ssh/sshd_config.d/50-mkoverlay.conf mode 0100666",
      "sif /etc/hostname uid 1000",
      "rm /etc/hosts",
      `write ${other} /etc/hosts`,
      "rm /etc/zz-long-link",
      `symlink /etc/zz-long-link /usr/lib/${"y".repeat(80)}`,
      "rm /etc/zz-short-link",
      "symlink /etc/zz-short-link /dev/zero",
    ];
    sh("debugfs", ["-w", "-f", "-", spec], cmds.join("\n") + "\n");
    const e = await refusal(verifyLaid(view, root, entries));
    expect(e.exitCode).toBe(1);
    expect(e.message.split("\n").slice(1)).toEqual([
      "  /etc/hostname: owner 1000:0, expected 0:0",
      "  /etc/hosts: content differs",
      "  /etc/ssh/sshd_config.d/50-mkoverlay.conf: mode 666, expected 644",
      `  /etc/zz-long-link: points to /usr/lib/${"y".repeat(80)}, expected ${longTarget}`,
      "  /etc/zz-short-link: points to /dev/zero, expected /dev/null",
    ]);
    expect(e.message).toMatch(/read-back after laying the overlay found 5 problem\(s\):/);
  });
});

requires(diskTools)("refusals: one clear message, nothing written", () => {
  const cases: [string, () => { base: string; entries?: Entry[]; rootPartition?: number }, RegExp][] = [
    [
      "not a disk image",
      () => {
        const p = join(dir, "junk.img");
        writeFileSync(p, Buffer.alloc(4 << 20, 0x5a));
        return { base: p };
      },
      /junk\.img: not a disk image \(no MBR signature/,
    ],
    [
      "needs journal recovery",
      () => {
        const p = join(dir, "recover.img");
        copyFileSync(mbr.path, p);
        sh("debugfs", ["-w", "-R", "feature needs_recovery", `${p}?offset=${mbr.rootOffset}`]);
        return { base: p };
      },
      /recover\.img partition 2: the ext4 journal needs recovery/,
    ],
    ["not ext", () => ({ base: mbr.path, rootPartition: 1 }), /base-mbr\.img partition 1: not an ext2\/3\/4 file system/],
    [
      "no room",
      () => ({ base: mbr.path, entries: [...overlay, { type: "file", path: "var/big", mode: 0o644, content: Buffer.alloc(80 << 20) }, { type: "dir", path: "var", mode: 0o755 }].sort((x, y) => (x.path < y.path ? -1 : 1)) as Entry[] }),
      /partition 2: not enough room: \d+ free blocks of 4096 bytes, the overlay needs about \d+/,
    ],
  ];
  it.each(cases)("%s", async (_name, setup, message) => {
    const c = setup();
    const out = join(dir, `refused-${_name.replace(/\W+/g, "-")}`);
    mkdirSync(out, { mode: 0o700 });
    const before = shaFile(c.base);
    const e = await refusal(buildImage({ base: c.base, image: join(out, "gw.img"), entries: c.entries ?? overlay, epoch: EPOCH, ...(c.rootPartition ? { rootPartition: c.rootPartition } : {}) }));
    expect(e.message).toMatch(message);
    expect(e.message.split("\n")).toHaveLength(1);
    expect(e.hint ?? "").not.toBe("");
    expect(readdirSync(out)).toEqual([]);
    expect(shaFile(c.base)).toBe(before);
    // In place (`write --image`): refused the same way, the image untouched.
    const e2 = await refusal(writeIntoImage({ image: c.base, entries: c.entries ?? overlay, epoch: EPOCH, ...(c.rootPartition ? { rootPartition: c.rootPartition } : {}) }));
    expect(e2.message).toMatch(message);
    expect(shaFile(c.base)).toBe(before);
  });

  it("a debugfs failure half-way through `write --image` is rolled back byte for byte; no temp files left", async () => {
    const img = join(dir, "rollback.img");
    copyFileSync(mbr.path, img);
    const before = shaFile(img);
    const tmp = join(dir, "tmpdir-rollback");
    mkdirSync(tmp);
    const saved = process.env.TMPDIR;
    process.env.TMPDIR = tmp;
    try {
      // Passes every check before writing, then fails inside debugfs (a symlink target longer
      // than a block), after the files before it were written.
      const bad: Entry[] = [...overlay, { type: "symlink", path: "etc/zz-long-link", target: "a".repeat(5000) }];
      const e = await refusal(writeIntoImage({ image: img, entries: bad, epoch: EPOCH }));
      expect(e.message).toMatch(/partition 2: debugfs failed while laying the overlay: .*symlink.* \(changes rolled back with e2undo\)$/);
      expect(e.exitCode).toBe(1);
    } finally {
      if (saved === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = saved;
    }
    expect(shaFile(img)).toBe(before);
    expect(readdirSync(tmp)).toEqual([]); // the private dir (key copies, undo log) is gone
  });

  it("reads /proc/self/mountinfo device numbers and mount points (blanks escaped)", () => {
    const m = parseMountinfo("36 35 7:0 / /mnt/my\\040card rw,relatime shared:1 - ext4 /dev/loop0p2 rw\n");
    expect(m).toEqual([{ dev: "7:0", mountPoint: "/mnt/my card" }]);
  });
});

requires(diskTools, root)("loop devices (root only for the setup) and an unprivileged user", () => {
  it("write --image refuses an image attached to a loop device and one mounted through it", () => {
    const img = join(dir, "attached.img");
    copyFileSync(mbr.path, img);
    const loop = sh("losetup", ["--show", "-f", img]).trim();
    try {
      expect(() => checkNotInUse(img)).toThrow(new RegExp(`attached.img: in use: attached to ${loop}`));
    } finally {
      run("losetup", ["-d", loop]);
    }
    // losetup -d only marks the device for detaching while something (udev's probe, another
    // test's tools) still has it open: wait for the kernel to let go.
    untilFree(img);
    expect(() => checkNotInUse(img)).not.toThrow();
    // Mounted the way a user would without partition devices: a loop at the root's offset.
    const mnt = join(dir, "mnt");
    mkdirSync(mnt);
    sh("mount", ["-o", `ro,loop,offset=${mbr.rootOffset}`, img, mnt]);
    try {
      expect(() => checkNotInUse(img)).toThrow(/attached\.img: in use: mounted at .*\/mnt \(through \/dev\/loop\d+\)/);
    } finally {
      run("umount", [mnt]);
    }
    untilFree(img);
    expect(() => checkNotInUse(img)).not.toThrow();
  });

  it("write --device --base on a loop device: base data + overlay, e2fsck clean; refused while mounted", async () => {
    const backing = join(dir, "card.img");
    sh("truncate", ["-s", String(statSync(mbr.path).size + (8 << 20)), backing]);
    const loop = sh("losetup", ["--show", "-f", backing]).trim();
    try {
      const res = await writeDevice({ device: loop, base: mbr.path, entries: overlay, epoch: EPOCH });
      expect(res.baseBytes).toBeGreaterThan(0);
      expect(res.baseBytes).toBeLessThan(statSync(mbr.path).size);
      const f = run("e2fsck", ["-fn", `${loop}?offset=${mbr.rootOffset}`], { env: { PATH: SBIN_PATH } });
      expect(f.code, f.stdout).toBe(0);
      const view = new ImageTreeView(findRoot(loop));
      const got = await view.getMany(overlay.map((e) => e.path));
      for (const e of overlay) if (e.type === "file") expect(got.get(e.path)?.content?.equals(e.content), e.path).toBe(true);
      // The boot partition came from the base, byte for byte.
      const dev = readFileSync(backing);
      expect(sha(dev.subarray(mbr.bootOffset, mbr.bootOffset + mbr.bootSize))).toBe(sha(readFileSync(mbr.path).subarray(mbr.bootOffset, mbr.bootOffset + mbr.bootSize)));
      // Again without a base (a card already flashed): the overlay is laid over it.
      await writeDevice({ device: loop, entries: overlay, epoch: EPOCH + 5 });
      // Its root partition mounted (through a loop at its offset: this container has no
      // partition devices): refused, the card untouched.
      const mnt = join(dir, "mnt2");
      mkdirSync(mnt);
      sh("mount", ["-o", `ro,loop,offset=${mbr.rootOffset}`, loop, mnt]);
      try {
        const before = shaFile(backing);
        const e = await refusal(writeDevice({ device: loop, base: mbr.path, entries: overlay, epoch: EPOCH }));
        expect(e.message).toMatch(/in use: mounted at .*\/mnt2 \(through \/dev\/loop\d+\)/);
        expect(shaFile(backing)).toBe(before);
      } finally {
        run("umount", [mnt]);
      }
    } finally {
      run("losetup", ["-d", loop]);
    }
  });

  it("runs as an unprivileged user (nobody) on files it owns", async () => {
    // A small script bundled from the library, run with setpriv as nobody:nogroup.
    const work = join("/tmp", `mko-nobody-${process.pid}`);
    mkdirSync(work, { mode: 0o700 });
    try {
      const entry = join(work, "run.ts");
      writeFileSync(
        entry,
        `import { buildImage, baseBmap } from ${JSON.stringify(join(REPO, "src/image/build.ts"))};
import { entriesOf } from ${JSON.stringify(join(REPO, "src/image/lay.ts"))};
import { openOverlay } from ${JSON.stringify(join(REPO, "src/image/open.ts"))};
const [base, archive, out] = process.argv.slice(2);
const entries = await entriesOf(await openOverlay(archive), archive);
const r = await buildImage({ base, image: out, entries, epoch: ${EPOCH}, baseMap: await baseBmap(base) });
console.log(JSON.stringify({ uid: process.getuid(), image: r.image }));
`,
      );
      const { build } = await import("esbuild");
      await build({
        entryPoints: [entry],
        bundle: true,
        platform: "node",
        format: "esm",
        target: "node20",
        outfile: join(work, "run.mjs"),
        logLevel: "silent",
        // CommonJS dependencies (tar-stream) call require(): give the ESM bundle one.
        banner: { js: 'import { createRequire } from "node:module"; const require = createRequire(import.meta.url);' },
      });
      copyFileSync(mbr.path, join(work, "base.img"));
      copyFileSync(archive, join(work, "overlay.tar.gz"));
      mkdirSync(join(work, "out"), { mode: 0o700 });
      for (const f of ["", "base.img", "overlay.tar.gz", "run.mjs", "out"]) chownSync(join(work, f), 65534, 65534);
      chmodSync(join(work, "run.mjs"), 0o644);
      const r = run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", process.execPath, join(work, "run.mjs"), join(work, "base.img"), join(work, "overlay.tar.gz"), join(work, "out/gw.img")], {
        env: { TMPDIR: work, HOME: work, PATH: "/usr/local/bin:/usr/bin:/bin" },
      });
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toEqual({ uid: 65534, image: join(work, "out/gw.img") });
      const st = statSync(join(work, "out/gw.img"));
      expect([st.uid, st.mode & 0o777]).toEqual([65534, 0o600]);
      expect(fsck({ path: join(work, "out/gw.img"), rootOffset: mbr.rootOffset }).code).toBe(0);
      // Same bytes as root's build: nothing depends on who ran it.
      const mine = join(dir, "out-root-ref");
      mkdirSync(mine, { mode: 0o700 });
      const ref = await buildImage({ base: mbr.path, image: join(mine, "gw.img"), entries: overlay, epoch: EPOCH });
      expect(shaFile(join(work, "out/gw.img"))).toBe(shaFile(ref.image));
      expect(existsSync(join(work, "out/gw.img.bmap"))).toBe(true);
      // No private temp dirs left behind in its TMPDIR.
      expect(readdirSync(work).filter((n) => n.startsWith("mkoverlay-"))).toEqual([]);
    } finally {
      removeDir(work);
    }
  });
});

/** Waits (up to 10 s) until no loop device holds `img` any more: a detach is done when its last user closes it. */
function untilFree(img: string): void {
  for (let i = 0; i < 100; i++) {
    try {
      checkNotInUse(img);
      return;
    } catch {
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100);
    }
  }
}
