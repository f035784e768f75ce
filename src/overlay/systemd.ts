/**
 * `systemctl enable` and `mask` as tree operations: the same symlinks systemctl would create,
 * derived from the unit's own [Install] section, so a booted system sees the unit enabled
 * without systemctl ever running on the target.
 */
import type { Tree } from "./tree.js";

const SYSTEM_DIR = "/etc/systemd/system";

/** Reads WantedBy=/RequiredBy=/Alias= from a unit's [Install] section. */
export function installSection(unitText: string): { wantedBy: string[]; requiredBy: string[]; alias: string[] } {
  const out = { wantedBy: [] as string[], requiredBy: [] as string[], alias: [] as string[] };
  let inInstall = false;
  for (const raw of unitText.split("\n")) {
    const line = raw.trim();
    if (line.startsWith("[")) {
      inInstall = line === "[Install]";
      continue;
    }
    if (!inInstall || line.startsWith("#") || line.startsWith(";")) continue;
    const m = /^(WantedBy|RequiredBy|Alias)\s*=\s*(.*)$/.exec(line);
    if (!m) continue;
    const values = (m[2] ?? "").split(/\s+/).filter(Boolean);
    if (m[1] === "WantedBy") out.wantedBy.push(...values);
    else if (m[1] === "RequiredBy") out.requiredBy.push(...values);
    else out.alias.push(...values);
  }
  return out;
}

/**
 * Enables `unitName` (e.g. `reverse-ssh@eu.service`) whose file lives at `unitPath`.
 * For a template instance the link is named after the instance and points at the template.
 */
export function enableUnit(tree: Tree, unitName: string, unitPath: string, install: { wantedBy: string[]; requiredBy?: string[]; alias?: string[] }): void {
  for (const target of install.wantedBy) tree.symlink(`${SYSTEM_DIR}/${target}.wants/${unitName}`, unitPath);
  for (const target of install.requiredBy ?? []) tree.symlink(`${SYSTEM_DIR}/${target}.requires/${unitName}`, unitPath);
  for (const alias of install.alias ?? []) tree.symlink(`${SYSTEM_DIR}/${alias}`, unitPath);
}

/** `systemctl mask`: a link to /dev/null in /etc wins over the unit wherever it is installed. */
export function maskUnit(tree: Tree, unitName: string): void {
  tree.symlink(`${SYSTEM_DIR}/${unitName}`, "/dev/null");
}
