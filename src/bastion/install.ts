/**
 * `bastion install`: sets a host (or a mounted image, `--root`) up as a bastion in one step, and
 * again and again without changing anything (idempotent: a file whose content and mode are
 * already right is not touched; a config change replaces only mkoverlay's own files).
 *
 * Order, so that a fault leaves nothing half installed:
 * 1. check everything that can be checked without changing anything: sshd present, sshd_config
 *    includes sshd_config.d, the keys command's path is one sshd will trust, the tunnel user
 *    (or permission to create it), the registry reachable with the agent's credentials;
 * 2. stage every file under a temp name beside its target;
 * 3. have the real sshd check the staged drop-in in the real configuration (sshd-check.ts);
 * 4. create missing users, rename the staged files into place (keeping the old ones until the
 *    end), enable the unit; any failure puts back what was there and removes what was created.
 * The key directory gets its first content from the registry when it is new, so the bastion
 * accepts every live device from the moment sshd reloads; afterwards the agent owns it.
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, linkSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, renameSync, rmdirSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join, posix } from "node:path";
import { bastionLockouts } from "../config/compat.js";
import type { Bastion, Fleet } from "../config/fleet.js";
import { UserError } from "../errors.js";
import { displayLocation, isPostgresUrl } from "../registry/location.js";
import type { Registry } from "../registry/types.js";
import { quotedValueProblem } from "../validate.js";
import { renderDropin } from "./dropin.js";
import { bastionEntries, type Skipped } from "./export.js";
import { KEYS_COMMAND } from "./keys-command.js";
import { KeyStore } from "./keystore.js";
import { AGENT_TEMPLATE, agentEnv, agentUnit, configDir, fleetCopy, KEYS_COMMAND_PATH, KEYS_USER, keysDir, sshdDropin, STATE_ROOT, stateDir } from "./paths.js";
import { checkConfig, dropinSettings, losingSettings, parseEffective, runSshd } from "./sshd-check.js";
import { renderAgentUnit, renderRegistryDropin } from "./unit.js";

export const SSHD = "/usr/sbin/sshd";

export interface InstallInput {
  fleet: Fleet;
  bastion: Bastion;
  /** "/" for this host, or a mounted image. */
  root: string;
  /** The registry the agent reads (may differ from the stations': a read-only role). */
  registry: string;
  openRegistry: (location: string) => Promise<Registry>;
  createUser: boolean;
  /** ExecStart's command: node and mkoverlay's CLI, or one executable. */
  exec: string[];
  /** The fleet config's bytes (the agent gets its own copy). */
  configText: string;
  log: (msg: string) => void;
  onSkip?: (s: Skipped) => void;
  /** Install even though the config would lock out registered devices (config/compat.ts). */
  forceConfigChange?: boolean;
  /** The config this bastion was installed with before, if any (what old devices dial). */
  previousFleet?: Fleet;
  warn?: (msg: string) => void;
}

export interface InstallResult {
  written: string[];
  unchanged: string[];
  createdUsers: string[];
  /** Keys written into a new key directory (undefined: it existed, the agent owns it). */
  initialKeys: number | undefined;
  live: boolean;
}

interface FileSpec {
  path: string;
  content: string;
  mode: number;
}

const WANTS = "/etc/systemd/system/multi-user.target.wants";

/** Directories that are mkoverlay's own (created with these modes; modes enforced). */
function ownDirs(b: string): [string, number][] {
  return [
    ["/etc/mkoverlay", 0o755],
    ["/etc/mkoverlay/bastion", 0o755],
    [configDir(b), 0o755],
    [dirname(KEYS_COMMAND_PATH), 0o755],
    ["/var/lib/mkoverlay", 0o755],
    [STATE_ROOT, 0o755],
    // Traverse-only: sshd's command user opens files by name, nobody lists the fleet's keys.
    [stateDir(b), 0o711],
    [keysDir(b), 0o711],
  ];
}

function envValueProblem(v: string): string | undefined {
  return quotedValueProblem(v) ?? (/[\s'$`]/.test(v) ? "contains spaces, quotes or $" : undefined);
}

/** A passwd entry of `root`'s system (getent on this host, the file for an image). */
function passwdEntry(root: string, user: string): string[] | undefined {
  if (root === "/") {
    const r = spawnSync("getent", ["passwd", user], { encoding: "utf8" });
    return r.status === 0 ? r.stdout.trim().split(":") : undefined;
  }
  try {
    for (const line of readFileSync(join(root, "etc/passwd"), "utf8").split("\n")) if (line.split(":")[0] === user) return line.split(":");
  } catch {
    return undefined;
  }
  return undefined;
}

/** sshd runs the keys command only if it and every directory above it is root's and not group/other-writable. */
function securePathProblem(root: string, path: string): string | undefined {
  for (let p = dirname(path); ; p = posix.dirname(p)) {
    const host = join(root, p);
    if (existsSync(host)) {
      const st = statSync(host);
      if (st.uid !== 0 || (st.mode & 0o022) !== 0) {
        return `${p} is ${(st.mode & 0o7777).toString(8)} owned by uid ${st.uid}: sshd runs an AuthorizedKeysCommand only below root-owned directories that group and others cannot write (chmod go-w ${p})`;
      }
    }
    if (p === "/") return undefined;
  }
}

const tmpBeside = (p: string): string => join(dirname(p), `.${basename(p)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`);

function sameFile(path: string, f: FileSpec): boolean {
  try {
    const st = lstatSync(path);
    return st.isFile() && (st.mode & 0o7777) === f.mode && readFileSync(path, "utf8") === f.content;
  } catch {
    return false;
  }
}

function nologin(root: string): string {
  for (const s of ["/usr/sbin/nologin", "/sbin/nologin"]) if (existsSync(join(root, s))) return s;
  return "/bin/false";
}

/** Undo log: each step registers how to take it back. */
class Undo {
  private readonly steps: (() => void)[] = [];
  push(step: () => void): void {
    this.steps.push(step);
  }
  run(): void {
    for (const s of this.steps.reverse()) {
      try {
        s();
      } catch {
        // best effort: keep undoing the rest
      }
    }
    this.steps.length = 0;
  }
  forget(): void {
    this.steps.length = 0;
  }
}

export async function install(i: InstallInput): Promise<InstallResult> {
  const { bastion: b, root } = i;
  const at = (p: string) => join(root, p);
  const live = root === "/";
  if (process.getuid?.() !== 0) throw new UserError("bastion install: run it as root (it creates a system user and writes under /etc, /usr/local and /var/lib)");
  if (!existsSync(root) || !statSync(root).isDirectory()) throw new UserError(`--root ${root}: not a directory`);

  // --- 1. checks, nothing changed yet ---
  if (!existsSync(at(SSHD))) throw new UserError(`sshd is not installed${live ? "" : ` in ${root}`} (${at(SSHD)} is missing)`, { hint: "install openssh-server first" });
  if (!existsSync(SSHD)) throw new UserError(`${SSHD} is missing on this host: it is needed to check the configuration`, { hint: "install openssh-server" });
  const mainPath = at("/etc/ssh/sshd_config");
  if (!existsSync(mainPath)) throw new UserError(`${mainPath} is missing`, { hint: "install openssh-server first" });
  const mainText = readFileSync(mainPath, "utf8");
  const dropin = sshdDropin(b.name);
  if (!checkConfig(mainText, root, dropin, undefined).covers) {
    throw new UserError(`${mainPath} does not include ${dropin}`, {
      hint: "add 'Include /etc/ssh/sshd_config.d/*.conf' at the top of sshd_config (Debian's default); mkoverlay never edits sshd_config itself",
    });
  }
  for (const p of i.exec) {
    const problem = /^\/[A-Za-z0-9._/+@-]+$/.test(p) ? undefined : "must be an absolute path of letters, digits and . _ / + @ -";
    if (problem) throw new UserError(`--mkoverlay ${JSON.stringify(p)}: ${problem}`);
    if (live && !existsSync(p)) throw new UserError(`--mkoverlay ${p}: does not exist`);
  }
  const pathProblem = securePathProblem(root, KEYS_COMMAND_PATH);
  if (pathProblem) throw new UserError(`cannot install the keys command: ${pathProblem}`);
  const sqlite = !isPostgresUrl(i.registry);
  const envProblem = envValueProblem(i.registry);
  if (envProblem) throw new UserError(`registry ${displayLocation(i.registry)}: ${envProblem}`, { hint: "the agent's unit passes it in an environment file" });
  const tunnelUser = passwdEntry(root, b.user);
  if (!tunnelUser && !i.createUser) {
    throw new UserError(`the tunnel user '${b.user}' of bastion '${b.name}' does not exist${live ? "" : ` in ${root}`}`, { hint: "create it, or run without --no-create-user" });
  }
  if (sqlite && !existsSync(i.registry)) throw new UserError(`registry ${i.registry}: does not exist`, { hint: "the agent reads an existing registry; build a device first or point --registry at it" });
  // The registry, read as the agent will read it.
  let registry: Registry;
  try {
    registry = await i.openRegistry(i.registry);
  } catch (e) {
    if (e instanceof UserError) throw new UserError(`the agent's registry is unusable: ${e.message}`, e.hint ? { hint: e.hint } : {});
    throw e;
  }
  let devices;
  try {
    devices = await registry.list();
  } catch (e) {
    if (e instanceof UserError) throw new UserError(`the agent's registry is unusable: ${e.message}`, e.hint ? { hint: e.hint } : {});
    throw e;
  } finally {
    await registry.close();
  }
  const { entries, skipped } = bastionEntries(i.fleet, b, devices, new Date());
  for (const s of skipped) i.onSkip?.(s);
  // --- lockouts (config/compat.ts): refused unless forced; then every tunnel user that
  // registered devices still dial keeps its Match block (and account) beside the new one. ---
  const lock = await bastionLockouts(i.fleet, b, devices, i.previousFleet, Boolean(i.forceConfigChange));
  for (const l of lock.lines) i.warn?.(l);
  const oldUserBlocks = lock.oldUsers.map((user) => `\n${renderDropin(i.fleet, { ...b, user })}`).join("");

  // --- 2. stage ---
  const homeReadOnly = i.exec.some((p) => /^\/(home|root|run\/user)(\/|$)/.test(p));
  const files: FileSpec[] = [
    { path: dropin, content: renderDropin(i.fleet, b) + oldUserBlocks, mode: 0o644 },
    { path: KEYS_COMMAND_PATH, content: KEYS_COMMAND, mode: 0o755 },
    { path: AGENT_TEMPLATE, content: renderAgentUnit({ exec: i.exec, homeReadOnly }), mode: 0o644 },
    { path: fleetCopy(b.name), content: i.configText, mode: 0o644 },
    {
      path: agentEnv(b.name),
      content: `# Installed by mkoverlay (bastion install). The registry the agent of bastion '${b.name}' reads.\nMKOVERLAY_REGISTRY=${i.registry}\n# Validated configs are not cached: the unit's file system is read-only.\nMKOVERLAY_CACHE=off\n`,
      mode: 0o600,
    },
  ];
  const registryDropin = `/etc/systemd/system/${agentUnit(b.name)}.d/50-registry.conf`;
  if (sqlite) files.push({ path: registryDropin, content: renderRegistryDropin(dirname(i.registry)), mode: 0o644 });

  const undo = new Undo();
  const cleanup: (() => void)[] = [];
  const staged = new Map<string, string>();
  const written: string[] = [];
  const unchanged: string[] = [];
  const createdUsers: string[] = [];
  let initialKeys: number | undefined;
  let checkDir: string | undefined;
  try {
    const mkdirs = (dir: string, mode: number) => {
      const missing: string[] = [];
      for (let d = dir; !existsSync(at(d)); d = posix.dirname(d)) missing.unshift(d);
      for (const d of missing) {
        mkdirSync(at(d), { mode });
        chmodSync(at(d), mode);
        undo.push(() => rmdirSync(at(d)));
      }
    };
    for (const [d, mode] of ownDirs(b.name)) mkdirs(d, mode);
    for (const f of files) {
      mkdirs(dirname(f.path), 0o755);
      if (sameFile(at(f.path), f)) {
        unchanged.push(f.path);
        continue;
      }
      const tmp = tmpBeside(at(f.path));
      writeFileSync(tmp, f.content, { mode: f.mode, flag: "wx" });
      chmodSync(tmp, f.mode);
      undo.push(() => rmSync(tmp, { force: true }));
      staged.set(f.path, tmp);
    }

    // --- 3. the real sshd checks the staged drop-in in the real configuration ---
    checkDir = mkdtempIn(tmpdir(), "mko-sshd-check-");
    const hostKey = join(checkDir, "hostkey");
    const kg = spawnSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", hostKey], { encoding: "utf8" });
    if (kg.status !== 0) throw new Error(`ssh-keygen: ${kg.stderr}`);
    mkdirSync("/run/sshd", { recursive: true, mode: 0o755 }); // sshd -t insists on its privsep directory
    const withCfg = join(checkDir, "with.conf");
    const withoutCfg = join(checkDir, "without.conf");
    writeFileSync(withCfg, checkConfig(mainText, root, dropin, staged.get(dropin) ?? at(dropin)).text);
    writeFileSync(withoutCfg, checkConfig(mainText, root, dropin, undefined).text);
    const base = ["-o", `HostKey=${hostKey}`];
    const t = runSshd(SSHD, ["-t", "-f", withCfg, ...base]);
    if (!t.ok) {
      const before = runSshd(SSHD, ["-t", "-f", withoutCfg, ...base]);
      const why = firstLine(t.stderr);
      throw new UserError(
        before.ok ? `sshd rejects mkoverlay's drop-in ${dropin}: ${why}` : `sshd rejects the existing configuration of ${root === "/" ? "this host" : root} (without mkoverlay's drop-in): ${firstLine(before.stderr)}`,
        { hint: before.ok ? "nothing was installed; report this with your sshd version (sshd -V)" : "fix sshd_config first (sshd -t shows the problem); nothing was installed" },
      );
    }
    const spec = (user: string) => ["-T", "-C", `user=${user},host=gateway.invalid,addr=192.0.2.1,laddr=127.0.0.1,lport=${b.port}`];
    const tunnel = runSshd(SSHD, [...spec(b.user), "-f", withCfg, ...base]);
    if (!tunnel.ok) throw new UserError(`sshd -T fails with mkoverlay's drop-in: ${firstLine(tunnel.stderr)}`, { hint: "nothing was installed" });
    const losing = losingSettings(dropinSettings(files[0]!.content), parseEffective(tunnel.stdout));
    if (losing.length > 0) {
      throw new UserError(
        `sshd would not use mkoverlay's settings for '${b.user}': ${losing.map(([k, want, got]) => `${k} is '${got}', not '${want}'`).join("; ")}`,
        { hint: `another Match block read before ${dropin} sets them; remove them there (sshd -T -C user=${b.user},host=x,addr=192.0.2.1 shows what wins). Nothing was installed` },
      );
    }
    const other = b.user === "root" ? "nobody" : "root";
    const withOther = runSshd(SSHD, [...spec(other), "-f", withCfg, ...base]);
    const withoutOther = runSshd(SSHD, [...spec(other), "-f", withoutCfg, ...base]);
    if (!withOther.ok || !withoutOther.ok || withOther.stdout !== withoutOther.stdout) {
      throw new UserError(`mkoverlay's drop-in would change sshd's settings for users other than '${b.user}'`, { hint: "nothing was installed; report this with your sshd version (sshd -V)" });
    }

    // --- 4. users, files, unit ---
    if (!tunnelUser) {
      addUser(root, b.user, ["--password", "*"], undo);
      createdUsers.push(b.user);
    }
    for (const user of lock.oldUsers) {
      if (passwdEntry(root, user)) continue;
      if (!i.createUser) throw new UserError(`the old tunnel user '${user}' of bastion '${b.name}' does not exist${live ? "" : ` in ${root}`}`, { hint: "create it, or run without --no-create-user" });
      addUser(root, user, ["--password", "*"], undo);
      createdUsers.push(user);
    }
    if (!passwdEntry(root, KEYS_USER)) {
      addUser(root, KEYS_USER, [], undo);
      createdUsers.push(KEYS_USER);
    }
    for (const [path, tmp] of staged) {
      const target = at(path);
      if (existsSync(target)) {
        const backup = tmpBeside(target);
        linkSync(target, backup);
        undo.push(() => renameSync(backup, target));
        renameSync(tmp, target);
        cleanup.push(() => rmSync(backup, { force: true }));
      } else {
        renameSync(tmp, target);
        undo.push(() => rmSync(target, { force: true }));
      }
      written.push(path);
    }
    if (!sqlite && existsSync(at(registryDropin))) {
      const backup = tmpBeside(at(registryDropin));
      renameSync(at(registryDropin), backup);
      undo.push(() => renameSync(backup, at(registryDropin)));
      cleanup.push(() => rmSync(backup, { force: true }));
      written.push(`${registryDropin} (removed)`);
    }
    for (const [d, mode] of ownDirs(b.name)) if ((statSync(at(d)).mode & 0o7777) !== mode) chmodSync(at(d), mode);
    const link = at(`${WANTS}/${agentUnit(b.name)}`);
    if (!(lstatSync(link, { throwIfNoEntry: false })?.isSymbolicLink() && readlinkSync(link) === AGENT_TEMPLATE)) {
      mkdirs(WANTS, 0o755);
      rmSync(link, { force: true });
      symlinkSync(AGENT_TEMPLATE, link);
      undo.push(() => rmSync(link, { force: true }));
      written.push(`${WANTS}/${agentUnit(b.name)} → ${AGENT_TEMPLATE}`);
    }
    // First content of a new key directory; an existing one belongs to the running agent.
    if (readdirSync(at(keysDir(b.name))).length === 0) {
      const store = KeyStore.open(at(keysDir(b.name)));
      for (const e of entries) store.put(e.fingerprint, `${e.line}\n`);
      initialKeys = entries.length;
    }
    undo.forget();
  } catch (e) {
    undo.run();
    if (e instanceof UserError) throw e;
    // A file system that refuses a step (a file where a directory should be, no space, …).
    throw new UserError(`bastion install failed: ${(e as Error).message}`, { hint: "everything it had created or replaced was put back" });
  } finally {
    for (const c of cleanup.splice(0)) c();
    if (checkDir) rmSync(checkDir, { recursive: true, force: true });
  }
  return { written, unchanged, createdUsers, initialKeys, live };
}

function firstLine(s: string): string {
  return s.trim().split("\n").find((l) => l.trim()) ?? "(no output)";
}

function mkdtempIn(dir: string, prefix: string): string {
  const p = join(dir, `${prefix}${process.pid}-${randomBytes(4).toString("hex")}`);
  mkdirSync(p, { mode: 0o700 });
  return p;
}

/** A system user with no login: useradd on this host, useradd --prefix for an image. */
function addUser(root: string, name: string, extra: string[], undo: Undo): void {
  const prefix = root === "/" ? [] : ["--prefix", root];
  const r = spawnSync("useradd", [...prefix, "--system", "--shell", nologin(root), "--home-dir", "/nonexistent", "--no-create-home", ...extra, name], { encoding: "utf8" });
  if (r.status !== 0) throw new UserError(`useradd ${name}${root === "/" ? "" : ` (in ${root})`} failed: ${firstLine(r.stderr || r.error?.message || "")}`);
  undo.push(() => spawnSync("userdel", [...prefix, name]));
}

/** Whether systemd runs this host (then the install reloads it and starts the agent). */
export function systemdRunning(): boolean {
  return existsSync("/run/systemd/system");
}
