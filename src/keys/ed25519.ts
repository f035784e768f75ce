/**
 * Device identity: ed25519 keys made with node:crypto (native) and written in OpenSSH's own
 * formats, so sshd uses the file as a host key and ssh uses it as the tunnel identity.
 * Formats per OpenSSH PROTOCOL.key and docs/facts.md.
 */
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes } from "node:crypto";
import { UserError } from "../util/errors.js";
import { blobFingerprint } from "./fingerprint.js";
import { sshString, u32, WireReader } from "./ssh-wire.js";

export interface Ed25519Key {
  /** 32-byte private seed. Never logged, never stored in the registry. */
  readonly seed: Buffer;
  /** 32-byte public key. */
  readonly pub: Buffer;
}

const KEY_TYPE = "ssh-ed25519";
const MAGIC = Buffer.from("openssh-key-v1\0", "latin1");
const ARMOR_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----";
const ARMOR_END = "-----END OPENSSH PRIVATE KEY-----";
// DER prefixes of a PKCS#8 / SPKI ed25519 key: the raw key is the 32 bytes that follow.
const PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");

export function generateEd25519(): Ed25519Key {
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  const der = privateKey.export({ format: "der", type: "pkcs8" });
  const spki = publicKey.export({ format: "der", type: "spki" });
  return { seed: Buffer.from(der.subarray(der.length - 32)), pub: Buffer.from(spki.subarray(spki.length - 32)) };
}

/** Derives the public key from a seed (used to check imported keys are consistent). */
function publicFromSeed(seed: Buffer): Buffer {
  const priv = createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, seed]), format: "der", type: "pkcs8" });
  const spki = createPublicKey(priv).export({ format: "der", type: "spki" });
  return Buffer.from(spki.subarray(spki.length - 32));
}

function publicBlob(pub: Buffer): Buffer {
  return Buffer.concat([sshString(KEY_TYPE), sshString(pub)]);
}

/** `ssh-ed25519 AAAA… comment` */
export function publicKeyLine(pub: Buffer, comment?: string): string {
  const base = `${KEY_TYPE} ${publicBlob(pub).toString("base64")}`;
  return comment ? `${base} ${comment}` : base;
}

/** `SHA256:…` exactly as `ssh-keygen -lf` prints it (unpadded base64). */
export function fingerprint(pub: Buffer): string {
  return blobFingerprint(publicBlob(pub));
}

/**
 * Unencrypted openssh-key-v1 private key file. The check integer is random unless given:
 * pass a fixed one (derived from the key) to make the file reproducible.
 */
export function encodePrivateKey(key: Ed25519Key, comment: string, checkInt?: number): string {
  const check = checkInt ?? randomBytes(4).readUInt32BE(0);
  const parts = [
    u32(check),
    u32(check),
    sshString(KEY_TYPE),
    sshString(key.pub),
    sshString(Buffer.concat([key.seed, key.pub])),
    sshString(comment),
  ];
  let priv = Buffer.concat(parts);
  const padLen = (8 - (priv.length % 8)) % 8;
  const pad = Buffer.from(Array.from({ length: padLen }, (_, i) => i + 1));
  priv = Buffer.concat([priv, pad]);
  const body = Buffer.concat([
    MAGIC,
    sshString("none"),
    sshString("none"),
    sshString(Buffer.alloc(0)),
    u32(1),
    sshString(publicBlob(key.pub)),
    sshString(priv),
  ]).toString("base64");
  const lines = body.match(/.{1,70}/g) ?? [];
  // The trailing newline matters: ssh-keygen refuses the file without it.
  return `${ARMOR_BEGIN}\n${lines.join("\n")}\n${ARMOR_END}\n`;
}

/** A check integer derived from the key, so an imported key re-encodes to the same bytes. */
export function deterministicCheckInt(key: Ed25519Key): number {
  return createHash("sha256").update("mkoverlay-check").update(key.seed).digest().readUInt32BE(0);
}

/**
 * Reads an unencrypted ed25519 key in OpenSSH format (`--host-key`). Refuses, with a reason,
 * anything else: other key types, passphrase-protected keys, PEM/PKCS#8, garbage.
 */
export function decodePrivateKey(text: string, source: string): { key: Ed25519Key; comment: string } {
  const trimmed = text.trim();
  if (!trimmed.startsWith(ARMOR_BEGIN) || !trimmed.endsWith(ARMOR_END)) {
    if (/BEGIN (RSA|EC|DSA|ENCRYPTED)? ?PRIVATE KEY/.test(trimmed)) {
      throw new UserError(`${source}: not an OpenSSH ed25519 key (PEM format)`, {
        hint: "convert it with 'ssh-keygen -p -f FILE' or generate one with 'ssh-keygen -t ed25519 -N \"\"'",
      });
    }
    throw new UserError(`${source}: not an OpenSSH private key`, {
      hint: "pass an unencrypted ed25519 key made by 'ssh-keygen -t ed25519 -N \"\"'",
    });
  }
  const b64 = trimmed.slice(ARMOR_BEGIN.length, trimmed.length - ARMOR_END.length).replace(/\s+/g, "");
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) throw new UserError(`${source}: corrupt OpenSSH private key (bad base64)`);
  const raw = Buffer.from(b64, "base64");
  try {
    if (!raw.subarray(0, MAGIC.length).equals(MAGIC)) throw new Error("bad magic");
    const r = new WireReader(raw.subarray(MAGIC.length));
    const cipher = r.string().toString();
    const kdf = r.string().toString();
    r.string();
    if (cipher !== "none" || kdf !== "none") {
      throw new UserError(`${source}: the key is passphrase-protected`, {
        hint: "remove the passphrase with 'ssh-keygen -p -N \"\" -f FILE' (a device boots unattended)",
      });
    }
    const n = r.uint32();
    if (n !== 1) throw new Error(`${n} keys in file`);
    const pubBlob = new WireReader(r.string());
    const type = pubBlob.string().toString();
    if (type !== KEY_TYPE) {
      throw new UserError(`${source}: ${type} key; mkoverlay needs an ed25519 key`, {
        hint: "generate one with 'ssh-keygen -t ed25519 -N \"\"'",
      });
    }
    const pr = new WireReader(r.string());
    const c1 = pr.uint32();
    const c2 = pr.uint32();
    if (c1 !== c2) throw new Error("check integers differ");
    if (pr.string().toString() !== KEY_TYPE) throw new Error("private key type");
    const pub = Buffer.from(pr.string());
    const sk = pr.string();
    const comment = pr.string().toString("utf8");
    if (pub.length !== 32 || sk.length !== 64) throw new Error("bad key lengths");
    const seed = Buffer.from(sk.subarray(0, 32));
    if (!sk.subarray(32).equals(pub) || !publicFromSeed(seed).equals(pub)) throw new Error("public and private halves do not match");
    return { key: { seed, pub }, comment };
  } catch (e) {
    if (e instanceof UserError) throw e;
    throw new UserError(`${source}: corrupt OpenSSH private key (${(e as Error).message})`);
  }
}
