/**
 * Runs a tunnel exactly as the overlay's unit would, without a booted systemd: reads the
 * unit's ExecStart and the instance's env file from an unpacked overlay, expands them the way
 * systemd does (${VAR} one word, $VAR split on whitespace, %i, %H), and points the absolute
 * paths into the unpacked tree.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";

function readEnvFile(file: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of readFileSync(file, "utf8").split("\n")) {
    if (!line.trim() || line.startsWith("#")) continue;
    const i = line.indexOf("=");
    env[line.slice(0, i)] = line.slice(i + 1);
  }
  return env;
}

function execStart(unitText: string): string {
  const joined = unitText.replace(/\\\n/g, " ");
  const m = /^ExecStart=(.*)$/m.exec(joined);
  if (!m?.[1]) throw new Error("no ExecStart");
  return m[1];
}

/** The unit's back-off wrapper: ExecStart runs it with the ssh command as its arguments. */
export const BACKOFF = "/usr/local/sbin/reverse-ssh-backoff";

/**
 * The ssh command the unit runs (without the back-off wrapper in front; `tunnelCommand` keeps
 * it).
 */
export function tunnelArgv(root: string, bastion: string, hostname: string): string[] {
  const out = tunnelCommand(root, bastion, hostname);
  if (out[0] !== join(root, BACKOFF)) throw new Error(`ExecStart does not run ${BACKOFF}: ${out[0]}`);
  out.shift();
  if (out[0] !== "/usr/bin/ssh") throw new Error(`${BACKOFF} does not run /usr/bin/ssh: ${out[0]}`);
  return out;
}

/** ExecStart as the unit runs it: the wrapper (inside `root`) and its ssh command. */
export function tunnelCommand(root: string, bastion: string, hostname: string): string[] {
  const unit = readFileSync(join(root, "etc/systemd/system/reverse-ssh@.service"), "utf8");
  const env = readEnvFile(join(root, `etc/mkoverlay/tunnels/${bastion}.env`));
  const words = execStart(unit).trim().split(/\s+/);
  const out: string[] = [];
  for (const w of words) {
    const split = /^\$([A-Z_]+)$/.exec(w);
    if (split) {
      out.push(...(env[split[1]!] ?? "").split(/\s+/).filter(Boolean));
      continue;
    }
    const v = w
      .replace(/\$\{([A-Z_]+)\}/g, (_, k: string) => env[k] ?? "")
      .replace(/%i/g, bastion)
      .replace(/%H/g, hostname)
      .replace(/(^|=)\/etc\/(ssh\/mkoverlay|mkoverlay)\//g, (_, pre: string, d: string) => `${pre}${root}/etc/${d}/`);
    out.push(v === BACKOFF ? join(root, BACKOFF) : v);
  }
  return out;
}
