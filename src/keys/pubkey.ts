/**
 * Checks OpenSSH public key lines taken from config (pinned bastion keys, operator keys).
 * A line is decoded to its last byte, as OpenSSH's sshkey_read() does: a key with one base64
 * character missing, a space inside, trailing bytes, a point off its curve or the wrong curve
 * is refused here, because ssh and sshd would refuse (or silently ignore) it on the device.
 * What is written to the device is the canonical `type base64 [comment]`, never the raw text.
 */
import { createPublicKey } from "node:crypto";
import { WireReader } from "./ssh-wire.js";

/** ECDSA curves by their SSH name: JWK curve name and coordinate length in bytes. */
const CURVES: Record<string, { jwk: string; bytes: number }> = {
  nistp256: { jwk: "P-256", bytes: 32 },
  nistp384: { jwk: "P-384", bytes: 48 },
  nistp521: { jwk: "P-521", bytes: 66 },
};

type Shape = { kind: "ed25519" } | { kind: "rsa" } | { kind: "ecdsa"; curve: string };
const KEY_TYPES = new Map<string, { shape: Shape; sk: boolean }>([
  ["ssh-ed25519", { shape: { kind: "ed25519" }, sk: false }],
  ["ecdsa-sha2-nistp256", { shape: { kind: "ecdsa", curve: "nistp256" }, sk: false }],
  ["ecdsa-sha2-nistp384", { shape: { kind: "ecdsa", curve: "nistp384" }, sk: false }],
  ["ecdsa-sha2-nistp521", { shape: { kind: "ecdsa", curve: "nistp521" }, sk: false }],
  ["ssh-rsa", { shape: { kind: "rsa" }, sk: false }],
  ["sk-ssh-ed25519@openssh.com", { shape: { kind: "ed25519" }, sk: true }],
  ["sk-ecdsa-sha2-nistp256@openssh.com", { shape: { kind: "ecdsa", curve: "nistp256" }, sk: true }],
]);

/** OpenSSH's limits (sshkey.h, sshbuf.h): RSA moduli of 1024 to 16384 bits. */
const RSA_MIN_BITS = 1024;
const MAX_BIGNUM_BYTES = 16384 / 8;

export interface PublicKey {
  type: string;
  base64: string;
  comment: string;
  /** `type base64` — the part that identifies the key. */
  text: string;
  /** `type base64 [comment]` with single spaces: what is written to the device. */
  canonical: string;
}

/** `U+00A0 (no-break space)` for messages about characters a user cannot see. */
function codePoint(ch: string): string {
  const cp = ch.codePointAt(0) ?? 0;
  const names: Record<number, string> = { 0xa0: "no-break space", 0xfeff: "byte order mark", 0x200b: "zero-width space", 0x3000: "ideographic space", 0x202f: "narrow no-break space" };
  const hex = cp.toString(16).toUpperCase().padStart(4, "0");
  return `U+${hex}${names[cp] ? ` (${names[cp]})` : /\s/u.test(ch) ? " (a Unicode space)" : ""}`;
}

/** Anything a terminal shows as blank but sshd does not skip: only space and tab separate fields. */
const INVISIBLE = /[\s\u200b-\u200d\u2060\ufeff]/u;

class Damaged extends Error {}

/** sshbuf_get_cstring: a NUL is allowed only as the last byte (and is not part of the text). */
function cstring(r: WireReader, what: string): string {
  const b = r.string();
  const nul = b.indexOf(0);
  if (nul !== -1 && nul < b.length - 1) throw new Damaged(`its ${what} contains a NUL byte`);
  return b.subarray(0, nul === -1 ? b.length : nul).toString("latin1");
}

/** An unsigned SSH mpint: sshbuf_get_bignum2 refuses negative and oversized values. */
function mpintBits(r: WireReader, what: string): number {
  const b = r.string();
  if (b.length > 0 && (b[0]! & 0x80) !== 0) throw new Damaged(`its RSA ${what} is negative`);
  if (b.length > MAX_BIGNUM_BYTES + 1 || (b.length === MAX_BIGNUM_BYTES + 1 && b[0] !== 0)) throw new Damaged(`its RSA ${what} is larger than 16384 bits`);
  let i = 0;
  while (i < b.length && b[i] === 0) i++;
  return i === b.length ? 0 : (b.length - i - 1) * 8 + (32 - Math.clz32(b[i]!));
}

function checkPoint(q: Buffer, curve: string): void {
  const c = CURVES[curve]!;
  // OpenSSH takes only uncompressed points (0x04 ‖ X ‖ Y).
  if (q.length !== 1 + 2 * c.bytes || q[0] !== 4) throw new Damaged(`its ${curve} point is not an uncompressed point of ${1 + 2 * c.bytes} bytes`);
  const jwk = { kty: "EC", crv: c.jwk, x: q.subarray(1, 1 + c.bytes).toString("base64url"), y: q.subarray(1 + c.bytes).toString("base64url") };
  try {
    // OpenSSL refuses a point that is not on the curve (or has coordinates beyond the field).
    createPublicKey({ key: jwk, format: "jwk" });
  } catch {
    throw new Damaged(`its ${curve} point is not on the curve`);
  }
}

/** Decodes the key blob to its last byte; throws Damaged (or a WireReader error when short). */
function decodeBlob(blob: Buffer, type: string): void {
  const spec = KEY_TYPES.get(type)!;
  const r = new WireReader(blob);
  const inner = cstring(r, "key type");
  if (inner !== type) throw new Damaged(`says '${type}' but its key data is '${inner}'`);
  const s = spec.shape;
  if (s.kind === "ed25519") {
    const pk = r.string();
    if (pk.length !== 32) throw new Damaged(`has an ed25519 key of ${pk.length} bytes (must be 32)`);
  } else if (s.kind === "rsa") {
    mpintBits(r, "exponent");
    const bits = mpintBits(r, "modulus");
    if (bits < RSA_MIN_BITS) throw new Damaged(`has an RSA modulus of ${bits} bits (OpenSSH needs at least ${RSA_MIN_BITS})`);
  } else {
    const curve = cstring(r, "curve name");
    if (curve !== s.curve) throw new Damaged(`says '${type}' but its curve is '${curve}'`);
    checkPoint(r.string(), curve);
  }
  if (spec.sk) cstring(r, "security key application");
  if (r.remaining > 0) throw new Damaged(`has ${r.remaining} byte(s) after the end of its key data (damaged or two keys run together)`);
}

function base64Problem(b64: string): string | undefined {
  const odd = [...b64].find((ch) => !/[A-Za-z0-9+/=]/.test(ch));
  if (odd !== undefined) return `has ${codePoint(odd)} inside its base64 key data`;
  // Node's decoder skips what it does not understand; OpenSSH's does not. Re-encoding must give
  // back the same text, so a missing character, missing padding or stray bits are refused.
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64) || Buffer.from(b64, "base64").toString("base64") !== b64) {
    return b64.length % 4 !== 0
      ? `has base64 key data of ${b64.length} characters, which is not a multiple of 4: a character is missing or extra (copy the whole line again)`
      : "has damaged base64 key data (copy the whole line again)";
  }
  return undefined;
}

/** Returns the parsed key, or a reason string why the line is not a usable public key. */
export function parsePublicKey(line: string): PublicKey | string {
  if (/[\r\n\0]/.test(line)) return "contains a line break or NUL";
  // sshd skips spaces and tabs before a key and splits fields on them; nothing else.
  const trimmed = line.replace(/^[ \t]+|[ \t]+$/g, "");
  const first = trimmed.charAt(0);
  if (first && INVISIBLE.test(first)) return `starts with ${codePoint(first)}, which sshd does not skip: it would ignore the whole line (delete that character)`;
  const last = trimmed.slice(-1);
  if (last && INVISIBLE.test(last)) return `ends with ${codePoint(last)} (delete that character)`;
  const m = /^([^ \t]+)[ \t]+([^ \t]+)(?:[ \t]+(.*))?$/.exec(trimmed);
  if (!m) return "is not an OpenSSH public key line ('TYPE BASE64 [comment]')";
  const [, type = "", b64 = "", comment = ""] = m;
  if (!KEY_TYPES.has(type)) {
    const odd = [...type].find((ch) => INVISIBLE.test(ch) || ch > "\x7e");
    if (odd !== undefined) return `has ${codePoint(odd)} in its key type '${type}'`;
    return `has unsupported key type '${type}' (use ${[...KEY_TYPES.keys()].slice(0, 5).join(", ")}, …)`;
  }
  const bad = base64Problem(b64);
  if (bad) return bad;
  try {
    decodeBlob(Buffer.from(b64, "base64"), type);
  } catch (e) {
    if (e instanceof Damaged) return e.message;
    return "has key data that is truncated (damaged or cut short)";
  }
  // eslint-disable-next-line no-control-regex -- rejecting control characters is the point
  if (/[\x00-\x1f\x7f]/.test(comment)) return "has control characters in its comment";
  const text = `${type} ${b64}`;
  return { type, base64: b64, comment, text, canonical: comment ? `${text} ${comment}` : text };
}

/** The canonical line of a key the config has already validated (a bug if it does not parse). */
export function canonicalKeyLine(line: string): string {
  const k = parsePublicKey(line);
  if (typeof k === "string") throw new Error(`canonicalKeyLine: an unvalidated key slipped through: it ${k}`);
  return k.canonical;
}

const CERT_AUTHORITY = /^[ \t]*@cert-authority[ \t]+/;

/** A pinned bastion key: a key line, or `@cert-authority KEYLINE`. */
export function parseHostKeyEntry(entry: string): { ca: boolean; key: PublicKey } | string {
  const ca = CERT_AUTHORITY.exec(entry);
  const key = parsePublicKey(ca ? entry.slice(ca[0].length) : entry);
  return typeof key === "string" ? key : { ca: Boolean(ca), key };
}

/** The canonical form of a validated pinned key entry. */
export function canonicalHostKeyEntry(entry: string): string {
  const e = parseHostKeyEntry(entry);
  if (typeof e === "string") throw new Error(`canonicalHostKeyEntry: an unvalidated key slipped through: it ${e}`);
  return `${e.ca ? "@cert-authority " : ""}${e.key.canonical}`;
}

/** The 32-byte ed25519 key of an `ssh-ed25519 AAAA… [comment]` line, or a reason. */
export function ed25519Key(line: string): Buffer | string {
  const m = /^ssh-ed25519 ([A-Za-z0-9+/]{68})(?: [^\r\n]*)?$/.exec(line);
  if (!m) return "is not an ssh-ed25519 public key line";
  try {
    const r = new WireReader(Buffer.from(m[1]!, "base64"));
    if (r.string().toString("latin1") !== "ssh-ed25519") return "does not decode as ssh-ed25519";
    const pub = Buffer.from(r.string());
    if (pub.length !== 32 || r.remaining !== 0) return "does not decode as ssh-ed25519";
    return pub;
  } catch {
    return "does not decode";
  }
}
