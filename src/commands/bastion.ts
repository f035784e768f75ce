/** `mkoverlay bastion authorized-keys|sshd-config --bastion NAME`: what a bastion imports. */
import { statSync } from "node:fs";
import { renderAuthorizedKeys } from "../bastion/export.js";
import { renderMatchBlock } from "../bastion/sshd-config.js";
import type { Bastion, Fleet } from "../config/fleet.js";
import { configPath, loadFleet } from "../config/load.js";
import { VERSION, withFleetRegistry } from "../context.js";
import { resolveBastions } from "../device.js";
import { errnoCode, UserError } from "../errors.js";
import { writeFileAtomic } from "../fsutil.js";
import { out } from "../output.js";

function oneBastion(fleet: Fleet, flag: string | undefined): Bastion {
  const bs = resolveBastions(fleet, flag);
  if (bs.length !== 1) throw new UserError(`--bastion ${flag}: name exactly one bastion`);
  return bs[0]!;
}

function existingOwner(file: string): { uid: number; gid: number } | undefined {
  try {
    const st = statSync(file);
    if (!st.isFile()) throw new UserError(`--write ${file}: exists and is not a regular file`);
    return { uid: st.uid, gid: st.gid };
  } catch (e) {
    if (e instanceof UserError) throw e;
    if (errnoCode(e) === "ENOENT") return undefined;
    throw new UserError(`--write ${file}: ${(e as Error).message}`);
  }
}

export async function authorizedKeysCommand(opts: { bastion?: string; write?: string; config?: string }): Promise<void> {
  const text = await withFleetRegistry(opts.config, async (fleet, registry) =>
    renderAuthorizedKeys(fleet, oneBastion(fleet, opts.bastion), await registry.list(), VERSION, {
      // A corrupt or hostile row is left out, never rendered; say which and why.
      onSkip: (s) => process.stderr.write(`mkoverlay: warning: left out ${JSON.stringify(s.hostname)}: ${s.reason}\n`),
    }),
  );
  if (!opts.write) {
    out(text);
    return;
  }
  // Replaced atomically (a cron job never leaves sshd a half file), 0600, keeping its owner
  // (sshd reads it as the tunnel user).
  const owner = existingOwner(opts.write);
  try {
    writeFileAtomic(opts.write, text, 0o600, owner);
  } catch (e) {
    throw new UserError(`--write ${opts.write}: ${errnoCode(e) ?? (e as Error).message}`);
  }
  process.stderr.write(`mkoverlay: wrote ${opts.write} (${text.split("\n").filter((l) => l && !l.startsWith("#")).length} keys)\n`);
}

export async function sshdConfigCommand(opts: { bastion?: string; config?: string; authorizedKeysFile?: string }): Promise<void> {
  const fleet = await loadFleet(configPath(opts.config));
  const akf = opts.authorizedKeysFile;
  if (akf !== undefined && /[\s"\\]/.test(akf)) throw new UserError(`--authorized-keys-file ${JSON.stringify(akf)}: no spaces, quotes or backslashes`);
  out(renderMatchBlock(fleet, oneBastion(fleet, opts.bastion), akf === undefined ? {} : { authorizedKeysFile: akf }));
}
