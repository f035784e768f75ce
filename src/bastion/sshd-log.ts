/**
 * Where sshd writes its log when it is not systemd's (for the agent's `--auth-log`): the file of
 * `sshd -E FILE`. On this host, from the command line of the running sshd that reads the given
 * config (root's listener, not a session process: those run with -R); in an image, or when none
 * runs, from the options the init scripts pass (Debian's /etc/default/ssh, OpenRC's
 * /etc/conf.d/sshd: SSHD_OPTS).
 */
import { readdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { posix } from "node:path";
import type { RootFs } from "./rootfs.js";

/** sshd's getopt string (OpenSSH 9.x): letters followed by ':' take an argument. */
const OPTSTRING = "C:E:b:c:f:g:h:k:o:p:u:46DGQRTdeiqrtV";

/** sshd's options from its argv (getopt rules: bundled letters, an argument attached or next). */
function sshdOptions(argv: string[]): Map<string, string[]> {
  const out = new Map<string, string[]>();
  const add = (k: string, v: string) => out.set(k, [...(out.get(k) ?? []), v]);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") break;
    if (!a.startsWith("-") || a === "-") continue;
    for (let j = 1; j < a.length; j++) {
      const c = a[j]!;
      const at = OPTSTRING.indexOf(c);
      if (at >= 0 && OPTSTRING[at + 1] === ":") {
        add(c, j + 1 < a.length ? a.slice(j + 1) : (argv[++i] ?? ""));
        break;
      }
      add(c, "");
    }
  }
  return out;
}

const logOf = (o: Map<string, string[]>): string | undefined => {
  const e = o.get("E")?.at(-1);
  return e && e.startsWith("/") ? e : undefined;
};

/**
 * The listener's argv from /proc/PID/cmdline. sshd retitles its listener as
 * "sshd: /usr/sbin/sshd -f … -E … [listener] 0 of 10-100 startups" (one string: the words are
 * split at spaces); session processes ("sshd: user@notty") are not listeners.
 */
function listenerArgv(cmdline: string): string[] | undefined {
  const title = /^sshd: (.*?) \[listener\]/.exec(cmdline.replace(/\0+$/, ""));
  if (title) return title[1]!.split(" ").filter(Boolean);
  if (cmdline.startsWith("sshd: ")) return undefined;
  return cmdline.replace(/\0$/, "").split("\0");
}

/** The running sshd listener(s) of this host that read `config`: their -E file, or null when they log elsewhere. */
export function runningSshdLog(config: string): string | null | undefined {
  let found: string | null | undefined;
  for (const pid of readdirSync("/proc").filter((n) => /^\d+$/.test(n))) {
    try {
      if (posix.basename(readlinkSync(`/proc/${pid}/exe`)) !== "sshd") continue;
      if (statSync(`/proc/${pid}`).uid !== 0) continue;
      const argv = listenerArgv(readFileSync(`/proc/${pid}/cmdline`, "utf8"));
      if (!argv) continue;
      const o = sshdOptions(argv.slice(1));
      if (o.has("R") || o.has("T") || o.has("t")) continue;
      if ((o.get("f")?.at(-1) ?? "/etc/ssh/sshd_config") !== config) continue;
      const log = logOf(o);
      if (log) return log;
      found = null;
    } catch {
      // gone, or not ours to read
    }
  }
  return found;
}

/** SSHD_OPTS of the init scripts' defaults files in the root. */
function configuredOptions(fs: RootFs): Map<string, string[]> {
  for (const f of ["/etc/default/ssh", "/etc/conf.d/sshd"]) {
    let text: string;
    try {
      text = readFileSync(fs.resolve(f), "utf8");
    } catch {
      continue;
    }
    const m = /^\s*SSHD_OPTS\s*=\s*(?:"([^"]*)"|'([^']*)'|(\S*))\s*$/m.exec(text);
    if (m) return sshdOptions((m[1] ?? m[2] ?? m[3] ?? "").split(/\s+/).filter(Boolean));
  }
  return new Map();
}

/** The file sshd logs to with -E, if it does. */
export function sshdLogFile(fs: RootFs, config = "/etc/ssh/sshd_config"): string | undefined {
  if (fs.live) {
    const running = runningSshdLog(config);
    if (running !== undefined) return running ?? undefined;
  }
  return logOf(configuredOptions(fs));
}
