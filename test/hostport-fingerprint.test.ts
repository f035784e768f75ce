/**
 * `[host]:port` and SSH fingerprints each in one module (issue 23): src/util/hostport.ts (parse and
 * format, IPv6 bracketed) and src/keys/fingerprint.ts, checked against the real `ssh-keygen -lf`
 * for ed25519, RSA and ECDSA keys, and used by every caller (init's pins, the compat record, the
 * device key).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseBastionFlag, keyFingerprint } from "../src/cli/commands/init-answers.js";
import { loopbackEndpoint } from "../src/cli/commands/bastion-agent.js";
import { hostKeyFingerprint } from "../src/config/compat.js";
import { fingerprint, generateEd25519, publicKeyLine } from "../src/keys/ed25519.js";
import { blobFingerprint, lineFingerprint } from "../src/keys/fingerprint.js";
import { jumpHost } from "../src/fleet/operator.js";
import { knownHostsPattern } from "../src/overlay/steps.js";
import { formatHostPort, knownHostsName, parseHostPort } from "../src/util/hostport.js";
import { removeDir, run, sshKeygen, tempDir } from "./helpers/workspace.js";

describe("fingerprints: one module, as ssh-keygen -lf prints them", () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir("mko-fp-");
  });
  afterAll(() => removeDir(dir));

  it.each([["ed25519"], ["rsa"], ["ecdsa"]])("a %s key's .pub line", (type) => {
    const priv = sshKeygen(dir, `k-${type}`, type);
    const r = run("ssh-keygen", ["-lf", `${priv}.pub`]);
    expect(r.code, r.stderr).toBe(0);
    const want = r.stdout.split(" ")[1]!;
    expect(want).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    const line = readFileSync(`${priv}.pub`, "utf8").trim();
    expect(lineFingerprint(line)).toBe(want);
    // init's pins and the compat record are the same function.
    expect(keyFingerprint(line)).toBe(want);
    expect(hostKeyFingerprint(line.split(" ").slice(0, 2).join(" "))).toBe(want);
    expect(lineFingerprint(`@cert-authority ${line}`)).toBe(want);
    expect(lineFingerprint(`@cert-authority ${line}`, { keepCA: true })).toBe(`@cert-authority ${want}`);
    expect(hostKeyFingerprint(`@cert-authority ${line.split(" ").slice(0, 2).join(" ")}`)).toBe(`@cert-authority ${want}`);
  });

  it("a generated device key's fingerprint is ssh-keygen's", () => {
    const k = generateEd25519();
    const line = publicKeyLine(k.pub, "gw-0001");
    const file = join(dir, "device.pub");
    run("sh", ["-c", `printf '%s\\n' "$1" > "$2"`, "sh", line, file]);
    const want = run("ssh-keygen", ["-lf", file]).stdout.split(" ")[1];
    expect(fingerprint(k.pub)).toBe(want);
    expect(blobFingerprint(Buffer.from(line.split(" ")[1]!, "base64"))).toBe(want);
  });
});

describe("[host]:port: one module", () => {
  it.each([
    ["bastion.example.com", 22, "bastion.example.com:22", "bastion.example.com"],
    ["198.51.100.7", 2222, "198.51.100.7:2222", "[198.51.100.7]:2222"],
    ["2001:db8::1", 2222, "[2001:db8::1]:2222", "[2001:db8::1]:2222"],
    ["::1", 22, "[::1]:22", "::1"],
  ] as const)("%s port %d: %s, known_hosts %s, and back", (host, port, text, kh) => {
    expect(formatHostPort(host, port)).toBe(text);
    expect(parseHostPort(text)).toEqual({ host, port });
    expect(knownHostsName(host, port)).toBe(kh);
    const b = { name: "eu", host, port, user: "reverse-ssh", hostKeys: [], from: undefined, expiry: undefined, jumpUser: "alice" };
    expect(knownHostsPattern(b)).toBe(kh);
    expect(jumpHost(b)).toBe(`alice@${formatHostPort(host, port, { omitPort: 22 })}`);
  });

  it("IPv6 is bracketed wherever a port follows, and a bare IPv6 address has no port", () => {
    expect(formatHostPort("2001:db8::1", 22, { omitPort: 22 })).toBe("[2001:db8::1]");
    expect(parseHostPort("2001:db8::1", { defaultPort: 22 })).toEqual({ host: "2001:db8::1", port: 22 });
    expect(parseHostPort("[2001:db8::1]", { defaultPort: 22 })).toEqual({ host: "2001:db8::1", port: 22 });
    expect(parseHostPort("2001:db8::1")).toMatch(/has no port/);
    expect(parseHostPort("host:99999")).toBe("port 99999 is not 1-65535");
    expect(parseHostPort("host:x")).toBe('"x" is not a port');
    expect(parseHostPort(":22")).toBe("has no host");
  });

  it("init's --bastion and the agent's --metrics-listen read through it", () => {
    expect(parseBastionFlag("eu=[2001:db8::1]:2222")).toEqual({ name: "eu", host: "2001:db8::1", port: 2222 });
    expect(parseBastionFlag("eu=2001:db8::1")).toEqual({ name: "eu", host: "2001:db8::1", port: 22 });
    expect(parseBastionFlag("eu=Bastion.example.com:2200")).toEqual({ name: "eu", host: "bastion.example.com", port: 2200 });
    expect(() => parseBastionFlag("eu=host:99999")).toThrow(/port 99999 is not 1-65535/);
    expect(loopbackEndpoint("[::1]:9273")).toEqual({ host: "::1", port: 9273 });
    expect(loopbackEndpoint("127.0.0.1:9273")).toEqual({ host: "127.0.0.1", port: 9273 });
    for (const bad of ["::1:9273", "0.0.0.0:9273", "[2001:db8::1]:9273", "127.0.0.1", "127.0.0.1:0"]) expect(() => loopbackEndpoint(bad), bad).toThrow(/--metrics-listen/);
  });
});
