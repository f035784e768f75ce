/**
 * Raspberry Pi OS–shaped disk images, made without root or loop devices: sfdisk writes the
 * table into a sparse file, mkfs.vfat --offset makes p1 FAT32 `bootfs`, and mke2fs -E offset=
 * makes p2 ext4 `rootfs` with pi-gen's options (`-O ^64bit,^huge_file`) from a small but
 * realistic root tree (merged /usr, ssh units, host keys, /dev). A GPT variant for other boards.
 */
import { chmodSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { entriesOf } from "../../src/image/lay.js";
import { openOverlay } from "../../src/image/open.js";
import type { Entry } from "../../src/overlay/tree.js";
import { type Need, SBIN_PATH, tools } from "./capability.js";
import { readPub, run, runCli, sshKeygen, writeFleet } from "./workspace.js";

export { SBIN_PATH };

export function sh(cmd: string, args: string[], input?: string): string {
  const r = run(cmd, args, { env: { PATH: SBIN_PATH }, ...(input === undefined ? {} : { input }) });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

/** The tools to make and check fixtures, for the capability gate (`make test` installs them). */
export const diskTools: Need = tools("sfdisk", "mkfs.vfat", "mke2fs", "debugfs", "e2fsck", "mcopy", "bmaptool");

function put(root: string, rel: string, content: string, mode = 0o644): void {
  const p = join(root, rel);
  mkdirSync(dirname(p), { recursive: true });
  writeFileSync(p, content);
  chmodSync(p, mode);
}

/** A small root tree shaped like Raspberry Pi OS bookworm's. */
export function makeRootTree(root: string): void {
  mkdirSync(root, { recursive: true });
  chmodSync(root, 0o755);
  mkdirSync(join(root, "usr/lib/systemd/system"), { recursive: true });
  symlinkSync("usr/lib", join(root, "lib"));
  symlinkSync("usr/bin", join(root, "bin"));
  put(root, "usr/lib/systemd/system/ssh.service", "[Unit]\nDescription=OpenBSD Secure Shell server\n\n[Service]\nExecStart=/usr/sbin/sshd -D\n\n[Install]\nWantedBy=multi-user.target\nAlias=sshd.service\n");
  put(root, "usr/lib/systemd/system/regenerate_ssh_host_keys.service", "[Unit]\nDescription=Regenerate SSH host keys\n");
  put(root, "usr/bin/true", "#!/bin/sh\nexit 0\n", 0o755);
  put(root, "etc/ssh/sshd_config", "Include /etc/ssh/sshd_config.d/*.conf\nKbdInteractiveAuthentication no\n");
  mkdirSync(join(root, "etc/ssh/sshd_config.d"), { recursive: true });
  put(root, "etc/ssh/ssh_host_ed25519_key", "stock host key\n", 0o600);
  put(root, "etc/hostname", "raspberrypi\n");
  put(root, "etc/fstab", "proc /proc proc defaults 0 0\nPARTUUID=deadbeef-01 /boot/firmware vfat defaults 0 2\nPARTUUID=deadbeef-02 / ext4 defaults,noatime 0 1\n");
  mkdirSync(join(root, "etc/systemd/system/multi-user.target.wants"), { recursive: true });
  symlinkSync("/lib/systemd/system/ssh.service", join(root, "etc/systemd/system/multi-user.target.wants/ssh.service"));
  // A 0700 directory: an overlay adding to it must not re-mode it.
  mkdirSync(join(root, "root"), { mode: 0o700 });
  chmodSync(join(root, "root"), 0o700);
  for (const d of ["dev", "proc", "sys", "run", "tmp", "boot/firmware", "home/pi"]) mkdirSync(join(root, d), { recursive: true });
  chmodSync(join(root, "tmp"), 0o1777);
  // Some bulk, so the file system is not trivially empty (a few hundred blocks of real data).
  put(root, "usr/share/doc/base/changelog", Array.from({ length: 20000 }, (_, i) => `line ${i} of a changelog\n`).join(""));
}

export interface Fixture {
  path: string;
  scheme: "mbr" | "gpt";
  bootOffset: number;
  bootSize: number;
  rootOffset: number;
  rootSize: number;
}

const MiB = 1024 * 1024;

/**
 * MBR (disk id 0xdeadbeef, like the fstab above) or GPT disk: p1 at 4 MiB, FAT32 `bootfs`
 * with a cmdline.txt; p2 ext4 `rootfs` up to the end. Sizes in MiB.
 */
export function makeDisk(path: string, rootTree: string, opts: { scheme?: "mbr" | "gpt"; bootMiB?: number; rootMiB?: number; mkfsExtra?: string[] } = {}): Fixture {
  const scheme = opts.scheme ?? "mbr";
  const bootMiB = opts.bootMiB ?? 40;
  const rootMiB = opts.rootMiB ?? 64;
  const start = 4 * MiB;
  const rootStart = start + bootMiB * MiB;
  const total = rootStart + rootMiB * MiB + (scheme === "gpt" ? MiB : 0);
  sh("truncate", ["-s", String(total), path]);
  const s = (b: number): number => b / 512;
  const script =
    scheme === "mbr"
      ? `label: dos\nlabel-id: 0xdeadbeef\nstart=${s(start)}, size=${s(bootMiB * MiB)}, type=c\nstart=${s(rootStart)}, size=${s(rootMiB * MiB)}, type=83\n`
      : `label: gpt\nstart=${s(start)}, size=${s(bootMiB * MiB)}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="bootfs"\nstart=${s(rootStart)}, size=${s(rootMiB * MiB)}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="rootfs"\n`;
  sh("sfdisk", ["-q", "--no-reread", "--no-tell-kernel", path], script);
  sh("mkfs.vfat", ["-F", "32", "-n", "bootfs", "-s", "1", "--offset", String(s(start)), "-h", String(s(start)), path, String((bootMiB * MiB) / 1024)]);
  const cmdline = join(dirname(path), `cmdline-${process.pid}.txt`);
  writeFileSync(cmdline, "console=serial0,115200 console=tty1 root=PARTUUID=deadbeef-02 rootfstype=ext4 fsck.repair=yes rootwait\n");
  sh("mcopy", ["-i", `${path}@@${start}`, cmdline, "::/cmdline.txt"]);
  sh("mke2fs", ["-q", "-F", "-t", "ext4", "-L", "rootfs", "-O", "^64bit,^huge_file", "-b", "4096", ...(opts.mkfsExtra ?? []), "-E", `offset=${rootStart}`, "-d", rootTree, path, `${rootMiB}M`]);
  return { path, scheme, bootOffset: start, bootSize: bootMiB * MiB, rootOffset: rootStart, rootSize: rootMiB * MiB };
}

/** e2fsck -fn on the root partition; returns its exit code and output. */
export function fsck(fx: Pick<Fixture, "path" | "rootOffset">): { code: number; out: string } {
  const r = run("e2fsck", ["-fn", `${fx.path}?offset=${fx.rootOffset}`], { env: { PATH: SBIN_PATH } });
  return { code: r.code, out: r.stdout + r.stderr };
}

/** The bases most image tests start from: one Raspberry-Pi-like root tree as an MBR and a GPT disk. */
export function baseDisks(dir: string): { rootTree: string; mbr: Fixture; gpt: Fixture } {
  const rootTree = join(dir, "rootfs");
  makeRootTree(rootTree);
  return { rootTree, mbr: makeDisk(join(dir, "base-mbr.img"), rootTree), gpt: makeDisk(join(dir, "base-gpt.img"), rootTree, { scheme: "gpt" }) };
}

/** A real overlay, as the CLI builds it for a Raspberry Pi (bastion eu), read back as tree entries. */
export async function cliOverlay(dir: string, epoch: number, hostKey?: string): Promise<{ entries: Entry[]; archive: string }> {
  const priv = sshKeygen(dir, `bastion_key_${process.pid}_${Math.random().toString(36).slice(2, 8)}`);
  const fleet = writeFleet(dir, { eu: { host: "bastion-eu.example.com", hostKeys: [readPub(priv)] } });
  const args = ["--config", fleet, "--json", "--board", "rpi4", "--bastion", "eu", "--out", join(dir, "out"), ...(hostKey ? ["--host-key", hostKey] : [])];
  const r = runCli(args, { cwd: dir, env: { SOURCE_DATE_EPOCH: String(epoch) } });
  if (r.code !== 0) throw new Error(`mkoverlay build failed: ${r.stderr}`);
  const archive = (JSON.parse(r.stdout) as { overlay: string }).overlay;
  return { entries: await entriesOf(await openOverlay(archive), archive), archive };
}
