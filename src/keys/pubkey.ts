/**
 * Checks OpenSSH public key lines taken from config (pinned bastion keys, operator keys):
 * a line must decode and its blob must name the same key type, so a typo never ships.
 */
import { WireReader } from "./ssh-wire.js";

const KEY_TYPES = new Set([
  "ssh-ed25519",
  "ecdsa-sha2-nistp256",
  "ecdsa-sha2-nistp384",
  "ecdsa-sha2-nistp521",
  "ssh-rsa",
  "sk-ssh-ed25519@openssh.com",
  "sk-ecdsa-sha2-nistp256@openssh.com",
]);

export interface PublicKey {
  type: string;
  base64: string;
  comment: string;
  /** `type base64` — the part that identifies the key. */
  text: string;
}

/** Returns the parsed key, or a reason string why the line is not a usable public key. */
export function parsePublicKey(line: string): PublicKey | string {
  if (/[\r\n\0]/.test(line)) return "contains a line break or NUL";
  const m = /^(\S+) ([A-Za-z0-9+/]+={0,2})(?: (.*))?$/.exec(line.trim());
  if (!m) return "is not an OpenSSH public key line ('TYPE BASE64 [comment]')";
  const [, type = "", b64 = "", comment = ""] = m;
  if (!KEY_TYPES.has(type)) return `has unsupported key type '${type}' (use ${[...KEY_TYPES].slice(0, 5).join(", ")}, …)`;
  let inner: string;
  try {
    const r = new WireReader(Buffer.from(b64, "base64"));
    inner = r.string().toString("latin1");
    if (r.remaining < 4) return "is truncated";
  } catch {
    return "does not decode";
  }
  if (inner !== type) return `says '${type}' but its key data is '${inner}'`;
  // eslint-disable-next-line no-control-regex -- rejecting control characters is the point
  if (/[\x00-\x1f\x7f]/.test(comment)) return "has control characters in its comment";
  return { type, base64: b64, comment, text: `${type} ${b64}` };
}
