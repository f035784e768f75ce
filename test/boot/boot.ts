/**
 * Boot-test harness: lay a rootfs overlay (.tar / .tar.gz) into a cached Debian bookworm base
 * image, boot it under qemu (TCG, no KVM), and run a throwaway bastion sshd on loopback.
 *
 * Network rule: everything here talks to 127.0.0.1 / ::1 only. The guest runs on qemu user
 * networking with `restrict=on` and a single guestfwd (10.0.2.100:22 in the guest -> socat ->
 * 127.0.0.1:<bastionPort> on the host).
 *
 * The base image comes from ./build-base.sh (cache outside the repo, see that script).
 */
import { isRoot } from "../helpers/capability.js";
import { canConnect, freePort } from "../helpers/net.js";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createReadStream, existsSync, readFileSync, readSync, readdirSync, openSync, closeSync } from "node:fs";
import { copyFile, mkdir, readFile, writeFile, chmod, stat } from "node:fs/promises";
import { connect } from "node:net";
import { dirname, join, posix } from "node:path";
import { fileURLToPath } from "node:url";
import { createGunzip } from "node:zlib";
import { Readable } from "node:stream";
import tarStream from "tar-stream";

const HERE = dirname(fileURLToPath(import.meta.url));
export const ENSURE_DEPS_SCRIPT = join(HERE, "ensure-deps.sh");
export const BUILD_BASE_SCRIPT = join(HERE, "build-base.sh");
/** Address the guest uses to reach the bastion (forwarded by qemu's guestfwd). */
export const GUEST_BASTION_ADDR = "10.0.2.100";
export const GUEST_BASTION_PORT = 22;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Prerequisites and base image
// ---------------------------------------------------------------------------------------------

/** How the harness boots one guest architecture (Debian architecture name as the key). */
export interface BootArchProfile {
  /** The qemu system emulator for it. */
  qemu: string;
  /** Machine and CPU (always TCG: no KVM, and arm64 runs on an x86-64 host anyway). */
  machineArgs: string[];
  /** The root disk (virtio-blk) for an image path. */
  diskArgs: (image: string) => string[];
  /** The virtio NIC on netdev n0 (PCI: the guest names it en*, which the base image configures). */
  nicArgs: string[];
}

export const BOOT_ARCH_PROFILES: Readonly<Record<string, BootArchProfile>> = {
  amd64: {
    qemu: "qemu-system-x86_64",
    machineArgs: [],
    diskArgs: (image) => ["-drive", `file=${image},format=raw,if=virtio,cache=unsafe`],
    nicArgs: ["-device", "virtio-net-pci,netdev=n0"],
  },
  arm64: {
    // The virt board: PL011 UART (console=ttyAMA0 in the base image's cmdline), generic PCIe host.
    qemu: "qemu-system-aarch64",
    machineArgs: ["-M", "virt", "-cpu", "cortex-a72"],
    diskArgs: (image) => ["-drive", `file=${image},format=raw,if=none,id=d0,cache=unsafe`, "-device", "virtio-blk-pci,drive=d0"],
    nicArgs: ["-device", "virtio-net-pci,netdev=n0"],
  },
};

/** Guest architectures the harness can build and boot. */
export const SUPPORTED_BOOT_ARCHES: readonly string[] = Object.keys(BOOT_ARCH_PROFILES);

function bootArchProfile(arch: string): BootArchProfile {
  const p = BOOT_ARCH_PROFILES[arch];
  if (!p) throw new Error(`unsupported boot architecture ${arch} (supported: ${SUPPORTED_BOOT_ARCHES.join(", ")})`);
  return p;
}

/** The guest architecture asked for with MKOVERLAY_BOOT_ARCH (`make test-boot ARCH=…`); default amd64. */
export function requestedBootArch(): string {
  return process.env.MKOVERLAY_BOOT_ARCH?.trim() || "amd64";
}

/** True when MKOVERLAY_BOOT_ARCH names an architecture explicitly (a request that must not be skipped). */
export function bootArchExplicit(): boolean {
  return Boolean(process.env.MKOVERLAY_BOOT_ARCH?.trim());
}

export interface BootPrerequisites {
  ok: boolean;
  /** Why the boot test cannot run here (empty when ok). */
  problems: string[];
}

function which(cmd: string): string | undefined {
  const dirs = (process.env.PATH ?? "").split(":").concat(["/usr/sbin", "/sbin", "/usr/bin", "/bin"]);
  for (const d of dirs) {
    const p = join(d, cmd);
    if (d && existsSync(p)) return p;
  }
  return undefined;
}

/**
 * Check (and, as root, install with ensure-deps.sh) what the boot test needs.
 * Never throws; callers decide whether a problem means skip (local) or fail (CI).
 */
export function checkBootPrerequisites(opts: { install?: boolean } = {}): BootPrerequisites {
  const problems: string[] = [];
  if (process.platform !== "linux") problems.push(`needs Linux (this is ${process.platform})`);
  if (process.arch !== "x64") problems.push(`the harness runs on an x86-64 host (amd64 and arm64 guests); host arch ${process.arch} untested`);
  const arch = requestedBootArch();
  const profile = BOOT_ARCH_PROFILES[arch];
  if (!profile) {
    problems.push(`MKOVERLAY_BOOT_ARCH=${arch} is not supported by the boot harness (supported: ${SUPPORTED_BOOT_ARCHES.join(", ")})`);
  }
  if (!isRoot) problems.push("needs root (debootstrap for the base image; bastion sshd switching to the tunnel user)");
  if (opts.install !== false && isRoot && profile) {
    // arm64 also needs qemu-user-static and an enabled binfmt_misc handler (ensure-deps.sh).
    const r = spawnSync("bash", [ENSURE_DEPS_SCRIPT], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, MKOVERLAY_BOOT_ARCH: arch },
    });
    if (r.status !== 0) problems.push(`ensure-deps.sh failed (${r.status}): ${(r.stderr || "").trim().split("\n").slice(-5).join(" | ")}`);
  }
  const deps = [profile?.qemu ?? "qemu-system-x86_64", "debugfs", "mke2fs", "socat", "sshd", "ssh", "ssh-keygen", "tar"];
  for (const c of deps) {
    if (!which(c)) problems.push(`missing ${c} (run MKOVERLAY_BOOT_ARCH=${arch} test/boot/ensure-deps.sh as root)`);
  }
  return { ok: problems.length === 0, problems };
}

export interface BaseImage {
  /** Cache directory of this recipe (…/mkoverlay-boot/base-<arch>-<hash>). */
  dir: string;
  /** Debian architecture of the image (amd64, arm64). */
  arch: string;
  rootfs: string;
  kernel: string;
  initrd: string;
  cmdline: string;
  /** Test-only operator key, authorized for root in the base image (never part of an overlay). */
  operatorKey: string;
  operatorKeyPub: string;
  manifest: Record<string, string>;
}

/**
 * Build the base image for `arch` (default: MKOVERLAY_BOOT_ARCH, else amd64) if the cached one is
 * missing or stale (amd64 ~1 min; arm64 ~4 min, its binaries run under qemu-user), else reuse it.
 */
export async function ensureBaseImage(opts: { log?: (line: string) => void; arch?: string } = {}): Promise<BaseImage> {
  const log = opts.log ?? ((l: string) => process.stderr.write(l + "\n"));
  const arch = opts.arch ?? requestedBootArch();
  bootArchProfile(arch);
  const { code, stdout, stderr } = await run("bash", [BUILD_BASE_SCRIPT], { onStderrLine: log, env: { MKOVERLAY_BOOT_ARCH: arch } });
  if (code !== 0) {
    throw new Error(`build-base.sh exited ${code}:\n${stderr.split("\n").slice(-30).join("\n")}`);
  }
  const dir = stdout.trim().split("\n").pop() ?? "";
  if (!dir || !existsSync(join(dir, "manifest"))) throw new Error(`build-base.sh printed no image dir: ${stdout}`);
  const manifest: Record<string, string> = {};
  for (const line of readFileSync(join(dir, "manifest"), "utf8").split("\n")) {
    const i = line.indexOf("=");
    if (i > 0) manifest[line.slice(0, i)] = line.slice(i + 1);
  }
  if (manifest.arch !== arch) throw new Error(`build-base.sh returned a ${manifest.arch ?? "?"} image (${dir}) for ${arch}`);
  return {
    dir,
    arch,
    rootfs: join(dir, "rootfs.ext4"),
    kernel: join(dir, "vmlinuz"),
    initrd: join(dir, "initrd.img"),
    cmdline: readFileSync(join(dir, "cmdline"), "utf8").trim(),
    operatorKey: join(dir, "operator_ed25519"),
    operatorKeyPub: readFileSync(join(dir, "operator_ed25519.pub"), "utf8").trim(),
    manifest,
  };
}

// ---------------------------------------------------------------------------------------------
// Laying an overlay tar into an ext4 image (debugfs, no mount, no root needed for this part)
// ---------------------------------------------------------------------------------------------

export interface OverlayEntry {
  /** Absolute path in the image, e.g. /etc/ssh/mkoverlay/ssh_host_ed25519_key ("/" for the root entry). */
  path: string;
  type: "file" | "directory" | "symlink";
  /** Permission bits (07777). */
  mode: number;
  /** Symlink target. */
  target?: string;
  data?: Buffer;
}

const SAFE_COMPONENT = /^[A-Za-z0-9._@+:=,~%-]+$/;
const SAFE_TARGET = /^[A-Za-z0-9._@+:=,~%/-]+$/;

function normalizeTarPath(name: string): string {
  const parts = name.split("/").filter((p) => p !== "" && p !== ".");
  for (const p of parts) {
    if (p === "..") throw new Error(`overlay entry escapes the root: ${JSON.stringify(name)}`);
    if (!SAFE_COMPONENT.test(p)) throw new Error(`overlay entry name not supported by the harness: ${JSON.stringify(name)}`);
  }
  return "/" + parts.join("/");
}

/** Read a .tar or .tar.gz into memory (overlays are small). Later duplicates win, as with tar -x. */
export async function readOverlayTar(tarPath: string): Promise<OverlayEntry[]> {
  const head = Buffer.alloc(2);
  const fd = openSync(tarPath, "r");
  try {
    readSync(fd, head, 0, 2, 0);
  } finally {
    closeSync(fd);
  }
  let src: Readable = createReadStream(tarPath);
  if (head[0] === 0x1f && head[1] === 0x8b) src = src.pipe(createGunzip());
  const extract = tarStream.extract();
  src.on("error", (e) => extract.destroy(e));
  src.pipe(extract);
  const byPath = new Map<string, OverlayEntry>();
  for await (const entry of extract) {
    const h = entry.header;
    const chunks: Buffer[] = [];
    for await (const c of entry) chunks.push(c as Buffer);
    const path = normalizeTarPath(h.name);
    const mode = (h.mode ?? 0o644) & 0o7777;
    let e: OverlayEntry;
    switch (h.type) {
      case "file":
      case "contiguous-file":
        e = { path, type: "file", mode, data: Buffer.concat(chunks) };
        break;
      case "directory":
        e = { path, type: "directory", mode };
        break;
      case "symlink": {
        const target = h.linkname ?? "";
        if (!target || !SAFE_TARGET.test(target)) throw new Error(`unsupported symlink target for ${path}: ${JSON.stringify(target)}`);
        e = { path, type: "symlink", mode: 0o777, target };
        break;
      }
      default:
        throw new Error(`overlay entry ${path}: tar type ${String(h.type)} not supported by the boot harness`);
    }
    if (path === "/" && e.type !== "directory") throw new Error("overlay root entry is not a directory");
    byPath.delete(path); // keep tar order of the last occurrence
    byPath.set(path, e);
  }
  return [...byPath.values()];
}

type Kind = "directory" | "file" | "symlink" | "other";
interface ListedInode {
  kind: Kind;
  mode: number; // full i_mode
  uid: number;
  gid: number;
}

function kindOf(mode: number): Kind {
  switch (mode & 0o170000) {
    case 0o040000:
      return "directory";
    case 0o100000:
      return "file";
    case 0o120000:
      return "symlink";
    default:
      return "other";
  }
}

async function debugfs(image: string, cmds: string[], write: boolean): Promise<{ sections: string[][]; stderr: string }> {
  const args = ["-f", "-", image];
  if (write) args.unshift("-w");
  const r = await run("debugfs", args, { input: cmds.join("\n") + "\n", env: { DEBUGFS_PAGER: "__none__", PAGER: "cat" } });
  if (r.code !== 0) throw new Error(`debugfs exited ${r.code}: ${r.stderr}`);
  // stdout: "debugfs: <cmd>" echo, then that command's output.
  const sections: string[][] = [];
  for (const line of r.stdout.split("\n")) {
    if (line.startsWith("debugfs: ")) sections.push([]);
    else if (sections.length > 0 && line !== "") sections[sections.length - 1]!.push(line);
  }
  const stderr = r.stderr
    .split("\n")
    .filter((l) => l.trim() !== "" && !/^debugfs \d/.test(l))
    .join("\n");
  return { sections, stderr };
}

/** List directories (following symlinks in the middle of paths, as the kernel would). */
async function listDirs(image: string, dirs: string[]): Promise<Map<string, Map<string, ListedInode>>> {
  const out = new Map<string, Map<string, ListedInode>>();
  if (dirs.length === 0) return out;
  // "dir/." so that a directory reached through a symlink (/lib -> usr/lib) is listed too.
  const { sections } = await debugfs(image, dirs.map((d) => `ls -p ${d === "/" ? "" : d}/.`), false);
  dirs.forEach((d, i) => {
    const m = new Map<string, ListedInode>();
    for (const line of sections[i] ?? []) {
      // /ino/mode/uid/gid/name/size/
      const f = line.split("/");
      if (f.length < 7) continue;
      const name = f.slice(5, f.length - 2).join("/");
      if (name === "." || name === "..") continue;
      const mode = parseInt(f[2] ?? "", 8);
      m.set(name, { kind: kindOf(mode), mode, uid: Number(f[3]), gid: Number(f[4]) });
    }
    out.set(d, m);
  });
  return out;
}

function parentsOf(p: string): string[] {
  const res: string[] = [];
  let d = posix.dirname(p);
  while (d !== "/") {
    res.unshift(d);
    d = posix.dirname(d);
  }
  return res;
}

/**
 * Lay an overlay tar into a raw ext4 image as `tar -xpf overlay.tar -C /` (GNU tar, as root)
 * would on the device: modes kept, owner and group forced to 0, symlinks (also to /dev/null)
 * kept, existing files and symlinks replaced. Refuses what tar would do destructively but
 * silently (a directory entry over a symlink such as /lib -> usr/lib, which GNU tar replaces by
 * an empty directory unless --keep-directory-symlink) and what the harness does not model
 * (hard links, devices). Verifies the result with a second pass and `e2fsck -fn`.
 */
export async function layOverlay(image: string, overlayTar: string, stagingDir: string): Promise<OverlayEntry[]> {
  const entries = await readOverlayTar(overlayTar);
  await mkdir(stagingDir, { recursive: true });

  const allDirs = new Set<string>(["/"]);
  for (const e of entries) for (const p of parentsOf(e.path)) allDirs.add(p);
  const listed = await listDirs(image, [...allDirs]);
  const state = new Map<string, Kind | "none">();
  const lookup = (p: string): Kind | "none" => {
    if (p === "/") return "directory";
    const s = state.get(p);
    if (s) return s;
    const d = listed.get(posix.dirname(p));
    const k = d?.get(posix.basename(p))?.kind ?? "none";
    state.set(p, k);
    return k;
  };

  const cmds: string[] = [];
  const own = (p: string): void => {
    cmds.push(`sif ${p} uid 0`, `sif ${p} gid 0`);
  };
  const ensureDir = (p: string): void => {
    const k = lookup(p);
    if (k === "directory") return;
    if (k === "symlink") return; // tar follows an existing symlink in the middle of a path
    if (k !== "none") throw new Error(`overlay needs directory ${p}, but the image has a ${k} there`);
    cmds.push(`mkdir ${p}`, `sif ${p} mode 040755`);
    own(p);
    state.set(p, "directory");
  };

  let n = 0;
  for (const e of entries) {
    for (const p of parentsOf(e.path)) ensureDir(p);
    const k = lookup(e.path);
    switch (e.type) {
      case "directory":
        if (k === "symlink") {
          throw new Error(
            `overlay has a directory entry for ${e.path}, which is a symlink in the image: ` +
              "GNU tar would replace it with an empty directory (unless --keep-directory-symlink)",
          );
        }
        if (k === "none") cmds.push(`mkdir ${e.path}`);
        else if (k !== "directory") throw new Error(`overlay directory ${e.path} over a ${k} in the image`);
        cmds.push(`sif ${e.path} mode 0${(0o040000 | e.mode).toString(8)}`);
        own(e.path);
        state.set(e.path, "directory");
        break;
      case "file": {
        if (k === "directory") throw new Error(`overlay file ${e.path} over a directory in the image`);
        if (k !== "none") cmds.push(`rm ${e.path}`);
        const host = join(stagingDir, `f${n++}`);
        await writeFile(host, e.data ?? Buffer.alloc(0), { mode: 0o600 });
        cmds.push(`write ${host} ${e.path}`, `sif ${e.path} mode 0${(0o100000 | e.mode).toString(8)}`);
        own(e.path);
        state.set(e.path, "file");
        break;
      }
      case "symlink":
        if (k === "directory") throw new Error(`overlay symlink ${e.path} over a directory in the image`);
        if (k !== "none") cmds.push(`rm ${e.path}`);
        cmds.push(`symlink ${e.path} ${e.target ?? ""}`);
        own(e.path);
        state.set(e.path, "symlink");
        break;
    }
  }
  if (/\s/.test(stagingDir)) throw new Error(`staging dir must not contain white space: ${stagingDir}`);

  const w = await debugfs(image, cmds, true);
  if (w.stderr) throw new Error(`debugfs reported errors while laying the overlay:\n${w.stderr}\ncommands:\n${cmds.join("\n")}`);

  // Verify: every entry is there with the right type, mode and owner.
  const again = await listDirs(image, [...new Set(entries.filter((e) => e.path !== "/").map((e) => posix.dirname(e.path)))]);
  const problems: string[] = [];
  for (const e of entries) {
    if (e.path === "/") continue;
    const got = again.get(posix.dirname(e.path))?.get(posix.basename(e.path));
    if (!got) {
      problems.push(`${e.path}: missing`);
      continue;
    }
    if (got.kind !== e.type) problems.push(`${e.path}: ${got.kind}, expected ${e.type}`);
    if (e.type !== "symlink" && (got.mode & 0o7777) !== e.mode)
      problems.push(`${e.path}: mode ${(got.mode & 0o7777).toString(8)}, expected ${e.mode.toString(8)}`);
    if (got.uid !== 0 || got.gid !== 0) problems.push(`${e.path}: owner ${got.uid}:${got.gid}`);
  }
  if (problems.length) throw new Error(`overlay not laid as expected:\n${problems.join("\n")}`);
  const fsck = await run("e2fsck", ["-fn", image]);
  if (fsck.code !== 0) throw new Error(`e2fsck -fn after laying the overlay exited ${fsck.code}:\n${fsck.stdout}${fsck.stderr}`);
  return entries;
}

export interface ImageInode {
  type: Kind;
  /** Permission bits (07777). */
  mode: number;
  uid: number;
  gid: number;
}

/** Type, mode and owner of a path in an ext4 image (undefined when absent). */
export async function imageStat(image: string, path: string): Promise<ImageInode | undefined> {
  const dir = posix.dirname(path);
  const got = (await listDirs(image, [dir])).get(dir)?.get(posix.basename(path));
  return got ? { type: got.kind, mode: got.mode & 0o7777, uid: got.uid, gid: got.gid } : undefined;
}

/** Content of a regular file in an ext4 image. */
export async function imageReadFile(image: string, path: string): Promise<string> {
  const r = await run("debugfs", ["-R", `cat ${path}`, image], { env: { DEBUGFS_PAGER: "__none__" } });
  if (r.code !== 0) throw new Error(`debugfs cat ${path}: ${r.stderr}`);
  return r.stdout;
}

/** Target of a symlink in an ext4 image (fast symlinks, i.e. targets under 60 bytes). */
export async function imageReadlink(image: string, path: string): Promise<string | undefined> {
  const r = await run("debugfs", ["-R", `stat ${path}`, image], { env: { DEBUGFS_PAGER: "__none__" } });
  const m = /Fast link dest: "(.*)"/.exec(r.stdout);
  return m?.[1];
}

// ---------------------------------------------------------------------------------------------
// Booting
// ---------------------------------------------------------------------------------------------

export interface BootedVm {
  pid: number;
  /** The guest's serial console (kernel, systemd status, journal forwarded to the console). */
  serialLog: string;
  /** qemu's own stdout/stderr. */
  qemuLog: string;
  /** The image copy the VM boots from (inside workDir). */
  image: string;
  /** Resolves with qemu's exit code (or null when killed by a signal). */
  exited: Promise<number | null>;
  /** False once qemu has exited. */
  running(): boolean;
  /** Kill qemu and its socat children (by PID). Safe to call more than once. */
  stop(): Promise<void>;
}

export interface BootOptions {
  overlayTar: string;
  /**
   * Host port of the bastion sshd on 127.0.0.1; the guest reaches it as 10.0.2.100:22. 0: the
   * guest reaches nothing at all (a bastion VM, reached only through `hostfwd`).
   */
  bastionPort: number;
  /** The guest port of 10.0.2.100 that leads to `bastionPort` (default 22; a bastion's tunnel port, e.g. 2222). */
  guestBastionPort?: number;
  /** Host ports on 127.0.0.1 forwarded to the guest's ports (a bastion VM's sshd). */
  hostfwd?: { host: number; guest: number }[];
  /** A reboot in the guest reboots it (default: qemu exits, -no-reboot). */
  allowReboot?: boolean;
  /** Scratch directory for the image copy and logs (created if missing). */
  workDir: string;
  /** Hard limit on the VM's lifetime; it is stopped after this (default 15 min). */
  timeoutMs?: number;
  /** Base image to use (default: ensureBaseImage()). */
  base?: BaseImage;
  memoryMb?: number;
  smp?: number;
  /** Extra kernel command-line arguments. */
  extraCmdline?: string;
}

const liveVmPids = new Set<number>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const pid of liveVmPids) {
      for (const p of [...descendantsOf(pid), pid]) {
        try {
          process.kill(p, "SIGKILL");
        } catch {
          /* gone */
        }
      }
    }
  });
}

/**
 * Starts a long-lived child (qemu, sshd) in its own process group with output to `logPath`,
 * registered with the exit hook and a guardian so it is killed by PID even if this test process
 * dies. `exited` resolves with its exit code once it is gone.
 */
async function spawnGuarded(
  cmd: string,
  args: string[],
  logPath: string,
  flags: "w" | "a",
): Promise<{ pid: number; guardian: number | undefined; exited: Promise<number | null> }> {
  const logFd = openSync(logPath, flags);
  let child: ChildProcess;
  try {
    child = spawn(cmd, args, { stdio: ["ignore", logFd, logFd], detached: true });
  } finally {
    closeSync(logFd);
  }
  const pid = await new Promise<number>((resolve, reject) => {
    child.once("error", reject);
    child.once("spawn", () => resolve(child.pid ?? -1));
  });
  installExitHook();
  liveVmPids.add(pid);
  const guardian = spawnGuardian(pid);
  const exited = new Promise<number | null>((resolve) => {
    child.once("exit", (code) => {
      liveVmPids.delete(pid);
      if (guardian) signal(guardian, "SIGKILL"); // its target PID is no longer ours
      resolve(code);
    });
  });
  return { pid, guardian, exited };
}

/** Copy the base image, lay the overlay into it, and boot it. Resolves once qemu is running. */
export async function bootWithOverlay(opts: BootOptions): Promise<BootedVm> {
  const base = opts.base ?? (await ensureBaseImage());
  await mkdir(opts.workDir, { recursive: true });
  const image = join(opts.workDir, "rootfs.ext4");
  await copySparse(base.rootfs, image);
  await layOverlay(image, opts.overlayTar, join(opts.workDir, "overlay-staging"));
  return bootDisk(image, { ...opts, base });
}

/**
 * A Raspberry Pi OS-shaped disk made from the base's root file system, without root or loop
 * devices: an MBR (disk id `diskId`) with p1 a FAT32 `bootfs` holding a cmdline.txt and p2 the
 * base's ext4 root written at its offset, and an fstab that names the partitions by PARTUUID as
 * Raspberry Pi OS's does. Boot it with `root=PARTUUID=<diskId>-02` (bootDisk's `root`).
 */
export async function makePartitionedBase(base: BaseImage, path: string, diskId = "6d6b6f76"): Promise<{ path: string; rootPartuuid: string; rootOffset: number }> {
  const sbin = { PATH: `${process.env.PATH ?? ""}:/usr/sbin:/sbin` };
  const must = async (cmd: string, args: string[], input?: string): Promise<void> => {
    const r = await run(cmd, args, { env: sbin, ...(input === undefined ? {} : { input }) });
    if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.code}: ${r.stderr}`);
  };
  const bootStart = 8192; // sectors: 4 MiB, as pi-gen aligned partitions before 2025
  const bootSectors = 131072; // 64 MiB
  const rootStart = bootStart + bootSectors;
  const rootBytes = (await stat(base.rootfs)).size;
  await must("truncate", ["-s", String(rootStart * 512 + rootBytes), path]);
  await must("sfdisk", ["-q", "--no-reread", "--no-tell-kernel", path], `label: dos\nlabel-id: 0x${diskId}\nstart=${bootStart}, size=${bootSectors}, type=c\nstart=${rootStart}, size=${rootBytes / 512}, type=83\n`);
  await must("mkfs.vfat", ["-F", "32", "-n", "bootfs", "-s", "1", "--offset", String(bootStart), "-h", String(bootStart), path, String(bootSectors / 2)]);
  const partuuid = `${diskId}-02`;
  const staging = `${path}.staging`;
  await mkdir(staging, { recursive: true });
  await writeFile(join(staging, "cmdline.txt"), `console=serial0,115200 root=PARTUUID=${partuuid} rootfstype=ext4 fsck.repair=yes rootwait\n`);
  await must("mcopy", ["-i", `${path}@@${bootStart * 512}`, join(staging, "cmdline.txt"), "::/cmdline.txt"]);
  await must("dd", [`if=${base.rootfs}`, `of=${path}`, "bs=4M", `seek=${rootStart * 512}`, "oflag=seek_bytes", "conv=sparse,notrunc", "status=none"]);
  // The base's fstab names /dev/vda (a bare file system); on a partitioned disk / is p2.
  await writeFile(join(staging, "fstab"), `PARTUUID=${diskId}-01\t/boot/firmware\tvfat\tdefaults,nofail\t0\t2\nPARTUUID=${partuuid}\t/\text4\trw,errors=remount-ro\t0\t1\n`);
  const spec = `${path}?offset=${rootStart * 512}`;
  await must("debugfs", ["-w", "-f", "-", spec], ["rm /etc/fstab", `write ${join(staging, "fstab")} /etc/fstab`, "sif /etc/fstab mode 0100644", "sif /etc/fstab uid 0", "sif /etc/fstab gid 0", "mkdir /boot/firmware", ""].join("\n"));
  await must("e2fsck", ["-fn", spec]);
  return { path, rootPartuuid: partuuid, rootOffset: rootStart * 512 };
}

export interface DiskBootOptions extends Omit<BootOptions, "overlayTar"> {
  /** `root=` for the kernel command line instead of the base's (e.g. PARTUUID=6d6b6f76-02). */
  root?: string;
}

/** Boot a disk image as it is (the base's kernel and initramfs). Resolves once qemu is running. */
export async function bootDisk(image: string, opts: DiskBootOptions): Promise<BootedVm> {
  if (!Number.isInteger(opts.bastionPort) || opts.bastionPort < 0 || opts.bastionPort > 65535) {
    throw new Error(`bad bastionPort ${opts.bastionPort}`);
  }
  const base = opts.base ?? (await ensureBaseImage());
  await mkdir(opts.workDir, { recursive: true });
  const serialLog = join(opts.workDir, "serial.log");
  const qemuLog = join(opts.workDir, "qemu.log");
  const cmdline = opts.root ? base.cmdline.replace(/(^|\s)root=\S+/, `$1root=${opts.root}`) : base.cmdline;

  const profile = bootArchProfile(base.arch);
  const forwards = [
    ...(opts.bastionPort > 0 ? [`guestfwd=tcp:${GUEST_BASTION_ADDR}:${opts.guestBastionPort ?? GUEST_BASTION_PORT}-cmd:socat - TCP:127.0.0.1:${opts.bastionPort}`] : []),
    ...(opts.hostfwd ?? []).map((f) => `hostfwd=tcp:127.0.0.1:${f.host}-:${f.guest}`),
  ];
  const args = [
    ...profile.machineArgs,
    "-accel", "tcg",
    "-smp", String(opts.smp ?? 2),
    "-m", String(opts.memoryMb ?? 1024),
    "-nographic",
    "-monitor", "none",
    "-serial", `file:${serialLog}`,
    ...(opts.allowReboot ? [] : ["-no-reboot"]),
    "-kernel", base.kernel,
    "-initrd", base.initrd,
    "-append", [cmdline, opts.extraCmdline ?? ""].join(" ").trim(),
    ...profile.diskArgs(image),
    "-netdev", ["user,id=n0,restrict=on", ...forwards].join(","),
    ...profile.nicArgs,
  ];
  const { pid, guardian, exited } = await spawnGuarded(profile.qemu, args, qemuLog, "w");
  let exitCode: number | null | undefined;
  void exited.then((code) => {
    exitCode = code;
  });

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      clearTimeout(watchdog);
      const kids = descendantsOf(pid); // socat children run in their own sessions (libslirp setsid)
      await killAndWait([pid], exited, 3000);
      for (const k of kids) if (alive(k)) signal(k, "SIGTERM");
      await sleep(200);
      for (const k of kids) if (alive(k)) signal(k, "SIGKILL");
      liveVmPids.delete(pid);
      if (guardian) signal(guardian, "SIGKILL");
    })();
    return stopping;
  };
  const watchdog = setTimeout(() => void stop(), opts.timeoutMs ?? 15 * 60_000);
  watchdog.unref();

  // qemu fails fast on bad arguments; report that instead of a hanging test.
  await Promise.race([exited, sleep(700)]);
  if (exitCode !== undefined) {
    const log = existsSync(qemuLog) ? await readFile(qemuLog, "utf8") : "";
    throw new Error(`qemu exited at once (${exitCode}):\n${log}`);
  }
  return { pid, serialLog, qemuLog, image, exited, running: () => exitCode === undefined, stop };
}

async function copySparse(src: string, dst: string): Promise<void> {
  const r = await run("cp", ["--sparse=always", "--reflink=auto", src, dst]);
  if (r.code !== 0) {
    await copyFile(src, dst);
  }
  await chmod(dst, 0o644);
}

// ---------------------------------------------------------------------------------------------
// Throwaway bastion sshd on 127.0.0.1
// ---------------------------------------------------------------------------------------------

export interface Bastion {
  port: number;
  /** The bastion's host public key line, e.g. "ssh-ed25519 AAAA… comment". */
  hostKeyPub: string;
  logPath: string;
  /** PID of the listening sshd. */
  pid: number;
  /** PIDs of the per-connection sshd processes (sessions) right now. */
  sessionPids(): number[];
  /** Kill the session processes (not the listener); resolves with the PIDs it killed. */
  killSessions(): Promise<number[]>;
  /** Kill the listener and every session process. Safe to call more than once. */
  stop(): Promise<void>;
}

export interface BastionOptions {
  workDir: string;
  /** Local user the tunnel logs in as (must exist). */
  user: string;
  /** Complete authorized_keys content for that user. */
  authorizedKeys: string;
  /** Appended at the end of sshd_config, e.g. a `Match User …` block. */
  sshdConfigExtra?: string;
  /**
   * Private host key (OpenSSH format, with its `.pub` beside it) the bastion presents, e.g. one
   * the test generated first to pin it in a fleet config. Default: a fresh ed25519 key.
   */
  hostKey?: string;
  logLevel?: "INFO" | "VERBOSE" | "DEBUG1" | "DEBUG2" | "DEBUG3";
}

export async function startBastion(opts: BastionOptions): Promise<Bastion> {
  const dir = join(opts.workDir, "bastion");
  await mkdir(dir, { recursive: true });
  // sshd opens authorized_keys as the target user: workDir (often a 0700 mkdtemp dir) and the
  // bastion dir must be traversable by others.
  const ws = await stat(opts.workDir);
  await chmod(opts.workDir, (ws.mode & 0o7777) | 0o011);
  await chmod(dir, 0o755);
  const hostKey = join(dir, "ssh_host_ed25519_key");
  if (opts.hostKey) {
    // A copy the bastion owns: sshd ignores a private host key readable by group or others.
    await copyFile(opts.hostKey, hostKey);
    await chmod(hostKey, 0o600);
    await copyFile(opts.hostKey + ".pub", hostKey + ".pub");
    await chmod(hostKey + ".pub", 0o644);
  } else if (!existsSync(hostKey)) {
    const g = await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "mkoverlay-test-bastion", "-f", hostKey]);
    if (g.code !== 0) throw new Error(`ssh-keygen: ${g.stderr}`);
  }
  const hostKeyPub = (await readFile(hostKey + ".pub", "utf8")).trim();
  const ak = join(dir, "authorized_keys");
  await writeFile(ak, opts.authorizedKeys.endsWith("\n") ? opts.authorizedKeys : opts.authorizedKeys + "\n", { mode: 0o644 });
  await chmod(ak, 0o644);
  if (isRoot && !existsSync("/run/sshd")) await mkdir("/run/sshd", { recursive: true, mode: 0o755 });

  const port = await freePort();
  const cfg = join(dir, "sshd_config");
  const logPath = join(dir, "sshd.log");
  await writeFile(
    cfg,
    [
      "# throwaway bastion for the mkoverlay boot test",
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${hostKey}`,
      `PidFile ${join(dir, "sshd.pid")}`,
      `AuthorizedKeysFile ${ak}`,
      // The test's scratch dir sits under world-writable /tmp, which StrictModes rejects.
      "StrictModes no",
      "PubkeyAuthentication yes",
      "AuthenticationMethods publickey",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "HostbasedAuthentication no",
      `UsePAM ${isRoot && existsSync("/etc/pam.d/sshd") ? "yes" : "no"}`,
      "PermitRootLogin no",
      `AllowUsers ${opts.user}`,
      "GatewayPorts no",
      "X11Forwarding no",
      "PrintMotd no",
      `LogLevel ${opts.logLevel ?? "VERBOSE"}`,
      "",
      opts.sshdConfigExtra ?? "",
      "",
    ].join("\n"),
  );
  const t = await run("/usr/sbin/sshd", ["-t", "-f", cfg]);
  if (t.code !== 0) throw new Error(`sshd -t rejected the bastion config:\n${t.stderr}`);

  const { pid, guardian, exited } = await spawnGuarded("/usr/sbin/sshd", ["-D", "-e", "-f", cfg], logPath, "a");
  let dead = false;
  void exited.then(() => {
    dead = true;
  });

  const deadline = Date.now() + 10_000;
  while (!(await canConnect(port))) {
    if (dead || Date.now() > deadline) {
      const log = existsSync(logPath) ? await readFile(logPath, "utf8") : "";
      signal(pid, "SIGKILL");
      throw new Error(`bastion sshd did not come up on 127.0.0.1:${port}:\n${log}`);
    }
    await sleep(50);
  }

  const sessionPids = (): number[] => descendantsOf(pid);
  const killSessions = async (): Promise<number[]> => {
    const pids = sessionPids();
    for (const p of pids) signal(p, "SIGTERM");
    const until = Date.now() + 3000;
    while (pids.some(alive) && Date.now() < until) await sleep(50);
    for (const p of pids) if (alive(p)) signal(p, "SIGKILL");
    return pids;
  };
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      // Sessions first: killing the listener does not end them, and they hold forwarded ports.
      const before = sessionPids();
      await killAndWait([pid], exited, 3000);
      for (const p of before) if (alive(p)) signal(p, "SIGKILL");
      liveVmPids.delete(pid);
      if (guardian) signal(guardian, "SIGKILL");
    })();
    return stopping;
  };
  return { port, hostKeyPub, logPath, pid, sessionPids, killSessions, stop };
}

/**
 * Create a local system user with no login shell if it does not exist, and make sure its
 * password field is `*` (needs root). useradd's default `!` marks the account locked, and sshd
 * without PAM refuses locked accounts even for public keys; `*` means "no password" only.
 */
export function ensureSystemUser(name: string): void {
  const r = spawnSync("getent", ["passwd", name]);
  if (r.status !== 0) {
    const shell = existsSync("/usr/sbin/nologin") ? "/usr/sbin/nologin" : "/sbin/nologin";
    const u = spawnSync("useradd", ["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", shell, name], {
      encoding: "utf8",
    });
    if (u.status !== 0) throw new Error(`useradd ${name} failed: ${u.stderr}`);
  }
  const sh = spawnSync("getent", ["shadow", name], { encoding: "utf8" });
  const pw = sh.status === 0 ? (sh.stdout.split(":")[1] ?? "") : "";
  if (pw === "" || pw.startsWith("!")) {
    const m = spawnSync("usermod", ["-p", "*", name], { encoding: "utf8" });
    if (m.status !== 0) throw new Error(`usermod -p '*' ${name} failed: ${m.stderr}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Small helpers (exported for tests)
// ---------------------------------------------------------------------------------------------

export { canConnect, freePort };

/**
 * Read the SSH identification string from host:port ("SSH-2.0-…"), or undefined when nothing
 * answers with one within timeoutMs. Through a reverse tunnel this proves the whole path
 * (bastion listener -> tunnel -> device sshd) works, not just that the bastion listens.
 */
export function sshBanner(port: number, host = "127.0.0.1", timeoutMs = 5000): Promise<string | undefined> {
  return new Promise((resolve) => {
    const s = connect({ port, host });
    let buf = "";
    const done = (v: string | undefined): void => {
      s.destroy();
      resolve(v);
    };
    s.setTimeout(timeoutMs, () => done(undefined));
    s.on("data", (d: Buffer) => {
      buf += d.toString("latin1");
      const i = buf.indexOf("\n");
      if (i >= 0) {
        const line = buf.slice(0, i).trim();
        done(line.startsWith("SSH-") ? line : undefined);
      }
    });
    s.once("error", () => done(undefined));
    s.once("end", () => done(undefined));
  });
}

/** Poll fn until it returns a value other than undefined/false, or throw after timeoutMs. */
export async function waitFor<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined | false>, everyMs = 250): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** Last n lines of a text file ("" when it does not exist). */
export async function tailFile(path: string, n = 40): Promise<string> {
  if (!existsSync(path)) return "";
  const text = await readFile(path, "utf8");
  return text.split("\n").slice(-n - 1).join("\n");
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run a command to completion (no shell). */
export function run(
  cmd: string,
  args: string[],
  opts: { input?: string; env?: Record<string, string>; timeoutMs?: number; onStderrLine?: (l: string) => void } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      stdio: ["pipe", "pipe", "pipe"],
      env: { ...process.env, ...(opts.env ?? {}) },
    });
    let stdout = "";
    let stderr = "";
    let partial = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => {
      const s = d.toString();
      stderr += s;
      if (opts.onStderrLine) {
        partial += s;
        const lines = partial.split("\n");
        partial = lines.pop() ?? "";
        for (const l of lines) opts.onStderrLine(l);
      }
    });
    const timer = opts.timeoutMs ? setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs) : undefined;
    child.once("error", reject);
    child.once("close", (code) => {
      if (timer) clearTimeout(timer);
      if (opts.onStderrLine && partial) opts.onStderrLine(partial);
      resolve({ code, stdout, stderr });
    });
    child.stdin.on("error", () => undefined);
    child.stdin.end(opts.input ?? "");
  });
}

/**
 * A detached watcher that kills `target` and its descendants (by PID) if this Node process dies
 * without calling stop() (worker killed, Ctrl-C): an orphaned TCG qemu would otherwise keep
 * burning both cores. stop() kills the watcher. Returns the watcher's PID.
 */
function spawnGuardian(target: number): number | undefined {
  const script = [
    'watch=$1; target=$2',
    'while kill -0 "$watch" 2>/dev/null; do sleep 2; done',
    'kill -0 "$target" 2>/dev/null || exit 0',
    'tree() { echo "$1"; for c in $(ps -e -o pid=,ppid= | awk -v p="$1" \'$2 == p { print $1 }\'); do tree "$c"; done; }',
    'pids=$(tree "$target")',
    'kill -TERM $pids 2>/dev/null; sleep 3; kill -KILL $pids 2>/dev/null; exit 0',
  ].join("\n");
  try {
    const g = spawn("sh", ["-c", script, "mkoverlay-boot-guardian", String(process.pid), String(target)], {
      detached: true,
      stdio: "ignore",
    });
    g.on("error", () => undefined);
    g.unref();
    return g.pid;
  } catch {
    return undefined;
  }
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    /* already gone */
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    // A zombie still "exists"; treat it as dead.
    const st = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = st.slice(st.lastIndexOf(")") + 2).split(" ")[0];
    return state !== "Z";
  } catch {
    return false;
  }
}

async function killAndWait(pids: number[], exited: Promise<unknown>, graceMs: number): Promise<void> {
  for (const p of pids) signal(p, "SIGTERM");
  const t = await Promise.race([exited.then(() => "exited"), sleep(graceMs).then(() => "timeout")]);
  if (t === "timeout") {
    for (const p of pids) signal(p, "SIGKILL");
    await Promise.race([exited, sleep(2000)]);
  }
}

/** All descendants of pid (children, grandchildren, …), from /proc. */
export function descendantsOf(pid: number): number[] {
  const children = new Map<number, number[]>();
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return [];
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    let st: string;
    try {
      st = readFileSync(`/proc/${e}/stat`, "utf8");
    } catch {
      continue;
    }
    const rest = st.slice(st.lastIndexOf(")") + 2).split(" ");
    const ppid = Number(rest[1]);
    const list = children.get(ppid) ?? [];
    list.push(Number(e));
    children.set(ppid, list);
  }
  const out: number[] = [];
  const todo = [pid];
  while (todo.length) {
    const p = todo.pop()!;
    for (const c of children.get(p) ?? []) {
      out.push(c);
      todo.push(c);
    }
  }
  return out;
}

/**
 * One booted-system test file at a time on this machine. Each boot test runs TCG guests (the
 * bastion test two at once); on two cores, a second file's guests beside them slowed every
 * guest several times over and pushed a device's first tunnel past its bound (CI, Dec 2026:
 * 120 s). The lock is a file naming its holder's PID, taken with O_EXCL; a holder that is gone
 * is taken over. Returns the release function; waits up to `maxWaitMs`.
 */
export async function holdVmLock(log: (line: string) => void, maxWaitMs = 30 * 60_000): Promise<() => void> {
  const { writeFileSync, rmSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const lock = join(tmpdir(), "mkoverlay-test-vms.lock");
  const alive = (pid: number): boolean => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === "EPERM";
    }
  };
  const t0 = Date.now();
  let said = false;
  for (;;) {
    try {
      writeFileSync(lock, String(process.pid), { flag: "wx" });
      if (said) log(`VM lock taken after ${Date.now() - t0} ms`);
      return () => {
        try {
          if (Number(readFileSync(lock, "utf8")) === process.pid) rmSync(lock);
        } catch {
          // already gone
        }
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    let holder = 0;
    try {
      holder = Number(readFileSync(lock, "utf8"));
    } catch {
      continue; // released meanwhile
    }
    if (holder !== 0 && !alive(holder)) {
      rmSync(lock, { force: true });
      continue;
    }
    if (Date.now() - t0 > maxWaitMs) throw new Error(`another boot test (pid ${holder}) held ${lock} for over ${maxWaitMs / 60_000} minutes`);
    if (!said) log(`waiting for the VM lock held by pid ${holder} (one booted-system test at a time)`);
    said = true;
    await new Promise((r) => setTimeout(r, 1000));
  }
}
