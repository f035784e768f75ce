/**
 * docs/image-builders.md, run as written: its pi-gen stage script, rpi-image-gen layer hook and
 * Buildroot post-fakeroot script are extracted from the document and run against scratch roots
 * shaped like Raspberry Pi OS (merged /usr: /lib -> usr/lib), as each builder runs them — pi-gen
 * and mmdebstrap as root, Buildroot as an ordinary user under fakeroot followed by `mke2fs -d`
 * in the same session. `mkoverlay verify` then checks every result against the registry. Also:
 * `--format dir` as an ordinary user is refused, pointing at the archive.
 */
import { chmodSync, chownSync, lstatSync, mkdirSync, readFileSync, readlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { requires, root, tools } from "./helpers/capability.js";
import { makeRootTree, SBIN_PATH } from "./helpers/disk.js";
import { readPub, removeDir, REPO, run, runCli, runCliAsNobody, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const DOC = readFileSync(join(REPO, "docs/image-builders.md"), "utf8");

/** The fenced block right after `<!-- tested: NAME -->` in the document. */
function block(name: string): string {
  const at = DOC.indexOf(`<!-- tested: ${name} -->`);
  if (at < 0) throw new Error(`docs/image-builders.md has no block marked ${name}`);
  const m = /```[a-z]*\n([\s\S]*?)```/.exec(DOC.slice(at));
  if (!m) throw new Error(`no fenced block after ${name}`);
  return m[1]!;
}

const dir = tempDir("mko-builders-");
let ws = "";
let archive = "";
const cli = (args: string[]) => runCli(args, { cwd: ws });

beforeAll(() => {
  ws = join(dir, "ws");
  mkdirSync(ws);
  writeFleet(ws, { eu: { hostKeys: [readPub(sshKeygen(ws, "bastion"))] } });
  const r = cli(["--board", "rpi4", "--bastion", "eu", "--out", join(ws, "out"), "--json"]);
  expect(r.code, r.stderr).toBe(0);
  archive = (JSON.parse(r.stdout) as { overlay: string }).overlay;
});
afterAll(() => removeDir(dir));

function expectVerified(target: string): void {
  const v = cli(["verify", target]);
  expect(v.code, v.stdout + v.stderr).toBe(0);
  expect(v.stdout).toMatch(/^ok +the key is registered to gw-0001$/m);
}

/** The merged-/usr links a scratch root starts with must survive the extraction. */
function expectLinksKept(root: string): void {
  expect(lstatSync(join(root, "lib")).isSymbolicLink()).toBe(true);
  expect(readlinkSync(join(root, "lib"))).toBe("usr/lib");
}

requires(root)("pi-gen and rpi-image-gen recipes (run as root, as those builders do)", () => {
  it("pi-gen: the stage's 00-run.sh lays the archive over ROOTFS_DIR; verify passes", () => {
    const stage = join(dir, "stage-mkoverlay", "00-mkoverlay");
    mkdirSync(join(stage, "files"), { recursive: true });
    writeFileSync(join(stage, "00-run.sh"), block("pi-gen 00-run.sh"), { mode: 0o755 });
    writeFileSync(join(stage, "files/overlay.tar.gz"), readFileSync(archive));
    const root = join(dir, "pigen-rootfs");
    makeRootTree(root);
    const r = run("./00-run.sh", [], { cwd: stage, env: { ROOTFS_DIR: root } });
    expect(r.code, r.stderr).toBe(0);
    expectLinksKept(root);
    expectVerified(root);
  });

  it("rpi-image-gen: the layer's customize hook lays the archive over $1; verify passes", () => {
    const layer = block("rpi-image-gen layer/mkoverlay.yaml");
    const hook = /customize-hooks:\n\s+- (.*)\n/.exec(layer)![1]!;
    const root = join(dir, "rig-rootfs");
    makeRootTree(root);
    // mmdebstrap runs each hook with sh -c, the root as $1.
    const r = run("sh", ["-c", hook, "sh", root], { env: { IGconf_mkoverlay_archive: archive } });
    expect(r.code, r.stderr).toBe(0);
    expectLinksKept(root);
    expectVerified(root);
  });
});

requires(root, tools("fakeroot"))("Buildroot recipe (an ordinary user under fakeroot)", () => {
  it("the post-fakeroot script, then mke2fs -d in the same session: the image's root holds the overlay as root:root; verify passes", () => {
    const work = join(dir, "buildroot");
    mkdirSync(work);
    const target = join(work, "target");
    makeRootTree(target);
    const script = join(work, "mkoverlay-fakeroot.sh");
    writeFileSync(script, block("buildroot mkoverlay-fakeroot.sh"), { mode: 0o755 });
    const mine = join(work, "overlay.tar.gz");
    writeFileSync(mine, readFileSync(archive));
    run("chown", ["-R", "65534:65534", work]);
    chmodSync(dir, 0o711);
    chownSync(work, 65534, 65534);
    const img = join(work, "rootfs.ext4");
    // What Buildroot's generated fakeroot script does: own the tree as root, run the
    // post-fakeroot scripts with TARGET_DIR, then make the image (rootfs-ext2: mkfs -d).
    const session = `set -e; chown -h -R 0:0 "$1"; "$2" "$1"; mke2fs -q -t ext4 -d "$1" "$3" 64M`;
    const r = run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "fakeroot", "--", "sh", "-c", session, "sh", target, script, img], {
      env: { PATH: SBIN_PATH, HOME: work, MKOVERLAY_ARCHIVE: mine },
    });
    expect(r.code, r.stderr).toBe(0);
    // Outside fakeroot the tree is nobody's; the image made inside it is root's.
    expect(lstatSync(join(target, "etc/ssh/mkoverlay/ssh_host_ed25519_key")).uid).toBe(65534);
    expectVerified(img);
  });
});

requires(root)("--format dir as an ordinary user", () => {
  it("is refused (exit 2) with a pointer to the archive; nothing written, nothing reserved", () => {
    const w = join(dir, "dir-user");
    mkdirSync(w);
    writeFleet(w, { eu: { hostKeys: [readPub(sshKeygen(w, "bastion"))] } });
    chownSync(w, 65534, 65534);
    chmodSync(dir, 0o711);
    const r = runCliAsNobody(["--board", "rpi4", "--bastion", "eu", "--format", "dir", "--out", join(w, "out")], {
      cwd: w,
      env: { HOME: w, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", MKOVERLAY_CACHE: "off" },
    });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^mkoverlay: error: --format dir needs root: as another user the files would be owned by you, not root:root$/m);
    expect(r.stderr).toMatch(/hint: use the archive .*docs\/image-builders\.md/);
    expect(run("ls", ["-A", w]).stdout.trim().split("\n").sort()).toEqual(["bastion", "bastion.pub", "mkoverlay.yaml"]);
  });
});
