/**
 * `ssh-config` and `known-hosts` as real ssh reads them: every Host block parses with
 * `ssh -G` (a bad line in a file operators include breaks every ssh command they run), the
 * ProxyJump form is right for IPv6, IPv4 and DNS bastions on port 22 and other ports, the jump
 * hop is pointed at the same known_hosts file, and that file holds the bastions' pinned keys in
 * the form ssh looks them up by.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-sshcfg-");
const cli = (args: string[]) => runCli(args, { cwd: dir });
const kh = join(dir, "fleet_known_hosts");
const cfgFile = join(dir, "fleet_ssh_config");
const keys: Record<string, string> = {};
const hostOf: Record<string, string> = {};

/** bastion name → [host, port, jumpUser, ProxyJump as written, known_hosts host field, ProxyJump as ssh -G reads it] */
const BASTIONS = {
  v6: ["::1", 2222, "alice", "alice@[::1]:2222", "[::1]:2222", "alice@[::1]:2222"],
  v6port22: ["::1", 22, undefined, "[::1]", "::1", "[::1]"],
  v4: ["127.0.0.1", 2200, undefined, "127.0.0.1:2200", "[127.0.0.1]:2200", "[127.0.0.1]:2200"],
  dns: ["bastion.example.com", 22, "bob", "bob@bastion.example.com", "bastion.example.com", "bob@bastion.example.com"],
} as const;

/** `ssh -G` output as keyword → values. */
function sshG(host: string): Map<string, string[]> {
  const r = run("ssh", ["-G", "-F", cfgFile, host]);
  expect(r.code, r.stderr).toBe(0);
  const m = new Map<string, string[]>();
  for (const line of r.stdout.split("\n")) {
    const [k, ...v] = line.split(" ");
    if (k) m.set(k, [...(m.get(k) ?? []), v.join(" ")]);
  }
  return m;
}

beforeAll(() => {
  const defs: Record<string, { host: string; port: number; jumpUser?: string; hostKeys: string[] }> = {};
  for (const [name, [host, port, jumpUser]] of Object.entries(BASTIONS)) {
    keys[name] = readPub(sshKeygen(dir, `bastion_${name}`));
    defs[name] = { host, port, hostKeys: [keys[name]!], ...(jumpUser ? { jumpUser } : {}) };
  }
  // One more key for dns, as a host CA: kept as @cert-authority.
  keys.ca = readPub(sshKeygen(dir, "host_ca"));
  defs.dns!.hostKeys.push(`@cert-authority ${keys.ca}`);
  writeFleet(dir, defs);
  for (const name of Object.keys(BASTIONS)) {
    const r = cli(["--board", "rpi4", "--bastion", name, "--json"]);
    expect(r.code, r.stderr).toBe(0);
    hostOf[name] = (JSON.parse(r.stdout) as { hostname: string }).hostname;
  }
  const c = cli(["ssh-config", "--known-hosts", kh]);
  expect(c.code, c.stderr).toBe(0);
  writeFileSync(cfgFile, c.stdout);
  const k = cli(["known-hosts"]);
  expect(k.code, k.stderr).toBe(0);
  writeFileSync(kh, k.stdout);
});
afterAll(() => removeDir(dir));

describe("ssh-config parsed by the real ssh (ssh -G)", () => {
  it.each(Object.entries(BASTIONS))("through %s: ProxyJump is what ssh accepts", (name, [, , , written, , read]) => {
    expect(readFileSync(cfgFile, "utf8")).toContain(`Host ${hostOf[name]}\n    HostName localhost\n    Port `);
    expect(readFileSync(cfgFile, "utf8")).toMatch(new RegExp(`^Host ${hostOf[name]}\n(    .*\n)*?    ProxyJump ${written.replace(/[[\]]/g, "\\$&")}\n`, "m"));
    const g = sshG(hostOf[name]!);
    expect(g.get("proxyjump")).toEqual([read]);
    expect(g.get("hostname")).toEqual(["localhost"]);
    expect(g.get("hostkeyalias")).toEqual([hostOf[name]]);
    expect(g.get("stricthostkeychecking")).toEqual(["true"]);
    expect(g.get("userknownhostsfile")).toEqual([kh]);
  });

  it.each([["::1"], ["127.0.0.1"], ["bastion.example.com"]])("the jump hop to %s checks the same file, strictly", (host) => {
    const g = sshG(host);
    expect(g.get("userknownhostsfile")).toEqual([kh]);
    expect(g.get("stricthostkeychecking")).toEqual(["true"]);
  });
});

describe("known-hosts holds the bastions' pinned keys", () => {
  it.each(Object.entries(BASTIONS))("%s: ssh-keygen -F finds its key under the name ssh looks up", (name, [, , , , field]) => {
    const r = run("ssh-keygen", ["-F", field, "-f", kh]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toContain(`${field} ${keys[name]!.split(" ").slice(0, 2).join(" ")}`);
  });

  it("a host CA stays an @cert-authority line", () => {
    const ca = keys.ca!.split(" ").slice(0, 2).join(" ");
    expect(readFileSync(kh, "utf8")).toContain(`\n@cert-authority bastion.example.com ${ca}\n`);
  });

  it("the devices are still there by name", () => {
    for (const h of Object.values(hostOf)) expect(run("ssh-keygen", ["-F", h, "-f", kh]).code).toBe(0);
  });
});
