/**
 * The SHA256 fingerprint of an SSH public key, exactly as `ssh-keygen -l` prints it:
 * `SHA256:` and the unpadded base64 of the SHA-256 of the key's wire blob (the base64 field of
 * its `.pub` line). The one implementation: device keys (keys/ed25519.ts feeds its blob), pinned
 * host keys (config/compat.ts, init), and whatever else shows a key by fingerprint.
 */
import { createHash } from "node:crypto";

/** `SHA256:…` of a key's wire blob. */
export function blobFingerprint(blob: Buffer): string {
  return "SHA256:" + createHash("sha256").update(blob).digest("base64").replace(/=+$/, "");
}

/**
 * `SHA256:…` of a public key line (`TYPE BASE64 [comment]`), or of a known_hosts entry
 * `@cert-authority TYPE BASE64 …`, then kept as `@cert-authority SHA256:…` when `keepCA`.
 */
export function lineFingerprint(line: string, o: { keepCA?: boolean } = {}): string {
  const ca = /^@cert-authority\s+/.exec(line);
  const b64 = line.slice(ca ? ca[0].length : 0).trim().split(/\s+/)[1] ?? "";
  const fp = blobFingerprint(Buffer.from(b64, "base64"));
  return ca && o.keepCA ? `@cert-authority ${fp}` : fp;
}
