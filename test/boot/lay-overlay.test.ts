/**
 * Fast check (no VM) of how the boot harness lays an overlay tar into an ext4 image:
 * modes kept, owners forced to 0:0, symlinks (also to /dev/null) kept, existing files and
 * symlinks replaced, implied parents created, paths through /lib -> usr/lib followed, and
 * what GNU tar would do destructively (directory entry over a directory symlink) refused.
 * Needs only e2fsprogs and GNU tar. Skipped locally without them; fails with CI=true.
 */
import { spawnSync } from "node:child_process";
import { chmod, link, mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { requires, tools } from "../helpers/capability.js";
import { imageReadFile, imageReadlink, imageStat, layOverlay } from "./boot.js";

const e2fs = tools("mke2fs", "debugfs", "e2fsck", "tar");

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: "utf8", env: { ...process.env, PATH: `${process.env.PATH ?? ""}:/usr/sbin:/sbin` } });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.status}: ${r.stderr}`);
}

async function put(root: string, rel: string, content: string, mode: number): Promise<void> {
  const p = join(root, rel);
  await mkdir(dirname(p), { recursive: true });
  await writeFile(p, content);
  await chmod(p, mode);
}

requires(e2fs)("layOverlay (debugfs into ext4, no mount)", () => {
  let work = "";
  let image = "";

  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), "mkoverlay-lay-"));
    // A tiny "base image": merged-/usr style /lib symlink, an sshd_config, a stale symlink.
    const base = join(work, "base");
    await mkdir(base);
    await chmod(base, 0o755);
    await put(base, "etc/ssh/sshd_config", "# stock\n", 0o644);
    await put(base, "etc/ssh/ssh_host_ed25519_key", "stock key\n", 0o600);
    await put(base, "usr/lib/systemd/system/ssh.service", "[Unit]\n", 0o644);
    await mkdir(join(base, "etc/systemd/system"), { recursive: true });
    await symlink("usr/lib", join(base, "lib"));
    await symlink("/nowhere", join(base, "etc/systemd/system/old.service"));
    image = join(work, "rootfs.ext4");
    sh("mke2fs", ["-q", "-t", "ext4", "-d", base, image, "16M"]);
  });

  afterAll(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  it("keeps modes and symlinks, forces owner 0:0, replaces files, follows /lib", async () => {
    const tree = join(work, "ov1");
    await mkdir(tree);
    await chmod(tree, 0o755);
    await put(tree, "etc/ssh/mkoverlay/ssh_host_ed25519_key", "device key\n", 0o600);
    await chmod(join(tree, "etc/ssh/mkoverlay"), 0o700);
    await put(tree, "etc/ssh/sshd_config", "# replaced\n", 0o600);
    await put(tree, "usr/local/bin/tool", "#!/bin/sh\n", 0o4750);
    await put(tree, "lib/systemd/system/extra.service", "[Unit]\n", 0o644); // via /lib -> usr/lib
    await mkdir(join(tree, "etc/systemd/system"), { recursive: true });
    await symlink("/dev/null", join(tree, "etc/systemd/system/regenerate_ssh_host_keys.service"));
    await writeFile(join(tree, "etc/systemd/system/old.service"), "[Unit]\n"); // file over symlink
    const tar = join(work, "ov1.tar.gz");
    // Only file/symlink members plus etc/ssh/mkoverlay: parents are implied, and uid/gid 1234
    // in the tar must come out as 0:0.
    sh("tar", [
      "--owner=1234", "--group=4321", "--numeric-owner", "--no-recursion", "-czf", tar, "-C", tree,
      "etc/ssh/mkoverlay", "etc/ssh/mkoverlay/ssh_host_ed25519_key", "etc/ssh/sshd_config", "usr/local/bin/tool",
      "lib/systemd/system/extra.service", "etc/systemd/system/regenerate_ssh_host_keys.service",
      "etc/systemd/system/old.service",
    ]);
    await layOverlay(image, tar, join(work, "staging1"));

    expect(await imageStat(image, "/etc/ssh/mkoverlay")).toEqual({ type: "directory", mode: 0o700, uid: 0, gid: 0 });
    expect(await imageStat(image, "/etc/ssh/mkoverlay/ssh_host_ed25519_key")).toEqual({ type: "file", mode: 0o600, uid: 0, gid: 0 });
    expect(await imageReadFile(image, "/etc/ssh/mkoverlay/ssh_host_ed25519_key")).toBe("device key\n");
    expect(await imageStat(image, "/etc/ssh/sshd_config")).toEqual({ type: "file", mode: 0o600, uid: 0, gid: 0 });
    expect(await imageReadFile(image, "/etc/ssh/sshd_config")).toBe("# replaced\n");
    expect(await imageStat(image, "/usr/local/bin/tool")).toEqual({ type: "file", mode: 0o4750, uid: 0, gid: 0 });
    expect(await imageStat(image, "/usr/local")).toEqual({ type: "directory", mode: 0o755, uid: 0, gid: 0 });
    expect(await imageStat(image, "/lib")).toMatchObject({ type: "symlink" }); // not replaced
    expect(await imageStat(image, "/usr/lib/systemd/system/extra.service")).toMatchObject({ type: "file", mode: 0o644 });
    const mask = "/etc/systemd/system/regenerate_ssh_host_keys.service";
    expect(await imageStat(image, mask)).toMatchObject({ type: "symlink", uid: 0, gid: 0 });
    expect(await imageReadlink(image, mask)).toBe("/dev/null");
    expect(await imageStat(image, "/etc/systemd/system/old.service")).toMatchObject({ type: "file" });
    expect(await imageStat(image, "/etc/ssh/ssh_host_ed25519_key")).toMatchObject({ type: "file" }); // untouched
  });

  it("refuses a directory entry over a directory symlink (tar would replace /lib)", async () => {
    const tree = join(work, "ov2");
    await put(tree, "lib/systemd/system/x.service", "[Unit]\n", 0o644);
    const tar = join(work, "ov2.tar");
    sh("tar", ["--owner=0", "--group=0", "--numeric-owner", "-cf", tar, "-C", tree, "lib"]);
    await expect(layOverlay(image, tar, join(work, "staging2"))).rejects.toThrow(/\/lib, which is a symlink/);
  });

  it("refuses hard links and paths that escape the root", async () => {
    const tree = join(work, "ov3");
    await put(tree, "etc/a", "x\n", 0o644);
    await link(join(tree, "etc/a"), join(tree, "etc/b"));
    const tar = join(work, "ov3.tar");
    sh("tar", ["-cf", tar, "-C", tree, "etc/a", "etc/b"]);
    await expect(layOverlay(image, tar, join(work, "staging3"))).rejects.toThrow(/not supported/);
    const tar2 = join(work, "ov4.tar");
    sh("tar", ["-cf", tar2, "-C", tree, "--transform", "s,^etc/a,../evil,", "etc/a"]);
    await expect(layOverlay(image, tar2, join(work, "staging4"))).rejects.toThrow(/escapes the root/);
  });
});
