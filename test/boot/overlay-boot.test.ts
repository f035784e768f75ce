/**
 * Issue 6, "Prove it on a booted system": the REAL product, end to end, on a booted Debian
 * bookworm (systemd 252 + OpenSSH 9.2) under qemu TCG.
 *
 *  - A fleet config with one bastion `lab` (10.0.2.100:22 as the guest sees it), pinned to the
 *    host key of a throwaway bastion sshd on 127.0.0.1; overlays built with `bin/mkoverlay`
 *    (rpi4 with its default OS raspios, and --os debian), checked with `bin/mkoverlay verify`.
 *  - The bastion gets exactly what mkoverlay exports: `bastion authorized-keys` and the Match
 *    block of `bastion sshd-config`.
 *  - The raspios overlay (an archive from `mkoverlay build`) is laid into the cached base image
 *    (which carries a stand-in for Raspberry Pi OS's regenerate_ssh_host_keys.service and an
 *    unmaskable key-deleting first-boot stand-in). The debian device is made by `mkoverlay image`
 *    from a PARTITIONED base shaped like Raspberry Pi OS's (MBR, p1 FAT32 bootfs, p2 the cached
 *    ext4 root at its offset, fstab by PARTUUID) and booted as it is, with
 *    `root=PARTUUID=<diskid>-02` on the kernel command line, as Raspberry Pi OS boots. Both boot
 *    on restricted user networking whose ONLY way out is 10.0.2.100:22 -> bastion.
 *
 * Proved: the tunnel comes up on the reserved port; an operator reaches the device through it
 * using `mkoverlay ssh-config` + `mkoverlay known-hosts` with StrictHostKeyChecking=yes (and a
 * wrong pin is refused); the device presents exactly the registered key and nothing else; the
 * tunnel, monitor timer and first-boot guards are in place; the tunnel unit's sandboxing is in
 * effect on the running ssh process; the monitor runs under its own sandbox; without
 * libnss-systemd; and after the bastion kills the tunnel's session, the device reconnects.
 *
 * Run: `make test-boot` or `node_modules/.bin/vitest run test/boot/` (needs `make build`).
 * The guest is amd64 unless MKOVERLAY_BOOT_ARCH says otherwise: `make test-boot ARCH=arm64` boots
 * the same overlays on an arm64 Debian (qemu-system-aarch64 -M virt -cpu cortex-a72, TCG; the
 * overlay ships no binaries, so it is the same tar for both).
 * Locally the boot tests are skipped, with the reason printed, when they cannot run (not root,
 * not Linux/x86-64) or with MKOVERLAY_BOOT_TEST=0. With CI=true, or an explicit
 * MKOVERLAY_BOOT_ARCH (`make test-boot ARCH=…`), they never skip: a boot test that cannot run
 * fails. MKOVERLAY_BOOT_KEEP=1 keeps the scratch directory.
 */
import { existsSync } from "node:fs";
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { inCI } from "../helpers/capability.js";
import { portBlock, type PortBlock } from "../helpers/net.js";
import { REPO, runCli, writeFleet, type Run } from "../helpers/workspace.js";
import {
  type BaseImage,
  type Bastion,
  type BootedVm,
  GUEST_BASTION_ADDR,
  GUEST_BASTION_PORT,
  bootArchExplicit,
  requestedBootArch,
  bootDisk,
  bootWithOverlay,
  canConnect,
  checkBootPrerequisites,
  ensureBaseImage,
  holdVmLock,
  ensureSystemUser,
  makePartitionedBase,
  run,
  sshBanner,
  startBastion,
  tailFile,
  waitFor,
} from "./boot.js";

const ARTIFACTS = join(REPO, "test-artifacts");
const TUNNEL_USER = "mko-boot-tunnel";
const BASTION = "lab";
/** Tunnel ports: a block of loopback ports this run owns (portBlock), not a fixed range that another run on the machine could be using. */
const PORT_BLOCK = 200;

const ARCH = requestedBootArch();
const mustRun = inCI || bootArchExplicit();
const optedOut = !mustRun && process.env.MKOVERLAY_BOOT_TEST === "0";
const prereq = optedOut ? { ok: false, problems: ["MKOVERLAY_BOOT_TEST=0"] } : checkBootPrerequisites();
const canRun = prereq.ok && existsSync(join(REPO, "dist/cli.js"));
if (prereq.ok && !canRun) prereq.problems.push("dist/cli.js missing: run `make build` first");

// Bounds. TCG on 2 shared cores: docs/facts.md measured ~9 s to sshd and 11-12 s to the tunnel.
// A first try can fail (the guest's network still coming up): the back-off then waits up to 10 s,
// then 20 s (reverse-ssh-backoff); room for three such tries on a loaded machine.
const TUNNEL_UP_MS = 240_000;
/** After a drop the unit waits 2 s (RestartSec=2) plus the back-off's first wait (1-10 s); allow for a slow reconnect. */
const RECONNECT_MS = 60_000;
const TEST_MS = 480_000;
const BASE_BUILD_MS = 20 * 60_000;

const log = (msg: string): void => {
  process.stdout.write(`[overlay-boot] ${msg}\n`);
};
if (!canRun) log(`${mustRun ? "CANNOT RUN (failing)" : "skipped"}: ${prereq.problems.join("; ")}`);

interface Built {
  hostname: string;
  board: string;
  os: string;
  bastions: string[];
  port: number;
  fingerprint: string;
  publicKey: string;
  overlay: string;
}

/** The key part ("type base64") of an OpenSSH public key line. */
const keyOf = (line: string): string => line.trim().split(/\s+/).slice(0, 2).join(" ");

function mustSucceed(what: string, r: Run | { code: number | null; stdout: string; stderr: string }): string {
  if (r.code !== 0) throw new Error(`${what} exited ${r.code}:\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** key=value lines (value up to the end of the line) into a record. */
function parseKv(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const i = line.indexOf("=");
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).trim();
  }
  return out;
}

/** What the operator session checks on the raspios device (key=value lines). */
const raspiosProbe = (unit: string): string => String.raw`
u=${unit}
echo "hostname=$(hostname)"
echo "tunnel=$(systemctl is-active $u)"
echo "tunnel_enabled=$(systemctl is-enabled $u)"
echo "timer=$(systemctl is-active reverse-ssh-monitor.timer)"
echo "timer_enabled=$(systemctl is-enabled reverse-ssh-monitor.timer)"
echo "ssh_enabled=$(systemctl is-enabled ssh.service)"
echo "regen=$(systemctl is-enabled regenerate_ssh_host_keys.service 2>&1)"
echo "regen_ran=$(test -e /run/regenerate_ssh_host_keys.ran && echo yes || echo no)"
echo "firstboot=$(systemctl is-active mkoverlay-test-firstboot-keys.service)"
echo "stock_keys=$(ls /etc/ssh | grep -c '^ssh_host_')"
echo "hostkeys=$(sshd -T 2>/dev/null | awk '$1=="hostkey" {print $2}' | tr '\n' ' ' | sed 's/ *$//')"
# sandboxing as configured ...
echo "nnp=$(systemctl show -p NoNewPrivileges --value $u)"
echo "protect_system=$(systemctl show -p ProtectSystem --value $u)"
echo "capbset=[$(systemctl show -p CapabilityBoundingSet --value $u)]"
echo "user=[$(systemctl show -p User --value $u)]"
# ... and in effect on the running ssh process
pid=$(systemctl show -p MainPID --value $u)
echo "main_pid=$pid"
echo "main_comm=$(cat /proc/$pid/comm)"
echo "proc_nnp=$(awk '$1=="NoNewPrivs:" {print $2}' /proc/$pid/status)"
echo "proc_capbnd=$(awk '$1=="CapBnd:" {print $2}' /proc/$pid/status)"
echo "proc_capeff=$(awk '$1=="CapEff:" {print $2}' /proc/$pid/status)"
echo "proc_seccomp=$(awk '$1=="Seccomp:" {print $2}' /proc/$pid/status)"
echo "proc_root=$(awk '$5=="/" {o=$6} END {print o}' /proc/$pid/mountinfo)"
echo "exposure=$(systemd-analyze security $u 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: *\([0-9.]*\).*/\1/p')"
# libnss-systemd is not installed (and the unit must not need it)
dpkg -s libnss-systemd >/dev/null 2>&1; echo "nss_systemd_dpkg=$?"
# the monitor, once, under its own sandbox: it must still be able to ask systemd
systemctl start reverse-ssh-monitor.service; echo "monitor_rc=$?"
echo "monitor_result=$(systemctl show -p Result --value reverse-ssh-monitor.service)"
echo "monitor_said=$(journalctl -b -t reverse-ssh-monitor -o cat --no-pager | tail -n 1)"
echo "nrestarts=$(systemctl show -p NRestarts --value $u)"
`;

/** What the operator session checks on the --os debian device. */
const debianProbe = (unit: string): string => String.raw`
echo "hostname=$(hostname)"
echo "tunnel=$(systemctl is-active ${unit})"
echo "timer=$(systemctl is-active reverse-ssh-monitor.timer)"
echo "regen=$(systemctl is-enabled regenerate_ssh_host_keys.service 2>&1)"
echo "regen_ran=$(test -e /run/regenerate_ssh_host_keys.ran && echo yes || echo no)"
echo "stock_keys=$(ls /etc/ssh | grep -c '^ssh_host_.*_key$')"
echo "hostkeys=$(sshd -T 2>/dev/null | awk '$1=="hostkey" {print $2}' | tr '\n' ' ' | sed 's/ *$//')"
echo "cmdline_root=$(tr ' ' '\n' </proc/cmdline | grep '^root=')"
echo "root_source=$(findmnt -n -o SOURCE /)"
`;

/** `ssh -G` output (lower-case keyword, value) into a record; the first value of each keyword. */
function parseSshG(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const i = line.indexOf(" ");
    if (i > 0 && !(line.slice(0, i) in out)) out[line.slice(0, i)] = line.slice(i + 1).trim();
  }
  return out;
}

describe.runIf(canRun || mustRun)(`the product's overlay on a booted system (qemu TCG, Debian bookworm ${ARCH})`, () => {
  let base: BaseImage | undefined;
  let work = "";
  let config = "";
  let bastion: Bastion | undefined;
  let bastionKey = "";
  const vms: BootedVm[] = [];
  const built: Record<string, Built> = {};
  let sshConfig = "";
  let knownHosts = "";
  let ports: PortBlock | undefined;
  let partitioned: { path: string; rootPartuuid: string; rootOffset: number } | undefined;
  const timings: Record<string, number> = {};
  const tStart = Date.now();

  const cli = (args: string[]): Run => runCli(args, { cwd: work });

  // One booted-system file at a time (holdVmLock says why); registered first, so released last.
  let releaseVms: (() => void) | undefined;
  beforeAll(async () => {
    if (canRun) releaseVms = await holdVmLock(log);
  }, 31 * 60_000);
  afterAll(() => releaseVms?.());

  beforeAll(async () => {
    if (!canRun) return;
    let t = Date.now();
    base = await ensureBaseImage({ log: (l) => log(l), arch: ARCH });
    timings.baseImageReadyMs = Date.now() - t;
    log(`${base.arch} base image ${base.dir} (${timings.baseImageReadyMs} ms; recipe build_seconds=${base.manifest.build_seconds ?? "?"})`);

    t = Date.now();
    work = await mkdtemp(join(tmpdir(), "mkoverlay-overlay-boot-"));
    ensureSystemUser(TUNNEL_USER);
    // The bastion's host key first: the fleet config pins it, the bastion sshd presents it.
    bastionKey = join(work, "bastion_host_ed25519_key");
    mustSucceed("ssh-keygen", await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "mkoverlay-boot-bastion", "-f", bastionKey]));
    const bastionPub = (await readFile(bastionKey + ".pub", "utf8")).trim();
    ports = await portBlock(PORT_BLOCK);
    config = writeFleet(
      work,
      { [BASTION]: { host: GUEST_BASTION_ADDR, port: GUEST_BASTION_PORT, user: TUNNEL_USER, hostKeys: [bastionPub] } },
      { ports: { ssh: ports.range(0, PORT_BLOCK / 2 - 1), services: ports.range(PORT_BLOCK / 2, PORT_BLOCK - 1) } },
    );

    // Two devices with the CLI: rpi4 with its default OS (raspios) as an archive, and one for
    // --os debian as a partitioned disk image made by `mkoverlay image`.
    partitioned = await makePartitionedBase(base, join(work, "base-partitioned.img"));
    for (const [name, extra] of [
      ["raspios", []],
      ["debian", ["image", "--base", partitioned.path, "--os", "debian"]],
    ] as const) {
      const r = cli([...extra.slice(0, 3), "--config", config, "--board", "rpi4", "--bastion", BASTION, "--json", "--out", join(work, "out"), ...extra.slice(3)]);
      built[name] = JSON.parse(mustSucceed(`mkoverlay ${extra[0] ?? "build"} (${name})`, r)) as Built;
    }
    // What a bastion imports, exactly as exported.
    const authorizedKeys = mustSucceed("mkoverlay bastion authorized-keys", cli(["bastion", "authorized-keys", "--bastion", BASTION, "--config", config]));
    const matchBlock = mustSucceed("mkoverlay bastion sshd-config", cli(["bastion", "sshd-config", "--bastion", BASTION, "--config", config]));
    // What an operator saves.
    knownHosts = join(work, "operator_known_hosts");
    await writeFile(knownHosts, mustSucceed("mkoverlay known-hosts", cli(["known-hosts", "--config", config])), { mode: 0o644 });
    sshConfig = join(work, "operator_ssh_config");
    await writeFile(
      sshConfig,
      mustSucceed("mkoverlay ssh-config", cli(["ssh-config", "--config", config, "--known-hosts", knownHosts])),
      { mode: 0o644 },
    );
    timings.cliMs = Date.now() - t;

    for (const b of Object.values(built)) {
      // A stale tunnel from an earlier run would make the banner checks below meaningless.
      if (await canConnect(b.port)) throw new Error(`127.0.0.1:${b.port} is already in use; another boot test running?`);
    }
    bastion = await startBastion({
      workDir: work,
      user: TUNNEL_USER,
      hostKey: bastionKey,
      authorizedKeys,
      sshdConfigExtra: matchBlock,
    });
    log(
      `built ${Object.values(built)
        .map((b) => `${b.hostname} (${b.os}, port ${b.port})`)
        .join(", ")}; bastion sshd on 127.0.0.1:${bastion.port} (${timings.cliMs} ms)`,
    );
  }, BASE_BUILD_MS);

  afterAll(async () => {
    for (const vm of vms) await vm.stop();
    await bastion?.stop();
    ports?.release();
    if (Object.keys(timings).length > 1) {
      timings.fileTotalMs = Date.now() - tStart;
      log(`timings: ${JSON.stringify(timings)}`);
      await mkdir(ARTIFACTS, { recursive: true });
      const file = ARCH === "amd64" ? "overlay-boot-timings.json" : `overlay-boot-timings-${ARCH}.json`;
      await writeFile(join(ARTIFACTS, file), JSON.stringify({ arch: ARCH, ...timings }, null, 2) + "\n");
    }
    if (work && process.env.MKOVERLAY_BOOT_KEEP !== "1") await rm(work, { recursive: true, force: true });
    else if (work) log(`kept ${work}`);
  }, 60_000);

  const requireSetup = (): { base: BaseImage; bastion: Bastion } => {
    if (!canRun) throw new Error(`boot test cannot run: ${prereq.problems.join("; ")}`);
    if (!base || !bastion) throw new Error("setup did not complete (see beforeAll)");
    return { base, bastion };
  };

  /** The operator's ssh to a device, configured by `mkoverlay ssh-config` (see below). */
  const operatorSsh = (hostname: string, remote: string, opts: { knownHostsFile?: string } = {}) =>
    run(
      "ssh",
      [
        "-F", sshConfig,
        // ssh-config routes through the bastion (ProxyJump 10.0.2.100, the address only the guest
        // can reach); the test host reaches the bastion's forwarded port directly instead.
        // Command-line options win over the file; Port, User, HostKeyAlias, StrictHostKeyChecking
        // and UserKnownHostsFile still come from mkoverlay's output.
        "-o", "ProxyJump=none",
        "-o", "HostName=127.0.0.1",
        ...(opts.knownHostsFile ? ["-o", `UserKnownHostsFile=${opts.knownHostsFile}`] : []),
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-i", base!.operatorKey,
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=30",
        "-o", "LogLevel=ERROR",
        hostname,
        remote,
      ],
      { timeoutMs: 90_000 },
    );

  /** Boot one overlay and wait for its tunnel; keeps logs under test-artifacts/ on failure. */
  async function bootAndWaitForTunnel(name: string, b: Built): Promise<{ vm: BootedVm; banner: string }> {
    const { base, bastion } = requireSetup();
    expect(await sshBanner(b.port, "127.0.0.1", 1000)).toBeUndefined(); // nothing there yet
    const t = Date.now();
    const common = { bastionPort: bastion.port, workDir: join(work, `vm-${name}`), base, timeoutMs: TEST_MS };
    // An image from `mkoverlay image` boots as it is; an archive is laid into the base first.
    const vm = b.overlay.endsWith(".img") ? await bootDisk(b.overlay, { ...common, root: `PARTUUID=${partitioned!.rootPartuuid}` }) : await bootWithOverlay({ ...common, overlayTar: b.overlay });
    vms.push(vm);
    timings[`${name}.layAndStartMs`] = Date.now() - t;
    const banner = await waitFor(`${b.hostname}'s tunnel on 127.0.0.1:${b.port}`, TUNNEL_UP_MS, async () => {
      if (!vm.running()) throw new Error(`qemu exited (${await vm.exited}) before the tunnel came up`);
      return sshBanner(b.port, "127.0.0.1", 3000);
    });
    timings[`${name}.bootToTunnelMs`] = Date.now() - t;
    log(`${b.hostname}: tunnel up on ${b.port} ${timings[`${name}.bootToTunnelMs`]} ms after boot: ${banner}`);
    return { vm, banner };
  }

  /** Every host key the device's sshd offers through the tunnel, as "type base64". */
  async function offeredKeys(port: number): Promise<string[]> {
    const r = await run("ssh-keyscan", ["-p", String(port), "-T", "20", "127.0.0.1"], { timeoutMs: 60_000 });
    return r.stdout
      .split("\n")
      .filter((l) => l.trim() && !l.startsWith("#"))
      .map((l) => keyOf(l.split(/\s+/).slice(1).join(" ")));
  }

  /** The tunnel authenticated at the bastion with this device's registered key. */
  async function acceptedAtBastion(b: Built): Promise<number> {
    const text = await readFile(bastion!.logPath, "utf8");
    return text.split("\n").filter((l) => l.includes(`Accepted publickey for ${TUNNEL_USER} `) && l.includes(b.fingerprint)).length;
  }

  it("`mkoverlay verify` accepts both outputs (the archive, and the image read from its root partition)", () => {
    requireSetup();
    for (const b of Object.values(built)) {
      const r = cli(["verify", b.overlay, "--config", config]);
      expect(r.code, `${b.overlay}\n${r.stdout}${r.stderr}`).toBe(0);
    }
  });

  it(
    "rpi4 / raspios: tunnel on the reserved port, strict operator access with the registered key, hardened unit, reconnect",
    async () => {
      const { bastion } = requireSetup();
      const b = built.raspios!;
      expect(b.os).toBe("raspios");
      const unit = `reverse-ssh@${BASTION}.service`;
      let vm: BootedVm | undefined;
      try {
        // (1) The tunnel comes up on the port the registry reserved for this device.
        const up = await bootAndWaitForTunnel("raspios", b);
        vm = up.vm;
        expect(up.banner).toMatch(/^SSH-2\.0-OpenSSH_/);
        expect(await acceptedAtBastion(b)).toBeGreaterThanOrEqual(1);

        // (2) The device presents exactly the registered key, and nothing else ...
        expect(await offeredKeys(b.port)).toEqual([keyOf(b.publicKey)]);
        // ... an operator gets in with mkoverlay's ssh-config + known-hosts, strictly: what ssh
        // will use for this name (only ProxyJump and HostName overridden, see operatorSsh) ...
        const effective = parseSshG(mustSucceed("ssh -G", await run("ssh", ["-F", sshConfig, "-o", "ProxyJump=none", "-o", "HostName=127.0.0.1", "-G", b.hostname])));
        expect(effective).toMatchObject({
          port: String(b.port),
          user: "root",
          hostkeyalias: b.hostname,
          stricthostkeychecking: "true",
          userknownhostsfile: knownHosts,
        });
        const probe = await operatorSsh(b.hostname, raspiosProbe(unit));
        log(`operator probe (exit ${probe.code}):\n${probe.stdout}${probe.stderr}`);
        expect(probe.code, probe.stderr).toBe(0);
        const kv = parseKv(probe.stdout);
        expect(kv.hostname).toBe(b.hostname);
        // ... and the key the device presents is the registered one although the deleting
        // first-boot stand-in ran: sshd uses only the key outside the deletion pattern.
        expect(kv.firstboot).toBe("active");
        expect(kv.stock_keys).toBe("0");
        expect(kv.hostkeys).toBe("/etc/ssh/mkoverlay/ssh_host_ed25519_key");

        // (3) Tunnel, monitor timer and first-boot guards.
        expect(kv.tunnel).toBe("active");
        expect(kv.tunnel_enabled).toBe("enabled");
        expect(kv.timer).toBe("active");
        expect(kv.timer_enabled).toBe("enabled");
        expect(kv.ssh_enabled).toBe("enabled");
        expect(kv.regen).toBe("masked");
        expect(kv.regen_ran).toBe("no");

        // (5) The hardened unit runs as shipped.
        expect(kv.nnp).toBe("yes");
        expect(kv.protect_system).toBe("strict");
        expect(kv.capbset).toBe("[]");
        expect(kv.user).toBe("[]"); // root without capabilities, no DynamicUser (no NSS module needed)
        expect(kv.main_comm).toBe("ssh");
        expect(kv.proc_nnp).toBe("1");
        expect(kv.proc_capbnd).toBe("0000000000000000");
        expect(kv.proc_capeff).toBe("0000000000000000");
        expect(kv.proc_seccomp).toBe("2"); // SECCOMP_MODE_FILTER: SystemCallFilter is loaded
        expect(kv.proc_root?.split(",")[0]).toBe("ro"); // ProtectSystem=strict: / read-only for ssh
        const exposure = Number(kv.exposure);
        expect(kv.exposure, "systemd-analyze security printed no exposure").toMatch(/^\d+(\.\d+)?$/);
        expect(exposure).toBeLessThanOrEqual(2.0);
        expect(kv.nss_systemd_dpkg).not.toBe("0");
        expect(kv.monitor_rc).toBe("0");
        expect(kv.monitor_result).toBe("success");
        expect(kv.monitor_said).toMatch(/no failed reverse-ssh tunnel, nothing to do/);

        // A wrong pin for the same name is refused: StrictHostKeyChecking really is in force.
        const wrongKnownHosts = join(work, "wrong_known_hosts");
        await writeFile(wrongKnownHosts, `${b.hostname} ${keyOf(bastion.hostKeyPub)}\n`);
        const refused = await operatorSsh(b.hostname, "true", { knownHostsFile: wrongKnownHosts });
        expect(refused.code).toBe(255);
        expect(refused.stderr).toMatch(/Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED/);

        // (4) The bastion kills the tunnel's session: the device reconnects by itself.
        const restartsBefore = Number(kv.nrestarts);
        const acceptedBefore = await acceptedAtBastion(b);
        const killed = await bastion.killSessions();
        log(`killed bastion session pids ${killed.join(",")}`);
        expect(killed.length).toBeGreaterThan(0);
        const tKill = Date.now();
        await waitFor("the old forwarded port to close", 15_000, async () => (await sshBanner(b.port, "127.0.0.1", 1000)) === undefined);
        const again = await waitFor(`${b.hostname}'s tunnel to come back on ${b.port}`, RECONNECT_MS, async () => {
          if (!vm!.running()) throw new Error(`qemu exited (${await vm!.exited})`);
          return sshBanner(b.port, "127.0.0.1", 3000);
        });
        timings["raspios.reconnectMs"] = Date.now() - tKill;
        log(`tunnel back after ${timings["raspios.reconnectMs"]} ms: ${again}`);
        expect(await acceptedAtBastion(b)).toBeGreaterThan(acceptedBefore);
        const after = await operatorSsh(
          b.hostname,
          `echo "tunnel=$(systemctl is-active ${unit})"; echo "nrestarts=$(systemctl show -p NRestarts --value ${unit})"; echo "main_pid=$(systemctl show -p MainPID --value ${unit})"; echo "backoff=$(cat /run/reverse-ssh-${BASTION}/backoff)"`,
        );
        expect(after.code, after.stderr).toBe(0);
        const kv2 = parseKv(after.stdout);
        expect(kv2.tunnel).toBe("active");
        expect(Number(kv2.nrestarts)).toBeGreaterThan(restartsBefore); // systemd restarted it, nobody else
        expect(kv2.main_pid).not.toBe(kv.main_pid);
        // systemd 252 ran the back-off's ExecStopPost: the drop was recorded as a network failure.
        expect(kv2.backoff).toMatch(/^network [1-9]$/);
      } catch (err) {
        await keepArtifacts("raspios", vm ?? vms.at(-1), bastion);
        throw err;
      } finally {
        await vm?.stop();
      }
    },
    TEST_MS,
  );

  it(
    "rpi4 / --os debian as a partitioned image from `mkoverlay image`, booted with root=PARTUUID=…-02: nothing masked, the host-key regenerator runs, and the device still presents only its registered key",
    async () => {
      const { bastion } = requireSetup();
      const b = built.debian!;
      expect(b.os).toBe("debian");
      let vm: BootedVm | undefined;
      try {
        const up = await bootAndWaitForTunnel("debian", b);
        vm = up.vm;
        expect(await acceptedAtBastion(b)).toBeGreaterThanOrEqual(1);
        expect(await offeredKeys(b.port)).toEqual([keyOf(b.publicKey)]);
        const probe = await operatorSsh(b.hostname, debianProbe(`reverse-ssh@${BASTION}.service`));
        log(`operator probe (exit ${probe.code}):\n${probe.stdout}${probe.stderr}`);
        expect(probe.code, probe.stderr).toBe(0);
        const kv = parseKv(probe.stdout);
        expect(kv.hostname).toBe(b.hostname);
        // Booted from the image's second partition, found by PARTUUID as Raspberry Pi OS does.
        expect(b.overlay).toMatch(/\.img$/);
        expect(kv.cmdline_root).toBe(`root=PARTUUID=${partitioned!.rootPartuuid}`);
        expect(kv.root_source).toBe("/dev/vda2");
        expect(kv.tunnel).toBe("active");
        expect(kv.timer).toBe("active");
        // The debian profile masks nothing, so the stand-in regenerated /etc/ssh/ssh_host_* ...
        expect(kv.regen).toBe("enabled");
        expect(kv.regen_ran).toBe("yes");
        expect(Number(kv.stock_keys)).toBeGreaterThan(0);
        // ... but the HostKey drop-in replaces sshd's default list: only the registered key.
        expect(kv.hostkeys).toBe("/etc/ssh/mkoverlay/ssh_host_ed25519_key");
      } catch (err) {
        await keepArtifacts("debian", vm ?? vms.at(-1), bastion);
        throw err;
      } finally {
        await vm?.stop();
      }
    },
    TEST_MS,
  );
});

async function keepArtifacts(name: string, vm: BootedVm | undefined, bastion: Bastion | undefined): Promise<void> {
  const dir = join(ARTIFACTS, `overlay-boot-${ARCH === "amd64" ? "" : `${ARCH}-`}${name}-${new Date().toISOString().replace(/[:.]/g, "-")}`);
  await mkdir(dir, { recursive: true });
  const copies: Array<[string | undefined, string]> = [
    [vm?.serialLog, "serial.log"],
    [vm?.qemuLog, "qemu.log"],
    [bastion?.logPath, "bastion-sshd.log"],
  ];
  for (const [src, file] of copies) if (src && existsSync(src)) await copyFile(src, join(dir, file));
  const serialTail = vm ? await tailFile(vm.serialLog, 40) : "(no VM)";
  process.stderr.write(`[overlay-boot] ${name} FAILED; logs kept in ${dir}\n--- last 40 lines of the serial console ---\n${serialTail}\n`);
  if (bastion) process.stderr.write(`--- last 20 lines of the bastion sshd log ---\n${await tailFile(bastion.logPath, 20)}\n`);
}
