/**
 * The bastion's dedicated tunnel sshd (src/bastion/tunnel-sshd.ts, issue 20) on the OpenSSH
 * versions bastions run: the system's 9.2 and bookworm-backports' 10.x (scripts/ensure-openssh10.sh;
 * required in CI). Real sshds on 127.0.0.1, real `ssh` clients, real keys command.
 *
 * - The renderer's config passes `sshd -t` on each version, and options a version does not know
 *   are not written for it.
 * - Today's bastion (one sshd, mkoverlay's Match drop-in): on 10.x revoked devices retrying from
 *   the shared address lock out a healthy device and an administrator (PerSourcePenalties); on
 *   9.2 they do not.
 * - The tunnel sshd + the admin's own sshd (default config): on every version, with 10 revoked
 *   devices retrying, the healthy device gets its tunnel at each attempt and the admin always logs in.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { renderDropin } from "../src/bastion/dropin.js";
import { KEYS_COMMAND } from "../src/bastion/keys-command.js";
import { fileNameFor } from "../src/bastion/keystore.js";
import { parseSshdVersion, renderTunnelSshdConfig, renderTunnelSshdUnit, type TunnelSshdInput } from "../src/bastion/tunnel-sshd.js";
import type { Bastion, Fleet } from "../src/config/fleet.js";
import { itRequires, need, requires, root } from "./helpers/capability.js";
import { secureRoot } from "./helpers/bastion.js";
import { sharedAddress } from "./helpers/shared-address.js";
import { ensureUser, freePort } from "./helpers/sshd.js";
import { runSshdVersion, sshdTest, sshdVersions, systemSshd, type SshdBinary } from "./helpers/sshd10.js";
import { readPub, removeDir, run, sshKeygen, tempDir } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-tsshd-t";
const KEYS_USER = "mkoverlay-keys";

const bastion: Bastion = { name: "lo", host: "127.0.0.1", port: 2222, user: TUNNEL_USER, hostKeys: [], from: undefined, expiry: undefined, jumpUser: undefined };
const fleet: Fleet = {
  file: "f.yaml",
  registry: "r.db",
  hostnameTemplate: "gw-{seq}",
  ports: { ssh: { lo: 21000, hi: 21999 }, services: { lo: 22000, hi: 22999 } },
  bastions: new Map([["lo", bastion]]),
  forwards: [],
  operators: undefined,
};

const dirs: string[] = [];
afterAll(() => {
  if (!process.env.KEEP) for (const d of dirs) removeDir(d);
});

const versions = sshdVersions();
const ten = versions.find((v) => v.major >= 10);

function input(bin: SshdBinary, dir: string, over: Partial<TunnelSshdInput> = {}): TunnelSshdInput {
  return {
    fleet,
    bastion,
    version: { major: bin.major, minor: bin.minor },
    hostKeys: [join(dir, "host_ed25519")],
    pidFile: join(dir, "tunnel.pid"),
    paths: { keysCommand: join(dir, "authorized-keys"), keysDir: join(dir, "keys"), keysUser: KEYS_USER },
    ...over,
  };
}

describe("the tunnel sshd's config", () => {
  const dir = tempDir("mko-tsshd-");
  dirs.push(dir);
  beforeAll(() => {
    sshKeygen(dir, "host_ed25519");
    chmodSync(join(dir, "host_ed25519"), 0o600);
  });

  it("parses sshd -V of both builds", () => {
    expect(parseSshdVersion("OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.19 27 Jan 2026")).toEqual({ major: 9, minor: 2 });
    expect(parseSshdVersion("OpenSSH_10.0p2 Debian-7~bpo12+1, OpenSSL 3.0.19 27 Jan 2026")).toEqual({ major: 10, minor: 0 });
    expect(() => parseSshdVersion("Dropbear v2022.83")).toThrow(/not an OpenSSH version string/);
    for (const v of versions) expect(parseSshdVersion(spawnSync(v.sshd, ["-V"], { encoding: "utf8" }).stderr)).toEqual({ major: v.major, minor: v.minor });
  });

  it.each(versions.map((v) => [v.version, v] as const))("passes sshd -t on OpenSSH %s, with penalties off only where the keyword exists", (_, bin) => {
    const text = renderTunnelSshdConfig(input(bin, dir));
    const file = join(dir, `tunnel-${bin.version}.conf`);
    writeFileSync(file, text);
    const t = sshdTest(bin, file);
    expect(t.stderr).toBe("");
    expect(t.ok).toBe(true);
    expect(text).toMatch(/^Port 2222$/m);
    expect(text).toMatch(/^Match User mko-tsshd-t$/m);
    expect(text).toMatch(/^PerSourceMaxStartups none$/m);
    const eff = spawnSync(bin.sshd, [...bin.args, "-T", "-f", file, "-C", `user=${TUNNEL_USER},host=gw,addr=127.0.0.1`], { encoding: "utf8" }).stdout;
    expect(eff).toMatch(/^maxstartups 100:30:1000$/m);
    expect(eff).toMatch(/^authorizedkeyscommand .*authorized-keys .*\/keys %f$/m);
    expect(eff).toMatch(/^allowusers mko-tsshd-t$/m);
    if (bin.major >= 10 || (bin.major === 9 && bin.minor >= 8)) {
      expect(text).toMatch(/^PerSourcePenalties authfail:0s noauth:0s grace-exceeded:0s$/m);
      expect(eff).toMatch(/^persourcepenalties crash:90 authfail:0 noauth:0 grace-exceeded:0 /m);
    } else {
      expect(text).not.toMatch(/^PerSource(Penalties|PenaltyExemptList)/m);
    }
  });

  itRequires(need(ten, "OpenSSH 10.x (scripts/ensure-openssh10.sh)"))("the config written for 10.x is refused by 9.2 (the version decides what is written)", () => {
    const file = join(dir, "ten-on-nine.conf");
    writeFileSync(file, renderTunnelSshdConfig(input(ten!, dir, { sizing: { penaltyExempt: ["198.51.100.0/24"] } })));
    expect(sshdTest(ten!, file).ok).toBe(true);
    const t = sshdTest(systemSshd(), file);
    expect(t.ok).toBe(false);
    expect(t.stderr).toMatch(/PerSourcePenalt/);
  });

  it("refuses the administrators' port 22 and unsafe tokens, naming the key to change", () => {
    const bin = systemSshd();
    expect(() => renderTunnelSshdConfig(input(bin, dir, { bastion: { ...bastion, port: 22 } }))).toThrow(/cannot listen on port 22, the administrators' sshd's; set bastions\.lo\.port/);
    expect(() => renderTunnelSshdConfig(input(bin, dir, { hostKeys: ["/etc/ssh/key with space"] }))).toThrow(/HostKey "\/etc\/ssh\/key with space"/);
    expect(() => renderTunnelSshdConfig(input(bin, dir, { sizing: { maxStartups: "lots" } }))).toThrow(/MaxStartups "lots"/);
  });

  it("its unit passes systemd-analyze verify and never removes the admin sshd's /run/sshd", () => {
    const text = renderTunnelSshdUnit();
    expect(text).toMatch(/^RuntimeDirectoryPreserve=yes$/m);
    expect(text).toMatch(/^After=mkoverlay-bastion@%i\.service$/m);
    expect(text).toMatch(/^ExecStart=\/usr\/sbin\/sshd -D -f \/etc\/mkoverlay\/bastion\/%i\/sshd_config$/m);
    const udir = join(dir, "units");
    mkdirSync(udir, { recursive: true });
    writeFileSync(join(udir, "mkoverlay-tunnel-sshd@.service"), text);
    copyFileSync(join(udir, "mkoverlay-tunnel-sshd@.service"), join(udir, "mkoverlay-tunnel-sshd@eu.service"));
    const r = spawnSync("systemd-analyze", ["verify", "--man=no", join(udir, "mkoverlay-tunnel-sshd@eu.service")], { encoding: "utf8" });
    if (r.error) throw r.error;
    // The agent unit it wants is not installed here; anything else is a defect of the unit.
    const problems = r.stderr.split("\n").filter((l) => l.trim() && !/mkoverlay-bastion@eu\.service/.test(l));
    expect(problems).toEqual([]);
  });
});

/**
 * A bastion on 127.0.0.1 as the tests need it: keys command and key directory under a root sshd
 * trusts, one healthy device key in it, ten revoked keys not in it, an admin key for root.
 */
interface Lab {
  root: string;
  keysCommand: string;
  keysDir: string;
  healthyKey: string;
  healthyListen: number;
  revokedKeys: string[];
  adminKey: string;
  adminKeysDir: string;
  hostKey: string;
}

function makeLab(): Lab {
  ensureUser(TUNNEL_USER);
  ensureUser(KEYS_USER);
  const root = secureRoot();
  dirs.push(root);
  const keysCommand = join(root, "authorized-keys");
  writeFileSync(keysCommand, KEYS_COMMAND, { mode: 0o755 });
  chmodSync(keysCommand, 0o755);
  const keysDir = join(root, "keys");
  mkdirSync(keysDir, { mode: 0o711 });
  chmodSync(keysDir, 0o711);
  const clients = join(root, "clients");
  mkdirSync(clients, { mode: 0o700 });
  const hostKey = sshKeygen(root, "host_ed25519");
  chmodSync(hostKey, 0o600);
  const healthyKey = sshKeygen(clients, "healthy");
  return { root, keysCommand, keysDir, healthyKey, healthyListen: 0, revokedKeys: Array.from({ length: 10 }, (_, i) => sshKeygen(clients, `revoked${i}`)), adminKey: sshKeygen(clients, "admin"), adminKeysDir: join(root, "admin-keys"), hostKey };
}

async function acceptHealthy(lab: Lab): Promise<void> {
  lab.healthyListen = await freePort();
  const fp = run("ssh-keygen", ["-l", "-E", "sha256", "-f", `${lab.healthyKey}.pub`]).stdout.split(" ")[1]!;
  writeFileSync(join(lab.keysDir, fileNameFor(fp)), `restrict,port-forwarding,command="/sbin/nologin",permitlisten="localhost:${lab.healthyListen}" ${readPub(lab.healthyKey)}\n`, { mode: 0o644 });
  mkdirSync(lab.adminKeysDir, { recursive: true, mode: 0o755 });
  writeFileSync(join(lab.adminKeysDir, "root"), `${readPub(lab.adminKey)}\n`, { mode: 0o644 });
}

/** An sshd with the administrators' usual settings (sshd's defaults: penalties, MaxStartups) and, optionally, mkoverlay's drop-in at its end. */
function adminConfig(lab: Lab, port: number, name: string, dropin: boolean): string {
  const file = join(lab.root, `${name}.conf`);
  writeFileSync(
    file,
    [
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${lab.hostKey}`,
      `PidFile ${join(lab.root, `${name}.pid`)}`,
      `AuthorizedKeysFile ${lab.adminKeysDir}/%u`,
      "UsePAM no",
      "KbdInteractiveAuthentication no",
      "PermitRootLogin prohibit-password",
      "LogLevel VERBOSE",
      dropin ? renderDropin(fleet, bastion, { keysCommand: lab.keysCommand, keysDir: lab.keysDir, keysUser: KEYS_USER }) : "",
      "",
    ].join("\n"),
  );
  return file;
}

requires(root)("a shared source address: revoked devices retrying, a healthy device and an admin", () => {
  let lab: Lab;
  beforeAll(async () => {
    lab = makeLab();
    await acceptHealthy(lab);
  });

  const common = (tunnelPort: number, adminPort: number, revoked: number) => ({
    tunnelPort,
    tunnelUser: TUNNEL_USER,
    revokedKeys: lab.revokedKeys.slice(0, revoked),
    // Devices on a 10 s RestartSec, compressed 5×.
    revokedEveryMs: 2000,
    healthyKey: lab.healthyKey,
    healthyListen: lab.healthyListen,
    adminPort,
    adminUser: "root",
    adminKey: lab.adminKey,
    warmupMs: 3000,
    tries: 5,
    everyMs: 2000,
  });

  it.each(versions.map((v) => [v.version, v] as const))(
    "today's bastion (one sshd with the Match drop-in) on OpenSSH %s: locked out by penalties on 10.x, clean before 9.8",
    async (_, bin) => {
      const port = await freePort();
      const config = adminConfig(lab, port, `single-${bin.version}`, true);
      expect(sshdTest(bin, config).stderr).toBe("");
      const log = join(lab.root, `single-${bin.version}.log`);
      const sshd = await runSshdVersion(bin, config, log, port);
      try {
        // Three revoked devices, as in the issue's reproduction (more would also hit 9.2's default
        // MaxStartups 10:30:100 on this loaded machine: a different refusal, not this test's).
        const r = await sharedAddress(common(port, port, 3));
        const refused = [...r.healthy, ...r.admin].filter((x) => !x.ok);
        if (bin.major >= 10) {
          // Both the healthy device and the administrator are refused at some attempts ...
          expect(r.healthy.some((x) => !x.ok), JSON.stringify(r.healthy)).toBe(true);
          expect(r.admin.some((x) => !x.ok), JSON.stringify(r.admin)).toBe(true);
          // ... because of the penalty on the shared address, as sshd says.
          expect(readFileSync(log, "utf8")).toMatch(/drop connection .* penalty: failed authentication/);
        } else {
          expect(refused, JSON.stringify(refused)).toEqual([]);
        }
      } finally {
        await sshd.stop();
      }
    },
    90_000,
  );

  it.each(versions.map((v) => [v.version, v] as const))(
    "the tunnel sshd + the admin's own sshd on OpenSSH %s: the healthy device gets its tunnel at every attempt, the admin always logs in",
    async (_, bin) => {
      const tunnelPort = await freePort();
      const adminPort = await freePort();
      const tdir = join(lab.root, `t-${bin.version}`);
      mkdirSync(tdir, { recursive: true });
      const tconf = join(tdir, "sshd_config");
      writeFileSync(
        tconf,
        renderTunnelSshdConfig({
          fleet,
          bastion,
          version: { major: bin.major, minor: bin.minor },
          port: tunnelPort,
          listen: ["127.0.0.1"],
          hostKeys: [lab.hostKey],
          pidFile: join(tdir, "sshd.pid"),
          paths: { keysCommand: lab.keysCommand, keysDir: lab.keysDir, keysUser: KEYS_USER },
        }),
      );
      expect(sshdTest(bin, tconf).stderr).toBe("");
      const aconf = adminConfig(lab, adminPort, `admin-${bin.version}`, false);
      const tlog = join(tdir, "sshd.log");
      const tunnel = await runSshdVersion(bin, tconf, tlog, tunnelPort);
      const admin = await runSshdVersion(bin, aconf, join(lab.root, `admin-${bin.version}.log`), adminPort);
      try {
        const r = await sharedAddress(common(tunnelPort, adminPort, 10));
        expect(r.healthy.filter((x) => !x.ok), JSON.stringify(r.healthy)).toEqual([]);
        expect(r.admin.filter((x) => !x.ok), JSON.stringify(r.admin)).toEqual([]);
        // The revoked devices did reach this sshd and were refused, without any penalty.
        expect(r.revokedAttempts).toBeGreaterThanOrEqual(30);
        const log = readFileSync(tlog, "utf8");
        expect(log).not.toMatch(/penalty/);
        // The healthy device's tunnel came up at each attempt well within its unit's 10 s retry.
        expect(Math.max(...r.healthy.map((x) => x.ms))).toBeLessThan(8000);
      } finally {
        await tunnel.stop();
        await admin.stop();
      }
    },
    90_000,
  );
});

