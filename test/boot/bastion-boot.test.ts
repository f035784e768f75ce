/**
 * Issue 20, "proven under a real systemd": a BASTION booted the way a device is booted (Debian
 * bookworm, systemd 252, OpenSSH 9.2, qemu TCG), installed with `mkoverlay bastion install`
 * exactly as docs/bastion.md says, on the running system (systemd reloads, the agent starts, sshd
 * reloads). A device booted beside it dials it; its tunnel comes up through the bastion's sshd;
 * then the bastion reboots and everything comes back by itself: sshd, the agent, the device's
 * tunnel.
 *
 *  - The bastion VM is the cached base image with mkoverlay installed as `npm install -g` lays it
 *    (/opt/mkoverlay, /usr/local/bin/mkoverlay; this host's node binary in /usr/local/bin), the
 *    fleet config in /root and the registry (SQLite, made by the builds on this host) in
 *    /var/lib/mkoverlay. Only 127.0.0.1:<port> -> its port 22 reaches it (restricted user
 *    networking, hostfwd); the test logs in as root with the base's test operator key and a pinned
 *    host key.
 *  - The bastion's tunnel port is 2222 (docs/bastion.md §12): devices dial a dedicated tunnel sshd
 *    (mkoverlay-tunnel-sshd@eu.service) the install sets up; the admins' sshd on 22 is untouched.
 *    The device VM reaches 10.0.2.100:2222 -> 127.0.0.1:<tunnelPort> -> the bastion VM's 2222
 *    (a second hostfwd), nothing else.
 *
 * Skips and failures follow overlay-boot.test.ts (CI: never skipped).
 */
import { existsSync } from "node:fs";
import { chmod, copyFile, cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { inCI } from "../helpers/capability.js";
import { freePort } from "../helpers/net.js";
import { REPO, runCli, writeFleet } from "../helpers/workspace.js";
import {
  type BaseImage,
  type BootedVm,
  GUEST_BASTION_ADDR,
  bootArchExplicit,
  bootDisk,
  bootWithOverlay,
  checkBootPrerequisites,
  ensureBaseImage,
  holdVmLock,
  layOverlay,
  requestedBootArch,
  run,
  sshBanner,
  waitFor,
} from "./boot.js";

const ARCH = requestedBootArch();
const mustRun = inCI || bootArchExplicit();
const optedOut = !mustRun && process.env.MKOVERLAY_BOOT_TEST === "0";
const prereq = optedOut ? { ok: false, problems: ["MKOVERLAY_BOOT_TEST=0"] } : checkBootPrerequisites();
// The bastion runs this host's node binary: the guest must be of this host's architecture.
if (ARCH !== "amd64" || process.arch !== "x64") prereq.problems.push(`the bastion boot test runs on amd64 only (guest ${ARCH}, host ${process.arch})`);
const canRun = prereq.problems.length === 0 && existsSync(join(REPO, "dist/cli.js"));
if (prereq.problems.length === 0 && !canRun) prereq.problems.push("dist/cli.js missing: run `make build` first");

const log = (msg: string): void => {
  process.stdout.write(`[bastion-boot] ${msg}\n`);
};
if (!canRun) log(`${mustRun ? "CANNOT RUN (failing)" : "skipped"}: ${prereq.problems.join("; ")}`);

const BASTION = "eu";
const TUNNEL_USER = "mko-tunnel";
/** What devices dial on the bastion: the tunnel sshd's port, not the admins' 22. */
const TUNNEL_PORT = 2222;
const TUNNEL_UNIT = `mkoverlay-tunnel-sshd@${BASTION}.service`;
const BASE_BUILD_MS = 20 * 60_000;
const UP_MS = 180_000;
const TEST_MS = 15 * 60_000;
/** The install recipe of docs/bastion.md this test runs as written (a SQLite registry on the bastion). */
const RECIPE_MARK = "--registry /var/lib/mkoverlay/fleet.db";

/** The shell block of docs/bastion.md that installs a bastion with its registry on itself. */
export function installRecipe(markdown: string): string {
  const blocks = [...markdown.matchAll(/^```(?:sh|bash)\n([\s\S]*?)^```$/gm)].map((m) => m[1]!);
  const found = blocks.filter((b) => b.includes(RECIPE_MARK));
  if (found.length !== 1) throw new Error(`docs/bastion.md: expected one shell block with '${RECIPE_MARK}', found ${found.length}`);
  return found[0]!;
}

describe.runIf(canRun || mustRun)("a bastion on a booted system: bastion install, a device's tunnel, a reboot", () => {
  let base: BaseImage | undefined;
  let work = "";
  let adminPort = 0;
  let tunnelHostPort = 0;
  let bastionVm: BootedVm | undefined;
  let deviceVm: BootedVm | undefined;
  let device: { hostname: string; port: number; publicKey: string; overlay: string } | undefined;
  let knownHosts = "";

  /** root on the bastion VM, as its administrator logs in (pinned host key, the base's key). */
  const onBastion = (script: string, timeoutMs = 120_000) =>
    run(
      "ssh",
      [
        "-p", String(adminPort),
        "-i", base!.operatorKey,
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", `UserKnownHostsFile=${knownHosts}`,
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "HostKeyAlias=bastion-vm",
        "-o", "ConnectTimeout=20",
        "-o", "LogLevel=ERROR",
        "root@127.0.0.1",
        script,
      ],
      { timeoutMs },
    );

  /** The host key the device presents through its tunnel, as the bastion sees it (or undefined). */
  const tunnelKey = async (): Promise<string | undefined> => {
    const r = await onBastion(`ssh-keyscan -T 5 -t ed25519 -p ${device!.port} 127.0.0.1 2>/dev/null`, 30_000);
    const line = r.stdout.split("\n").find((l) => l.includes("ssh-ed25519"));
    return line?.split(/\s+/).slice(1, 3).join(" ");
  };

  // One booted-system file at a time (holdVmLock says why); registered first, so released last.
  let releaseVms: (() => void) | undefined;
  beforeAll(async () => {
    if (canRun) releaseVms = await holdVmLock(log);
  }, 31 * 60_000);
  afterAll(() => releaseVms?.());

  beforeAll(async () => {
    if (!canRun) return;
    base = await ensureBaseImage({ log, arch: ARCH });
    work = await mkdtemp(join(tmpdir(), "mkoverlay-bastion-boot-"));
    adminPort = await freePort();
    tunnelHostPort = await freePort();

    // The bastion's host key: the fleet config pins it, the bastion VM's sshd presents it.
    const hostKey = join(work, "ssh_host_ed25519_key");
    must("ssh-keygen", await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "bastion-eu", "-f", hostKey]));
    const hostPub = (await readFile(hostKey + ".pub", "utf8")).trim();
    knownHosts = join(work, "admin_known_hosts");
    await writeFile(knownHosts, `bastion-vm ${hostPub}\n`);

    // The fleet: one bastion as the device sees it; the registry made here, copied to the bastion.
    const config = writeFleet(work, { [BASTION]: { host: GUEST_BASTION_ADDR, port: TUNNEL_PORT, user: TUNNEL_USER, hostKeys: [hostPub] } }, { registry: "./fleet.db", ports: { ssh: "21000-21099", services: "22000-22099" } });
    const b = runCli(["--config", config, "--board", "rpi4", "--bastion", BASTION, "--json", "--out", join(work, "out")], { cwd: work });
    device = JSON.parse(must("mkoverlay build", b)) as typeof device;

    // The bastion's disk: the base, with mkoverlay installed, sshd enabled with the pinned key.
    const root = join(work, "bastion-root");
    const put = async (path: string, data: string | Buffer, mode: number) => {
      await mkdir(join(root, path, ".."), { recursive: true });
      await writeFile(join(root, path), data);
      await chmod(join(root, path), mode);
    };
    const link = async (path: string, target: string) => {
      await mkdir(join(root, path, ".."), { recursive: true });
      await symlink(target, join(root, path));
    };
    await copyFile(process.execPath, join(await mkdirp(root, "usr/local/bin"), "node"));
    const pkg = await mkdirp(root, "opt/mkoverlay");
    for (const d of ["bin", "dist", "boards", "overlays", "schema", "package.json"]) await cp(join(REPO, d), join(pkg, d), { recursive: true });
    for (const d of ["better-sqlite3/package.json", "better-sqlite3/lib", "better-sqlite3/build/Release/better_sqlite3.node", "bindings", "file-uri-to-path"]) {
      if (existsSync(join(REPO, "node_modules", d))) await cp(join(REPO, "node_modules", d), join(pkg, "node_modules", d), { recursive: true });
    }
    await link("usr/local/bin/mkoverlay", "/opt/mkoverlay/bin/mkoverlay");
    await put("etc/ssh/ssh_host_ed25519_key", await readFile(hostKey), 0o600);
    await put("etc/ssh/ssh_host_ed25519_key.pub", hostPub + "\n", 0o644);
    await link("etc/systemd/system/multi-user.target.wants/ssh.service", "/lib/systemd/system/ssh.service");
    await link("etc/systemd/system/sshd.service", "/lib/systemd/system/ssh.service");
    // The base's Raspberry Pi OS stand-ins delete host keys: a bastion is not such a device.
    await link("etc/systemd/system/regenerate_ssh_host_keys.service", "/dev/null");
    await link("etc/systemd/system/mkoverlay-test-firstboot-keys.service", "/dev/null");
    await put("etc/hostname", "bastion-eu\n", 0o644);
    await put("root/fleet.yaml", (await readFile(config, "utf8")).replace('"./fleet.db"', '"/var/lib/mkoverlay/fleet.db"'), 0o600);
    await put("var/lib/mkoverlay/fleet.db", await readFile(join(work, "fleet.db")), 0o600);
    const tar = join(work, "bastion.tar");
    must("tar", await run("tar", ["--numeric-owner", "--owner=0", "--group=0", "-C", root, "-cf", tar, "."]));
    const image = join(work, "bastion.ext4");
    must("cp", await run("cp", ["--sparse=always", base.rootfs, image]));
    await layOverlay(image, tar, join(work, "bastion-staging"));
    bastionVm = await bootDisk(image, { bastionPort: 0, hostfwd: [{ host: adminPort, guest: 22 }, { host: tunnelHostPort, guest: TUNNEL_PORT }], allowReboot: true, workDir: join(work, "vm-bastion"), base, timeoutMs: TEST_MS });
    await waitFor("the bastion VM's sshd", UP_MS, async () => {
      if (!bastionVm!.running()) throw new Error(`the bastion VM exited (${await bastionVm!.exited})`);
      return (await onBastion("true", 30_000)).code === 0;
    }, 2000);
    log(`bastion VM up, admin sshd on 127.0.0.1:${adminPort}; device ${device!.hostname} port ${device!.port}`);
  }, BASE_BUILD_MS);

  afterAll(async () => {
    await deviceVm?.stop();
    await bastionVm?.stop();
    if (work && process.env.MKOVERLAY_BOOT_KEEP !== "1") await rm(work, { recursive: true, force: true });
    else if (work) log(`kept ${work}`);
  }, 60_000);

  it("installs as docs/bastion.md says, on the running system: agent active, sshd reloaded", async () => {
    if (!canRun) throw new Error(`boot test cannot run: ${prereq.problems.join("; ")}`);
    const recipe = installRecipe(await readFile(join(REPO, "docs/bastion.md"), "utf8"));
    const r = await onBastion(`cd /root && set -e\n${recipe}`, 300_000);
    expect(r.code, `${r.stderr}\n${r.stdout}`).toBe(0);
    // The install reloaded sshd: a login in that instant is reset (slirp answers for the guest).
    const s = await waitFor("a login after the install", 60_000, async () => {
      const x = await onBastion(`systemctl is-active mkoverlay-bastion@${BASTION}.service ssh.service ${TUNNEL_UNIT}; systemctl is-enabled mkoverlay-bastion@${BASTION}.service ${TUNNEL_UNIT}`);
      return x.code === 255 ? undefined : x;
    }, 2000);
    expect(s.stdout.trim().split("\n"), s.stderr).toEqual(["active", "active", "active", "enabled", "enabled"]);
    // The tunnel sshd listens on 2222, the admins' sshd is still on 22 alone.
    const l = await onBastion("ss -Htlnp");
    expect(l.stdout).toMatch(/:2222\s.*"sshd"/);
    expect(l.stdout).not.toMatch(/:22\s.*mkoverlay-tunnel/);
    // Ordered after the agent whose key directory it reads.
    const after = await onBastion(`systemctl show -p After --value ${TUNNEL_UNIT}`);
    expect(after.stdout).toContain(`mkoverlay-bastion@${BASTION}.service`);
  }, TEST_MS);

  it("a booted device's tunnel comes up through it, presenting the registered key", async () => {
    if (!canRun || !bastionVm) throw new Error("setup did not complete");
    deviceVm = await bootWithOverlay({ overlayTar: device!.overlay, bastionPort: tunnelHostPort, guestBastionPort: TUNNEL_PORT, workDir: join(work, "vm-device"), base, timeoutMs: TEST_MS });
    const key = await waitFor(`${device!.hostname}'s tunnel on the bastion's port ${device!.port}`, UP_MS, async () => {
      if (!deviceVm!.running()) throw new Error(`the device VM exited (${await deviceVm!.exited})`);
      return tunnelKey();
    }, 3000);
    expect(key).toBe(device!.publicKey.trim().split(/\s+/).slice(0, 2).join(" "));
    await expectThroughTunnelSshd();
  }, TEST_MS);

  /** The device's forwarded port is held by a session process whose parent is the tunnel sshd's main pid. */
  const expectThroughTunnelSshd = async () => {
    const r = await onBastion(
      `main=$(systemctl show -p MainPID --value ${TUNNEL_UNIT}); pid=$(ss -Htlnp "sport = :${device!.port}" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2); ` +
        `echo "main=$main pid=$pid"; p=$pid; while [ -n "$p" ] && [ "$p" -gt 1 ]; do [ "$p" = "$main" ] && { echo through-tunnel-sshd; exit 0; }; p=$(ps -o ppid= -p "$p" | tr -d ' '); done; ps -ef; exit 1`,
    );
    expect(r.stdout, r.stderr).toContain("through-tunnel-sshd");
  };

  it("after a bastion reboot, sshd, the agent and the device's tunnel come back by themselves", async () => {
    if (!canRun || !bastionVm || !deviceVm) throw new Error("setup did not complete");
    const bootId = (await onBastion("cat /proc/sys/kernel/random/boot_id")).stdout.trim();
    await onBastion("systemctl reboot", 30_000);
    const t = Date.now();
    await waitFor("the bastion to come back after its reboot", UP_MS, async () => {
      if (!bastionVm!.running()) throw new Error(`the bastion VM exited (${await bastionVm!.exited}) instead of rebooting`);
      const r = await onBastion("cat /proc/sys/kernel/random/boot_id", 20_000);
      return r.code === 0 && r.stdout.trim() !== bootId && r.stdout.trim() !== "";
    }, 3000);
    const s = await waitFor("the agent and the tunnel sshd after the reboot", 60_000, async () => {
      const x = await onBastion(`systemctl is-active mkoverlay-bastion@${BASTION}.service ssh.service ${TUNNEL_UNIT}`);
      return x.stdout.trim() === "active\nactive\nactive" ? x : undefined;
    }, 2000);
    expect(s.stdout.trim().split("\n"), s.stderr).toEqual(["active", "active", "active"]);
    const key = await waitFor(`${device!.hostname}'s tunnel back after the bastion's reboot`, UP_MS * 2, async () => tunnelKey(), 3000);
    expect(key).toBe(device!.publicKey.trim().split(/\s+/).slice(0, 2).join(" "));
    await expectThroughTunnelSshd();
    log(`after the reboot: tunnel back ${Date.now() - t} ms after 'systemctl reboot'`);
    expect(await sshBanner(adminPort, "127.0.0.1", 5000)).toMatch(/^SSH-2\.0-OpenSSH_9\.2/);
  }, TEST_MS);
});

function must(what: string, r: { code: number | null; stdout: string; stderr: string }): string {
  if (r.code !== 0) throw new Error(`${what} exited ${r.code}:\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

async function mkdirp(root: string, path: string): Promise<string> {
  await mkdir(join(root, path), { recursive: true });
  return join(root, path);
}
