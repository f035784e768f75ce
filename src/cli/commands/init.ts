/**
 * `mkoverlay init`: a commented fleet config from flags (or, on a terminal, answers). Every
 * value is checked where it is given (a flag, a file and its line), the text is then loaded by
 * the same validator as every command, and only then written — atomically, never over an
 * existing file without --force.
 *
 * init never fetches a bastion's host key: what the gateways will trust is the user's decision.
 * It reads keys the user got (ssh-keyscan output on stdin, a known_hosts or .pub file) and
 * prints their fingerprints to compare with the bastion's own.
 */
import { existsSync, linkSync, readFileSync, unlinkSync } from "node:fs";
import { basename, dirname } from "node:path";
import { configPath, parseFleet } from "../../config/load.js";
import { errnoCode, UserError, UserErrors } from "../../util/errors.js";
import { pathError, tempNameFor, writeFileAtomic } from "../../util/fsutil.js";
import { out, stderrLog, type Log } from "../../util/log.js";
import { answersFromFlags, keyFingerprint, type InitAnswers, type InitOptions } from "./init-answers.js";
import { renderConfig } from "./init-render.js";

/** Where a config problem came from, as the flag the user gave. */
const FLAG_OF: [RegExp, string][] = [
  [/ ports\.ssh\b/, "--ssh-ports"],
  [/ ports\.services\b/, "--service-ports"],
  [/ hostname\b/, "--hostname"],
  [/ registry\b/, "--registry"],
];

/** Writes `text` to `file` unless something is there (no check-then-write race: a hard link fails on an existing name). */
function writeNew(file: string, text: string): void {
  const tmp = tempNameFor(file);
  try {
    writeFileAtomic(tmp, text, { mode: 0o644 });
    linkSync(tmp, file);
  } catch (e) {
    if (errnoCode(e) === "EEXIST" && existsSync(file)) throw new UserError(`${file}: already exists`, { hint: "use --force to replace it, or --config FILE to write another" });
    throw pathError(e, file);
  } finally {
    try {
      unlinkSync(tmp);
    } catch {
      // not created
    }
  }
}

export interface InitResult {
  file: string;
  bastions: { name: string; host: string; port: number; hostKeys: { key: string; fingerprint: string }[] }[];
  operators: { user: string; authorizedKeys: number; userCA: boolean } | null;
  registry: string;
  replaced: boolean;
}

/** Checks, renders, validates like every command would, writes. */
export async function writeInit(file: string, a: InitAnswers, force: boolean, now = new Date()): Promise<InitResult> {
  const text = renderConfig(a, now);
  let warnings: string[] = [];
  try {
    warnings = (await parseFleet(text, file, now)).warnings ?? [];
  } catch (e) {
    if (!(e instanceof UserError)) throw e;
    const lines = (e instanceof UserErrors ? e.problems : [e.message]).map((p) => {
      const flag = FLAG_OF.find(([re]) => re.test(p));
      return flag ? `${flag[1]}: ${p.replace(/^\S+:\d+:\d+ /, "")}` : p;
    });
    throw new UserErrors(lines, "nothing was written");
  }
  const replaced = existsSync(file);
  if (replaced && !force) throw new UserError(`${file}: already exists`, { hint: "use --force to replace it, or --config FILE to write another" });
  if (force) {
    try {
      writeFileAtomic(file, text, { mode: 0o644 });
    } catch (e) {
      throw pathError(e, file);
    }
  } else writeNew(file, text);
  // Allowed, but likely to hurt (a port range among the bastions' ephemeral ports): said once, here.
  for (const w of warnings) stderrLog(false).warn(w);
  return {
    file,
    bastions: a.bastions.map((b) => ({ name: b.name, host: b.host, port: b.port, hostKeys: b.hostKeys.map((k) => ({ key: k, fingerprint: keyFingerprint(k) })) })),
    operators: a.operators ? { user: a.operators.user, authorizedKeys: a.operators.authorizedKeys.length, userCA: a.operators.userCA !== undefined } : null,
    registry: a.registry,
    replaced,
  };
}

function readStdin(): string {
  try {
    return readFileSync(0, "utf8");
  } catch (e) {
    throw new UserError(`--host-keys -: cannot read stdin (${(e as Error).message})`);
  }
}

function report(r: InitResult, log: Log): void {
  log.info(`${r.replaced ? "replaced" : "wrote"} ${r.file}`);
  for (const b of r.bastions) {
    for (const k of b.hostKeys) log.info(`pinned for ${b.name} (${b.host}${b.port === 22 ? "" : `:${b.port}`}): ${k.fingerprint} ${k.key.split(/\s+/)[k.key.startsWith("@") ? 1 : 0]}`);
  }
  log.info("compare those fingerprints with the bastion's own (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on it)");
  const first = r.bastions[0]!.name;
  const cfg = basename(r.file) === "mkoverlay.yaml" && dirname(r.file) === process.cwd() ? "" : ` --config ${r.file}`;
  log.info(`next: mkoverlay${cfg} --board rpi4 --bastion ${first}   (boards: 'mkoverlay boards')`);
}

export async function initCommand(opts: InitOptions): Promise<void> {
  const log = stderrLog(Boolean(opts.json));
  const file = configPath(opts.config);
  // Refused before any question is asked.
  if (existsSync(file) && !opts.force) throw new UserError(`${file}: already exists`, { hint: "use --force to replace it, or --config FILE to write another" });
  let answers: InitAnswers;
  const interactive = (opts.bastion ?? []).length === 0 && process.stdin.isTTY === true && process.stderr.isTTY === true && opts.hostKeys === undefined;
  if (interactive) answers = await (await import("./init-ask.js")).askAnswers(opts);
  else answers = answersFromFlags(opts, readStdin);
  const r = await writeInit(file, answers, Boolean(opts.force));
  if (opts.json) out(JSON.stringify(r));
  report(r, log);
}
