/**
 * The sshd drop-in `bastion install` writes: the tunnel user's `Match User` block
 * (sshd-config.ts, the same block `bastion sshd-config` prints) with the key lookup switched
 * from a file to the agent's key directory:
 *
 *   AuthorizedKeysFile none                       no file to scan
 *   AuthorizedKeysCommand KEYS_COMMAND DIR %f     one file, named after the offered key
 *   AuthorizedKeysCommandUser mkoverlay-keys      may read that directory, nothing else
 *
 * It holds nothing outside the Match block: mkoverlay never changes how sshd treats other users.
 * The block ends with the file (sshd restores the Match state after each Include: servconf.c,
 * OpenSSH ≥ 8.2), which the install checks with `sshd -T` for another user.
 */
import type { Bastion, Fleet } from "../config/fleet.js";
import { KEYS_COMMAND_PATH, KEYS_USER, keysDir } from "./paths.js";
import { renderMatchBlock } from "./sshd-config.js";

export interface DropinPaths {
  keysCommand: string;
  keysDir: string;
  keysUser: string;
}

export const defaultDropinPaths = (bastion: string): DropinPaths => ({ keysCommand: KEYS_COMMAND_PATH, keysDir: keysDir(bastion), keysUser: KEYS_USER });

export function renderDropin(fleet: Fleet, b: Bastion, paths: DropinPaths = defaultDropinPaths(b.name)): string {
  const block = renderMatchBlock(fleet, b).split("\n");
  const start = block.findIndex((l) => l.startsWith("Match User "));
  if (start < 0) throw new Error("renderMatchBlock produced no Match line");
  // The block's own lines as `bastion sshd-config` prints them (its PermitListen is one fixed
  // line: each key's permitlisten names the key's ports, whatever the fleet's size).
  const body = block.slice(start + 1);
  return [
    `# Installed by mkoverlay (bastion install --bastion ${b.name}). Do not edit: re-run the install.`,
    `# The tunnel user '${b.user}' of bastion '${b.name}'. This Match block ends with this file.`,
    block[start],
    "    # The offered key's file from the agent's key directory: no list to scan, whatever the fleet size.",
    "    AuthorizedKeysFile none",
    `    AuthorizedKeysCommand ${paths.keysCommand} ${paths.keysDir} %f`,
    `    AuthorizedKeysCommandUser ${paths.keysUser}`,
    ...body,
  ]
    .join("\n")
    .replace(/\n+$/, "\n");
}
