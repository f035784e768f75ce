/**
 * `mkoverlay init` on a terminal with no --bastion: asks for what the flags would say. Each
 * answer is checked at once and asked again when wrong. The host key is pasted or named by the
 * user — init shows how to get it and its fingerprint, and never fetches it.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline/promises";
import { isUserError, UserErrors } from "../../util/errors.js";
import { answersFromFlags, assignHostKeys, keyFingerprint, parseBastionFlag, type InitAnswers, type InitBastion, type InitOptions } from "./init-answers.js";
import { stderrLog } from "../../util/log.js";

const say = (s: string): void => stderrLog(false).progress(s + "\n");

export async function askAnswers(o: InitOptions): Promise<InitAnswers> {
  const rl = createInterface({ input: process.stdin, output: process.stderr, terminal: true });
  const ask = async (q: string, def = ""): Promise<string> => (await rl.question(def ? `${q} [${def}]: ` : `${q}: `)).trim() || def;
  try {
    say("mkoverlay init: a fleet config for your gateways. Ctrl-C stops without writing anything.\n");
    const bastions: InitBastion[] = [];
    for (;;) {
      let b: InitBastion | undefined;
      while (!b) {
        const name = await ask("Bastion name (used as --bastion NAME)", bastions.length === 0 ? "eu" : "");
        const host = await ask("Its public host name or IP (HOST, or HOST:PORT when sshd is not on 22)");
        try {
          b = { ...parseBastionFlag(`${name}=${host}`), hostKeys: [] };
          if (bastions.some((x) => x.name === b!.name)) {
            say(`  '${b.name}' is already given`);
            b = undefined;
          }
        } catch (e) {
          if (!isUserError(e)) throw e;
          say(`  ${e.message}`);
        }
      }
      const target = b.port === 22 ? b.host : `-p ${b.port} ${b.host}`;
      say(`\nPin ${b.host}'s host key: the gateways will trust only this key. mkoverlay does not fetch it.`);
      say(`Run 'ssh-keyscan -t ed25519 ${target}' (and check its fingerprint with the bastion's admin),`);
      say("or copy the bastion's /etc/ssh/ssh_host_ed25519_key.pub. Paste the line(s), or give a file path;");
      say("an empty line when done.");
      for (;;) {
        const line = await ask(">");
        if (line === "") {
          if (b.hostKeys.length > 0) break;
          say("  a bastion needs at least one pinned key");
          continue;
        }
        const path = line.replace(/^~(?=\/)/, homedir());
        const fromFile = !/\s/.test(line) && existsSync(path) && statSync(path).isFile();
        const problems: string[] = [];
        const before = b.hostKeys.length;
        assignHostKeys(fromFile ? readFileSync(path, "utf8") : line, fromFile ? line : "(pasted)", [b], b.name, problems);
        for (const p of problems) say(`  ${p}`);
        for (const k of b.hostKeys.slice(before)) say(`  pinned ${keyFingerprint(k)} (${k.split(/\s+/).slice(0, -1).join(" ")})`);
      }
      bastions.push(b);
      if (!/^y/i.test(await ask("Another bastion? (y/N)", "n"))) break;
    }
    const defKey = join(homedir(), ".ssh", "id_ed25519.pub");
    for (;;) {
      const ans = await ask("Operators' public key file(s), comma-separated ('none': the image brings its own logins)", existsSync(defKey) ? defKey : "");
      try {
        const flags: InitOptions = ans === "none" ? { ...o, operators: false } : { ...o, operatorKey: ans.split(",").map((s) => s.trim()).filter(Boolean) };
        // The bastions are checked already; the rest goes through the same checks as the flags.
        return answersFromFlags(flags, () => "", bastions);
      } catch (e) {
        if (!isUserError(e)) throw e;
        for (const p of e instanceof UserErrors ? e.problems : [e.message]) say(`  ${p}`);
      }
    }
  } finally {
    rl.close();
  }
}
