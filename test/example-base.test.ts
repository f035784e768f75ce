/**
 * Issue 22, "a small base image, documented and tested": docs/image-builders.md's recipe is run
 * as written, as an unprivileged user (nobody), and what it makes is a disk shaped like
 * Raspberry Pi OS's (MBR; p1 FAT32 "bootfs"; p2 ext4 "rootfs" without 64bit and huge_file, as
 * pi-gen makes it; a merged-/usr root) that `mkoverlay image` takes and `verify` checks.
 */
import { chmodSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { requires, root } from "./helpers/capability.js";
import { readPub, removeDir, REPO, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const DOC = readFileSync(join(REPO, "docs/image-builders.md"), "utf8");

function block(name: string): string {
  const at = DOC.indexOf(`<!-- tested: ${name} -->`);
  if (at < 0) throw new Error(`docs/image-builders.md has no block marked ${name}`);
  const m = /```sh\n([\s\S]*?)```/.exec(DOC.slice(at));
  if (!m) throw new Error(`no sh block after ${name}`);
  return m[1]!;
}

const dir = tempDir("mko-example-base-");
afterAll(() => removeDir(dir));

requires(root)("docs/image-builders.md: the small base image", () => {
  const ws = join(dir, "ws");
  beforeAll(() => {
    // nobody makes it in a folder of its own (the test's tempdir is root's 0700).
    chmodSync(dir, 0o711);
    run("install", ["-d", "-o", "nobody", "-g", "nogroup", "-m", "0755", ws]);
  });

  it("runs as written, as an ordinary user, and makes a Raspberry Pi OS-shaped disk", () => {
    const r = run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh", "-eu", "-c", block("example base.img")], { cwd: ws, env: { PATH: "/usr/local/bin:/usr/bin:/bin", HOME: ws } });
    expect(r.code, r.stderr).toBe(0);
    const img = join(ws, "base.img");
    const table = JSON.parse(run("/usr/sbin/sfdisk", ["--json", img]).stdout) as { partitiontable: { label: string; partitions: { start: number; size: number; type: string }[] } };
    expect(table.partitiontable.label).toBe("dos");
    expect(table.partitiontable.partitions.map((p) => [p.start, p.type])).toEqual([
      [8192, "c"],
      [139264, "83"],
    ]);
    const fat = run("sh", ["-c", `dd if=${img} bs=512 skip=8192 count=1 status=none | od -An -c -j 71 -N 11`]);
    expect(fat.stdout.replace(/\s+/g, "")).toBe("bootfs");
    const ext = run("/usr/sbin/dumpe2fs", ["-h", `${img}?offset=${139264 * 512}`]);
    expect(ext.code, ext.stderr).toBe(0);
    expect(ext.stdout).toMatch(/^Filesystem volume name:\s+rootfs$/m);
    const features = /^Filesystem features:\s+(.*)$/m.exec(ext.stdout)![1]!.split(/\s+/);
    expect(features).toContain("has_journal");
    expect(features).not.toContain("64bit");
    expect(features).not.toContain("huge_file");
    const lib = run("/usr/sbin/debugfs", ["-R", "stat /lib", `${img}?offset=${139264 * 512}`]);
    expect(lib.stdout).toMatch(/Fast link dest: "usr\/lib"/);
  });

  it("mkoverlay image takes it, and verify reads the device back from it", () => {
    const fleet = writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
    const env = { MKOVERLAY_CONFIG: fleet, MKOVERLAY_REGISTRY: join(dir, "registry.db") };
    const b = runCli(["image", "--base", join(ws, "base.img"), "--board", "rpi4", "--bastion", "eu", "--out", join(dir, "out"), "--json"], { cwd: dir, env });
    expect(b.code, b.stderr).toBe(0);
    const image = join(dir, "out", `${(JSON.parse(b.stdout) as { hostname: string }).hostname}.img`);
    const v = runCli(["verify", image], { cwd: dir, env });
    expect(v.code, v.stderr + v.stdout).toBe(0);
  });
});
