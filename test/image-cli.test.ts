/**
 * Issue 14 phase 2, through the built CLI: `mkoverlay image` (and `batch --image`) registers a
 * device exactly as `build` does and writes a per-device image of a Raspberry Pi OS-shaped base
 * (MBR, and a GPT variant), made without root. Checked with the real tools: e2fsck -fn on the
 * root, every overlay entry read back against the archive `build` writes for the same device,
 * the boot partition byte for byte, `bmaptool copy` with our bmap, a second run byte-identical,
 * `verify` of the image (and of the .zst), refusals that change nothing and reserve nothing,
 * `registry doctor` on killed image builds, `write --image` (identity rule, bmap refreshed).
 * Root-only parts (a loop device, a mount, setpriv to `nobody`) are in the block gated on root.
 */
import Database from "better-sqlite3";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, chownSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { gunzipSync, gzipSync } from "node:zlib";
import { extract, pack } from "tar-stream";
import { afterAll, beforeAll, expect, it } from "vitest";
import { entriesOf } from "../src/image/lay.js";
import { ImageTreeView } from "../src/image/reader.js";
import { findRoot } from "../src/image/root.js";
import { openOverlay } from "../src/image/open.js";
import type { Entry } from "../src/overlay/tree.js";
import { requires, root } from "./helpers/capability.js";
import { baseDisks, fsck, diskTools, makeDisk, SBIN_PATH, sh, type Fixture } from "./helpers/disk.js";
import { CLI, readPub, removeDir, type Run, run, runCli, runCliAsNobody, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";
import { bootId } from "../src/registry/core.js";

const EPOCH = "1700000000";
const DEAD_STATION = `${hostname()}:4194305:1:${bootId()}`;

const dir = tempDir("mko-imgcli-");
let mbr: Fixture;
let gpt: Fixture;
let rootTree = "";
let bastionPub = "";
let hostKey = "";

const sha = (b: Buffer): string => createHash("sha256").update(b).digest("hex");
const shaFile = (p: string): string => sha(readFileSync(p));
const slice = (p: string, off: number, len: number): Buffer => readFileSync(p).subarray(off, off + len);

interface Ws {
  ws: string;
  cli: (args: string[], env?: Record<string, string>) => Run;
  devices: () => { hostname: string; status: string; port: number; overlay: string | null }[];
}

/** A fleet workspace of its own (registry beside the config). */
function workspace(name: string): Ws {
  const ws = join(dir, name);
  mkdirSync(ws);
  writeFleet(ws, { eu: { hostKeys: [bastionPub] } });
  return {
    ws,
    cli: (args, env = {}) => runCli(args, { cwd: ws, env: { SOURCE_DATE_EPOCH: EPOCH, ...env } }),
    devices: () => {
      if (!existsSync(join(ws, "registry.db"))) return [];
      const db = new Database(join(ws, "registry.db"), { readonly: true });
      try {
        return db.prepare("SELECT hostname, status, port, overlay FROM devices ORDER BY hostname").all() as ReturnType<Ws["devices"]>;
      } finally {
        db.close();
      }
    },
  };
}

const ok = (r: Run): string => {
  expect(r.code, r.stderr).toBe(0);
  return r.stdout;
};

/** Every entry of `entries` as read from the image's root: type, mode, owner, content, target. */
async function expectLaid(image: string, entries: Entry[]): Promise<void> {
  const got = await new ImageTreeView(findRoot(image)).getMany(entries.map((e) => e.path));
  for (const e of entries) {
    const g = got.get(e.path);
    expect(g, e.path).toBeDefined();
    expect(g!.type, e.path).toBe(e.type);
    if (e.type === "dir") continue; // existing directories of the OS keep their modes
    expect([g!.uid, g!.gid], e.path).toEqual([0, 0]);
    if (e.type === "file") {
      expect(g!.mode, e.path).toBe(e.mode);
      expect(g!.content?.equals(e.content), e.path).toBe(true);
    } else expect(g!.target, e.path).toBe(e.target);
  }
}

/** `src` with one more entry: a symlink whose target is longer than a block (no host file system takes it). */
async function withLongSymlink(src: string, dst: string): Promise<void> {
  const ex = extract();
  const pk = pack();
  ex.on("entry", (h, stream, next) => {
    const chunks: Buffer[] = [];
    stream.on("data", (c: unknown) => chunks.push(c as Buffer));
    stream.on("end", () => pk.entry(h, Buffer.concat(chunks), next));
  });
  const done = new Promise<void>((resolve, reject) => {
    ex.on("finish", () => {
      pk.entry({ name: "etc/zz-long-link", type: "symlink", linkname: "a".repeat(5000), mode: 0o777, uid: 0, gid: 0 });
      pk.finalize();
    });
    ex.on("error", reject);
    const out: Buffer[] = [];
    pk.on("data", (c: unknown) => out.push(c as Buffer));
    pk.on("end", () => {
      writeFileSync(dst, gzipSync(Buffer.concat(out)));
      resolve();
    });
  });
  ex.end(gunzipSync(readFileSync(src)));
  await done;
}

beforeAll(() => {
  if (!diskTools.ok) return; // the gate skips (laptop) or fails (CI) every block
  ({ rootTree, mbr, gpt } = baseDisks(dir));
  bastionPub = readPub(sshKeygen(dir, "bastion"));
  hostKey = sshKeygen(dir, "device_key");
}, 120_000);
afterAll(() => removeDir(dir));

requires(diskTools)("mkoverlay image", () => {
  it("MBR: a registered device, a 0600 image + bmap in a 0700 folder, e2fsck clean, entries as in its archive, boot partition untouched, bmaptool flashes it", async () => {
    const w = workspace("mbr");
    const out = join(w.ws, "out");
    const r = JSON.parse(ok(w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--host-key", hostKey, "--out", out, "--json"]))) as { hostname: string; port: number; overlay: string; bmap: string };
    expect(r.overlay).toBe(join(out, `${r.hostname}.img`));
    expect(r.bmap).toBe(join(out, `${r.hostname}.img.bmap`));
    expect(readdirSync(out).sort()).toEqual([`${r.hostname}.authorized_keys`, `${r.hostname}.img`, `${r.hostname}.img.bmap`]);
    expect(statSync(out).mode & 0o777).toBe(0o700);
    expect(statSync(r.overlay).mode & 0o777).toBe(0o600);
    expect(statSync(r.bmap).mode & 0o777).toBe(0o600);
    // Registered exactly like a build: active, the image recorded as its output.
    expect(w.devices()).toEqual([{ hostname: r.hostname, status: "active", port: r.port, overlay: r.overlay }]);
    const f = fsck({ path: r.overlay, rootOffset: mbr.rootOffset });
    expect(f.code, f.out).toBe(0);
    // The archive `build` writes for the same device (a re-flash with its key: same port) ...
    const again = JSON.parse(ok(w.cli(["--board", "rpi4", "--bastion", "eu", "--host-key", hostKey, "--out", join(w.ws, "archive"), "--json"]))) as { overlay: string; port: number };
    expect(again.port).toBe(r.port);
    // ... holds exactly what the image's root now holds.
    await expectLaid(r.overlay, await entriesOf(await openOverlay(again.overlay), again.overlay));
    expect(sha(slice(r.overlay, mbr.bootOffset, mbr.bootSize))).toBe(sha(slice(mbr.path, mbr.bootOffset, mbr.bootSize)));
    expect(sha(slice(r.overlay, 0, mbr.bootOffset))).toBe(sha(slice(mbr.path, 0, mbr.bootOffset))); // partition table too
    const flashed = join(dir, "flashed-mbr.img");
    const b = run("bmaptool", ["copy", "--bmap", r.bmap, r.overlay, flashed]);
    expect(b.code, b.stderr).toBe(0);
    expect(shaFile(flashed)).toBe(shaFile(r.overlay));
    // verify reads the image's root partition and runs the archive's checks.
    const v = w.cli(["verify", r.overlay]);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect(v.stdout).toMatch(/^ok +the key is registered to gw-0001$/m);
    // Recognised by its content, not its name.
    const renamed = join(w.ws, "card-copy.data");
    copyFileSync(r.overlay, renamed);
    expect(w.cli(["verify", renamed]).code).toBe(0);
  });

  it("same base, key, inputs and SOURCE_DATE_EPOCH: byte-identical image and bmap", () => {
    const outs = ["again-1", "again-2"].map((n) => {
      const w = workspace(n);
      const r = JSON.parse(ok(w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--host-key", hostKey, "--hostname", "gw-repro", "--out", join(w.ws, "out"), "--json"]))) as { overlay: string; bmap: string };
      return r;
    });
    expect(shaFile(outs[0]!.overlay)).toBe(shaFile(outs[1]!.overlay));
    expect(readFileSync(outs[0]!.bmap, "utf8")).toBe(readFileSync(outs[1]!.bmap, "utf8"));
  });

  it("GPT base, --compress zstd: H.img.zst + bmap; verify decompresses it privately; bmaptool flashes the .zst", () => {
    const w = workspace("gpt");
    const out = join(w.ws, "out");
    const r = JSON.parse(ok(w.cli(["image", "--base", gpt.path, "--board", "rpi4", "--bastion", "eu", "--compress", "zstd", "--out", out, "--json"]))) as { hostname: string; overlay: string; bmap: string };
    expect(readdirSync(out).sort()).toEqual([`${r.hostname}.authorized_keys`, `${r.hostname}.img.bmap`, `${r.hostname}.img.zst`]);
    expect(w.devices()[0]!.overlay).toBe(r.overlay);
    const tmp = join(w.ws, "tmp");
    mkdirSync(tmp);
    const v = w.cli(["verify", r.overlay], { TMPDIR: tmp });
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect(readdirSync(tmp)).toEqual([]); // the decompressed copy (it holds the key) is gone
    const flashed = join(dir, "flashed-gpt.img");
    expect(run("bmaptool", ["copy", "--bmap", r.bmap, r.overlay, flashed]).code).toBe(0);
    expect(fsck({ path: flashed, rootOffset: gpt.rootOffset }).code).toBe(0);
  });

  it("takes build's set-up: --attr is recorded, and --hostname serial=… with its key re-flashes the device as an image (issue 23)", () => {
    const w = workspace("attr");
    const out = join(w.ws, "out");
    const first = JSON.parse(ok(w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--host-key", hostKey, "--attr", "serial=SN0099", "--out", out, "--json"]))) as { hostname: string; port: number; attributes: Record<string, string>; rebuilt: boolean };
    expect(first).toMatchObject({ attributes: { serial: "SN0099" }, rebuilt: false });
    const again = JSON.parse(ok(w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--host-key", hostKey, "--hostname", "serial=SN0099", "--out", out, "--json"]))) as typeof first & { image: string; bmap: string };
    expect(again).toMatchObject({ hostname: first.hostname, port: first.port, attributes: { serial: "SN0099" }, rebuilt: true });
    expect(again.bmap).toBe(`${again.image}.bmap`);
    expect(existsSync(again.bmap)).toBe(true);
    expect(w.devices()).toEqual([expect.objectContaining({ hostname: first.hostname, status: "active", port: first.port })]);
  });

  it("verify of an image whose overlay was tampered with fails (exit 1), naming the file", () => {
    const w = workspace("tamper");
    const r = JSON.parse(ok(w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), "--json"]))) as { overlay: string };
    sh("debugfs", ["-w", "-R", "sif /etc/ssh/sshd_config.d/50-mkoverlay.conf mode 0100666", `${r.overlay}?offset=${mbr.rootOffset}`]);
    const v = w.cli(["verify", r.overlay]);
    expect(v.code).toBe(1);
    expect(v.stdout).toMatch(/FAIL .*\/etc\/ssh\/sshd_config\.d\/50-mkoverlay\.conf is mode 0666, not 0644/);
  });
});

requires(diskTools)("image refusals: one message, nothing written, no port reserved", () => {
  const cases: [string, () => { base: string; extra?: string[] }, RegExp][] = [
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
      "root needs journal recovery",
      () => {
        const p = join(dir, "recover.img");
        copyFileSync(mbr.path, p);
        sh("debugfs", ["-w", "-R", "feature needs_recovery", `${p}?offset=${mbr.rootOffset}`]);
        return { base: p };
      },
      /recover\.img partition 2: the ext4 journal needs recovery/,
    ],
    ["root not ext", () => ({ base: mbr.path, extra: ["--root-partition", "1"] }), /base-mbr\.img partition 1: not an ext2\/3\/4 file system/],
    [
      "no room",
      () => {
        // A root partition the OS has filled up to 100 blocks short of the end.
        const fx = makeDisk(join(dir, "full.img"), rootTree, { rootMiB: 16 });
        const spec = `${fx.path}?offset=${fx.rootOffset}`;
        const free = Number(/Free blocks:\s+(\d+)/.exec(sh("dumpe2fs", ["-h", spec]))![1]);
        const filler = join(dir, "filler");
        writeFileSync(filler, Buffer.alloc((free - 100) * 4096, 1));
        sh("debugfs", ["-w", "-R", `write ${filler} /filler`, spec]);
        return { base: fx.path };
      },
      /full\.img partition 2: not enough room: \d+ free blocks/,
    ],
    [
      "a path whose type clashes with the overlay",
      () => {
        const tree = join(dir, "clash-tree");
        sh("cp", ["-a", rootTree, tree]);
        rmSync(join(tree, "etc/hostname"));
        mkdirSync(join(tree, "etc/hostname"));
        return { base: makeDisk(join(dir, "clash.img"), tree).path };
      },
      /clash\.img partition 2: the overlay conflicts with the image:$/,
    ],
    [
      "another device's identity",
      () => {
        const w = workspace("identity-src");
        const r = JSON.parse(ok(w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), "--json"]))) as { overlay: string };
        return { base: r.overlay };
      },
      /gw-0001\.img partition 2: already carries another device's mkoverlay identity \(\/etc\/ssh\/mkoverlay\/ssh_host_ed25519_key\.pub: ssh-ed25519 /,
    ],
  ];
  it.each(cases)("%s", (name, setup, message) => {
    const c = setup();
    const w = workspace(`refused-${name.replace(/\W+/g, "-")}`);
    ok(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "first")])); // the registry exists and holds one device
    const before = { devices: JSON.stringify(w.devices()), base: shaFile(c.base) };
    const out = join(w.ws, "out");
    const r = w.cli(["image", "--base", c.base, "--board", "rpi4", "--bastion", "eu", "--out", out, ...(c.extra ?? [])]);
    expect(r.code, r.stderr).toBe(2);
    const lines = r.stderr.trim().split("\n");
    expect(lines[0]).toMatch(/^mkoverlay: error: /);
    expect(lines[0]).toMatch(message);
    // One message: a conflict lists its paths on the lines of that one error.
    expect(lines.slice(1).every((l) => l.startsWith("mkoverlay: hint: ") || l.startsWith("mkoverlay: error:   /"))).toBe(true);
    expect(existsSync(out)).toBe(false); // not even the output folder
    expect(JSON.stringify(w.devices())).toBe(before.devices);
    expect(shaFile(c.base)).toBe(before.base);
    if (name === "another device's identity") {
      // --force: laid anyway; the overlay's key replaces the one that was there.
      const f = JSON.parse(ok(w.cli(["image", "--base", c.base, "--board", "rpi4", "--bastion", "eu", "--out", out, "--force", "--json"]))) as { overlay: string };
      expect(w.cli(["verify", f.overlay]).code).toBe(0);
    }
  });

  it("bad flags are refused before anything happens", () => {
    const w = workspace("flags");
    for (const [args, msg] of [
      [["--compress", "xz"], /--compress "xz": only zstd is supported/],
      [["--root-partition", "0"], /--root-partition "0": a partition number from 1 to 128/],
      [["--format", "dir"], /unknown option '--format'/],
    ] as const) {
      const r = w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), ...args]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(msg);
      expect(existsSync(join(w.ws, "out"))).toBe(false);
    }
    const odd = join(w.ws, "what?.img");
    copyFileSync(mbr.path, odd);
    const q = w.cli(["image", "--base", odd, "--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out")]);
    expect([q.code, q.stderr.split("\n")[0]]).toEqual([2, `mkoverlay: error: ${odd}: e2fsprogs cannot open a path with a "?" in it`]);
    expect(existsSync(join(w.ws, "registry.db"))).toBe(false);
  });
});

requires(diskTools)("registry doctor on killed image builds", () => {
  it("pending device, image complete → activated; image truncated or missing → reclaimed", () => {
    const w = workspace("doctor");
    const build = (): { hostname: string; port: number; overlay: string } =>
      JSON.parse(ok(w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--json"]))) as { hostname: string; port: number; overlay: string };
    const [a, b, c] = [build(), build(), build()];
    const db = new Database(join(w.ws, "registry.db"));
    db.prepare("UPDATE devices SET status = 'pending', station = ?").run(DEAD_STATION);
    db.close();
    truncateSync(b.overlay, mbr.rootOffset + 4096); // killed while the image was being written
    rmSync(c.overlay); // killed before the image took its name
    const r = JSON.parse(ok(w.cli(["registry", "doctor", "--fix", "--json"])));
    expect(r).toEqual([
      { hostname: a.hostname, port: a.port, work: "build", action: "activated", fixed: true },
      { hostname: b.hostname, port: b.port, work: "build", action: "reclaimed", fixed: true },
      { hostname: c.hostname, port: c.port, work: "build", action: "reclaimed", fixed: true },
    ]);
    expect(w.devices().map((d) => [d.hostname, d.status])).toEqual([[a.hostname, "active"]]);
  });
});

requires(diskTools)("interrupted", () => {
  // A base with enough data that copying it takes a moment.
  let base = "";
  beforeAll(() => {
    const tree = join(dir, "bulky-tree");
    sh("cp", ["-a", rootTree, tree]);
    writeFileSync(join(tree, "usr/share/bulk"), Buffer.alloc(200 << 20, 0x5a));
    base = makeDisk(join(dir, "bulky.img"), tree, { rootMiB: 320 }).path;
  }, 60_000);

  // To the process alone (a service manager's stop), or to its process group as a Ctrl-C in a
  // terminal sends it: then cp and debugfs get it too, and their failure is the interruption.
  it.each([
    ["the process", false],
    ["its process group", true],
  ])("SIGINT to %s while the image is being made: exit 130, no temp image, no private temp dir (they hold the key), the port given back", async (_to, group) => {
    const w = workspace(group ? "sigint-group" : "sigint");
    const out = join(w.ws, "out");
    const tmp = join(w.ws, "tmp");
    mkdirSync(tmp);
    const child = spawn(process.execPath, [CLI, "image", "--base", base, "--board", "rpi4", "--bastion", "eu", "--out", out], {
      cwd: w.ws,
      env: { ...process.env, TMPDIR: tmp, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", NO_COLOR: "1" },
      stdio: ["ignore", "ignore", "pipe"],
      detached: group,
    });
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
    // As soon as cp has written into the temp image, interrupt. Not on an empty one: the reflink
    // attempt before cp creates and removes it at once, so it may be gone a moment later. (Nor
    // on the output folder's writability probe, `.probe.*.tmp`, before the reservation.)
    const copying = (n: string): boolean => {
      try {
        return /^\.gw-0001\.img\.\d+\.[0-9a-f]+\.tmp$/.test(n) && statSync(join(out, n)).size > 0;
      } catch {
        return false; // gone between the listing and the stat
      }
    };
    const staging = (): boolean => existsSync(out) && readdirSync(out).some(copying);
    for (let i = 0; i < 1000 && !staging(); i++) await new Promise((r) => setTimeout(r, 10));
    expect(staging()).toBe(true);
    if (group) process.kill(-child.pid!, "SIGINT");
    else child.kill("SIGINT");
    expect(await exited, stderr).toBe(130);
    // A deliberate stop, not an error.
    expect(stderr).toMatch(/^mkoverlay: interrupted by SIGINT: gw-0001 was not built; its reservation was given back$/m);
    expect(stderr).not.toMatch(/error/);
    expect(existsSync(out) ? readdirSync(out) : []).toEqual([]); // an output folder it made is removed
    expect(readdirSync(tmp)).toEqual([]);
    expect(w.devices()).toEqual([]);
  }, 60_000);
});

requires(diskTools)("batch --image", () => {
  it("one image per device from one base bmap; each e2fsck clean, verified, with its own key", () => {
    const w = workspace("batch");
    const cache = join(w.ws, "cache");
    const out = join(w.ws, "out");
    const lines = ok(w.cli(["batch", "--image", mbr.path, "--board", "rpi4", "--bastion", "eu", "--count", "3", "--out", out, "--json"], { MKOVERLAY_CACHE: cache }))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { hostname: string; overlay: string; fingerprint: string });
    expect(lines.map((l) => l.hostname)).toEqual(["gw-0001", "gw-0002", "gw-0003"]);
    expect(new Set(lines.map((l) => l.fingerprint)).size).toBe(3);
    // Nothing but the outputs: no temp file left.
    expect(readdirSync(out).sort()).toEqual(lines.flatMap((l) => [`${l.hostname}.authorized_keys`, `${l.hostname}.img`, `${l.hostname}.img.bmap`]).sort());
    for (const l of lines) {
      expect(l.overlay).toBe(join(out, `${l.hostname}.img`));
      expect(existsSync(`${l.overlay}.bmap`)).toBe(true);
      expect(fsck({ path: l.overlay, rootOffset: mbr.rootOffset }).code).toBe(0);
      expect(w.cli(["verify", l.overlay]).code).toBe(0);
    }
    // The base's bmap was computed once and cached by content (one entry for one base).
    expect(readdirSync(join(cache, "bmap"))).toHaveLength(1);
  });
});

requires(diskTools)("mkoverlay write --image", () => {
  it("lays an archive into an image in place, refreshes its bmap; refuses another device's identity without --force; a failed write exits 1, rolled back", async () => {
    const w = workspace("write");
    const a = JSON.parse(ok(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), "--json"]))) as { overlay: string };
    const b = JSON.parse(ok(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), "--json"]))) as { overlay: string };
    const img = join(w.ws, "card.img");
    copyFileSync(mbr.path, img);
    chmodSync(img, 0o600);
    // A bmap of the base beside it: write must bring it up to date.
    writeFileSync(`${img}.bmap`, run("bmaptool", ["create", img]).stdout);
    const r = JSON.parse(ok(w.cli(["write", a.overlay, "--image", img, "--json"]))) as { bmap: string | null; created: number };
    expect(r.bmap).toBe(`${img}.bmap`);
    expect(r.created).toBeGreaterThan(10);
    expect(fsck({ path: img, rootOffset: mbr.rootOffset }).code).toBe(0);
    expect(w.cli(["verify", img]).code).toBe(0);
    const flashed = join(dir, "flashed-write.img");
    expect(run("bmaptool", ["copy", "--bmap", `${img}.bmap`, img, flashed]).code).toBe(0);
    expect(shaFile(flashed)).toBe(shaFile(img));
    // Again with the same overlay: fine (a re-flash). With b's: refused, nothing changed.
    ok(w.cli(["write", a.overlay, "--image", img]));
    const before = shaFile(img);
    const refused = w.cli(["write", b.overlay, "--image", img]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toMatch(/card\.img partition 2: already carries another device's mkoverlay identity/);
    expect(shaFile(img)).toBe(before);
    ok(w.cli(["write", b.overlay, "--image", img, "--force"]));
    expect(w.cli(["verify", img]).stdout).toMatch(/registered to gw-0002/);
    // Usage: exactly one target; --base only with --device; a .zst is not written in place.
    expect(w.cli(["write", a.overlay]).stderr).toMatch(/exactly one of --image IMG or --device/);
    expect(w.cli(["write", a.overlay, "--image", img, "--base", mbr.path]).stderr).toMatch(/--base goes with --device/);
    // A write that fails inside debugfs, after it began (a symlink target longer than a block,
    // in an archive made by hand): exit 1, rolled back, the image as it was.
    const bad = join(w.ws, "bad.tar.gz");
    await withLongSymlink(a.overlay, bad);
    const beforeBad = shaFile(img);
    const failed = w.cli(["write", bad, "--image", img, "--force"]);
    expect(failed.code, failed.stderr).toBe(1);
    expect(failed.stderr).toMatch(/debugfs failed while laying the overlay: .*\(changes rolled back with e2undo\)$/m);
    expect(shaFile(img)).toBe(beforeBad);
    sh("zstd", ["-q", img, "-o", `${img}.zst`]);
    const z = w.cli(["write", a.overlay, "--image", `${img}.zst`]);
    expect([z.code, z.stderr]).toEqual([2, expect.stringMatching(/a zstd-compressed image cannot be written in place/)]);
  });
});

requires(diskTools)("mkoverlay write --image makes the bmap an image has not got", () => {
  it("no IMG.bmap: one is made, bmaptool copy writes the image from it; a second write updates it", () => {
    const w = workspace("write-no-bmap");
    const a = JSON.parse(ok(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), "--json"]))) as { overlay: string };
    const img = join(w.ws, "card.img");
    copyFileSync(mbr.path, img);
    chmodSync(img, 0o600);
    expect(existsSync(`${img}.bmap`)).toBe(false);
    const made = w.cli(["write", a.overlay, "--image", img]);
    expect(made.code, made.stderr).toBe(0);
    expect(made.stderr).toMatch(new RegExp(`; made ${img}\\.bmap$`, "m"));
    expect(statSync(`${img}.bmap`).mode & 0o777).toBe(0o600);
    const flashed = join(w.ws, "flashed.img");
    const copy = run("bmaptool", ["copy", "--bmap", `${img}.bmap`, img, flashed]);
    expect(copy.code, copy.stderr).toBe(0);
    expect(shaFile(flashed)).toBe(shaFile(img));
    // Another device's overlay over it (new keys): the bmap follows, still checked by bmaptool.
    const b = JSON.parse(ok(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), "--json"]))) as { overlay: string };
    const first = readFileSync(`${img}.bmap`, "utf8");
    const again = JSON.parse(ok(w.cli(["write", b.overlay, "--image", img, "--force", "--json"]))) as { bmap: string | null };
    expect(again.bmap).toBe(`${img}.bmap`);
    expect(readFileSync(`${img}.bmap`, "utf8")).not.toBe(first);
    rmSync(flashed);
    expect(run("bmaptool", ["copy", "--bmap", `${img}.bmap`, img, flashed]).code).toBe(0);
    expect(shaFile(flashed)).toBe(shaFile(img));
  });

  it("image --json names the image `image` (and `overlay`, as build does)", () => {
    const w = workspace("image-json-name");
    const r = JSON.parse(ok(w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), "--json"]))) as { hostname: string; image: string; overlay: string; bmap: string };
    expect(r.image).toBe(join(w.ws, "out", `${r.hostname}.img`));
    expect(r.overlay).toBe(r.image);
    expect(r.bmap).toBe(`${r.image}.bmap`);
  });
});

requires(diskTools, root)("root for the setup: a loop device, a mount, an unprivileged station user", () => {
  it("write --device --base on a loop device: base + overlay, verify reads the card; refused while mounted (exit 2, card untouched)", () => {
    const w = workspace("device");
    const a = JSON.parse(ok(w.cli(["--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out"), "--json"]))) as { overlay: string };
    const backing = join(w.ws, "card.img");
    sh("truncate", ["-s", String(statSync(mbr.path).size + (8 << 20)), backing]);
    const loop = sh("losetup", ["--show", "-f", backing]).trim();
    try {
      const r = JSON.parse(ok(w.cli(["write", a.overlay, "--device", loop, "--base", mbr.path, "--json"]))) as { baseBytes: number };
      expect(r.baseBytes).toBeGreaterThan(0);
      expect(run("e2fsck", ["-fn", `${loop}?offset=${mbr.rootOffset}`], { env: { PATH: SBIN_PATH } }).code).toBe(0);
      const v = w.cli(["verify", loop]);
      expect(v.code, v.stdout + v.stderr).toBe(0);
      const mnt = join(w.ws, "mnt");
      mkdirSync(mnt);
      sh("mount", ["-o", `ro,loop,offset=${mbr.rootOffset}`, loop, mnt]);
      try {
        const before = shaFile(backing);
        const e = w.cli(["write", a.overlay, "--device", loop, "--base", mbr.path]);
        expect(e.code).toBe(2);
        expect(e.stderr).toMatch(/in use: mounted at .*\/mnt \(through \/dev\/loop\d+\)/);
        expect(shaFile(backing)).toBe(before);
      } finally {
        run("umount", [mnt]);
      }
    } finally {
      run("losetup", ["-d", loop]);
    }
  });

  it("image refuses a base that is mounted, with nothing reserved", () => {
    const w = workspace("mounted");
    const base = join(w.ws, "base.img");
    copyFileSync(mbr.path, base);
    const mnt = join(w.ws, "mnt");
    mkdirSync(mnt);
    sh("mount", ["-o", `ro,loop,offset=${mbr.rootOffset}`, base, mnt]);
    try {
      const r = w.cli(["image", "--base", base, "--board", "rpi4", "--bastion", "eu", "--out", join(w.ws, "out")]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/base\.img: in use: mounted at .*\/mnt/);
      expect(existsSync(join(w.ws, "registry.db"))).toBe(false);
      expect(existsSync(join(w.ws, "out"))).toBe(false);
    } finally {
      run("umount", [mnt]);
    }
  });

  it("refuses, with nothing reserved: an output folder without room for the image; an image of that name that is in use", () => {
    const w = workspace("room");
    const small = join(w.ws, "small");
    mkdirSync(small);
    const allocated = statSync(mbr.path).blocks * 512;
    sh("mount", ["-t", "tmpfs", "-o", `size=${Math.floor(allocated / 2)},mode=0700`, "tmpfs", small]);
    try {
      const r = w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--out", small]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`^mkoverlay: error: --out ${small}: [0-9.]+ GB free, but an image of .*base-mbr\\.img needs about [0-9.]+ GB$`, "m"));
      expect(readdirSync(small)).toEqual([]);
      expect(existsSync(join(w.ws, "registry.db"))).toBe(false);
    } finally {
      run("umount", [small]);
    }
    const out = join(w.ws, "out");
    mkdirSync(out, { mode: 0o700 });
    const old = join(out, "gw-busy.img");
    copyFileSync(mbr.path, old);
    const loop = sh("losetup", ["--show", "-f", old]).trim();
    try {
      const r = w.cli(["image", "--base", mbr.path, "--board", "rpi4", "--bastion", "eu", "--hostname", "gw-busy", "--out", out]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`gw-busy\\.img: in use: attached to ${loop}`));
      expect(readdirSync(out)).toEqual(["gw-busy.img"]);
      expect(existsSync(join(w.ws, "registry.db"))).toBe(false);
    } finally {
      run("losetup", ["-d", loop]);
    }
  });

  it("runs as an unprivileged user (nobody) on files it owns: the same bytes as root's run", () => {
    const w = workspace("nobody");
    const base = join(w.ws, "base.img");
    copyFileSync(mbr.path, base);
    const key = join(w.ws, "key");
    copyFileSync(hostKey, key);
    for (const f of ["", "base.img", "key", "mkoverlay.yaml"]) chownSync(join(w.ws, f), 65534, 65534);
    chmodSync(dir, 0o711); // the test's temp dir: traversable, not listable
    const args = ["image", "--base", base, "--board", "rpi4", "--bastion", "eu", "--host-key", key, "--hostname", "gw-nobody", "--out", join(w.ws, "out"), "--json"];
    const r = runCliAsNobody(args, {
      cwd: w.ws,
      // A station user's PATH: no /usr/sbin (debugfs is found there anyway).
      env: { HOME: w.ws, TMPDIR: w.ws, PATH: "/usr/local/bin:/usr/bin:/bin", SOURCE_DATE_EPOCH: EPOCH, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: join(w.ws, "cache"), NO_COLOR: "1" },
    });
    expect(r.code, r.stderr).toBe(0);
    const img = (JSON.parse(r.stdout) as { overlay: string }).overlay;
    const st = statSync(img);
    expect([st.uid, st.mode & 0o777]).toEqual([65534, 0o600]);
    expect(fsck({ path: img, rootOffset: mbr.rootOffset }).code).toBe(0);
    expect(readdirSync(w.ws).filter((n) => n.startsWith("mkoverlay-") || n.endsWith(".tmp"))).toEqual([]);
    // Root's run with the same inputs gives the same bytes: nothing depends on who ran it.
    const w2 = workspace("nobody-ref");
    const ref = JSON.parse(ok(w2.cli(args.map((a) => (a === base ? mbr.path : a === key ? hostKey : a === join(w.ws, "out") ? join(w2.ws, "out") : a))))) as { overlay: string };
    expect(shaFile(img)).toBe(shaFile(ref.overlay));
  });
});
