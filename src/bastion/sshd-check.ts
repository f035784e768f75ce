/**
 * Checks a staged sshd drop-in against the real sshd BEFORE it is put in place: sshd reads a
 * temporary copy of the target's sshd_config whose `Include` lines name the files they would
 * include, with the staged drop-in where it will land. Then:
 *
 * - `sshd -t` must accept it (and, if it fails, whether it failed without the drop-in too says
 *   whose fault it is);
 * - `sshd -T -C user=TUNNEL,…` must show the drop-in's values winning (an earlier Match block
 *   for the same user would override them);
 * - `sshd -T -C user=root,…` must be identical with and without the drop-in: it changes nothing
 *   for anyone else, and its Match block does not swallow the rest of sshd_config.
 *
 * sshd_config itself is only read, never written.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { dirname, posix } from "node:path";
import { RootFs } from "./rootfs.js";

const SSH_DIR = "/etc/ssh";

/** fnmatch-style pattern (one path component) as a RegExp; a leading dot must match literally. */
export function globComponent(pattern: string): RegExp {
  let re = "";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]!;
    if (c === "*") re += "[^/]*";
    else if (c === "?") re += "[^/]";
    else if (c === "[") {
      const end = pattern.indexOf("]", i + 2);
      if (end < 0) re += "\\[";
      else {
        const body = pattern.slice(i + 1, end).replace(/^!/, "^").replace(/\\/g, "\\\\");
        re += `[${body}]`;
        i = end;
      }
    } else re += c.replace(/[.+^${}()|\\]/g, "\\$&");
  }
  return new RegExp(`^${pattern.startsWith(".") ? "" : "(?!\\.)"}${re}$`);
}

/** The files an Include argument names inside `root` (paths as sshd on the target sees them), sorted like glob(3). */
function expandInclude(fs: RootFs, arg: string): string[] {
  const abs = arg.startsWith("/") ? arg : posix.join(SSH_DIR, arg);
  if (!/[*?[]/.test(abs)) return existsSync(fs.resolve(abs)) ? [abs] : [];
  const dir = dirname(abs);
  const re = globComponent(posix.basename(abs));
  let names: string[];
  try {
    names = readdirSync(fs.resolve(dir));
  } catch {
    return [];
  }
  return names
    .filter((n) => re.test(n))
    .sort(byteOrder)
    .map((n) => posix.join(dir, n));
}

/** Would an Include argument pick `path` up (if it existed)? */
function includeCovers(arg: string, path: string): boolean {
  const abs = arg.startsWith("/") ? arg : posix.join(SSH_DIR, arg);
  if (!/[*?[]/.test(abs)) return abs === path;
  return dirname(abs) === dirname(path) && globComponent(posix.basename(abs)).test(posix.basename(path));
}

/** Splits an sshd_config argument list (double quotes group words). */
function words(s: string): string[] {
  return [...s.matchAll(/"([^"]*)"|(\S+)/g)].map((m) => m[1] ?? m[2]!);
}

const byteOrder = (a: string, b: string): number => Buffer.compare(Buffer.from(a), Buffer.from(b));

const quote = (p: string): string => (/[\s"]/.test(p) ? `"${p}"` : p);

export interface CheckConfig {
  text: string;
  /** Does a top-level Include of sshd_config pick the drop-in up? */
  covers: boolean;
}

/**
 * sshd_config's text with every top-level Include replaced by the host paths of the files it
 * would include on the target (symlinks followed inside the root, rootfs.ts). `staged` stands in
 * for `dropin` (undefined: leave the drop-in out).
 */
export function checkConfig(mainText: string, root: string | RootFs, dropin: string, staged: string | undefined): CheckConfig {
  const fs = typeof root === "string" ? new RootFs(root) : root;
  let covers = false;
  const lines = mainText.split("\n").map((line) => {
    const m = /^(\s*)include\s+(.*)$/i.exec(line);
    if (!m) return line;
    // Argument by argument, each in glob(3) order, as sshd reads them.
    const host: string[] = [];
    for (const arg of words(m[2]!)) {
      const files = expandInclude(fs, arg).filter((f) => f !== dropin);
      if (includeCovers(arg, dropin)) {
        covers = true;
        if (staged !== undefined) files.push(dropin);
      }
      files.sort(byteOrder);
      host.push(...files.map((f) => (f === dropin ? staged! : fs.resolve(f))));
    }
    return host.length > 0 ? `${m[1]}Include ${host.map(quote).join(" ")}` : `${m[1]}# (Include ${m[2]} matches nothing)`;
  });
  return { text: lines.join("\n"), covers };
}

export interface SshdRun {
  ok: boolean;
  stdout: string;
  stderr: string;
}

export function runSshd(sshd: string, args: string[]): SshdRun {
  const r = spawnSync(sshd, args, { encoding: "utf8" });
  if (r.error) return { ok: false, stdout: "", stderr: r.error.message };
  return { ok: r.status === 0, stdout: r.stdout, stderr: r.stderr };
}

/** `sshd -T` output as keyword → values (keywords like acceptenv repeat). */
export function parseEffective(out: string): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const line of out.split("\n")) {
    const i = line.indexOf(" ");
    if (i <= 0) continue;
    const k = line.slice(0, i).toLowerCase();
    m.set(k, [...(m.get(k) ?? []), line.slice(i + 1).trim()]);
  }
  return m;
}

/** The keyword/value pairs a drop-in's Match block sets (the values it means to win). */
export function dropinSettings(text: string): [string, string][] {
  const out: [string, string][] = [];
  let inMatch = false;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const [k = "", ...rest] = line.split(/\s+/);
    if (k.toLowerCase() === "match") {
      inMatch = true;
      continue;
    }
    if (inMatch) out.push([k.toLowerCase(), rest.join(" ")]);
  }
  return out;
}

/** Settings of the drop-in that sshd would not use for the tunnel user: [keyword, wanted, effective]. */
export function losingSettings(wanted: [string, string][], effective: Map<string, string[]>): [string, string, string][] {
  const out: [string, string, string][] = [];
  for (const [k, v] of wanted) {
    // Lists that accumulate across blocks are not single winners.
    if (k === "acceptenv") continue;
    const got = effective.get(k);
    const norm = (s: string) => s.replace(/\s+/g, " ").toLowerCase();
    if (!got || got.length !== 1 || norm(got[0]!) !== norm(v)) out.push([k, v, got?.join(" | ") ?? "(not shown)"]);
  }
  return out;
}
