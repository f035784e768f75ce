/**
 * Issue 22, many cards at once: `mkoverlay flash` with loop devices as cards (as root), each
 * throttled to a card's write speed (helpers/cards.ts). Four cards from a shift CSV, one pulled
 * mid-write (a real EIO): three verified — read back from the card with the image readers, the
 * device's key and files those of its archive, e2fsck clean — and registered; the pulled card's
 * device given back (not in the registry, `registry doctor` clean) and flashed later on a new
 * card as the shift's next row. Refusals (mounted, a partition, the station's own disk, a card
 * or device given twice, a device already built) name the target, write nothing, reserve nothing.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, openSync, readFileSync, readSync, closeSync, realpathSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { entriesOf } from "../src/image/lay.js";
import { ImageTreeView } from "../src/image/reader.js";
import { findRoot } from "../src/image/root.js";
import { openOverlay } from "../src/image/open.js";
import { CardLines } from "../src/cli/commands/flash-progress.js";
import { Cards, throttleKind, type Card } from "./helpers/cards.js";
import { baseDisks, diskTools, SBIN_PATH, type Fixture } from "./helpers/disk.js";
import { inCI, need, requires, root as asRoot } from "./helpers/capability.js";

/** Cards are loop devices, throttled like cards: root, the disk tools, a block I/O throttle. */
const NEEDS = [diskTools, asRoot, need(throttleKind() !== undefined, "a block I/O throttle (cgroup v1 blkio or v2 io.max)")];
const able = NEEDS.every((n) => n.ok);
import { CLI, readPub, removeDir, REPO, run, sshKeygen, tempDir, writeFleet, type Run } from "./helpers/workspace.js";

const EPOCH = "1700000000";
/** A card's write speed here: the base's data takes about a second per card. */
const CARD_BPS = 4 << 20;

const dir = tempDir("mko-flash-");
const cards = new Cards(dir);
let base: Fixture;
let ws = "";

function cli(args: string[]): Run {
  const [cmd, argv] = cards.wrap(process.execPath, [CLI, ...args]);
  const r = spawnSync(cmd, argv, { cwd: ws, encoding: "utf8", env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: "off", SOURCE_DATE_EPOCH: EPOCH, PATH: SBIN_PATH } });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

interface Outcome {
  card: string;
  hostname: string | null;
  ok: boolean;
  port?: number;
  overlay?: string;
  fingerprint?: string;
  phase?: string;
  error?: string;
}

const lines = (r: Run): Outcome[] => r.stdout.trim().split("\n").filter(Boolean).map((l) => JSON.parse(l) as Outcome);
const registry = (): { hostname: string; status: string; fingerprint: string; attributes: Record<string, string> }[] => JSON.parse(cli(["registry", "list", "--json"]).stdout || "[]");
const firstMiB = (p: string): Buffer => {
  const fd = openSync(p, "r");
  try {
    const b = Buffer.alloc(1 << 20);
    readSync(fd, b, 0, b.length, 0);
    return b;
  } finally {
    closeSync(fd);
  }
};
const blank = (c: Card): boolean => firstMiB(c.loop).every((x) => x === 0);

/** The card read back with the image readers: its overlay's entries equal its archive's; e2fsck clean. */
async function checkCard(c: Card, archive: string): Promise<void> {
  const root = findRoot(c.loop);
  const view = new ImageTreeView(root);
  const want = await entriesOf(await openOverlay(archive), archive);
  const got = await view.statMany(
    want.map((e) => e.path),
    new Set(want.filter((e) => e.type === "file").map((e) => e.path)),
  );
  for (const e of want) {
    const g = got.get(e.path);
    expect(g?.type, e.path).toBe(e.type);
    if (e.type === "file") expect(g?.content?.equals(e.content), e.path).toBe(true);
    if (e.type === "symlink") expect(g?.target, e.path).toBe(e.target);
  }
  expect(run("e2fsck", ["-fn", `${c.loop}?offset=${root.offset}`], { env: { PATH: SBIN_PATH } }).code).toBe(0);
}

beforeAll(() => {
  // Without them the describe below is skipped (laptop) or failed (CI) by the gate.
  if (!able) return;
  ({ mbr: base } = baseDisks(dir));
  ws = join(dir, "ws");
  mkdirSync(ws);
  writeFleet(ws, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
  writeFileSync(join(ws, "shift.csv"), "hostname,serial\npj-0001,SN0001\npj-0002,SN0002\npj-0003,SN0003\npj-0004,SN0004\npj-0005,SN0005\n");
}, 120_000);

afterAll(() => {
  try {
    cards.cleanup();
  } finally {
    removeDir(dir);
  }
});

requires(...NEEDS)("mkoverlay flash: loop devices as cards", () => {
  let four: Card[] = [];

  it("four cards, one pulled mid-write: three verified and registered, the pulled card's device given back", async () => {
    const size = readFileSync(base.path).length;
    four = [0, 1, 2, 3].map((k) => cards.make(`card${k}`, size + (4 << 20), k === 2 ? { onTmpfs: 3 << 20 } : {}));
    for (const c of four) cards.throttle(c, CARD_BPS);
    const r = cli(["flash", "--base", base.path, "--board", "rpi4", "--bastion", "eu", "--hosts", "shift.csv", "--json", ...four.map((c) => c.loop)]);
    expect(r.code, r.stderr).toBe(1);
    const out = lines(r);
    expect(out.map((o) => o.card).sort()).toEqual(four.map((c) => c.loop).sort());
    const pulled = out.find((o) => o.card === four[2]!.loop)!;
    expect(pulled).toMatchObject({ ok: false, hostname: "pj-0003", phase: "base" });
    expect(pulled.error).toMatch(/writing the base failed: .*(EIO|i\/o error)/i);
    // Pulled mid-write: the start of the base (its partition table) reached the card, the rest did not.
    expect(firstMiB(four[2]!.loop).readUInt16LE(510)).toBe(0xaa55);
    expect(r.stderr).toMatch(/flash: 3 of 4 card\(s\) verified and registered, 1 failed \(\/dev\/loop\d+;/);
    // One line per card on stderr (not a terminal: when it is done), naming card and device.
    for (const [k, name] of ["pj-0001", "pj-0002", "pj-0003", "pj-0004"].entries()) expect(r.stderr).toMatch(new RegExp(`${four[k]!.loop} ${name}: ${k === 2 ? "FAILED \\(base\\)" : "verified"}`));
    // The objects have the fields docs/json.md shows for a card verified and a card failed.
    const doc = [...readFileSync(join(REPO, "docs/json.md"), "utf8").split("## `mkoverlay flash --json`")[1]!.split("\n## ")[0]!.matchAll(/```json\n(.*)\n```/g)].map((m) => Object.keys(JSON.parse(m[1]!) as object).sort());
    expect(Object.keys(out.find((o) => o.ok)!).sort()).toEqual(doc[0]);
    expect(Object.keys(pulled).sort()).toEqual(doc[1]);
    const good = out.filter((o) => o.ok);
    expect(good.map((o) => o.hostname).sort()).toEqual(["pj-0001", "pj-0002", "pj-0004"]);
    const reg = registry();
    expect(reg.map((d) => [d.hostname, d.status]).sort()).toEqual([
      ["pj-0001", "active"],
      ["pj-0002", "active"],
      ["pj-0004", "active"],
    ]);
    for (const o of good) {
      const c = four.find((x) => x.loop === o.card)!;
      expect(reg.find((d) => d.hostname === o.hostname)).toMatchObject({ fingerprint: o.fingerprint, attributes: { serial: `SN000${o.hostname!.slice(-1)}` } });
      // The card's overlay (its key included) is the registered device's archive, entry for entry.
      await checkCard(c, o.overlay!);
    }
    expect(existsSync(join(ws, "out", "pj-0003.overlay.tar.gz"))).toBe(false);
    const doctor = cli(["registry", "doctor"]);
    expect(doctor.code, doctor.stdout + doctor.stderr).toBe(0);
    // A new card in the pulled one's reader: the next row not built is pj-0003.
    const fresh = cards.make("card2b", size + (4 << 20));
    const again = cli(["flash", "--base", base.path, "--board", "rpi4", "--bastion", "eu", "--hosts", "shift.csv", "--json", fresh.loop]);
    expect(again.code, again.stderr).toBe(0);
    expect(lines(again)).toMatchObject([{ ok: true, hostname: "pj-0003", card: fresh.loop }]);
    await checkCard(fresh, lines(again)[0]!.overlay!);
  }, 180_000);

  it("a card named by serial and by hostname gets that row; with no --hosts a new device of that name", async () => {
    const size = readFileSync(base.path).length;
    const [a, b, c] = ["n1", "n2", "n3"].map((n) => cards.make(n, size + (1 << 20)));
    const r = cli(["flash", "--base", base.path, "--board", "rpi4", "--bastion", "eu", "--hosts", "shift.csv", "--json", `serial=SN0005@${a!.loop}`]);
    expect(r.code, r.stderr).toBe(0);
    expect(lines(r)[0]).toMatchObject({ ok: true, hostname: "pj-0005" });
    const n = cli(["flash", "--base", base.path, "--board", "rpi4", "--bastion", "eu", "--json", `lab-7@${b!.loop}`, `serial=SN9999@${c!.loop}`]);
    expect(n.code, n.stderr).toBe(0);
    const got = lines(n);
    expect(got.find((o) => o.card === b!.loop)).toMatchObject({ ok: true, hostname: "lab-7" });
    expect(registry().find((d) => d.hostname === got.find((o) => o.card === c!.loop)!.hostname)?.attributes).toEqual({ serial: "SN9999" });
  }, 120_000);

  it("Ctrl-C mid-write: the cards in flight stop, their devices are given back, exit 130", async () => {
    const size = readFileSync(base.path).length;
    const slow = ["i1", "i2"].map((n) => cards.make(n, size + (1 << 20)));
    for (const c of slow) cards.throttle(c, 1 << 20);
    const before = registry().length;
    const [cmd, argv] = cards.wrap(process.execPath, [CLI, "flash", "--base", base.path, "--board", "rpi4", "--bastion", "eu", "--json", ...slow.map((c) => `stop-${c.loop.slice(9)}@${c.loop}`)]);
    const child = spawn(cmd, argv, { cwd: ws, env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: "off", PATH: SBIN_PATH } });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const t0 = Date.now();
    // Once both cards are being written (their base has begun to land), Ctrl-C.
    while (!slow.every((c) => firstMiB(c.loop).readUInt16LE(510) === 0xaa55) && Date.now() - t0 < 20_000) await new Promise((r) => setTimeout(r, 100));
    child.kill("SIGINT");
    const t1 = Date.now();
    const code = await new Promise<number | null>((res) => child.on("close", res));
    expect(code, stderr).toBe(130);
    expect(Date.now() - t1, "stopped promptly").toBeLessThan(6_000);
    expect(stderr).toMatch(/interrupted by SIGINT: 0 of 2 card\(s\) verified and registered, 2 failed/);
    // Stopped while the base was being written, not after it.
    expect(stdout.trim().split("\n").map((l) => [(JSON.parse(l) as Outcome).ok, (JSON.parse(l) as Outcome).phase])).toEqual([
      [false, "base"],
      [false, "base"],
    ]);
    expect(registry()).toHaveLength(before);
    expect(cli(["registry", "doctor"]).code).toBe(0);
  }, 60_000);

  describe("refusals: one message naming the target, nothing written, nothing reserved", () => {
    let card: Card;
    let other: Card;
    let before: string;

    beforeAll(() => {
      if (!able) return;
      const size = readFileSync(base.path).length;
      card = cards.make("innocent", size + (1 << 20));
      other = cards.make("other", size + (1 << 20));
      before = JSON.stringify(registry());
    });

    const refused = (targets: string[], message: RegExp, extra: string[] = []): void => {
      const r = cli(["flash", "--base", base.path, "--board", "rpi4", "--bastion", "eu", ...extra, ...targets]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(message);
      expect(r.stderr.trim().split("\n").filter((l) => l.startsWith("mkoverlay: error:"))).toHaveLength(1);
      expect(blank(card)).toBe(true);
      expect(JSON.stringify(registry())).toBe(before);
    };

    it("a mounted card", () => {
      // The card holds a file system, mounted (through a loop device over it).
      const fs = cards.make("mounted", 64 << 20);
      run("mke2fs", ["-q", "-F", "-t", "ext4", fs.loop], { env: { PATH: SBIN_PATH } });
      const mnt = join(dir, "mnt");
      mkdirSync(mnt, { recursive: true });
      expect(run("mount", ["-o", "ro", fs.loop, mnt], { env: { PATH: SBIN_PATH } }).code).toBe(0);
      try {
        refused([card.loop, fs.loop], new RegExp(`error: card ${fs.loop}: in use: mounted at ${mnt}`));
      } finally {
        run("umount", [mnt], { env: { PATH: SBIN_PATH } });
      }
    });

    it("a partition, not a whole disk", () => {
      const p = cards.make("parted", readFileSync(base.path).length, { partscan: true });
      writeFileSync(p.loop, readFileSync(base.path));
      run("partx", ["-u", p.loop], { env: { PATH: SBIN_PATH } });
      const part = `${p.loop}p2`;
      for (let i = 0; i < 50 && !existsSync(part); i++) spawnSync("sleep", ["0.1"]);
      expect(existsSync(part), `${part} exists`).toBe(true);
      refused([card.loop, part], new RegExp(`error: card ${part}: a partition, not a whole disk`));
    });

    it("the station's own disk (the disk holding /)", () => {
      const root = readFileSync("/proc/self/mountinfo", "utf8").split("\n").map((l) => l.split(" ")).find((f) => f[4] === "/")![2]!;
      let disk = realpathSync(`/sys/dev/block/${root}`);
      if (existsSync(join(disk, "partition"))) disk = join(disk, "..");
      const dev = `/dev/${disk.split("/").pop()}`;
      if (!existsSync(dev)) {
        expect(inCI, `${dev} (the disk holding /) has no device node here`).toBe(false);
        return;
      }
      refused([card.loop, dev], new RegExp(`error: card ${dev}: the station's own disk`));
    });

    it("a card given twice (also through a symbolic link), a device named twice, a device already built", () => {
      refused([card.loop, other.loop, card.loop], new RegExp(`error: card ${card.loop}: given twice`));
      const link = join(dir, "by-id-card");
      symlinkSync(card.loop, link);
      refused([card.loop, link], new RegExp(`error: card ${link}: given twice \\(as ${card.loop} and ${link}, both ${card.loop}\\)`));
      refused([`lab-9@${card.loop}`, `lab-9@${other.loop}`], new RegExp(`error: target lab-9@${other.loop}: lab-9 is named twice \\(also lab-9@${card.loop}\\)`));
      // A device built already (here without a card), by name and as the only row of a CSV.
      const built = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "lab-built", "-q"]);
      expect(built.code, built.stderr).toBe(0);
      before = JSON.stringify(registry());
      writeFileSync(join(ws, "done.csv"), "hostname\nlab-built\n");
      refused([`lab-built@${card.loop}`], new RegExp(`error: target lab-built@${card.loop}: lab-built is already registered \\(active\\)`));
      refused([`lab-built@${card.loop}`], new RegExp(`error: target lab-built@${card.loop}: lab-built is already registered \\(active\\)`), ["--hosts", "done.csv"]);
      refused([card.loop], /error: --hosts done.csv: 0 row\(s\) left to build, for 1 card/, ["--hosts", "done.csv"]);
      const small = cards.make("small", 8 << 20);
      refused([card.loop, small.loop], new RegExp(`error: card ${small.loop}: ${8 << 20} bytes, but the base is ${readFileSync(base.path).length}`));
    });
  });
});

describe("flash's progress: one line per card, cut to the terminal's width", () => {
  it("redraws the block of lines in place, each line at most the width", () => {
    let width = 60;
    let text = "";
    const lines = new CardLines({ tty: true, silent: false, color: false, write: (s) => (text += s), columns: () => width });
    lines.start(["/dev/disk/by-id/usb-Generic_STORAGE_DEVICE_000000000208-0:0", "/dev/sdc"], 1_650_000_000);
    lines.name(0, "pj-0001");
    lines.update(0, { phase: "base", done: 412_000_000, total: 1_650_000_000 });
    lines.update(1, { phase: "overlay", done: 0, total: 0 });
    width = 40;
    lines.finish(1, "FAILED (base): writing the base failed: EIO: i/o error, fsync; pj-0002 given back", false);
    lines.stop();
    const drawn = text.split("\n").filter(Boolean).map((l) => l.replace(new RegExp(`${String.fromCharCode(27)}\\[\\d*[A-Za-z]`, "g"), "").replace(/^\r/, ""));
    expect(drawn.length).toBeGreaterThanOrEqual(4);
    for (const l of drawn.slice(0, 2)) expect(l.length, l).toBeLessThanOrEqual(59);
    for (const l of drawn.slice(-2)) expect(l.length, l).toBeLessThanOrEqual(39);
    expect(drawn[0]).toMatch(/^\/dev\/disk\/by-id\/usb-Generic_STORAGE_DEVICE_000000000208-0:…$/);
    expect(drawn.at(-2)).toMatch(/^\/dev\/disk\/by-id\/usb-Generic_STOR[A-Z_]*…$/);
    width = 200;
    text = "";
    lines.stop();
    expect(text).toMatch(/\/dev\/disk\/by-id\/usb-Generic_STORAGE_DEVICE_000000000208-0:0 pj-0001: writing {2}24% 412\.0\/1650\.0 MB/);
    expect(drawn.at(-1)).toMatch(/^\/dev\/sdc: FAILED .*…$/);
    expect(drawn.at(-1)!.length).toBe(39);
    // Moved up over the block before each redraw, never scrolling a new block per tick.
    expect(text).toContain("\x1b[2A");
  });

  it("not a terminal: a plain line per card when it is done", () => {
    let text = "";
    const lines = new CardLines({ tty: false, silent: false, color: false, write: (s) => (text += s) });
    lines.start(["/dev/sdb", "/dev/sdc"], 8_000_000);
    lines.name(0, "pj-0001");
    lines.update(0, { phase: "base", done: 4_000_000, total: 8_000_000 });
    lines.finish(0, "verified, registered with port 21000 (3.1 s)", true);
    lines.stop();
    expect(text).toBe("mkoverlay: flashing 2 card(s), 8.0 MB of the base each\nmkoverlay: /dev/sdb pj-0001: verified, registered with port 21000 (3.1 s)\n");
  });
});
