/**
 * Public key lines from the config are decoded to their last byte: every line in this table is
 * fed both to parsePublicKey and to the real `ssh-keygen -l -f`, and the two must agree on
 * which lines are keys. The table holds real keys of every supported type and damaged copies:
 * each base64 character dropped in turn, a space put inside, bytes appended, wrong lengths,
 * wrong curves, points off the curve, and invisible characters around the line.
 */
import { generateKeyPairSync } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { parseFleet } from "../src/config/load.js";
import { sshString, u32 } from "../src/keys/ssh-wire.js";
import { parsePublicKey } from "../src/keys/pubkey.js";
import { readPub, removeDir, run, sshKeygen, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-pubkey-");
afterAll(() => removeDir(dir));

const real: Record<string, string> = {};
for (const [name, type, extra] of [
  ["ed25519", "ed25519", []],
  ["rsa3072", "rsa", ["-b", "3072"]],
  ["rsa1024", "rsa", ["-b", "1024"]],
  ["ecdsa256", "ecdsa", ["-b", "256"]],
  ["ecdsa384", "ecdsa", ["-b", "384"]],
  ["ecdsa521", "ecdsa", ["-b", "521"]],
] as const) {
  const [t, b64] = readPub(sshKeygen(dir, name, type, [...extra])).split(" ");
  real[name] = `${t} ${b64}`;
}

// Security-key types cannot be made without a token: build their blobs by hand (PROTOCOL.u2f).
const blob = (...parts: (Buffer | string)[]) => Buffer.concat(parts.map((p) => sshString(p)));
const edPub = generateKeyPairSync("ed25519").publicKey.export({ format: "der", type: "spki" }).subarray(-32);
const ec = generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ format: "jwk" });
const point = Buffer.concat([Buffer.from([4]), Buffer.from(ec.x!, "base64url"), Buffer.from(ec.y!, "base64url")]);
const line = (type: string, b: Buffer) => `${type} ${b.toString("base64")}`;
const SK_ED = "sk-ssh-ed25519@openssh.com";
const SK_EC = "sk-ecdsa-sha2-nistp256@openssh.com";
real.skEd25519 = line(SK_ED, blob(SK_ED, edPub, "ssh:"));
real.skEcdsa = line(SK_EC, blob(SK_EC, "nistp256", point, "ssh:"));

const decoded = (l: string) => Buffer.from(l.split(" ")[1]!, "base64");
const flipped = (b: Buffer, i: number) => Buffer.concat([b.subarray(0, i), Buffer.from([b[i]! ^ 1]), b.subarray(i + 1)]);
const rsaParts = (() => {
  const j = generateKeyPairSync("rsa", { modulusLength: 2048 }).publicKey.export({ format: "jwk" });
  return { e: Buffer.from(j.e!, "base64url"), n: Buffer.from(j.n!, "base64url") };
})();
const mp = (b: Buffer) => ((b[0]! & 0x80) !== 0 ? Buffer.concat([Buffer.from([0]), b]) : b);

interface Case {
  name: string;
  /** The key part; the table adds a `case-N` comment so ssh-keygen's output names it. */
  key: string;
  /** Text after the key instead of ` case-N` (for cases about the end of the line). */
  tail?: string;
  /** Prefix before the key. */
  head?: string;
}

const cases: Case[] = [];
for (const [name, k] of Object.entries(real)) {
  cases.push({ name: `${name} as made`, key: k });
  const [t, b64] = k.split(" ") as [string, string];
  // The issue's first case: one base64 character missing, at every position.
  for (let i = 0; i < b64.length; i++) cases.push({ name: `${name} without base64 character ${i}`, key: `${t} ${b64.slice(0, i)}${b64.slice(i + 1)}` });
  // The second: a space inside the key (every 5th position, and the last few).
  for (let i = 1; i < b64.length; i += i > b64.length - 6 ? 1 : 5) cases.push({ name: `${name} with a space at ${i}`, key: `${t} ${b64.slice(0, i)} ${b64.slice(i)}` });
  cases.push({ name: `${name} with one byte appended`, key: line(t, Buffer.concat([decoded(k), Buffer.from([0])])) });
  cases.push({ name: `${name} with an empty string appended`, key: line(t, Buffer.concat([decoded(k), u32(0)])) });
  cases.push({ name: `${name} cut by one byte`, key: line(t, decoded(k).subarray(0, -1)) });
  cases.push({ name: `${name} with padding removed`, key: `${t} ${b64.replace(/=+$/, "")}` });
  cases.push({ name: `${name} with a padding character added`, key: `${t} ${b64}=` });
  cases.push({ name: `${name} with a tab after the type`, key: `${t}\t${b64}` });
  cases.push({ name: `${name} with two spaces after the type`, key: `${t}  ${b64}` });
}
const ED = "ssh-ed25519";
const EC = "ecdsa-sha2-nistp256";
cases.push(
  { name: "ed25519 of 31 bytes", key: line(ED, blob(ED, edPub.subarray(1))) },
  { name: "ed25519 of 33 bytes", key: line(ED, blob(ED, Buffer.concat([edPub, Buffer.from([1])]))) },
  { name: "ed25519 blob naming ssh-rsa", key: line(ED, blob("ssh-rsa", edPub)) },
  { name: "ed25519 with a NUL after its type", key: line(ED, blob(`${ED}\0`, edPub)) },
  { name: "ed25519 with a NUL inside its type", key: line(ED, blob(`ssh-\0ed25519`, edPub)) },
  { name: "ecdsa with the nistp384 curve name", key: line(EC, blob(EC, "nistp384", point)) },
  { name: "ecdsa blob of another ecdsa type", key: line(EC, blob("ecdsa-sha2-nistp384", "nistp384", point)) },
  { name: "ecdsa point off the curve", key: line(EC, blob(EC, "nistp256", flipped(point, 64))) },
  { name: "ecdsa point compressed", key: line(EC, blob(EC, "nistp256", Buffer.concat([Buffer.from([2 + (point[64]! & 1)]), point.subarray(1, 33)]))) },
  { name: "ecdsa point at infinity", key: line(EC, blob(EC, "nistp256", Buffer.from([0]))) },
  { name: "ecdsa point cut short", key: line(EC, blob(EC, "nistp256", point.subarray(0, 64))) },
  { name: "rsa with a leading zero on e", key: line("ssh-rsa", blob("ssh-rsa", Buffer.concat([Buffer.from([0, 0]), rsaParts.e]), mp(rsaParts.n))) },
  { name: "rsa with a negative modulus", key: line("ssh-rsa", blob("ssh-rsa", mp(rsaParts.e), rsaParts.n)) },
  { name: "rsa of 1023 bits", key: line("ssh-rsa", blob("ssh-rsa", mp(rsaParts.e), Buffer.concat([Buffer.from([0x7f]), rsaParts.n.subarray(1, 128)]))) },
  { name: "rsa of 1024 bits", key: line("ssh-rsa", blob("ssh-rsa", mp(rsaParts.e), mp(Buffer.concat([Buffer.from([0x80]), rsaParts.n.subarray(1, 128)])))) },
  { name: "rsa of 16384 bits", key: line("ssh-rsa", blob("ssh-rsa", mp(rsaParts.e), Buffer.concat([Buffer.from([0]), Buffer.alloc(2048, 0xff)]))) },
  { name: "rsa of 16385 bits", key: line("ssh-rsa", blob("ssh-rsa", mp(rsaParts.e), Buffer.concat([Buffer.from([0, 1]), Buffer.alloc(2048, 0xff)]))) },
  { name: "rsa without a modulus", key: line("ssh-rsa", blob("ssh-rsa", mp(rsaParts.e))) },
  { name: "sk-ed25519 without its application", key: line(SK_ED, blob(SK_ED, edPub)) },
  { name: "sk-ed25519 with an empty application", key: line(SK_ED, blob(SK_ED, edPub, "")) },
  { name: "sk-ed25519 with a NUL in its application", key: line(SK_ED, blob(SK_ED, edPub, "ssh:\0x")) },
  { name: "sk-ecdsa without its application", key: line(SK_EC, blob(SK_EC, "nistp256", point)) },
  { name: "sk-ecdsa with a byte after its application", key: line(SK_EC, Buffer.concat([blob(SK_EC, "nistp256", point, "ssh:"), Buffer.from([0])])) },
  { name: "leading spaces and a tab", key: real.ed25519!, head: "  \t" },
  { name: "leading no-break space", key: real.ed25519!, head: "\u00a0" },
  { name: "leading byte order mark", key: real.ed25519!, head: "\ufeff" },
  { name: "leading em space", key: real.ed25519!, head: "\u2003" },
  { name: "trailing no-break space, no comment", key: real.ed25519!, tail: "\u00a0" },
  { name: "trailing spaces, no comment", key: real.ed25519!, tail: "   " },
  { name: "no comment", key: real.ed25519!, tail: "" },
  { name: "no-break space inside the base64", key: real.ed25519!.replace(/(.{40})/, "$1\u00a0") },
);

/** Lines ssh-keygen accepts, by case index: one run over the whole table (a file of many keys). */
function sshKeygenAccepts(lines: string[]): boolean[] {
  const tagged = lines.map((l, i) => ({ l, i, tag: /case-(\d+)$/.exec(l)?.[1] }));
  const accepted = new Array<boolean>(lines.length).fill(false);
  const file = join(dir, "table.pub");
  writeFileSync(file, tagged.filter((t) => t.tag !== undefined).map((t) => t.l).join("\n") + "\n");
  const r = run("ssh-keygen", ["-l", "-f", file]);
  for (const m of r.stdout.matchAll(/case-(\d+)/g)) accepted[Number(m[1])] = true;
  // Lines without a tag (their end is the point of the case) one at a time.
  for (const t of tagged.filter((x) => x.tag === undefined)) {
    writeFileSync(file, t.l + "\n");
    accepted[t.i] = run("ssh-keygen", ["-l", "-f", file]).code === 0;
  }
  return accepted;
}

describe("public key lines against the real ssh-keygen", () => {
  const lines = cases.map((c, i) => `${c.head ?? ""}${c.key}${c.tail ?? ` case-${i}`}`);
  const theirs = sshKeygenAccepts(lines);
  const ours = lines.map((l) => typeof parsePublicKey(l) === "object");

  it(`agrees with ssh-keygen -l on every line of the table (${cases.length} lines)`, () => {
    const disagree = cases.flatMap((c, i) => (theirs[i] === ours[i] ? [] : [`${c.name}: ssh-keygen ${theirs[i] ? "accepts" : "rejects"}, parsePublicKey ${ours[i] ? "accepts" : "rejects"} (${parsePublicKey(lines[i]!) as string})`]));
    expect(disagree).toEqual([]);
    // Both outcomes occur, so agreement means something.
    expect(theirs.filter(Boolean).length).toBeGreaterThan(20);
    expect(theirs.filter((x) => !x).length).toBeGreaterThan(300);
  });

  it("the issue's cases are refused with a reason a user can act on", () => {
    const b64 = real.ed25519!.split(" ")[1]!;
    expect(parsePublicKey(`${ED} ${b64.slice(0, 20)}${b64.slice(21)} bastion`)).toMatch(/67 characters, which is not a multiple of 4: a character is missing/);
    expect(parsePublicKey(`${ED} ${b64.slice(0, 60)} ${b64.slice(60)} alice`)).toMatch(/not a multiple of 4|damaged|truncated/);
    expect(parsePublicKey(`\u00a0${real.ed25519} alice`)).toMatch(/starts with U\+00A0 \(no-break space\), which sshd does not skip/);
    expect(parsePublicKey(line(ED, Buffer.concat([decoded(real.ed25519!), Buffer.from([0])])))).toMatch(/1 byte\(s\) after the end of its key data/);
    expect(parsePublicKey(line(EC, blob(EC, "nistp256", flipped(point, 64))))).toMatch(/point is not on the curve/);
    expect(parsePublicKey(line(EC, blob(EC, "nistp384", point)))).toMatch(/its curve is 'nistp384'/);
    expect(parsePublicKey(line(ED, blob(ED, edPub.subarray(1))))).toMatch(/ed25519 key of 31 bytes \(must be 32\)/);
  });

  it("gives the canonical line (single spaces, nothing around it) for what it accepts", () => {
    const k = parsePublicKey(`  ${real.rsa1024!.replace(" ", "\t")}\t  operator bob  `);
    expect(typeof k).toBe("object");
    expect((k as { canonical: string }).canonical).toBe(`${real.rsa1024} operator bob`);
  });
});

describe("the config refuses damaged keys (and so verify can never call one fine)", () => {
  const fleet = (hostKey: string, operatorKey: string) =>
    JSON.stringify({
      bastions: { eu: { host: "bastion-eu.example.com", hostKeys: [hostKey] } },
      operators: { authorizedKeys: [operatorKey] },
    });
  const b64 = real.ed25519!.split(" ")[1]!;

  it("a pinned bastion key with one base64 character missing", async () => {
    const damaged = `${ED} ${b64.slice(0, 33)}${b64.slice(34)} bastion-eu`;
    await expect(parseFleet(fleet(damaged, real.ecdsa256!), join(dir, "f.yaml"))).rejects.toThrow(/f\.yaml:1:\d+ bastions\.eu\.hostKeys\[0\]: is not a public key: it has base64 key data of 67 characters/);
  });

  it("an operator key with a space inside", async () => {
    const damaged = `${ED} ${b64.slice(0, 64)} ${b64.slice(64)} alice`;
    await expect(parseFleet(fleet(real.ed25519!, damaged), join(dir, "f.yaml"))).rejects.toThrow(/operators\.authorizedKeys\[0\]: is not a public key/);
  });

  it("an @cert-authority entry is decoded the same way", async () => {
    await expect(parseFleet(fleet(`@cert-authority ${ED} ${b64.slice(1)}`, real.ed25519!), join(dir, "f.yaml"))).rejects.toThrow(/hostKeys\[0\]: is not a public key/);
    const ok = await parseFleet(fleet(`@cert-authority\t${real.ecdsa384}  host-ca`, real.ed25519!), join(dir, "f.yaml"));
    expect(ok.bastions.get("eu")!.hostKeys).toEqual([`@cert-authority ${real.ecdsa384} host-ca`]);
  });
});
