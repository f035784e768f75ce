/**
 * Issue 19, items 5, 14 and 15: what the image code trusts.
 *
 * 5: a base whose partition table or file system claims more than it has (an ext4 of 32 MiB in
 *    an 8 MiB partition, a partition past the end of the file, overlapping partitions, a GPT
 *    partition over its own table, a hybrid MBR that disagrees with the GPT) is refused by
 *    `image`, `write --image` (and `write --device`, same path) with nothing reserved and
 *    nothing written; and whatever debugfs writes outside the partition is found in its undo log,
 *    rolled back and refused.
 * 14: `verify` of a `.zst` is bounded: decompressed bytes stop at the room left in $TMPDIR.
 * 15: `write --device` on a partition, through a symlink, on a card with a partition mounted,
 *    on the station's own disk (real loop devices, root only for the setup).
 * Bases are made by the real tools (sfdisk, mke2fs -d, mkfs.vfat), without root.
 */
import Database from "better-sqlite3";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, readSync, statfsSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import { afterAll, beforeAll, expect, it } from "vitest";
import { layTree } from "../src/image/lay.js";
import { findRoot } from "../src/image/root.js";
import { requires, root } from "./helpers/capability.js";
import { fsck, diskTools, makeDisk, makeRootTree, SBIN_PATH, sh, type Fixture } from "./helpers/disk.js";
import { CLI, readPub, removeDir, type Run, run, runCli, sshKeygen, tempDir, TEST_CACHE, writeFleet } from "./helpers/workspace.js";
import type { Entry } from "../src/overlay/tree.js";

const EPOCH = "1700000000";
const MiB = 1 << 20;

const dir = tempDir("mko-imgtrust-");
let rootTree = "";
let mbr: Fixture;
let gpt: Fixture;
let bastionPub = "";
/** Loop devices and mounts the root-only tests made: undone before the folder goes, even on failure. */
const loops: string[] = [];
const mounts: string[] = [];
afterAll(() => {
  for (const m of mounts.reverse()) run("umount", [m]);
  for (const l of loops) run("losetup", ["-d", l], { env: { PATH: SBIN_PATH } });
  removeDir(dir);
});

const sha = (p: string): string => createHash("sha256").update(readFileSync(p)).digest("hex");

interface Ws {
  ws: string;
  cli: (args: string[], env?: Record<string, string>) => Run;
  reserved: () => number;
}

function workspace(name: string): Ws {
  const ws = join(dir, name);
  mkdirSync(ws);
  writeFleet(ws, { eu: { hostKeys: [bastionPub] } });
  return {
    ws,
    cli: (args, env = {}) => runCli(args, { cwd: ws, env: { SOURCE_DATE_EPOCH: EPOCH, ...env } }),
    reserved: () => {
      if (!existsSync(join(ws, "registry.db"))) return 0;
      const db = new Database(join(ws, "registry.db"), { readonly: true });
      try {
        return (db.prepare("SELECT count(*) AS n FROM devices").get() as { n: number }).n;
      } finally {
        db.close();
      }
    },
  };
}

function patch(file: string, at: number, bytes: Buffer): void {
  const fd = openSync(file, "r+");
  try {
    writeSync(fd, bytes, 0, bytes.length, at);
  } finally {
    closeSync(fd);
  }
}

function readBytes(file: string, at: number, len: number): Buffer {
  const fd = openSync(file, "r");
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, at);
    return b;
  } finally {
    closeSync(fd);
  }
}

/** An MBR entry (slot 1–4): type, first sector, sectors. */
function mbrEntry(file: string, slot: number, type: number, lba: number, sectors: number): void {
  const e = Buffer.alloc(16);
  e[4] = type;
  e.writeUInt32LE(lba, 8);
  e.writeUInt32LE(sectors, 12);
  patch(file, 446 + (slot - 1) * 16, e);
}

/**
 * The issue's case: p1 (8 MiB, "rootfs") holds an ext4 made 32 MiB long, so it runs over p2
 * (a data partition, filled with a marker) — both made by the real tools.
 */
function oversizedRoot(path: string): { p2: number } {
  sh("truncate", ["-s", String(64 * MiB), path]);
  sh("sfdisk", ["-q", "--no-reread", "--no-tell-kernel", path], `label: dos\nlabel-id: 0xdeadbeef\nstart=${(4 * MiB) / 512}, size=${(8 * MiB) / 512}, type=83\nstart=${(12 * MiB) / 512}, size=${(48 * MiB) / 512}, type=83\n`);
  sh("mke2fs", ["-q", "-F", "-t", "ext4", "-L", "rootfs", "-O", "^64bit,^huge_file", "-b", "4096", "-E", `offset=${4 * MiB}`, "-d", rootTree, path, "32M"]);
  return { p2: 12 * MiB };
}

/**
 * Rewrites a GPT entry's first LBA (and, if given, the header's first usable LBA), with both CRCs
 * made right again (primary only).
 */
function gptMoveFirst(file: string, entryIndex: number, firstLba: number, firstUsable?: number): void {
  const hdr = readBytes(file, 512, 512);
  if (firstUsable !== undefined) hdr.writeBigUInt64LE(BigInt(firstUsable), 40);
  const entriesLba = Number(hdr.readBigUInt64LE(72));
  const n = hdr.readUInt32LE(80);
  const size = hdr.readUInt32LE(84);
  const arr = readBytes(file, entriesLba * 512, n * size);
  arr.writeBigUInt64LE(BigInt(firstLba), entryIndex * size + 32);
  patch(file, entriesLba * 512, arr);
  hdr.writeUInt32LE(crc32(arr), 88);
  const hsize = hdr.readUInt32LE(12);
  hdr.writeUInt32LE(0, 16);
  hdr.writeUInt32LE(crc32(hdr.subarray(0, hsize)), 16);
  patch(file, 512, hdr);
}

beforeAll(() => {
  if (!diskTools.ok) return; // the gate skips (laptop) or fails (CI) every block
  rootTree = join(dir, "rootfs");
  makeRootTree(rootTree);
  mbr = makeDisk(join(dir, "base-mbr.img"), rootTree);
  gpt = makeDisk(join(dir, "base-gpt.img"), rootTree, { scheme: "gpt" });
  bastionPub = readPub(sshKeygen(dir, "bastion"));
}, 120_000);

requires(diskTools)("item 5: nothing is written outside the root partition", () => {
  it("image and write --image refuse an ext4 of 32 MiB in an 8 MiB partition: one message, nothing reserved, nothing written", () => {
    const w = workspace("oversized");
    const base = join(w.ws, "base.img");
    const { p2 } = oversizedRoot(base);
    // The next partition holds data of its own (past the file system's real end in p1).
    patch(base, p2 + 20 * MiB, Buffer.alloc(MiB, 0x5a));
    const before = sha(base);
    const msg = /base\.img partition 1: the ext file system claims 33554432 bytes \(8192 blocks of 4096\), more than the 8388608 bytes of partition 1$/m;
    const out = join(w.ws, "out");
    const r = w.cli(["image", "--base", base, "--board", "rpi4", "--bastion", "eu", "--out", out]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(msg);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(w.reserved()).toBe(0);
    expect(existsSync(out) ? run("find", [out, "-type", "f"]).stdout : "").toBe("");
    // write --image: the same message, the image untouched.
    const a = JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "ov"), "--json"]).stdout) as { overlay: string };
    const wr = w.cli(["write", a.overlay, "--image", base]);
    expect(wr.code, wr.stderr).toBe(2);
    expect(wr.stderr).toMatch(msg);
    expect(sha(base)).toBe(before);
  }, 60_000);

  it("refuses tables that claim more than the disk has: a partition past the end, over the MBR, overlapping partitions, a GPT partition over its own table or outside its usable area, a hybrid MBR that disagrees with the GPT", () => {
    const w = workspace("tables");
    const a = JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "ov"), "--json"]).stdout) as { overlay: string };
    const cases: [string, (img: string) => void, RegExp][] = [
      [
        "past-end",
        (img) => mbrEntry(img, 2, 0x83, mbr.rootOffset / 512, (mbr.rootSize + 64 * MiB) / 512),
        /past-end\.img: partition 2 ends at byte \d+, beyond the end of the \d+-byte MBR disk/,
      ],
      // p1 (FAT) grown over the start of p2: writing the root writes the boot partition too.
      // p1 moved to sector 0: writing it writes the table.
      ["mbr-at-zero", (img) => mbrEntry(img, 1, 0x0c, 0, (mbr.bootOffset + mbr.bootSize) / 512), /mbr-at-zero\.img: MBR partition 1 starts at sector 0, on the partition table itself/],
      ["overlap", (img) => mbrEntry(img, 1, 0x0c, mbr.bootOffset / 512, (mbr.bootSize + 8 * MiB) / 512), /overlap\.img: partitions 1 \(bytes \d+–\d+\) and 2 \(from byte \d+\) overlap/],
      [
        "gpt-over-table",
        (img) => gptMoveFirst(img, 0, 1),
        /gpt-over-table\.img: GPT: partition 1 \(LBA 1–\d+\) lies over the partition table \(LBA 0–1 and 2–33\)/,
      ],
      // The same with the header's usable area widened to match: still over the table.
      ["gpt-usable-lies", (img) => gptMoveFirst(img, 0, 3, 1), /gpt-usable-lies\.img: GPT: partition 1 \(LBA 3–\d+\) lies over the partition table \(LBA 0–1 and 2–33\)/],
      // Inside the table's reach but before the usable area sfdisk set (LBA 2048).
      ["gpt-before-usable", (img) => gptMoveFirst(img, 0, 40), /gpt-before-usable\.img: GPT: partition 1 \(LBA 40–\d+\) lies outside the usable area \(LBA 2048–\d+\)/],
      // A hybrid MBR whose second entry is a Linux partition the GPT does not have.
      ["hybrid", (img) => mbrEntry(img, 2, 0x83, 2048, 4096), /hybrid\.img: the MBR's partition 2 \(bytes 1048576–3145728\) is not one of the GPT's partitions: the MBR and the GPT disagree/],
    ];
    for (const [name, damage, msg] of cases) {
      const img = join(w.ws, `${name}.img`);
      copyFileSync(name.startsWith("gpt") || name === "hybrid" ? gpt.path : mbr.path, img);
      chmodSync(img, 0o600);
      damage(img);
      const before = sha(img);
      const out = join(w.ws, `out-${name}`);
      const r = w.cli(["image", "--base", img, "--board", "rpi4", "--bastion", "eu", "--out", out]);
      expect([name, r.code], r.stderr).toEqual([name, 2]);
      expect(r.stderr, name).toMatch(msg);
      expect(w.reserved(), name).toBe(1); // the device of the overlay `a`, no more
      expect(existsSync(out) ? run("find", [out, "-type", "f"]).stdout : "", name).toBe("");
      const wr = w.cli(["write", a.overlay, "--image", img]);
      expect([name, wr.code], wr.stderr).toEqual([name, 2]);
      expect(wr.stderr, name).toMatch(msg);
      expect(sha(img), name).toBe(before);
    }
  }, 120_000);

  it("a write by debugfs outside the partition is found in its undo log, rolled back and refused (exit 1)", async () => {
    // An honest 32 MiB root; the writer is told its extent is only the first 6 MiB, as if the
    // superblock had lied: a 3 MiB file must land past that, and must be rolled back.
    const img = join(dir, "extent.img");
    const fx = makeDisk(img, rootTree, { rootMiB: 32 });
    // Unpartitioned room after p2 (a card larger than its image): twice the root's offset is in the file.
    sh("truncate", ["-s", String(128 * MiB), img]);
    const root = findRoot(img);
    // First an honest write: e2fsprogs 1.47.0 logs the superblock at twice the offset, here
    // past the partition's end: that key alone is not an outside write.
    expect(root.offset * 2 + 1024).toBeGreaterThan(root.offset + root.size);
    await layTree(root, [{ type: "dir", path: "etc", mode: 0o755 }, { type: "file", path: "etc/motd", mode: 0o644, content: Buffer.from("hello\n") }], Number(EPOCH));
    expect(fsck(fx).code).toBe(0);
    const narrowed = { ...root, size: 6 * MiB };
    const before = sha(img);
    const big: Entry[] = [{ type: "dir", path: "etc", mode: 0o755 }, { type: "file", path: "etc/big", mode: 0o600, content: Buffer.alloc(3 * MiB, 0x42) }];
    const e = await layTree(narrowed, big, Number(EPOCH)).then(
      () => undefined,
      (x: unknown) => x as Error & { exitCode?: number },
    );
    expect(e?.message).toMatch(/extent\.img partition 2: debugfs wrote outside the partition \(bytes \d+–\d+; the partition is bytes \d+–\d+\); changes rolled back with e2undo/);
    expect(e?.exitCode).toBe(1);
    expect(sha(img)).toBe(before);
    expect(fsck(fx).code).toBe(0);
  }, 60_000);
});

/** A loop device over `file` with its partitions (partx: this container's udev makes no nodes by itself). */
function attach(file: string): string {
  const loop = sh("losetup", ["--show", "-f", "-P", file]).trim();
  loops.push(loop);
  run("partx", ["-a", loop], { env: { PATH: SBIN_PATH } });
  for (let i = 0; i < 50 && !existsSync(`${loop}p2`); i++) sh("sleep", ["0.1"]);
  return loop;
}
requires(diskTools, root)("item 15: write --device on real loop devices (root for the setup)", () => {
  it("refuses a partition (naming the whole disk), follows a symbolic link and says which device it is, refuses a card with a partition mounted; the card untouched", () => {
    const w = workspace("device");
    const a = JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "ov"), "--json"]).stdout) as { overlay: string };
    const card = join(w.ws, "card.img");
    copyFileSync(mbr.path, card);
    const loop = attach(card);
    const name = loop.replace("/dev/", "");
    expect(existsSync(`${loop}p2`), "partx made the partition devices").toBe(true);
    const before = sha(card);
    // A partition: refused, the whole disk named.
    const p = w.cli(["write", a.overlay, "--device", `${loop}p2`, "--base", mbr.path]);
    expect(p.code, p.stderr).toBe(2);
    expect(p.stderr).toMatch(new RegExp(`^mkoverlay: error: --device ${loop}p2: a partition, not a whole disk\nmkoverlay: hint: give the whole disk: --device ${loop}$`, "m"));
    // A symbolic link to that partition: the same, saying what it points to.
    const linkP = join(w.ws, "by-id-part");
    sh("ln", ["-s", `${loop}p2`, linkP]);
    const lp = w.cli(["write", a.overlay, "--device", linkP]);
    expect(lp.code, lp.stderr).toBe(2);
    expect(lp.stderr).toMatch(new RegExp(`--device ${linkP} \\(a symbolic link to ${loop}p2\\): a partition, not a whole disk`));
    expect(sha(card)).toBe(before);
    // A partition mounted: the card is refused, with or without --base.
    const mnt = join(w.ws, "mnt");
    mkdirSync(mnt);
    sh("mount", ["-o", "ro", `${loop}p2`, mnt]);
    mounts.push(mnt);
    for (const extra of [[], ["--base", mbr.path]]) {
      const m = w.cli(["write", a.overlay, "--device", loop, ...extra]);
      expect(m.code, m.stderr).toBe(2);
      expect(m.stderr).toMatch(new RegExp(`${loop}: in use: mounted at ${mnt} \\(through /dev/${name}p2\\)`));
    }
    run("umount", [mnt]);
    mounts.pop();
    expect(sha(card)).toBe(before);
    // A symbolic link to the whole disk: followed, named, written.
    const link = join(w.ws, "by-id-card");
    sh("ln", ["-s", loop, link]);
    const ok = w.cli(["write", a.overlay, "--device", link]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stderr).toMatch(new RegExp(`^mkoverlay: --device ${link}: a symbolic link to ${loop}; writing ${loop}$`, "m"));
    expect(ok.stderr).toMatch(new RegExp(`laid \\d+ entries into ${link} \\(${loop}\\)`));
    const js = w.cli(["write", a.overlay, "--device", link, "--json"]);
    expect(js.code, js.stderr).toBe(0);
    expect(JSON.parse(js.stdout)).toMatchObject({ device: link, realDevice: loop });
    expect(run("e2fsck", ["-fn", `${loop}p2`], { env: { PATH: SBIN_PATH } }).code).toBe(0);
  }, 120_000);

  it("item 5 through write --device: an oversized root is refused on the base and on the card, the card untouched", () => {
    const w = workspace("device-oversized");
    const a = JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "ov"), "--json"]).stdout) as { overlay: string };
    const bad = join(w.ws, "bad.img");
    oversizedRoot(bad);
    const card = join(w.ws, "card.img");
    copyFileSync(bad, card);
    const loop = attach(card);
    const before = sha(card);
    const withBase = w.cli(["write", a.overlay, "--device", loop, "--base", bad]);
    expect(withBase.code, withBase.stderr).toBe(2);
    expect(withBase.stderr).toMatch(/bad\.img partition 1: the ext file system claims 33554432 bytes \(8192 blocks of 4096\), more than the 8388608 bytes of partition 1$/m);
    const onCard = w.cli(["write", a.overlay, "--device", loop]);
    expect(onCard.code, onCard.stderr).toBe(2);
    expect(onCard.stderr).toMatch(new RegExp(`${loop} partition 1: the ext file system claims 33554432 bytes \\(8192 blocks of 4096\\), more than the 8388608 bytes of partition 1$`, "m"));
    expect(sha(card)).toBe(before);
  }, 60_000);

  it("refuses the station's own disk: the disk / is on", async () => {
    const { checkNotInUse } = await import("../src/image/busy.js");
    const card = join(dir, "own.img");
    copyFileSync(mbr.path, card);
    const loop = attach(card);
    const name = loop.replace("/dev/", "");
    const dev = readFileSync(`/sys/class/block/${name}p2/dev`, "utf8").trim();
    // The station as it would be if its root were this disk's partition 2.
    const mountinfo = `27 1 ${dev} / / rw,relatime - ext4 /dev/${name}p2 rw\n`;
    expect(() => checkNotInUse(loop, mountinfo)).toThrow(new RegExp(`^${loop}: the station's own disk \\(/ is on it, through /dev/${name}p2\\)$`));
    // And this station's real root disk, when / is on a block device here.
    const root = readFileSync("/proc/self/mountinfo", "utf8").split("\n").find((l) => l.split(" ")[4] === "/");
    const rootDev = root?.split(" ")[2] ?? "0:0";
    if (!rootDev.startsWith("0:") && existsSync(`/sys/dev/block/${rootDev}`)) {
      const { wholeDiskOf } = await import("../src/image/busy.js");
      const disk = `/dev/${wholeDiskOf(rootDev) ?? run("sh", ["-c", `basename $(readlink -f /sys/dev/block/${rootDev})`]).stdout.trim()}`;
      const w = workspace("own");
      const a = JSON.parse(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "ov"), "--json"]).stdout) as { overlay: string };
      const r = w.cli(["write", a.overlay, "--device", disk]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`${disk}: the station's own disk \\(/ is on it`));
    }
  }, 60_000);
});

/**
 * `verify TARGET` in workspace `ws` with TMPDIR=`tmp`: exit code, stderr, the child's peak RSS
 * (MB) and the peak bytes used on `tmp`'s file system, polled every 5 ms while it runs.
 */
async function verifyMeasured(ws: string, target: string, tmp: string): Promise<{ code: number; stderr: string; rssMb: number; peakTmp: number }> {
  const used = (): number => {
    const f = statfsSync(tmp);
    return (f.blocks - f.bfree) * f.bsize;
  };
  const base = used();
  let peak = 0;
  const rss = join(dir, "rss.py");
  if (!existsSync(rss)) writeFileSync(rss, "import resource,subprocess,sys\nr=subprocess.run(sys.argv[1:],capture_output=True,text=True)\nsys.stderr.write(r.stderr)\nprint(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n");
  const child = spawn("python3", [rss, process.execPath, CLI, "verify", target], {
    cwd: ws,
    env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: TEST_CACHE, TMPDIR: tmp },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const timer = setInterval(() => (peak = Math.max(peak, used() - base)), 5);
  await new Promise<void>((res) => child.once("close", () => res()));
  clearInterval(timer);
  const [code = "-1", kb = "0"] = stdout.trim().split("\n").pop()!.split(" ");
  return { code: Number(code), stderr, rssMb: Number(kb) / 1024, peakTmp: peak };
}

/** A zstd frame that declares `size` bytes of content (Frame_Content_Size, 8 bytes) and holds one RLE block. */
function zstdDeclaring(size: bigint): Buffer {
  const b = Buffer.alloc(4 + 1 + 1 + 8 + 3 + 1);
  b.writeUInt32LE(0xfd2fb528, 0);
  b[4] = 3 << 6; // FCS of 8 bytes, not single-segment, no dictionary
  b[5] = 17 << 3; // window 128 MiB
  b.writeBigUInt64LE(size, 6);
  b.writeUIntLE(1 | (1 << 1) | (4096 << 3), 14, 3); // last block, RLE, 4096 bytes
  b[17] = 0;
  return b;
}

requires(diskTools)("item 14: verify of a .zst is bounded", () => {
  it("refuses a .zst whose header declares 100 GiB, before decompressing anything", () => {
    const w = workspace("declared");
    const zst = join(w.ws, "huge.img.zst");
    writeFileSync(zst, zstdDeclaring(100n * 2n ** 30n));
    const r = w.cli(["verify", zst]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/^mkoverlay: error: .*huge\.img\.zst: decompresses to 100 GiB \(its zstd header says so\), more than the 64 GiB a disk image may be$/m);
  });
});

requires(diskTools, root)("item 14: peak disk and memory of verify on a .zst (a tmpfs as $TMPDIR, root for the mount)", () => {
  let tmp = "";
  let w: Ws;
  beforeAll(() => {
    w = workspace("zst");
    tmp = join(w.ws, "tmpfs");
    mkdirSync(tmp);
    sh("mount", ["-t", "tmpfs", "-o", "size=768m,mode=1777", "tmpfs", tmp]);
    mounts.push(tmp);
  });

  it("a device image padded to 4 GiB (a few MB as .zst): verified, holes kept, peak use of $TMPDIR and RSS small", async () => {
    const out = join(w.ws, "out");
    const r = w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--out", out, "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const img = (JSON.parse(r.stdout) as { overlay: string }).overlay;
    sh("truncate", ["-s", "4G", img]);
    sh("zstd", ["-q", "-T0", "-1", "--rm", img, "-o", `${img}.zst`]);
    const v = await verifyMeasured(w.ws, `${img}.zst`, tmp);
    expect(v.code, v.stderr).toBe(0);
    expect(v.peakTmp).toBeLessThan(64 * MiB);
    expect(v.rssMb).toBeLessThan(250);
  }, 120_000);

  it("a .zst of 400 MiB of data (no size in its header) with 768 MiB free: stopped before less than 512 MiB is left, the temp file removed", async () => {
    const zst = join(w.ws, "data.img.zst");
    sh("sh", ["-c", `head -c ${400 * MiB} /dev/zero | tr '\\000' '\\001' | zstd -q -T0 -1 > ${zst}`]);
    const v = await verifyMeasured(w.ws, zst, tmp);
    expect(v.code, v.stderr).toBe(2);
    expect(v.stderr).toMatch(/data\.img\.zst: decompressing it would leave less than 0\.50 GiB free in .*mkoverlay-zst-[^ ]+ \(0\.75 GiB were free\); stopped after 0\.25 GiB$/m);
    expect(v.peakTmp).toBeLessThan(300 * MiB);
    expect(v.rssMb).toBeLessThan(250);
    expect(run("find", [tmp, "-mindepth", "1"]).stdout).toBe("");
  }, 120_000);
});
