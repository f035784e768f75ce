/** `mkoverlay bastion authorized-keys|sshd-config --bastion NAME`: what a bastion imports. */
import { spawnSync } from "node:child_process";
import { readFileSync, statSync } from "node:fs";
import { renderAuthorizedKeys } from "../../bastion/export.js";
import { lastSightings } from "../../fleet/status.js";
import { renderMatchBlock } from "../../bastion/sshd-config.js";
import type { Bastion, Fleet } from "../../config/fleet.js";
import { configPath, loadFleet } from "../../config/load.js";
import { withFleetRegistry } from "../context.js";
import { VERSION } from "../../util/version.js";
import { resolveBastions } from "../../device/inputs.js";
import { errnoCode, ioUserError, UserError } from "../../util/errors.js";
import { writeFileAtomic } from "../../util/fsutil.js";
import { out, stderrLog } from "../../util/log.js";

function oneBastion(fleet: Fleet, flag: string | undefined): Bastion {
  const bs = resolveBastions(fleet, flag);
  if (bs.length !== 1) throw new UserError(`--bastion ${flag}: name exactly one bastion`);
  return bs[0]!;
}

interface Account {
  uid: number;
  gid: number;
}

/**
 * The tunnel user as the bastion's sshd sees it: through NSS (`getent`, so LDAP/SSSD accounts
 * count), or /etc/passwd where there is no getent.
 */
function lookupUser(name: string): Account | undefined {
  const r = spawnSync("getent", ["passwd", name], { encoding: "utf8" });
  let entry: string | undefined;
  if (r.error) {
    let passwd = "";
    try {
      passwd = readFileSync("/etc/passwd", "utf8");
    } catch {
      // no user database at all: the user does not exist here
    }
    entry = passwd.split("\n").find((l) => l.startsWith(`${name}:`));
  } else if (r.status === 0) {
    entry = r.stdout.split("\n")[0];
  }
  const f = entry?.split(":");
  if (!f || f.length < 4 || !/^\d+$/.test(f[2]!) || !/^\d+$/.test(f[3]!)) return undefined;
  return { uid: Number(f[2]), gid: Number(f[3]) };
}

/**
 * Who the written file belongs to. sshd reads authorized_keys as the tunnel user, and the
 * file is 0600: so it must be that user's. A new file is created for it; an existing file
 * keeps its owner and group, and one the tunnel user could not read (root's, say, from an
 * older mkoverlay) is refused instead of rewritten into a silent lockout.
 */
function ownerFor(file: string, b: Bastion): Account {
  const flag = `--write ${file}`;
  const user = lookupUser(b.user);
  if (!user) {
    throw new UserError(`${flag}: the tunnel user '${b.user}' of bastion '${b.name}' does not exist on this machine`, {
      hint: `create it first (docs/bastion.md, step 1), or print the file (drop --write) and install it on the bastion owned by ${b.user}, mode 0600`,
    });
  }
  let st;
  try {
    st = statSync(file);
  } catch (e) {
    if (errnoCode(e) !== "ENOENT") throw new UserError(`${flag}: ${(e as Error).message}`);
    const me = process.getuid?.();
    if (me !== undefined && me !== 0 && me !== user.uid) {
      throw new UserError(`${flag}: a new file must belong to the tunnel user '${b.user}' (sshd reads it as that user), and only root can give it away`, {
        hint: `run as root, or create it first: install -m 0600 -o ${b.user} /dev/null ${file}`,
      });
    }
    return user;
  }
  if (!st.isFile()) throw new UserError(`${flag}: exists and is not a regular file`);
  if (st.uid !== user.uid) {
    throw new UserError(`${flag}: belongs to uid ${st.uid}, not to the tunnel user '${b.user}' (uid ${user.uid}): at mode 0600 sshd could not read it and would refuse every tunnel`, {
      hint: `chown ${b.user} ${file} (or remove it: a new file is created for ${b.user})`,
    });
  }
  return { uid: st.uid, gid: st.gid };
}

/** Key lines in an authorized_keys text (not comments or blank lines). */
const keyCount = (text: string): number => text.split("\n").filter((l) => l && !l.startsWith("#")).length;

export async function authorizedKeysCommand(opts: { bastion?: string; write?: string; config?: string; json?: boolean }): Promise<void> {
  const log = stderrLog(Boolean(opts.json));
  const { text, bastion } = await withFleetRegistry(opts.config, async (fleet, registry) => {
    const b = oneBastion(fleet, opts.bastion);
    // A corrupt or hostile row is left out, never rendered; say which and why.
    const devices = await registry.list();
    // With expiryRenewal, a device seen connected gets the renewed expiry the agent serves.
    const seen = b.expiryRenewal ? lastSightings(devices, await registry.observations()) : undefined;
    const text = renderAuthorizedKeys(fleet, b, devices, VERSION, { onSkip: (s) => log.warn(`left out ${JSON.stringify(s.hostname)}: ${s.reason}`), ...(seen ? { seen } : {}) });
    return { text, bastion: b };
  });
  const report = { bastion: bastion.name, user: bastion.user, file: opts.write ?? null, keys: keyCount(text) };
  if (!opts.write) {
    out(opts.json ? JSON.stringify({ ...report, text }) : text);
    return;
  }
  // Replaced atomically (a cron job never leaves sshd a half file), 0600, the tunnel user's.
  const owner = ownerFor(opts.write, bastion);
  try {
    writeFileAtomic(opts.write, text, { mode: 0o600, ...(owner ? { owner } : {}) });
  } catch (e) {
    const io = ioUserError(e);
    throw io ? new UserError(`--write ${io.message}`, io.hint === undefined ? {} : { hint: io.hint }) : e;
  }
  if (opts.json) out(JSON.stringify(report));
  log.info(`wrote ${opts.write} (${report.keys} keys)`);
}

export async function sshdConfigCommand(opts: { bastion?: string; config?: string; authorizedKeysFile?: string; json?: boolean }): Promise<void> {
  const fleet = await loadFleet(configPath(opts.config));
  const akf = opts.authorizedKeysFile;
  if (akf !== undefined && /[\s"\\]/.test(akf)) throw new UserError(`--authorized-keys-file ${JSON.stringify(akf)}: no spaces, quotes or backslashes`);
  const b = oneBastion(fleet, opts.bastion);
  const text = renderMatchBlock(fleet, b, akf === undefined ? {} : { authorizedKeysFile: akf });
  out(opts.json ? JSON.stringify({ bastion: b.name, user: b.user, text }) : text);
}
