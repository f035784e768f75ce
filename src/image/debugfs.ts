/**
 * Running e2fsprogs' debugfs, the only writer of file systems inside images (no mount, no
 * root). Its exit status is 0 even when commands fail, so any stderr line other than its
 * version banner is a failure. A station user's PATH often lacks /usr/sbin, where Debian puts
 * it, so the binary is looked up there too.
 */
import { spawn } from "node:child_process";
import { accessSync, constants, writeFileSync } from "node:fs";
import { delimiter, join } from "node:path";
import { UserError } from "../util/errors.js";
import { privateDir } from "./temps.js";

const SBIN = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

const found = new Map<string, string>();

/** Absolute path of an e2fsprogs/util-linux tool, or a UserError naming the package. */
export function findTool(name: string, pkg = "e2fsprogs"): string {
  const hit = found.get(name);
  if (hit) return hit;
  const dirs = [...(process.env.PATH ?? "").split(delimiter).filter(Boolean), ...SBIN];
  for (const d of dirs) {
    const p = join(d, name);
    try {
      accessSync(p, constants.X_OK);
      found.set(name, p);
      return p;
    } catch {
      // next
    }
  }
  throw new UserError(`${name} not found (looked in PATH and ${SBIN.join(", ")})`, { hint: `install Debian's ${pkg} package: apt-get install ${pkg}` });
}

export interface ToolResult {
  code: number;
  /** The signal that ended the tool, if one did (a Ctrl-C reaches the whole process group). */
  signal?: NodeJS.Signals | undefined;
  stdout: Buffer;
  stderr: string;
}

export function runTool(cmd: string, args: string[], opts: { env?: Record<string, string>; input?: string } = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: { ...process.env, ...opts.env }, stdio: [opts.input === undefined ? "ignore" : "pipe", "pipe", "pipe"] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on("data", (c: Buffer) => out.push(c));
    child.stderr!.on("data", (c: Buffer) => err.push(c));
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code: code ?? (signal ? 128 : -1), ...(signal ? { signal } : {}), stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString("utf8") }));
    if (child.stdin) {
      // A tool that exits without reading its input must not crash us with EPIPE.
      child.stdin.on("error", () => undefined);
      child.stdin.end(opts.input);
    }
  });
}

/** Lines of debugfs's stderr that report a problem (everything but the banner). */
function debugfsErrors(stderr: string): string[] {
  return stderr.split("\n").filter((l) => l.trim() !== "" && !/^debugfs \d+\.\d+/.test(l));
}

export interface DebugfsRun {
  /** Output of each command, in order (debugfs echoes "debugfs: CMD" before each). */
  sections: string[][];
  errors: string[];
}

/** Splits -f output into one block of lines per command echoed as "debugfs: CMD". */
function splitSections(stdout: string): string[][] {
  const sections: string[][] = [];
  for (const line of stdout.split("\n")) {
    if (line.startsWith("debugfs: ")) sections.push([]);
    else if (sections.length > 0 && line !== "") sections[sections.length - 1]!.push(line);
  }
  return sections;
}

/**
 * Runs `cmds` with `debugfs [-w] -f CMDFILE SPEC`. The command file goes to `dir` (a private
 * temp dir the caller owns) or to a fresh one removed afterwards. `fakeTime` pins every time
 * e2fsprogs takes from the clock (new inodes, directory mtimes, the superblock's write time):
 * e2fsprogs 1.47.0 ignores SOURCE_DATE_EPOCH, and honours E2FSPROGS_FAKE_TIME unless it is 0.
 * `undo` (a path that must not exist yet) makes debugfs log the old contents of every block it
 * overwrites (see undo.ts). It prints a line about e2undo on stdout, not stderr.
 */
export async function debugfs(spec: string, cmds: readonly string[], opts: { write?: boolean; fakeTime?: number; dir?: string; undo?: string } = {}): Promise<DebugfsRun> {
  const bin = findTool("debugfs");
  const own = opts.dir === undefined ? privateDir("mkoverlay-debugfs-") : undefined;
  const dir = opts.dir ?? own!.path;
  try {
    const file = join(dir, "cmds");
    writeFileSync(file, cmds.join("\n") + "\n", { mode: 0o600 });
    const env: Record<string, string> = { DEBUGFS_PAGER: "__none__", PAGER: "cat", LC_ALL: "C" };
    if (opts.fakeTime !== undefined) env.E2FSPROGS_FAKE_TIME = String(Math.max(1, opts.fakeTime));
    const r = await runTool(bin, [...(opts.write ? ["-w"] : []), ...(opts.undo ? ["-z", opts.undo] : []), "-f", file, spec], { env });
    const errors = debugfsErrors(r.stderr);
    if (r.code !== 0) errors.push(`debugfs exited with status ${r.code}`);
    return { sections: splitSections(r.stdout.toString("utf8")), errors };
  } finally {
    own?.remove();
  }
}

/** A path or symlink target debugfs can take as one argument (its parser splits on blanks and quotes). */
export function debugfsSafe(s: string): boolean {
  // eslint-disable-next-line no-control-regex -- control characters are exactly what is refused
  return s.length > 0 && !/[\s"'\\\0-\x1f\x7f]/.test(s);
}
