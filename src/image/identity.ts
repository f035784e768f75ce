/**
 * Whose mkoverlay identity a root file system already carries: the public half of the device
 * key at /etc/ssh/mkoverlay/ssh_host_ed25519_key.pub. Laying a device's overlay over another
 * device's identity is how two devices end up with one key (a personalised card re-flashed with
 * the wrong overlay, a golden image cut from a device), so it is refused unless --force.
 */
import { UserError } from "../util/errors.js";
import { HOST_KEY_PUB } from "../overlay/paths.js";
import type { TreeView } from "../overlay/view.js";
import { ImageTreeView } from "./reader.js";

/** "type base64" of an OpenSSH public key line (the comment is the hostname and may differ). */
function keyPart(line: string): string {
  return line.trim().split(/\s+/).slice(0, 2).join(" ");
}

/** The identity a root carries, or undefined when it has none (an image: one debugfs run). */
export async function identityOf(view: TreeView | ImageTreeView): Promise<string | undefined> {
  let content: Buffer | undefined;
  if (view instanceof ImageTreeView) content = await view.readFile(HOST_KEY_PUB);
  else {
    const e = await view.get(HOST_KEY_PUB.slice(1));
    content = e?.type === "file" ? e.content : undefined;
  }
  const k = content ? keyPart(content.toString("utf8")) : "";
  return k === "" ? undefined : k;
}

/**
 * Refuses to lay an overlay whose key is `mine` (a public key line; undefined when each device
 * of a batch brings its own, so any identity is another's) over a root that carries `found`.
 */
export function checkIdentity(where: string, found: string | undefined, mine: string | undefined, force: boolean): void {
  if (found === undefined || force) return;
  if (mine !== undefined && keyPart(mine) === found) return;
  const comment = found.length > 40 ? `${found.slice(0, 40)}…` : found;
  throw new UserError(`${where}: already carries another device's mkoverlay identity (${HOST_KEY_PUB}: ${comment})`, {
    hint: "use the plain base image, not one made for a device; --force lays the overlay anyway (its key replaces that one)",
  });
}
