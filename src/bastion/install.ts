/**
 * `bastion install`: sets a host (or a mounted image, `--root`) up as a bastion in one step, and
 * again and again without changing anything (idempotent: a file whose content and mode are
 * already right is not touched; a config change replaces only mkoverlay's own files).
 *
 * The steps, in order, so that a fault leaves nothing half installed (`install()` reads as this
 * list; each step is a function of its own; the checks are in install-checks.ts):
 * 1. `checkHost`: sshd present, sshd_config includes the drop-in, the agent's executable and the
 *    keys command's path are ones the target will use and sshd will trust;
 * 2. `checkTunnelAccount`: an existing tunnel user must be a tunnel account, never somebody's
 *    login (account.ts), unless `--take-over-user` names it;
 * 3. `readRegistry`: the registry, read as the agent will read it;
 * 4. `plan`: every file, directory and link, each path resolved inside the root (rootfs.ts);
 * 5. `stage`: every file under a temp name beside its target (with `--dry-run`: in a private
 *    folder, and the install stops after step 6 with a diff);
 * 6. `checkSshd`: the real sshd checks the staged drop-in in the real configuration
 *    (sshd-check.ts), and that it would let the tunnel user in at all (account.ts);
 * 7. `apply`: create missing users, rename the staged files into place (keeping the old ones
 *    until the end), enable the unit; any failure puts back what was there and removes what was
 *    created.
 * The key directory gets its first content from the registry when it is new, so the bastion
 * accepts every live device from the moment sshd reloads; afterwards the agent owns it.
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, linkSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, renameSync, rmdirSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { UserError } from "../util/errors.js";
import { bastionLockouts } from "../config/compat.js";
import { isPostgresUrl } from "../config/registry-location.js";
import type { Registry } from "../registry/types.js";
import { nologinShell, readAccount } from "./account.js";
import { renderDropin } from "./dropin.js";
import { bastionEntries, type BastionEntry as Entry } from "./export.js";
import { capacityProblems, checkHost, checkSshd, checkTunnelAccount, checkTunnelSshd, firstLine, hostLimits, planTunnel, prepareCheck, SSHD, type Ctx, type InstallInput, type TunnelAccount, type TunnelPlan } from "./install-checks.js";
import { KEYS_COMMAND } from "./keys-command.js";
import { KeyStore } from "./keystore.js";
import { AGENT_TEMPLATE, agentEnv, agentExecDropin, agentUnit, configDir, fleetCopy, KEYS_COMMAND_PATH, KEYS_USER, keysDir, registryDropin, STATE_ROOT, stateDir } from "./paths.js";
import { RootFs } from "./rootfs.js";
import { renderTunnelSshdConfig, renderTunnelSshdUnit, TUNNEL_SSHD_TEMPLATE, tunnelSshdConfigPath, tunnelSshdUnit } from "./tunnel-sshd.js";
import { renderAgentUnit, renderExecDropin, renderRegistryDropin } from "./unit.js";

export type { InstallInput } from "./install-checks.js";

export interface InstallResult {
  written: string[];
  unchanged: string[];
  createdUsers: string[];
  /** Keys written into a new key directory (undefined: it existed, the agent owns it, or the registry was not read here). */
  initialKeys: number | undefined;
  live: boolean;
  dryRun: boolean;
  /** "tunnel": a dedicated sshd for the tunnels (its unit installed and enabled); "dropin": the admin sshd carries them. */
  mode: "tunnel" | "dropin";
  /** With dryRun: what would change, as a unified diff per file and `#` lines for the rest. */
  diff: string;
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

/** lstat finds something there (a file where a folder should be is the apply step's to report). */
const exists = (p: string): boolean => {
  try {
    return Boolean(lstatSync(p, { throwIfNoEntry: false }));
  } catch {
    return false;
  }
};

const tmpBeside = (p: string): string => join(dirname(p), `.${basename(p)}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`);

function sameFile(path: string, f: FileSpec): boolean {
  try {
    const st = lstatSync(path);
    return st.isFile() && (st.mode & 0o7777) === f.mode && readFileSync(path, "utf8") === f.content;
  } catch {
    return false;
  }
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
  if (process.getuid?.() !== 0) throw new UserError("bastion install: run it as root (it creates a system user and writes under /etc, /usr/local and /var/lib)");
  if (!existsSync(i.root) || !statSync(i.root).isDirectory()) throw new UserError(`--root ${i.root}: not a directory`);
  const fs = new RootFs(i.root);
  const { mainText, dropin } = checkHost(i, fs);
  const checkDir = mkdtempIn(tmpdir(), "mko-sshd-check-");
  try {
    const c = prepareCheck({ i, b: i.bastion, fs, mainText, dropin, checkDir, hostKey: "", withoutCfg: "" });
    const account = checkTunnelAccount(c);
    const tunnel = planTunnel(c);
    const { entries, oldUsers } = await readRegistry(c);
    checkCapacity(c, entries);
    const plan = planInstall(c, oldUsers, tunnel);
    const staged = stage(c, plan);
    try {
      checkSshd(c, plan.files[0]!.content, staged.files.get(c.dropin) ?? plan.files[0]!.host, account);
      if (tunnel.mode === "tunnel") checkTunnelSshd(c, tunnel);
    } catch (e) {
      staged.undo.run();
      throw e;
    }
    if (i.dryRun) return dryRunResult(c, plan, staged, account, entries, oldUsers);
    return apply(c, plan, staged, account, entries, oldUsers);
  } finally {
    rmSync(checkDir, { recursive: true, force: true });
  }
}

/**
 * 3b. This host against the bastion's share (every active device that dials it, all connected at
 * once): warnings, never a refusal — a bastion is installed before its fleet is built. Only on
 * the host itself: an image's kernel and memory are not this station's.
 */
function checkCapacity(c: Ctx, entries: Entry[] | undefined): void {
  if (!c.fs.live || !entries) return;
  const limits = hostLimits();
  if (!limits) return;
  for (const p of capacityProblems(limits, entries.length)) c.i.warn?.(`bastion ${c.b.name} carries ${entries.length} devices: ${p}`);
}

/** 3. The registry, read as the agent will read it: the first key set, and proof the agent can. */
async function readRegistry(c: Ctx): Promise<{ entries: Entry[] | undefined; oldUsers: string[] }> {
  const { i, fs } = c;
  let location = i.registry;
  if (!isPostgresUrl(i.registry)) {
    // A registry file as the bastion sees it: on this host, or inside the image.
    location = fs.resolve(i.registry);
    if (!existsSync(location)) {
      if (fs.live) throw new UserError(`registry ${i.registry}: does not exist`, { hint: "the agent reads an existing registry; build a device first or point --registry at it" });
      i.log(`registry ${i.registry} is not in ${fs.root}: not read here (nor checked for devices a config change would lock out); the agent reads it on the bastion`);
      return { entries: undefined, oldUsers: [] };
    }
  }
  let registry: Registry;
  let devices;
  try {
    registry = await i.openRegistry(location);
  } catch (e) {
    if (e instanceof UserError) throw new UserError(`the agent's registry is unusable: ${e.message}`, e.hint ? { hint: e.hint } : {});
    throw e;
  }
  try {
    devices = await registry.list();
  } catch (e) {
    if (e instanceof UserError) throw new UserError(`the agent's registry is unusable: ${e.message}`, e.hint ? { hint: e.hint } : {});
    throw e;
  } finally {
    await registry.close();
  }
  const { entries, skipped } = bastionEntries(i.fleet, c.b, devices, new Date());
  for (const s of skipped) i.onSkip?.(s);
  // Lockouts (config/compat.ts): refused unless forced; then every tunnel user that registered
  // devices still dial keeps its Match block (and account) beside the new one.
  const lock = await bastionLockouts(i.fleet, c.b, devices, i.previousFleet, Boolean(i.forceConfigChange));
  for (const l of lock.lines) i.warn?.(l);
  return { entries, oldUsers: lock.oldUsers };
}

interface Plan {
  files: (FileSpec & { host: string })[];
  /** Own directories: target path, host path, mode. */
  dirs: [string, string, number][];
  /** Files that must go: the registry drop-in (registry no longer a file), the tunnel sshd's enablement (back to drop-in mode). */
  remove: { path: string; host: string }[];
  /** Enablement links: the agent's, and in tunnel mode the tunnel sshd's. */
  links: { path: string; host: string; target: string }[];
  mode: "tunnel" | "dropin";
}

/** 4. Every file, directory and link, resolved inside the root before anything is touched. */
function planInstall(c: Ctx, oldUsers: string[], t: TunnelPlan): Plan {
  const { i, b, fs } = c;
  for (const user of oldUsers) {
    if (!i.createUser && !readAccount(fs, user)) throw new UserError(`the old tunnel user '${user}' of bastion '${b.name}' does not exist${fs.live ? "" : ` in ${fs.root}`}`, { hint: "create it, or run without --no-create-user" });
  }
  const sqlite = !isPostgresUrl(i.registry);
  const homeReadOnly = i.exec.some((p) => /^\/(home|root|run\/user)(\/|$)/.test(p));
  const files: FileSpec[] = [
    { path: c.dropin, content: renderDropin(i.fleet, b) + oldUsers.map((user) => `\n${renderDropin(i.fleet, { ...b, user })}`).join(""), mode: 0o644 },
    { path: KEYS_COMMAND_PATH, content: KEYS_COMMAND, mode: 0o755 },
    { path: AGENT_TEMPLATE, content: renderAgentUnit(), mode: 0o644 },
    { path: agentExecDropin(b.name), content: renderExecDropin({ exec: i.exec, homeReadOnly }), mode: 0o644 },
    { path: fleetCopy(b.name), content: i.configText, mode: 0o644 },
    {
      path: agentEnv(b.name),
      // Single-quoted: systemd's EnvironmentFile= and sh (the command printed without systemd) read it alike.
      content: `# Installed by mkoverlay (bastion install). The registry the agent of bastion '${b.name}' reads.\nMKOVERLAY_REGISTRY='${i.registry}'\n# Validated configs are not cached: the unit's file system is read-only.\nMKOVERLAY_CACHE='off'\n`,
      mode: 0o600,
    },
  ];
  if (sqlite) files.push({ path: registryDropin(b.name), content: renderRegistryDropin(dirname(i.registry)), mode: 0o644 });
  const link = (unit: string, target: string) => ({ path: `${WANTS}/${unit}`, host: join(fs.resolve(WANTS), unit), target });
  const links = [link(agentUnit(b.name), AGENT_TEMPLATE)];
  const tunnelLink = link(tunnelSshdUnit(b.name), TUNNEL_SSHD_TEMPLATE);
  const remove: { path: string; host: string }[] = [];
  if (t.mode === "tunnel") {
    // The tunnel sshd (tunnel-sshd.ts): its whole config, the shared template, enabled for this bastion.
    files.push(
      { path: tunnelSshdConfigPath(b.name), content: renderTunnelSshdConfig({ fleet: i.fleet, bastion: b, version: t.version, ...(t.hostKeys.length > 0 ? { hostKeys: t.hostKeys } : {}) }), mode: 0o644 },
      { path: TUNNEL_SSHD_TEMPLATE, content: renderTunnelSshdUnit({ sshd: SSHD }), mode: 0o644 },
    );
    links.push(tunnelLink);
  } else if (exists(tunnelLink.host)) remove.push(tunnelLink);
  const removeHost = sqlite ? undefined : fs.file(registryDropin(b.name));
  if (removeHost && existsSync(removeHost)) remove.push({ path: registryDropin(b.name), host: removeHost });
  return {
    files: files.map((f) => ({ ...f, host: fs.file(f.path) })),
    dirs: ownDirs(b.name).map(([d, mode]) => [d, fs.resolve(d), mode]),
    remove,
    links,
    mode: t.mode,
  };
}

interface Staged {
  /** target path → staged host path, for files that change. */
  files: Map<string, string>;
  unchanged: string[];
  undo: Undo;
}

/** 5. Every changed file under a temp name: beside its target, or (dry run) in the private folder. */
function stage(c: Ctx, plan: Plan): Staged {
  const undo = new Undo();
  const files = new Map<string, string>();
  const unchanged: string[] = [];
  try {
    if (!c.i.dryRun) for (const [, host, mode] of plan.dirs) mkdirs(host, mode, undo);
    for (const [n, f] of plan.files.entries()) {
      if (sameFile(f.host, f)) {
        unchanged.push(f.path);
        continue;
      }
      let tmp: string;
      if (c.i.dryRun) tmp = join(c.checkDir, `staged-${n}`);
      else {
        mkdirs(dirname(f.host), 0o755, undo);
        tmp = tmpBeside(f.host);
      }
      writeFileSync(tmp, f.content, { mode: f.mode, flag: "wx" });
      chmodSync(tmp, f.mode);
      undo.push(() => rmSync(tmp, { force: true }));
      files.set(f.path, tmp);
    }
  } catch (e) {
    undo.run();
    throw failed(e);
  }
  return { files, unchanged, undo };
}

/** Creates the missing folders of a (resolved) host path, each with `mode`. */
function mkdirs(host: string, mode: number, undo: Undo): void {
  const missing: string[] = [];
  for (let d = host; !existsSync(d); d = dirname(d)) missing.unshift(d);
  for (const d of missing) {
    mkdirSync(d, { mode });
    chmodSync(d, mode);
    undo.push(() => rmdirSync(d));
  }
}

/** What a dry run reports: a unified diff per file (`diff -u`), `#` lines for users, folders, links and keys. */
function dryRunResult(c: Ctx, plan: Plan, staged: Staged, t: TunnelAccount, entries: Entry[] | undefined, oldUsers: string[]): InstallResult {
  const { b } = c;
  const out: string[] = [];
  const createdUsers = [...(t.account ? [] : [b.user]), ...oldUsers.filter((u) => !readAccount(c.fs, u)), ...(readAccount(c.fs, KEYS_USER) ? [] : [KEYS_USER])];
  for (const u of createdUsers) out.push(`# would create system user ${u}`);
  for (const [d, host, mode] of plan.dirs) {
    if (!existsSync(host)) out.push(`# would create directory ${d} (${mode.toString(8)})`);
    else if ((statSync(host).mode & 0o7777) !== mode) out.push(`# would chmod ${mode.toString(8)} ${d}`);
  }
  const written: string[] = [];
  for (const f of plan.files) {
    const tmp = staged.files.get(f.path);
    if (!tmp) continue;
    written.push(f.path);
    const old = lstatSync(f.host, { throwIfNoEntry: false });
    if (old && (old.mode & 0o7777) !== f.mode) out.push(`# mode of ${f.path}: ${(old.mode & 0o7777).toString(8)} → ${f.mode.toString(8)}`);
    let [from, to] = [old ? f.host : "/dev/null", tmp];
    if (f.mode === 0o600) {
      // agent.env may hold a registry URL with a password: never printed, on either side.
      out.push(`# ${f.path}: passwords in URLs shown as ***`);
      const mask = (text: string) => text.replace(/(:\/\/[^:/@\s']*):[^@\s']*@/g, "$1:***@");
      [from, to] = [from, to].map((p, k) => {
        if (p === "/dev/null") return p;
        const m = join(c.checkDir, `masked-${k}`);
        writeFileSync(m, mask(readFileSync(p, "utf8")), { mode: 0o600 });
        return m;
      }) as [string, string];
    }
    const d = spawnSync("diff", ["-u", "--label", old ? f.path : "/dev/null", "--label", f.path, from, to], { encoding: "utf8" });
    if (d.status === 2 || d.error) throw new UserError(`diff failed: ${firstLine(d.stderr || d.error?.message || "")}`, { hint: "--dry-run shows changes with diff -u (GNU diffutils)" });
    out.push(d.stdout.replace(/\n$/, ""));
  }
  for (const r of plan.remove) {
    written.push(`${r.path} (removed)`);
    out.push(`# would remove ${r.path}`);
  }
  for (const l of plan.links) {
    if (linkIsRight(l)) continue;
    written.push(`${l.path} → ${l.target}`);
    out.push(`# would link ${l.path} → ${l.target}`);
  }
  const keys = keysDirEmpty(plan) && entries ? entries.length : undefined;
  if (keys !== undefined) out.push(`# would fill ${keysDir(b.name)} from the registry: ${keys} key(s)`);
  staged.undo.run();
  return { written, unchanged: staged.unchanged, createdUsers, initialKeys: keys, live: c.fs.live, dryRun: true, mode: plan.mode, diff: out.length > 0 ? out.join("\n") + "\n" : "" };
}

const linkIsRight = (l: Plan["links"][number]): boolean => {
  const st = lstatSync(l.host, { throwIfNoEntry: false });
  return Boolean(st?.isSymbolicLink() && readlinkSync(l.host) === l.target);
};

const keysDirEmpty = (plan: Plan): boolean => {
  const host = plan.dirs.find(([d]) => d.endsWith("/keys"))![1];
  return !existsSync(host) || readdirSync(host).length === 0;
};

/** 7. Users, files, the enablement link and the first key set together; undone on any failure. */
function apply(c: Ctx, plan: Plan, staged: Staged, t: TunnelAccount, entries: Entry[] | undefined, oldUsers: string[]): InstallResult {
  const { b, fs } = c;
  const undo = staged.undo;
  const cleanup: (() => void)[] = [];
  const written: string[] = [];
  const createdUsers: string[] = [];
  let initialKeys: number | undefined;
  try {
    const keysMissing = !readAccount(fs, KEYS_USER);
    const oldMissing = oldUsers.filter((u) => !readAccount(fs, u));
    if (!t.account || keysMissing || oldMissing.length > 0) fs.checkUserFiles();
    if (!t.account) {
      addUser(fs, b.user, ["--password", "*"], undo);
      createdUsers.push(b.user);
    }
    // Old tunnel users that registered devices still dial (a forced config change).
    for (const user of oldMissing) {
      addUser(fs, user, ["--password", "*"], undo);
      createdUsers.push(user);
    }
    if (keysMissing) {
      addUser(fs, KEYS_USER, [], undo);
      createdUsers.push(KEYS_USER);
    }
    for (const f of plan.files) {
      const tmp = staged.files.get(f.path);
      if (!tmp) continue;
      if (existsSync(f.host)) {
        const backup = tmpBeside(f.host);
        linkSync(f.host, backup);
        undo.push(() => renameSync(backup, f.host));
        renameSync(tmp, f.host);
        cleanup.push(() => rmSync(backup, { force: true }));
      } else {
        renameSync(tmp, f.host);
        undo.push(() => rmSync(f.host, { force: true }));
      }
      written.push(f.path);
    }
    for (const r of plan.remove) {
      const backup = tmpBeside(r.host);
      renameSync(r.host, backup);
      undo.push(() => renameSync(backup, r.host));
      cleanup.push(() => rmSync(backup, { force: true }));
      written.push(`${r.path} (removed)`);
    }
    for (const [, host, mode] of plan.dirs) if ((statSync(host).mode & 0o7777) !== mode) chmodSync(host, mode);
    for (const l of plan.links) {
      if (linkIsRight(l)) continue;
      mkdirs(dirname(l.host), 0o755, undo);
      const old = lstatSync(l.host, { throwIfNoEntry: false });
      if (old) {
        const backup = tmpBeside(l.host);
        renameSync(l.host, backup);
        undo.push(() => renameSync(backup, l.host));
        cleanup.push(() => rmSync(backup, { force: true }));
      }
      symlinkSync(l.target, l.host);
      undo.push(() => rmSync(l.host, { force: true }));
      written.push(`${l.path} → ${l.target}`);
    }
    // First content of a new key directory; an existing one belongs to the running agent.
    if (entries && keysDirEmpty(plan)) {
      const store = KeyStore.open(plan.dirs.find(([d]) => d === keysDir(b.name))![1]);
      for (const e of entries) store.put(e.fingerprint, `${e.line}\n`);
      initialKeys = entries.length;
    }
    undo.forget();
  } catch (e) {
    undo.run();
    throw failed(e);
  } finally {
    for (const f of cleanup.splice(0)) f();
  }
  return { written, unchanged: staged.unchanged, createdUsers, initialKeys, live: fs.live, dryRun: false, mode: plan.mode, diff: "" };
}

/** A file system that refuses a step (a file where a directory should be, no space, …). */
function failed(e: unknown): Error {
  if (e instanceof UserError) return e;
  return new UserError(`bastion install failed: ${(e as Error).message}`, { hint: "everything it had created or replaced was put back" });
}

function mkdtempIn(dir: string, prefix: string): string {
  const p = join(dir, `${prefix}${process.pid}-${randomBytes(4).toString("hex")}`);
  mkdirSync(p, { mode: 0o700 });
  return p;
}

/** A system user with no login: useradd on this host, useradd --prefix for an image. */
function addUser(fs: RootFs, name: string, extra: string[], undo: Undo): void {
  const prefix = fs.live ? [] : ["--prefix", fs.root];
  const r = spawnSync("useradd", [...prefix, "--system", "--shell", nologinShell(fs), "--home-dir", "/nonexistent", "--no-create-home", ...extra, name], { encoding: "utf8" });
  if (r.status !== 0) throw new UserError(`useradd ${name}${fs.live ? "" : ` (in ${fs.root})`} failed: ${firstLine(r.stderr || r.error?.message || "")}`);
  undo.push(() => spawnSync("userdel", [...prefix, name]));
}

/** Whether systemd runs this host, or is the image's init (then the install reloads it / enables the agent). */
export function systemdRunning(): boolean {
  return existsSync("/run/systemd/system");
}

export function imageHasSystemd(fs: RootFs): boolean {
  return ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"].some((p) => existsSync(fs.resolve(p)));
}
