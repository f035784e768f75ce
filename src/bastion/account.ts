/**
 * The tunnel user as `bastion install` finds it, before anything is written:
 *
 * - `loginReasons`: why an existing account is somebody's login (uid 0, a login shell, a
 *   password, authorized keys) and so must not become a tunnel account — its Match block would
 *   leave it `AuthorizedKeysFile none` and `ForceCommand /sbin/nologin`. An account mkoverlay
 *   created has none of these (system user, nologin, password `*`, home /nonexistent).
 * - `accessProblems`: whether sshd would let the tunnel user in at all, decided as sshd's
 *   `allowed_user()` (auth.c) does, in its order: the shell must exist, a locked password (`!`)
 *   is refused without PAM, then DenyUsers, AllowUsers, DenyGroups, AllowGroups — with the values
 *   the real `sshd -T -C user=…` says apply to a tunnel login. Patterns are sshd's `match_pattern`
 *   (`*`, `?`, case-sensitive); a `user@host` entry only concerns logins from that host, so it is
 *   a warning, not a refusal.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, statSync } from "node:fs";
import { posix } from "node:path";
import type { RootFs } from "./rootfs.js";

export interface Account {
  name: string;
  uid: number;
  gid: number;
  home: string;
  shell: string;
  /** The password field (shadow's when the passwd field is `x`); undefined: unknown. */
  password: string | undefined;
}

function fileLines(fs: RootFs, p: string): string[] | undefined {
  try {
    return readFileSync(fs.resolve(p), "utf8").split("\n");
  } catch {
    return undefined;
  }
}

function entry(fs: RootFs, db: "passwd" | "shadow" | "group", key: string): string[] | undefined {
  if (fs.live) {
    const r = spawnSync("getent", [db, key], { encoding: "utf8" });
    return r.status === 0 ? r.stdout.split("\n")[0]!.split(":") : undefined;
  }
  for (const line of fileLines(fs, `/etc/${db}`) ?? []) {
    const f = line.split(":");
    if (f[0] === key || (db === "group" && /^\d+$/.test(key) && f[2] === key)) return f;
  }
  return undefined;
}

/** A passwd entry of the target's system (getent on this host, the files of an image). */
export function readAccount(fs: RootFs, user: string): Account | undefined {
  const p = entry(fs, "passwd", user);
  if (!p) return undefined;
  const pw = p[1] ?? "";
  const password = pw === "x" ? entry(fs, "shadow", user)?.[1] : pw;
  return { name: user, uid: Number(p[2]), gid: Number(p[3]), home: p[5] ?? "/", shell: p[6] || "/bin/sh", password };
}

/** The account's groups, primary and supplementary (a user still to be created gets its own). */
export function accountGroups(fs: RootFs, a: Account | undefined, user: string): string[] {
  if (!a) return [user];
  if (fs.live) {
    const r = spawnSync("id", ["-Gn", user], { encoding: "utf8" });
    if (r.status === 0) return r.stdout.trim().split(/\s+/);
  }
  const out = new Set<string>();
  for (const line of fileLines(fs, "/etc/group") ?? []) {
    const [name = "", , gid = "", members = ""] = line.split(":");
    if (Number(gid) === a.gid || members.split(",").includes(user)) out.add(name);
  }
  return [...out];
}

const isNologin = (shell: string): boolean => ["nologin", "false"].includes(posix.basename(shell));

/** A usable password: a crypt hash (`$id$…` or 13-character DES); `*`, `!…`, `x` are none. */
const hasPassword = (pw: string): boolean => pw.startsWith("$") || /^[./0-9A-Za-z]{13}$/.test(pw);

/** `AuthorizedKeysFile` values of sshd -T for this user, as target paths. */
function keyFiles(a: Account, authorizedKeysFile: string | undefined): string[] {
  if (!authorizedKeysFile || authorizedKeysFile === "none") return [];
  return authorizedKeysFile
    .split(/\s+/)
    .filter((f) => f && f !== "none")
    .map((f) => f.replace(/%(.)/g, (_, c: string) => (c === "h" ? a.home : c === "u" ? a.name : c === "U" ? String(a.uid) : c === "%" ? "%" : `%${c}`)))
    .map((f) => (f.startsWith("/") ? f : posix.join(a.home, f)));
}

/** Why an existing account is a login account (empty: it is shaped like a tunnel account). */
export function loginReasons(fs: RootFs, a: Account, authorizedKeysFile: string | undefined): string[] {
  const out: string[] = [];
  if (a.uid === 0) out.push("uid 0");
  if (!isNologin(a.shell)) out.push(`login shell ${a.shell}`);
  if (a.password === "") out.push("an empty password");
  else if (a.password !== undefined && hasPassword(a.password)) out.push("a password");
  for (const f of keyFiles(a, authorizedKeysFile)) {
    let text: string;
    try {
      text = readFileSync(fs.resolve(f), "utf8");
    } catch {
      continue;
    }
    if (text.split("\n").some((l) => l.trim() && !l.trim().startsWith("#"))) out.push(`authorized keys in ${f}`);
  }
  return out;
}

/** sshd's match_pattern: `*` and `?`, the whole string, case-sensitive. */
function matchPattern(s: string, pattern: string): boolean {
  const re = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(`^${re}$`, "s").test(s);
}

export interface Access {
  /** Settings that refuse every tunnel login, named. */
  refuse: string[];
  /** Settings that refuse tunnels from some hosts only. */
  warn: string[];
}

/** sshd's allowed_user(), for a login of `user` (groups `groups`) with the effective settings of sshd -T. */
export function accessProblems(fs: RootFs, eff: Map<string, string[]>, user: string, a: Account | undefined, groups: string[]): Access {
  const refuse: string[] = [];
  const warn: string[] = [];
  if (a) {
    let runnable = false;
    try {
      const st = statSync(fs.resolve(a.shell));
      runnable = st.isFile() && (st.mode & 0o111) !== 0;
    } catch {
      runnable = false;
    }
    if (!runnable) refuse.push(`its shell ${a.shell} does not exist${fs.live ? "" : ` in ${fs.root}`} (sshd refuses a user whose shell it cannot run)`);
    const pam = (eff.get("usepam")?.[0] ?? "no").toLowerCase() === "yes";
    if (!pam && a.password?.startsWith("!")) refuse.push(`its password is locked ('!' in /etc/shadow) and UsePAM is no, so sshd treats the account as locked (usermod -p '*' ${user})`);
  }
  const list = (k: string) => eff.get(k)?.flatMap((v) => v.split(/\s+/)).filter(Boolean) ?? [];
  const split = (p: string): [string, string | undefined] => {
    const i = p.lastIndexOf("@");
    return i < 0 ? [p, undefined] : [p.slice(0, i), p.slice(i + 1)];
  };
  for (const p of list("denyusers")) {
    const [u, host] = split(p);
    if (!matchPattern(user, u)) continue;
    if (host === undefined) refuse.push(`DenyUsers ${p} matches '${user}'`);
    else warn.push(`DenyUsers ${p} refuses tunnels of '${user}' from ${host}`);
  }
  const allow = list("allowusers");
  if (allow.length > 0) {
    const mine = allow.filter((p) => matchPattern(user, split(p)[0]));
    if (mine.length === 0) refuse.push(`AllowUsers ${allow.join(" ")} does not list '${user}'`);
    else if (mine.every((p) => split(p)[1] !== undefined)) warn.push(`AllowUsers admits '${user}' only as ${mine.join(" ")}: tunnels from elsewhere are refused`);
  }
  const denyG = list("denygroups");
  const hit = denyG.find((p) => groups.some((g) => matchPattern(g, p)));
  if (hit) refuse.push(`DenyGroups ${hit} matches a group of '${user}' (${groups.join(", ")})`);
  const allowG = list("allowgroups");
  if (allowG.length > 0 && !allowG.some((p) => groups.some((g) => matchPattern(g, p)))) refuse.push(`AllowGroups ${allowG.join(" ")} lists no group of '${user}' (${groups.join(", ")})`);
  return { refuse, warn };
}

/** The shell useradd gives a tunnel user in this root. */
export function nologinShell(fs: RootFs): string {
  for (const s of ["/usr/sbin/nologin", "/sbin/nologin"]) if (existsSync(fs.resolve(s))) return s;
  return "/bin/false";
}
