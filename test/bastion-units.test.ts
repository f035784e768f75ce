/**
 * The bastion side's small parts, each against the real thing where there is one: the keys
 * command under dash and shellcheck, /proc listeners of real sockets, a session ended by its
 * real process, sshd log lines as sshd writes them, Include expansion on real directories.
 */
import { spawn } from "node:child_process";
import { appendFileSync, chmodSync, mkdirSync, renameSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { followFile, parseAccepted } from "../src/bastion/authlog.js";
import { renderDropin } from "../src/bastion/dropin.js";
import { bastionEntries } from "../src/bastion/export.js";
import { KEYS_COMMAND } from "../src/bastion/keys-command.js";
import { fileNameFor, fingerprintFor, KeyStore, listenPorts } from "../src/bastion/keystore.js";
import { endSessions, loopbackListeners, parseProcNetTcp } from "../src/bastion/sessions.js";
import { checkConfig, globComponent } from "../src/bastion/sshd-check.js";
import type { Bastion, Fleet } from "../src/config/fleet.js";
import { fingerprint, generateEd25519, publicKeyLine } from "../src/keys/ed25519.js";
import type { DeviceRecord } from "../src/registry/types.js";
import { canConnect, freePort, waitFor } from "./helpers/sshd.js";
import { removeDir, run, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-bunits-");
afterAll(() => removeDir(dir));

const bastion: Bastion = { name: "eu", host: "b.example.com", port: 22, user: "reverse-ssh", hostKeys: [], from: undefined, expiry: undefined, jumpUser: undefined };
const fleet: Fleet = {
  file: "f.yaml",
  registry: "r.db",
  hostnameTemplate: "gw-{seq}",
  ports: { ssh: { lo: 21000, hi: 21999 }, services: { lo: 22000, hi: 22999 } },
  bastions: new Map([["eu", bastion]]),
  forwards: [],
  operators: undefined,
};

function record(hostname: string, port: number, over: Partial<DeviceRecord> = {}): DeviceRecord {
  const k = generateEd25519();
  return {
    hostname, board: "rpi4", os: "raspios", bastions: ["eu"], port, services: {}, publicKey: publicKeyLine(k.pub), fingerprint: fingerprint(k.pub),
    status: "active", overlay: null, station: "s:1", created: "2025-01-01T00:00:00.000Z", updated: "2025-01-01T00:00:00.000Z", attributes: {}, ...over,
  };
}

describe("key file names", () => {
  it("round-trip a fingerprint through a file name without '/' and '+'", () => {
    for (let i = 0; i < 200; i++) {
      const fp = fingerprint(generateEd25519().pub);
      const name = fileNameFor(fp);
      expect(name).toMatch(/^[A-Za-z0-9_-]{43}$/);
      expect(fingerprintFor(name)).toBe(fp);
    }
    for (const bad of ["SHA256:../../etc/passwd", "MD5:aa", "SHA256:" + "A".repeat(42), `SHA256:${"A".repeat(42)}\n`]) expect(() => fileNameFor(bad)).toThrow(/not a SHA256 fingerprint/);
    expect(fingerprintFor(".tmp")).toBeUndefined();
  });

  it("the store writes, replaces and removes files atomically, 0644, and counts ports", () => {
    const d = join(dir, "store");
    const s = KeyStore.open(d);
    const fp = fingerprint(generateEd25519().pub);
    writeFileSync(join(d, ".leftover.1234.tmp"), "x");
    expect(s.put(fp, 'restrict,permitlisten="localhost:21001",permitlisten="localhost:22001" ssh-ed25519 AAAA a\n')).toBe(true);
    expect(s.put(fp, 'restrict,permitlisten="localhost:21001",permitlisten="localhost:22001" ssh-ed25519 AAAA a\n')).toBe(false);
    expect(s.allows(21001) && s.allows(22001)).toBe(true);
    const again = KeyStore.open(d); // a restart reads the last known good state, drops temp debris
    expect(again.get(fp)).toContain("21001");
    expect(run("ls", ["-a", d]).stdout).not.toContain(".tmp");
    expect(run("stat", ["-c", "%a", join(d, fileNameFor(fp))]).stdout.trim()).toBe("644");
    expect(again.remove(fp)).toContain("ssh-ed25519");
    expect(again.allows(21001)).toBe(false);
    expect(listenPorts('a,permitlisten="localhost:1",permitopen="localhost:2"')).toEqual([1]);
  });
});

describe("the keys command (sh, run by sshd)", () => {
  const cmd = join(dir, "authorized-keys");
  writeFileSync(cmd, KEYS_COMMAND, { mode: 0o755 });
  chmodSync(cmd, 0o755);
  const keys = join(dir, "keys");
  const fp = "SHA256:ab+/cdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNO";
  mkdirSync(keys, { recursive: true });
  writeFileSync(join(keys, fileNameFor(fp)), "line one\nline two");

  it("passes shellcheck", () => {
    const r = run("shellcheck", ["-s", "sh", cmd]);
    expect(r.code, r.stdout).toBe(0);
  });

  it("prints the offered key's file (a last line without newline included), and nothing for anything else", () => {
    const call = (...args: string[]) => run("dash", [cmd, ...args]);
    expect(call(keys, fp)).toEqual({ code: 0, stdout: "line one\nline two\n", stderr: "" });
    for (const args of [
      [keys, "SHA256:ab+/cdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"], // 42 characters
      [keys, "SHA256:ab+/cdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP"], // 44
      [keys, "SHA256:../../../../../../etc/passwd..............."], // 43, with dots and slashes
      [keys, "SHA256:ab+/cdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN*"], // a glob character
      [keys, "SHA256:ab+/cdefghijklmnopqrstuvwxyzABCDEFGHIJK MNO"], // a space
      [keys, fp.replace("SHA256", "MD5")],
      ["relative/keys", fp],
      [keys],
      [keys, fp, "extra"],
      [keys, "SHA256:" + "Z".repeat(43)], // well-formed, no such key
    ]) {
      expect(call(...args), args.join(" ")).toEqual({ code: 0, stdout: "", stderr: "" });
    }
  });
});

describe("what a bastion authorizes (bastionEntries)", () => {
  it("a rotated-out key until its grace ends, with expiry-time at that instant; hostile rows skipped", () => {
    const now = new Date("2025-06-01T12:00:00Z");
    const prev = generateEd25519();
    const rotated = record("gw-rot", 21001, { previous: { publicKey: publicKeyLine(prev.pub), fingerprint: fingerprint(prev.pub), until: "2025-06-08T12:00:00.000Z" } });
    const expired = record("gw-exp", 21002, { previous: { publicKey: publicKeyLine(prev.pub), fingerprint: fingerprint(prev.pub), until: "2025-06-01T11:59:00.000Z" } });
    const hostile = [
      record("gw-q\"uote", 21003),
      record("gw-port", 23000),
      record("gw-svc", 21004, { services: { web: 99 } }),
      { ...record("gw-fp", 21005), fingerprint: "SHA256:" + "x".repeat(43) },
      { ...record("gw-type", 21006), publicKey: "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ" },
      record("gw-other", 21007, { bastions: ["us"] }),
      record("gw-revoked", 21008, { status: "revoked" }),
    ];
    const { entries, skipped } = bastionEntries(fleet, bastion, [rotated, expired, ...hostile], now);
    expect(entries.map((e) => [e.hostname, e.previous])).toEqual([
      ["gw-rot", false],
      ["gw-rot", true],
      ["gw-exp", false],
    ]);
    expect(entries[1]!.line).toBe(`restrict,port-forwarding,command="/sbin/nologin",expiry-time="202506081200",permitlisten="localhost:21001" ${publicKeyLine(prev.pub, "gw-rot")}`);
    expect(skipped.map((s) => s.hostname).sort()).toEqual(["gw-fp", "gw-port", "gw-q\"uote", "gw-svc", "gw-type"]);
    expect(skipped.find((s) => s.hostname === "gw-port")?.reason).toBe("port 23000 is not in ports.ssh 21000-21999");
  });
});

describe("the sshd drop-in", () => {
  it("is one Match block with the keys command, no per-port PermitListen list, nothing global", () => {
    const text = renderDropin(fleet, bastion);
    const settings = text.split("\n").filter((l) => l.trim() && !l.trim().startsWith("#"));
    expect(settings[0]).toBe("Match User reverse-ssh");
    expect(settings.filter((l) => /^Match /.test(l))).toHaveLength(1);
    expect(settings.slice(1).every((l) => l.startsWith("    "))).toBe(true);
    expect(text).toContain("    AuthorizedKeysFile none\n    AuthorizedKeysCommand /usr/local/lib/mkoverlay/authorized-keys /var/lib/mkoverlay/bastion/eu/keys %f\n    AuthorizedKeysCommandUser mkoverlay-keys\n");
    // One fixed line, whatever the ranges: each key's permitlisten names its ports.
    expect(text.match(/PermitListen.*/g)).toEqual(["PermitListen localhost:*"]);
  });

  it("Include lines are rewritten to the files they would include, with the staged drop-in in its place", () => {
    const root = join(dir, "inc");
    mkdirSync(join(root, "etc/ssh/sshd_config.d"), { recursive: true });
    for (const f of ["10-a.conf", "70-z.conf", ".hidden.conf", "x.conf.bak"]) writeFileSync(join(root, "etc/ssh/sshd_config.d", f), "");
    const main = "# top\nInclude /etc/ssh/sshd_config.d/*.conf extra.conf\nPort 22\n";
    writeFileSync(join(root, "etc/ssh/extra.conf"), "");
    const drop = "/etc/ssh/sshd_config.d/60-mkoverlay-bastion-eu.conf";
    const c = checkConfig(main, root, drop, "/tmp/staged");
    expect(c.covers).toBe(true);
    expect(c.text).toBe(`# top\nInclude ${root}/etc/ssh/sshd_config.d/10-a.conf /tmp/staged ${root}/etc/ssh/sshd_config.d/70-z.conf ${root}/etc/ssh/extra.conf\nPort 22\n`);
    expect(checkConfig(main, root, drop, undefined).text).not.toContain("staged");
    expect(checkConfig("Port 22\nInclude /etc/ssh/other.d/*.conf\n", root, drop, "/s").covers).toBe(false);
    expect(globComponent("*.conf").test(".x.conf")).toBe(false);
    expect(globComponent("[0-9]?-*.conf").test("60-x.conf")).toBe(true);
  });
});

describe("sessions from /proc", () => {
  const servers: Server[] = [];
  afterAll(() => servers.forEach((s) => s.close()));
  const listen = (port: number, host: string) =>
    new Promise<void>((res, rej) => {
      const s = createServer();
      s.once("error", rej);
      s.listen(port, host, () => res());
      servers.push(s);
    });

  it("parses LISTEN lines of tcp and tcp6 (loopback only, in the range)", () => {
    const tcp = [
      "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
      "   0: 0100007F:5208 00000000:0000 0A 00000000:00000000 00:00000000 00000000   994        0 99957 1 0000000000000000 100 0 0 10 0",
      "   1: 0200007F:5209 00000000:0000 0A 00000000:00000000 00:00000000 00000000   994        0 99958 1 0000000000000000 100 0 0 10 0",
      "   2: 00000000:520A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99959 1 0000000000000000 100 0 0 10 0",
      "   3: 0100007F:520B 0100007F:D4C2 01 00000000:00000000 00:00000000 00000000   994        0 99960 1 0000000000000000 100 0 0 10 0",
      "   4: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99961 1 0000000000000000 100 0 0 10 0",
    ].join("\n");
    expect(parseProcNetTcp(tcp, [{ lo: 21000, hi: 21999 }], true)).toEqual([
      { port: 21000, address: "127.0.0.1", uid: 994, inode: 99957 },
      { port: 21001, address: "127.0.0.1", uid: 994, inode: 99958 },
    ]);
    const tcp6 = [
      "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
      "   0: 00000000000000000000000001000000:5208 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   994        0 99956 1 0000000000000000 100 0 0 10 0",
      "   1: 0000000000000000FFFF00000100007F:5209 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   994        0 99955 1 0000000000000000 100 0 0 10 0",
      "   2: 00000000000000000000000000000000:520A 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   994        0 99954 1 0000000000000000 100 0 0 10 0",
    ].join("\n");
    expect(parseProcNetTcp(tcp6, [{ lo: 21000, hi: 21999 }], true)).toEqual([
      { port: 21000, address: "::1", uid: 994, inode: 99956 },
      { port: 21001, address: "127.0.0.1", uid: 994, inode: 99955 },
    ]);
  });

  it("finds real listeners with their pid; ends the process holding a port and frees it", async () => {
    const p1 = await freePort();
    await listen(p1, "127.0.0.1");
    await listen(p1, "::1");
    const uid = process.getuid!();
    const mine = loopbackListeners([{ lo: p1, hi: p1 }], { uid, withPids: true });
    expect(mine.map((l) => [l.address, l.pid]).sort()).toEqual([
      ["127.0.0.1", process.pid],
      ["::1", process.pid],
    ]);
    const p2 = await freePort();
    const child = spawn(process.execPath, ["-e", `require("net").createServer().listen(${p2}, "127.0.0.1"); setInterval(() => {}, 1000)`], { stdio: "ignore" });
    await waitFor("child listening", () => canConnect(p2));
    const r = await endSessions([p2, p1 + 100000], uid, { graceMs: 2000 });
    expect(r.ended).toEqual([{ port: p2, pid: child.pid }]);
    await waitFor("child gone", () => child.exitCode !== null || child.signalCode !== null);
    expect(child.signalCode).toBe("SIGTERM");
    expect(await canConnect(p2)).toBe(false);
    // Another uid's sockets are never touched.
    expect((await endSessions([p1], uid + 1)).ended).toEqual([]);
    expect(await canConnect(p1)).toBe(true);
  });
});

describe("sshd's log", () => {
  it("parses Accepted publickey lines as OpenSSH 9.2 writes them", () => {
    expect(parseAccepted("Accepted publickey for mko-exp from 127.0.0.1 port 57332 ssh2: ED25519 SHA256:8Q8f0pyAIDYy44cRehXrcIxtZs4y81LMKk5JlSDyXDQ")).toEqual({
      user: "mko-exp", address: "127.0.0.1", port: 57332, keyType: "ED25519", fingerprint: "SHA256:8Q8f0pyAIDYy44cRehXrcIxtZs4y81LMKk5JlSDyXDQ",
    });
    // A -E file's lines end in CR LF.
    expect(parseAccepted("Accepted publickey for a from ::1 port 1 ssh2: ED25519 SHA256:8Q8f0pyAIDYy44cRehXrcIxtZs4y81LMKk5JlSDyXDQ\r")?.address).toBe("::1");
    // Only the whole line, as sshd writes it: text a client chose (a preauth disconnect reason),
    // anything before or after it, is not a login (issue 19).
    for (const forged of [
      "Received disconnect from 127.0.0.1 port 46908:11: Accepted publickey for a from ::1 port 1 ssh2: ED25519 SHA256:8Q8f0pyAIDYy44cRehXrcIxtZs4y81LMKk5JlSDyXDQ [preauth]",
      "Nov 30 sshd[1]: Accepted publickey for a from ::1 port 1 ssh2: ED25519 SHA256:8Q8f0pyAIDYy44cRehXrcIxtZs4y81LMKk5JlSDyXDQ",
      "Accepted publickey for a from ::1 port 1 ssh2: ED25519 SHA256:8Q8f0pyAIDYy44cRehXrcIxtZs4y81LMKk5JlSDyXDQ ID x",
    ]) expect(parseAccepted(forged), forged).toBeUndefined();
    expect(parseAccepted("Failed publickey for a from ::1 port 1 ssh2: ED25519 SHA256:8Q8f0pyAIDYy44cRehXrcIxtZs4y81LMKk5JlSDyXDQ")).toBeUndefined();
  });

  it("follows a file from its end, across truncation and rotation", async () => {
    const f = join(dir, "auth.log");
    writeFileSync(f, "old line\n");
    const got: string[] = [];
    const follower = followFile(f, (l) => got.push(l), { intervalMs: 20 });
    try {
      appendFileSync(f, "one\ntw");
      await waitFor("one", () => got.includes("one"), 2000, 10);
      appendFileSync(f, "o\n");
      await waitFor("two", () => got.includes("two"), 2000, 10);
      writeFileSync(f, "after truncate\n");
      await waitFor("truncate", () => got.includes("after truncate"), 2000, 10);
      renameSync(f, `${f}.1`);
      writeFileSync(f, "rotated\n");
      await waitFor("rotated", () => got.includes("rotated"), 2000, 10);
      expect(got).toEqual(["one", "two", "after truncate", "rotated"]);
    } finally {
      follower.stop();
    }
  });
});
