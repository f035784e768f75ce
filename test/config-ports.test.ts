/**
 * Ports the tunnel user can bind (issue 21): a `ports.ssh`/`ports.services` range reaching below
 * 1024 is refused by the config rules with file:line:col, the key and why (the unprivileged tunnel
 * user's sshd says "remote port forwarding failed for listen port 500"), unless
 * `ports.allowPrivileged` says why the bastions allow it; a range among Linux's default ephemeral
 * ports (32768-60999) is a warning, printed by the commands that hand out ports and by init.
 */
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseFleet } from "../src/config/load.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const PIN = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB bastion";
const config = (ports: string[]) =>
  ["registry: ./r.db", "operators: none", "ports:", ...ports.map((l) => `  ${l}`), "bastions:", "  eu:", "    host: bastion.example.com", `    hostKeys: ["${PIN}"]`, ""].join("\n");
const load = (ports: string[]) => parseFleet(config(ports), "/etc/fleet.yaml");

describe("privileged ports", () => {
  it.each([
    [["ssh: 500-600", "services: 22000-22999"], /^\/etc\/fleet\.yaml:4:8 ports\.ssh: 500-600 reaches below 1024: the tunnel user is not root/],
    [["ssh: 1-1024", "services: 22000-22999"], /:4:8 ports\.ssh: 1-1024 reaches below 1024/],
    [["ssh: 21000-21999", "services: 80-99"], /:5:13 ports\.services: 80-99 reaches below 1024/],
    [["ssh: 1023-2000", "services: 22000-22999"], /:4:8 ports\.ssh: 1023-2000 reaches below 1024.*use ports from 1024 up.*ports\.allowPrivileged/],
  ])("%j is refused with the key and why", async (ports, message) => {
    await expect(load(ports)).rejects.toThrow(message);
  });

  it("1024 and up is fine; ports.allowPrivileged with a reason allows lower ones", async () => {
    expect((await load(["ssh: 1024-2000", "services: 22000-22999"])).ports.ssh).toEqual({ lo: 1024, hi: 2000 });
    const f = await load(["ssh: 500-600", "services: 700-800", 'allowPrivileged: "the bastions set net.ipv4.ip_unprivileged_port_start=0"']);
    expect(f.ports).toEqual({ ssh: { lo: 500, hi: 600 }, services: { lo: 700, hi: 800 } });
    expect(f.warnings).toEqual([]);
    await expect(load(["ssh: 500-600", "services: 22000-22999", 'allowPrivileged: ""'])).rejects.toThrow(/ports\.allowPrivileged: must be at least 1/);
    await expect(load(["ssh: 500-600", "services: 22000-22999", "allowPrivileged: true"])).rejects.toThrow(/ports\.allowPrivileged: expected string, got boolean/);
  });
});

describe("ephemeral ports", () => {
  it.each([
    [["ssh: 32768-32768", "services: 22000-22999"], "ssh"],
    [["ssh: 30000-33000", "services: 22000-22999"], "ssh"],
    [["ssh: 21000-21999", "services: 60999-61100"], "services"],
  ])("%j is a warning with file:line:col and the key, not an error", async (ports, key) => {
    const f = await load(ports);
    expect(f.warnings).toHaveLength(1);
    expect(f.warnings![0]).toMatch(new RegExp(`^/etc/fleet\\.yaml:${key === "ssh" ? "4:8" : "5:13"} ports\\.${key}: \\S+ overlaps Linux's default ephemeral ports 32768-60999`));
  });

  it.each([[["ssh: 21000-21999", "services: 22000-22999"]], [["ssh: 61000-61999", "services: 30000-32767"]]])("%j: no warning", async (ports) => {
    expect((await load(ports)).warnings).toEqual([]);
  });

  describe("on the command line", () => {
    let dir: string;
    beforeAll(() => {
      dir = tempDir("mko-ports-");
    });
    afterAll(() => removeDir(dir));

    it("a build warns (also with --json, on stderr) and builds; so from the cache; init warns when it writes", () => {
      writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } }, { ports: { ssh: "40000-40999", services: "22000-22999" } });
      for (const out of ["a", "b"]) {
        const r = runCli(["--board", "rpi4", "--bastion", "eu", "--json", "--out", join(dir, out)], { cwd: dir });
        expect(r.code, r.stderr).toBe(0);
        expect(JSON.parse(r.stdout)).toMatchObject({ port: out === "a" ? 40000 : 40001 });
        expect(r.stderr).toMatch(/^mkoverlay: warning: \S+mkoverlay\.yaml:\d+:\d+ ports\.ssh: 40000-40999 overlaps Linux's default ephemeral ports/);
      }
      const init = runCli(["init", "--config", join(dir, "new.yaml"), "--bastion", "eu=bastion.example.com", "--host-key-file", join(dir, "bastion.pub"), "--no-operators", "--ssh-ports", "50000-50999"], { cwd: dir });
      expect(init.code, init.stderr).toBe(0);
      expect(init.stderr).toMatch(/mkoverlay: warning: \S+new\.yaml:\d+:\d+ ports\.ssh: 50000-50999 overlaps/);
      const low = runCli(["init", "--config", join(dir, "low.yaml"), "--bastion", "eu=bastion.example.com", "--host-key-file", join(dir, "bastion.pub"), "--no-operators", "--ssh-ports", "500-999"], { cwd: dir });
      expect(low.code).toBe(2);
      expect(low.stderr).toMatch(/--ssh-ports: ports\.ssh: 500-999 reaches below 1024/);
    });
  });
});
