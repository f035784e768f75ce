/**
 * `bastion install`'s checks (steps 1, 2 and 6 of install.ts): the host and its sshd, the tunnel
 * account (account.ts), and the real sshd on the real configuration with the staged drop-in
 * (sshd-check.ts) — accepted, winning for the tunnel user, changing nothing for anyone else, and
 * letting the tunnel user in at all. Nothing here writes outside its private check folder.
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, posix } from "node:path";
import type { Bastion, Fleet } from "../config/fleet.js";
import { UserError } from "../util/errors.js";
import { displayLocation, isPostgresUrl } from "../config/registry-location.js";
import type { Registry } from "../registry/types.js";
import { quotedValueProblem } from "../util/validate.js";
import { accessProblems, accountGroups, loginReasons, readAccount, type Account } from "./account.js";
import type { Skipped } from "./export.js";
import { KEYS_COMMAND_PATH, sshdDropin } from "./paths.js";
import type { RootFs } from "./rootfs.js";
import { checkConfig, dropinSettings, losingSettings, parseEffective, runSshd } from "./sshd-check.js";
import { ADMIN_PORT, parseSshdVersion, renderTunnelSshdConfig, type SshdVersion } from "./tunnel-sshd.js";
import { unitPathProblem } from "./unit.js";

export const SSHD = "/usr/sbin/sshd";

export interface InstallInput {
  fleet: Fleet;
  bastion: Bastion;
  /** "/" for this host, or a mounted image. */
  root: string;
  /** The registry the agent reads, as the bastion sees it (may differ from the stations': a read-only role). */
  registry: string;
  openRegistry: (location: string) => Promise<Registry>;
  createUser: boolean;
  /** ExecStart's command: node and mkoverlay's CLI, or one executable, as paths on the bastion. */
  exec: string[];
  /** The fleet config's bytes (the agent gets its own copy). */
  configText: string;
  /** An existing login account the operator agrees to turn into the tunnel user. */
  takeOverUser?: string | undefined;
  /** Check and show, change nothing. */
  dryRun?: boolean;
  log: (msg: string) => void;
  warn?: (msg: string) => void;
  onSkip?: (s: Skipped) => void;
  /** Install even though the config would lock out registered devices (config/compat.ts). */
  forceConfigChange?: boolean;
  /** The config this bastion was installed with before, if any (what old devices dial). */
  previousFleet?: Fleet;
  /** The target's OpenSSH version ("10.0") when its sshd cannot be run here (an image of another architecture). */
  sshdVersion?: string | undefined;
}

function envValueProblem(v: string): string | undefined {
  return quotedValueProblem(v) ?? (/[\s'$`]/.test(v) ? "contains spaces, quotes or $" : undefined);
}

/** sshd runs the keys command only if it and every directory above it is root's and not group/other-writable. */
function securePathProblem(fs: RootFs, path: string): string | undefined {
  for (let p = dirname(path); ; p = posix.dirname(p)) {
    const host = fs.resolve(p);
    if (existsSync(host)) {
      const st = statSync(host);
      if (st.uid !== 0 || (st.mode & 0o022) !== 0) {
        return `${p} is ${(st.mode & 0o7777).toString(8)} owned by uid ${st.uid}: sshd runs an AuthorizedKeysCommand only below root-owned directories that group and others cannot write (chmod go-w ${p})`;
      }
    }
    if (p === "/") return undefined;
  }
}

/** What every step shares. */
export interface Ctx {
  i: InstallInput;
  b: Bastion;
  fs: RootFs;
  mainText: string;
  dropin: string;
  /** A private folder: sshd's check configs, a throwaway host key, dry-run staging. */
  checkDir: string;
  hostKey: string;
  withoutCfg: string;
}

/** 1. What can be checked without reading the registry or changing anything. */
export function checkHost(i: InstallInput, fs: RootFs): { mainText: string; dropin: string } {
  const b = i.bastion;
  const live = fs.live;
  if (!existsSync(fs.resolve(SSHD))) throw new UserError(`sshd is not installed${live ? "" : ` in ${fs.root}`} (${join(fs.root, SSHD)} is missing)`, { hint: "install openssh-server first" });
  if (!existsSync(SSHD)) throw new UserError(`${SSHD} is missing on this host: it is needed to check the configuration`, { hint: "install openssh-server" });
  const mainPath = fs.resolve("/etc/ssh/sshd_config");
  if (!existsSync(mainPath)) throw new UserError(`${mainPath} is missing`, { hint: "install openssh-server first" });
  const mainText = readFileSync(mainPath, "utf8");
  const dropin = sshdDropin(b.name);
  if (!checkConfig(mainText, fs, dropin, undefined).covers) {
    throw new UserError(`${mainPath} does not include ${dropin}`, {
      hint: "add 'Include /etc/ssh/sshd_config.d/*.conf' at the top of sshd_config (Debian's default); mkoverlay never edits sshd_config itself",
    });
  }
  for (const p of i.exec) {
    const problem = unitPathProblem(p);
    if (problem) throw new UserError(`--mkoverlay ${JSON.stringify(p)}: ${problem}`);
    if (live && !existsSync(p)) throw new UserError(`--mkoverlay ${p}: does not exist`);
    if (!live && !existsSync(fs.resolve(p))) i.warn?.(`--mkoverlay ${p} is not in ${fs.root} (yet): the agent's unit runs it on the bastion`);
  }
  const pathProblem = securePathProblem(fs, KEYS_COMMAND_PATH);
  if (pathProblem) throw new UserError(`cannot install the keys command: ${pathProblem}`);
  const envProblem = envValueProblem(i.registry);
  if (envProblem) throw new UserError(`registry ${displayLocation(i.registry)}: ${envProblem}`, { hint: "the agent's unit passes it in an environment file" });
  if (!isPostgresUrl(i.registry)) {
    const problem = unitPathProblem(i.registry);
    if (problem) throw new UserError(`registry ${i.registry}: ${problem}`, { hint: "give the registry file as the bastion sees it" });
  }
  return { mainText, dropin };
}

/** A throwaway host key and sshd_config without mkoverlay's drop-in (what sshd does today). */
export function prepareCheck(c: Ctx): Ctx {
  const hostKey = join(c.checkDir, "hostkey");
  const kg = spawnSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", hostKey], { encoding: "utf8" });
  if (kg.status !== 0) throw new Error(`ssh-keygen: ${kg.stderr}`);
  mkdirSync("/run/sshd", { recursive: true, mode: 0o755 }); // sshd -t insists on its privsep directory
  const withoutCfg = join(c.checkDir, "without.conf");
  writeFileSync(withoutCfg, checkConfig(c.mainText, c.fs, c.dropin, undefined).text);
  return { ...c, hostKey, withoutCfg };
}

const spec = (c: Ctx, user: string): string[] => ["-T", "-C", `user=${user},host=gateway.invalid,addr=192.0.2.1,laddr=127.0.0.1,lport=${c.b.port}`, "-o", `HostKey=${c.hostKey}`];

export interface TunnelAccount {
  /** undefined: it does not exist yet (the install creates it). */
  account: Account | undefined;
  groups: string[];
}

/** 2. The tunnel user: missing (created), a tunnel account, or somebody's login (refused unless taken over by name). */
export function checkTunnelAccount(c: Ctx): TunnelAccount {
  const { i, b, fs } = c;
  const account = readAccount(fs, b.user);
  if (i.takeOverUser !== undefined && i.takeOverUser !== b.user) {
    throw new UserError(`--take-over-user ${i.takeOverUser}: the tunnel user of bastion '${b.name}' is '${b.user}'`, { hint: "name the account the install would change; nothing was installed" });
  }
  if (!account) {
    if (!i.createUser) throw new UserError(`the tunnel user '${b.user}' of bastion '${b.name}' does not exist${fs.live ? "" : ` in ${fs.root}`}`, { hint: "create it, or run without --no-create-user" });
    return { account, groups: accountGroups(fs, undefined, b.user) };
  }
  const today = runSshd(SSHD, [...spec(c, b.user), "-f", c.withoutCfg]);
  const keysFile = today.ok ? parseEffective(today.stdout).get("authorizedkeysfile")?.[0] : ".ssh/authorized_keys .ssh/authorized_keys2";
  const reasons = loginReasons(fs, account, keysFile);
  if (reasons.length > 0) {
    if (i.takeOverUser !== b.user) {
      throw new UserError(
        `the tunnel user '${b.user}' of bastion '${b.name}' is an existing login account (${reasons.join(", ")}): its Match block (AuthorizedKeysFile none, ForceCommand /sbin/nologin) would lock it out of everything but tunnels`,
        { hint: `give bastion '${b.name}' a tunnel user of its own (bastions.${b.name}.user; the install creates it), or pass --take-over-user ${b.user} if that account is meant to become one; nothing was installed` },
      );
    }
    i.warn?.(`taking over the login account '${b.user}' (${reasons.join(", ")}): after sshd reloads it logs in only as a tunnel`);
  }
  return { account, groups: accountGroups(fs, account, b.user) };
}

/** 6. The real sshd on the real configuration with the staged drop-in: accepted, winning, for the tunnel user only, and letting it in. */
export function checkSshd(c: Ctx, dropinText: string, stagedDropin: string, t: TunnelAccount): void {
  const { b, fs, dropin } = c;
  {
    const withCfg = join(c.checkDir, "with.conf");
    writeFileSync(withCfg, checkConfig(c.mainText, fs, dropin, stagedDropin).text);
    const base = ["-o", `HostKey=${c.hostKey}`];
    const tcheck = runSshd(SSHD, ["-t", "-f", withCfg, ...base]);
    if (!tcheck.ok) {
      const before = runSshd(SSHD, ["-t", "-f", c.withoutCfg, ...base]);
      const why = firstLine(tcheck.stderr);
      throw new UserError(
        before.ok ? `sshd rejects mkoverlay's drop-in ${dropin}: ${why}` : `sshd rejects the existing configuration of ${fs.live ? "this host" : fs.root} (without mkoverlay's drop-in): ${firstLine(before.stderr)}`,
        { hint: before.ok ? "nothing was installed; report this with your sshd version (sshd -V)" : "fix sshd_config first (sshd -t shows the problem); nothing was installed" },
      );
    }
    const tunnel = runSshd(SSHD, [...spec(c, b.user), "-f", withCfg]);
    if (!tunnel.ok) throw new UserError(`sshd -T fails with mkoverlay's drop-in: ${firstLine(tunnel.stderr)}`, { hint: "nothing was installed" });
    const effective = parseEffective(tunnel.stdout);
    const losing = losingSettings(dropinSettings(dropinText), effective);
    if (losing.length > 0) {
      throw new UserError(
        `sshd would not use mkoverlay's settings for '${b.user}': ${losing.map(([k, want, got]) => `${k} is '${got}', not '${want}'`).join("; ")}`,
        { hint: `another Match block read before ${dropin} sets them; remove them there (sshd -T -C user=${b.user},host=x,addr=192.0.2.1 shows what wins). Nothing was installed` },
      );
    }
    const access = accessProblems(fs, effective, b.user, t.account, t.groups);
    if (access.refuse.length > 0) {
      throw new UserError(`sshd would refuse every tunnel of bastion '${b.name}' (user '${b.user}'): ${access.refuse.join("; ")}`, {
        hint: `change that setting so it admits '${b.user}' (sshd -T -C user=${b.user},host=x,addr=192.0.2.1 shows the values that apply); nothing was installed`,
      });
    }
    for (const w of access.warn) c.i.warn?.(w);
    const other = b.user === "root" ? "nobody" : "root";
    const withOther = runSshd(SSHD, [...spec(c, other), "-f", withCfg]);
    const withoutOther = runSshd(SSHD, [...spec(c, other), "-f", c.withoutCfg]);
    if (!withOther.ok || !withoutOther.ok || withOther.stdout !== withoutOther.stdout) {
      throw new UserError(`mkoverlay's drop-in would change sshd's settings for users other than '${b.user}'`, { hint: "nothing was installed; report this with your sshd version (sshd -V)" });
    }
  }
}

export function firstLine(s: string): string {
  return s.trim().split("\n").find((l) => l.trim()) ?? "(no output)";
}


/**
 * How the bastion carries its tunnels (docs/bastion.md §12):
 * - "tunnel": the devices' port is not one the administrators' sshd listens on, so a dedicated
 *   sshd (tunnel-sshd.ts) listens there with fleet-sized global settings, in a unit of its own;
 * - "dropin": devices dial the administrators' sshd (fleets flashed to dial 22): only the Match
 *   drop-in, and on OpenSSH >= 9.8 a warning that its per-source penalties count the tunnels'
 *   failures against the administrators too.
 */
export interface TunnelPlan {
  mode: "tunnel" | "dropin";
  /** The target's sshd version: what the tunnel sshd's config is written for. */
  version: SshdVersion;
  /** The ports the administrators' sshd listens on (`sshd -T` of the real configuration). */
  adminPorts: number[];
  /** The administrators' sshd's host keys (the ones devices pin): the tunnel sshd presents the same. */
  hostKeys: string[];
  /** The sshd that checks the tunnel sshd's config (`sshd -t`): the target's own when it runs here. */
  checker: string | undefined;
}

const versionText = (v: SshdVersion): string => `${v.major}.${v.minor}`;

/** 1b. The administrators' sshd as it runs today (ports, host keys) and the target sshd's version. */
export function planTunnel(c: Ctx): TunnelPlan {
  const { i, b, fs } = c;
  const today = runSshd(SSHD, ["-T", "-f", c.withoutCfg, "-o", `HostKey=${c.hostKey}`]);
  if (!today.ok) throw new UserError(`sshd rejects the existing configuration of ${fs.live ? "this host" : fs.root} (without mkoverlay's drop-in): ${firstLine(today.stderr)}`, { hint: "fix sshd_config first (sshd -t shows the problem); nothing was installed" });
  const eff = parseEffective(today.stdout);
  // Port lines, and ListenAddress lines with a port of their own ("0.0.0.0:2200", "[::]:22").
  const listenPorts = (eff.get("listenaddress") ?? []).map((a) => /:(\d+)$/.exec(a)?.[1]).filter((p): p is string => p !== undefined);
  const adminPorts = [...new Set([...(eff.get("port") ?? ["22"]), ...listenPorts].map(Number))];
  const hostKeys = (eff.get("hostkey") ?? []).filter((k) => k !== c.hostKey);
  // The version of the sshd the target runs: the target's binary, or --sshd-version when it cannot run here.
  const target = fs.resolve(SSHD);
  const v = spawnSync(target, ["-V"], { encoding: "utf8" });
  let version: SshdVersion | undefined;
  try {
    version = v.error ? undefined : parseSshdVersion(`${v.stderr}${v.stdout}`);
  } catch {
    version = undefined;
  }
  let checker: string | undefined = version ? target : undefined;
  if (i.sshdVersion !== undefined) {
    const m = /^(\d+)\.(\d+)$/.exec(i.sshdVersion);
    if (!m) throw new UserError(`--sshd-version ${i.sshdVersion}: give OpenSSH's version as MAJOR.MINOR (e.g. 9.2 or 10.0)`);
    const given = { major: Number(m[1]), minor: Number(m[2]) };
    if (version && versionText(version) !== versionText(given)) {
      throw new UserError(`--sshd-version ${i.sshdVersion}: ${fs.name(SSHD)} is OpenSSH ${versionText(version)}`, { hint: "leave --sshd-version out when the target's sshd runs here" });
    }
    if (!version) {
      // The target's sshd does not run here: this host's sshd checks the config if it is the same version.
      const host = spawnSync(SSHD, ["-V"], { encoding: "utf8" });
      const hostV = /OpenSSH_(\d+\.\d+)/.exec(`${host.stderr}`)?.[1];
      checker = hostV === versionText(given) ? SSHD : undefined;
    }
    version = given;
  }
  // Port 22 is never the tunnel sshd's (tunnel-sshd.ts): devices that dial it are the admin sshd's, as before.
  const mode = adminPorts.includes(b.port) || b.port === ADMIN_PORT ? "dropin" : "tunnel";
  if (!version) {
    if (mode === "dropin") version = { major: 0, minor: 0 };
    else throw new UserError(`${fs.name(SSHD)} does not run here (${firstLine(v.stderr || v.error?.message || "")}): the tunnel sshd's config depends on its version`, { hint: "name it: --sshd-version MAJOR.MINOR (what sshd -V prints on the bastion, e.g. 9.2 or 10.0); nothing was installed" });
  }
  if (mode === "dropin" && !adminPorts.includes(b.port)) {
    i.warn?.(`bastion '${b.name}': devices dial port ${ADMIN_PORT}, but the administrators' sshd listens on ${adminPorts.join(", ")}: the drop-in is installed for it as before; give the tunnels a port of their own (bastions.${b.name}.port, e.g. 2222) for a tunnel sshd`);
  }
  if (mode === "dropin" && (version.major > 9 || (version.major === 9 && version.minor >= 8))) {
    i.warn?.(
      `bastion '${b.name}': devices dial port ${b.port}, the administrators' sshd's (OpenSSH ${versionText(version)}): its PerSourcePenalties count every failed tunnel login (a revoked or expired device retrying) against the source address, so devices and administrators behind the same NAT address get refused; give the tunnels a port of their own (bastions.${b.name}.port, e.g. 2222: the install then runs a dedicated tunnel sshd, docs/bastion.md §12)`,
    );
  }
  return { mode, version, adminPorts, hostKeys, checker };
}

/** 6b. The tunnel sshd's staged config, checked by the real sshd (`sshd -t`) with a throwaway host key. */
export function checkTunnelSshd(c: Ctx, t: TunnelPlan): void {
  const { i, b } = c;
  if (!t.checker) {
    i.warn?.(`no sshd of OpenSSH ${versionText(t.version)} runs here: the tunnel sshd's config was not checked by sshd -t (its unit checks it before each start)`);
    return;
  }
  const file = join(c.checkDir, "tunnel-sshd.conf");
  writeFileSync(file, renderTunnelSshdConfig({ fleet: i.fleet, bastion: b, version: t.version, hostKeys: [c.hostKey] }));
  const r = runSshd(t.checker, ["-t", "-f", file]);
  if (!r.ok) throw new UserError(`sshd rejects the tunnel sshd's config of bastion '${b.name}': ${firstLine(r.stderr)}`, { hint: "nothing was installed; report this with your sshd version (sshd -V)" });
}

/**
 * What a bastion needs per live tunnel, measured (bench/bastion-results.md: 1,000 tunnels on
 * OpenSSH 9.2 and 10.0, linear from 200): two sshd processes (the session and its unprivileged
 * child) and about 1.9 MB of memory (PSS).
 */
export const PER_TUNNEL = { processes: 2, memoryKiB: 1_900 };

export interface HostLimits {
  /** kernel.pid_max */
  pidMax: number;
  /** kernel.threads-max */
  threadsMax: number;
  /** MemTotal, KiB */
  memTotalKiB: number;
}

/** This host's limits from /proc, or undefined where /proc does not say. */
export function hostLimits(proc = "/proc"): HostLimits | undefined {
  try {
    const num = (f: string): number => Number(readFileSync(join(proc, f), "utf8").trim());
    const mem = /^MemTotal:\s+(\d+) kB$/m.exec(readFileSync(join(proc, "meminfo"), "utf8"));
    const l = { pidMax: num("sys/kernel/pid_max"), threadsMax: num("sys/kernel/threads-max"), memTotalKiB: Number(mem?.[1]) };
    return Object.values(l).every((v) => Number.isFinite(v) && v > 0) ? l : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Whether a host can carry `tunnels` live tunnels at once, with room: twice the processes
 * (the rest of the system, and a reconnect storm in which old and new sessions overlap), and
 * the memory with a quarter to spare. Each problem names the setting and the size it needs.
 */
export function capacityProblems(l: HostLimits, tunnels: number): string[] {
  const problems: string[] = [];
  const processes = 2 * PER_TUNNEL.processes * tunnels;
  if (l.pidMax < processes) problems.push(`kernel.pid_max is ${l.pidMax}: ${tunnels} tunnels need ${PER_TUNNEL.processes * tunnels} processes, twice that with room; set kernel.pid_max = ${Math.max(processes, 4_194_304)} in /etc/sysctl.d/`);
  if (l.threadsMax < processes) problems.push(`kernel.threads-max is ${l.threadsMax}: ${tunnels} tunnels need ${PER_TUNNEL.processes * tunnels} processes, twice that with room; raise it in /etc/sysctl.d/ (or add memory: the kernel sizes it from RAM)`);
  const needKiB = Math.ceil(tunnels * PER_TUNNEL.memoryKiB * 1.25);
  if (l.memTotalKiB < needKiB) problems.push(`memory is ${Math.round(l.memTotalKiB / 1024)} MiB: ${tunnels} tunnels take about ${Math.round((tunnels * PER_TUNNEL.memoryKiB) / 1024)} MiB, ${Math.round(needKiB / 1024)} MiB with room`);
  return problems;
}
