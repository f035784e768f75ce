/**
 * I/O the station can fix is a user error, not a bug: a full disk, a read-only mount, a missing
 * permission, something in the way. Each case runs the CLI against a real file system made to
 * fail (a tiny tmpfs, a read-only bind mount, an unprivileged user, a dangling symlink, a mount
 * point in the way) and asserts exit 2, one message naming the path, no stack, no `.tmp`
 * debris, no overlay and no lines file for the given-up device, and the registry's devices as
 * before with the port given back.
 *
 * Mounting needs root (so does --apply): as another user these cases are skipped, loudly.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ioUserError } from "../src/util/errors.js";
import { requires, root } from "./helpers/capability.js";
import { readPub, removeDir, run, runCli, runCliAsNobody, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-io-");
const mounts: string[] = [];
const cli = (args: string[]) => runCli(args, { cwd: dir });
const PORTS = { ssh: "21000-21009", services: "22000-22009" };

function mount(args: string[], at: string): void {
  const r = run("mount", [...args, at]);
  if (r.code !== 0) throw new Error(`mount ${args.join(" ")} ${at}: ${r.stderr}`);
  mounts.unshift(at);
}

/** A tmpfs with exactly one 4 KiB page left: a small file fits, an overlay archive does not. */
function nearlyFull(name: string): string {
  const at = join(dir, name);
  mkdirSync(at);
  mount(["-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"], at);
  writeFileSync(join(at, "spare"), Buffer.alloc(4096));
  spawnSync("dd", ["if=/dev/zero", `of=${join(at, "filler")}`, "bs=4096"], { stdio: "ignore" });
  run("rm", [join(at, "spare")]);
  return at;
}

function filesUnder(root: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      out.push(relative(root, p));
      if (e.isDirectory()) walk(p);
    }
  };
  if (existsSync(root)) walk(root);
  return out;
}

const devices = () => cli(["registry", "list", "--json"]).stdout;

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Exit 2, exactly one error line `<path>: <what> (<syscall>)`, a hint, no stack. */
function expectUserIoError(r: { code: number; stdout: string; stderr: string }, path: string | RegExp, what: RegExp): void {
  expect(r.code, r.stderr).toBe(2);
  const errors = r.stderr.split("\n").filter((l) => l.startsWith("mkoverlay: error:"));
  expect(errors, r.stderr).toHaveLength(1);
  const p = typeof path === "string" ? esc(path) : path.source;
  expect(errors[0]).toMatch(new RegExp(`^mkoverlay: error: ${p}: ${what.source}`));
  expect(r.stderr).toMatch(/^mkoverlay: hint: /m);
  expect(r.stderr).not.toMatch(/internal error|This is a bug|\n\s+at /);
}

beforeAll(() => {
  writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } }, { ports: PORTS });
});

afterAll(() => {
  for (const m of mounts) run("umount", ["-l", m]);
  removeDir(dir);
});

requires(root)("I/O failures are user errors (exit 2), with nothing left behind", () => {
  let before: string;
  beforeAll(() => {
    before = devices();
  });

  it.each([["tar", []], ["dir", ["--format", "dir"]]] as const)("ENOSPC: a full --out (%s)", (form, extra) => {
    const out = join(nearlyFull(`full-${form}`), "out");
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", `full-${form}`, "--out", out, ...extra]);
    const overlay = join(out, form === "tar" ? `full-${form}.overlay.tar.gz` : `full-${form}.overlay`);
    expectUserIoError(r, overlay, /no space left on device \(write\)$/);
    expect(r.stderr).toMatch(/hint: free space on that file system, or write elsewhere \(--out\)/);
    // Not the archive, not the lines file of the given-up device, no temp.
    expect(filesUnder(out)).toEqual([]);
    expect(devices()).toBe(before);
  });

  it("ENOSPC: a full --apply root, with --debug the stack is there", () => {
    const root = nearlyFull("full-root");
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "full-apply", "--apply", root, "--out", join(dir, "out-apply"), "--debug"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(new RegExp(`^mkoverlay: error: ${root}/\\S+: no space left on device \\(write\\)$`, "m"));
    expect(r.stderr).toMatch(/\n\s+at /);
    expect(r.stderr).not.toMatch(/This is a bug/);
    expect(filesUnder(root).filter((f) => f.endsWith(".tmp"))).toEqual([]);
    expect(devices()).toBe(before);
  });

  it("EROFS: --apply onto a read-only mount", () => {
    const src = join(dir, "ro-src");
    mkdirSync(join(src, "etc"), { recursive: true });
    const root = join(dir, "ro-root");
    mkdirSync(root);
    mount(["--bind", src], root);
    mount(["-o", "remount,bind,ro"], root);
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "ro-apply", "--apply", root, "--out", join(dir, "out-ro")]);
    expectUserIoError(r, new RegExp(`${esc(root)}/etc/[^ ]+`), /read-only file system \(mkdir\)$/);
    expect(r.stderr).toMatch(/hint: remount it read-write/);
    expect(filesUnder(src)).toEqual(["etc"]);
    expect(devices()).toBe(before);
  });

  it("EEXIST: a dangling symlink where --apply makes a folder; no .tmp left", () => {
    const root = join(dir, "dangling-root");
    mkdirSync(join(root, "etc/ssh"), { recursive: true });
    symlinkSync("/nonexistent/mkoverlay", join(root, "etc/ssh/mkoverlay"));
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "dangling", "--apply", root, "--out", join(dir, "out-dangling")]);
    expectUserIoError(r, join(root, "etc/ssh/mkoverlay"), /already exists \(mkdir\)$/);
    expect(r.stderr).toMatch(/dangling symbolic link/);
    expect(filesUnder(root).filter((f) => f.endsWith(".tmp"))).toEqual([]);
    expect(devices()).toBe(before);
  });

  it("EBUSY: a mount point where --apply puts a file; its temp is removed", () => {
    const root = join(dir, "busy-root");
    mkdirSync(join(root, "etc"), { recursive: true });
    writeFileSync(join(root, "etc/hostname"), "old\n");
    writeFileSync(join(dir, "elsewhere"), "x\n");
    mount(["--bind", join(dir, "elsewhere")], join(root, "etc/hostname"));
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "busy", "--apply", root, "--out", join(dir, "out-busy")]);
    expectUserIoError(r, join(root, "etc/hostname"), /device or resource busy \(rename\)$/);
    expect(filesUnder(root).filter((f) => f.endsWith(".tmp"))).toEqual([]);
    expect(devices()).toBe(before);
  });

  it("EISDIR: a folder where the archive goes", () => {
    const out = join(dir, "out-isdir");
    mkdirSync(join(out, "isdir.overlay.tar.gz"), { recursive: true });
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--hostname", "isdir", "--out", out]);
    expectUserIoError(r, join(out, "isdir.overlay.tar.gz"), /is a directory \(rename\)$/);
    expect(filesUnder(out)).toEqual(["isdir.overlay.tar.gz"]);
    expect(devices()).toBe(before);
  });

  it("EACCES: an unprivileged user writing into a folder it may not write", () => {
    chmodSync(dir, 0o755);
    const locked = join(dir, "locked");
    mkdirSync(locked, { mode: 0o755 });
    const r = runCliAsNobody(["schema", "--out", join(locked, "fleet.json")], { cwd: dir });
    expectUserIoError(r, join(locked, "fleet.json"), /permission denied \(open\)$/);
    expect(readdirSync(locked)).toEqual([]);
  });

  it("after all that, the ports were given back: the next device gets the first one", () => {
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--json", "--out", join(dir, "out-ok")]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).port).toBe(21000);
  });
});

describe("ioUserError: which errors are the station's to fix", () => {
  const err = (code: string, syscall: string, extra: Record<string, string> = {}) => Object.assign(new Error(`${code}: …`), { code, syscall, ...extra });

  it.each([
    ["ENOSPC", "write", "no space left on device"],
    ["EDQUOT", "write", "disk quota exceeded"],
    ["EACCES", "open", "permission denied"],
    ["EROFS", "mkdir", "read-only file system"],
    ["EEXIST", "mkdir", "already exists"],
    ["EBUSY", "rename", "device or resource busy"],
    ["EPERM", "chown", "operation not permitted"],
    ["EISDIR", "rename", "is a directory"],
    ["ENOTDIR", "open", "not a directory"],
    ["EMFILE", "open", "too many open files"],
    ["EIO", "read", "input/output error"],
  ])("%s names the path, says what happened and what to do", (code, syscall, what) => {
    const u = ioUserError(err(code, syscall, { path: "/x/y" }));
    expect(u?.message).toBe(`/x/y: ${what} (${syscall})`);
    expect(u?.hint).toBeTruthy();
    expect(u?.exitCode).toBe(2);
  });

  it("a rename or symlink names its destination", () => {
    expect(ioUserError(err("EBUSY", "rename", { path: "/a/.t.tmp", dest: "/a/t" }))?.message).toBe("/a/t: device or resource busy (rename)");
  });

  it("errors that are not about a file stay bugs", () => {
    expect(ioUserError(new Error("boom"))).toBeUndefined();
    expect(ioUserError(Object.assign(new Error("x"), { code: "ERR_INVALID_ARG_TYPE" }))).toBeUndefined();
    expect(ioUserError(err("EINVAL", "write", { path: "/x" }))).toBeUndefined();
  });
});
