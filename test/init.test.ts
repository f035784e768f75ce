/**
 * `mkoverlay init`: real ssh-keyscan output from a real sshd on 127.0.0.1 pinned as given, the
 * config it writes loaded by every command (a build and verify run on it), every bad flag one
 * message with nothing written, no overwrite without --force, and the questions on a terminal.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { requires, tools } from "./helpers/capability.js";
import { startSshd, type Sshd } from "./helpers/sshd.js";
import { CLI, REPO, removeDir, run, runCli, sshKeygen, TEST_CACHE, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-init-");
let sshd: Sshd;
let scan: string;
let operatorPub: string;
let bastionPub: string;

beforeAll(async () => {
  sshd = await startSshd({ dir: join(dir, "sshd"), authorizedKeys: {} });
  const r = run("ssh-keyscan", ["-p", String(sshd.port), "-t", "ed25519", "127.0.0.1"]);
  expect(r.code, r.stderr).toBe(0);
  scan = r.stdout;
  operatorPub = `${sshKeygen(dir, "operator")}.pub`;
  bastionPub = `${sshKeygen(dir, "other_bastion")}.pub`;
});
afterAll(async () => {
  await sshd?.stop();
  removeDir(dir);
});

function ws(name: string): string {
  const d = join(dir, name);
  spawnSync("mkdir", ["-p", d]);
  return d;
}
const fingerprintOf = (pubFile: string): string => run("ssh-keygen", ["-lf", pubFile]).stdout.split(" ")[1]!;
const noTemp = (d: string) => expect(readdirSync(d).filter((f) => f.includes(".tmp"))).toEqual([]);

describe("init from flags", () => {
  it("pins what ssh-keyscan saw (a non-22 port too), and the config builds and verifies", () => {
    const d = ws("keyscan");
    const r = runCli(["init", "--bastion", `eu=127.0.0.1:${sshd.port}`, "--host-keys", "-", "--operator-key", operatorPub], { cwd: d, input: scan });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe("");
    const file = join(d, "mkoverlay.yaml");
    const text = readFileSync(file, "utf8");
    expect(statSync(file).mode & 0o777).toBe(0o644);
    // The schema line points at this installation's schema, which exists.
    const schema = /^# yaml-language-server: \$schema=(\S+)\n/.exec(text)![1]!;
    expect(schema).toBe(join(REPO, "schema/mkoverlay.schema.json"));
    expect(existsSync(schema)).toBe(true);
    const hostKey = sshd.hostKeyPub.split(" ").slice(0, 2).join(" ");
    expect(text).toContain(`    hostKeys:\n      - ${hostKey}\n`);
    expect(text).toContain(`    port: ${sshd.port}\n`);
    expect(text).toContain(`    - ${readFileSync(operatorPub, "utf8").trim()}\n`);
    // The fingerprint shown is ssh-keygen's for the bastion's key.
    const fp = fingerprintOf(join(sshd.dir, "sshd_host_ed25519_key.pub"));
    expect(r.stderr).toContain(`mkoverlay: pinned for eu (127.0.0.1:${sshd.port}): ${fp} ssh-ed25519\n`);
    expect(text).toContain(`#   ${fp} (ssh-ed25519)`);
    expect(r.stderr).toMatch(/next: mkoverlay --board rpi4 --bastion eu/);
    noTemp(d);
    const b = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: d });
    expect(b.code, b.stderr).toBe(0);
    const v = runCli(["verify", JSON.parse(b.stdout).overlay], { cwd: d });
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect(v.stdout).toMatch(/ok {3}the key is registered to gw-0001/);
  });

  it("a .pub copied from the bastion, named for its bastion; --no-operators; two bastions", () => {
    const d = ws("pubfile");
    const r = runCli(
      ["init", "--bastion", "eu=bastion-eu.example.com", "--bastion", "us=[2001:db8::7]:2222", "--host-key-file", `eu=${bastionPub}`, "--host-key-file", `us=${bastionPub}`, "--no-operators", "--json", "--registry", "fleet.db"],
      { cwd: d },
    );
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j).toEqual({
      file: join(d, "mkoverlay.yaml"),
      bastions: [
        { name: "eu", host: "bastion-eu.example.com", port: 22, hostKeys: [{ key: readFileSync(bastionPub, "utf8").split(" ").slice(0, 2).join(" "), fingerprint: fingerprintOf(bastionPub) }] },
        { name: "us", host: "2001:db8::7", port: 2222, hostKeys: [{ key: expect.stringMatching(/^ssh-ed25519 /), fingerprint: fingerprintOf(bastionPub) }] },
      ],
      operators: null,
      registry: "fleet.db",
      replaced: false,
    });
    expect(readFileSync(join(d, "mkoverlay.yaml"), "utf8")).toMatch(/\noperators: none\n/);
    const b = runCli(["--board", "rpi4", "--bastion", "eu,us"], { cwd: d });
    expect(b.code, b.stderr).toBe(0);
    expect(existsSync(join(d, "fleet.db"))).toBe(true);
  });

  it("ssh-keyscan output for several hosts is matched to the bastions by host", () => {
    const d = ws("multi");
    const other = readFileSync(bastionPub, "utf8").split(" ").slice(0, 2).join(" ");
    const input = `# 127.0.0.1:${sshd.port} SSH-2.0-OpenSSH\n${scan}bastion-us.example.com ${other}\n`;
    const r = runCli(["init", "--bastion", `eu=127.0.0.1:${sshd.port}`, "--bastion", "us=bastion-us.example.com", "--host-keys", "-", "--operator-key", operatorPub], { cwd: d, input });
    expect(r.code, r.stderr).toBe(0);
    const text = readFileSync(join(d, "mkoverlay.yaml"), "utf8");
    expect(text).toMatch(new RegExp(`  us:\\n    host: bastion-us.example.com\\n[\\s\\S]*      - ${other.replace(/[+/]/g, "\\$&")}\\n`));
  });

  it.each([
    [["--bastion", "eu"], "--bastion \"eu\": write NAME=HOST[:PORT], e.g. eu=bastion.example.com"],
    [["--bastion", "EU=host.example.com"], '--bastion "EU=host.example.com": the name "EU" must be 1-32'],
    [["--bastion", "eu=bad_host!"], '--bastion "eu=bad_host!": the host "bad_host!"'],
    [["--bastion", "eu=host.example.com:99999"], "port 99999 is not 1-65535"],
    [["--bastion", "eu=host.example.com", "--host-keys", "-", "--operator-key", "op.pub", "--ssh-ports", "22000-21000"], "--ssh-ports: ports.ssh: \"22000-21000\" is reversed (write 21000-22000)"],
    [["--bastion", "eu=host.example.com", "--host-keys", "-", "--operator-key", "operator"], "(this is a private key: give the .pub file)"],
    [["--bastion", "eu=host.example.com", "--host-keys", "-", "--operator-key", "op.pub", "--registry", "postgres://u:secret@db/fleet"], "--registry: no password in the URL"],
    [["--bastion", "eu=host.example.com", "--host-keys", "-", "--operator-ca", "op.pub"], "--operator-ca needs --principal NAME"],
    [["--bastion", "eu=host.example.com", "--host-keys", "-"], "who may log in to the gateways? give --operator-key FILE"],
  ])("%j: one message naming the flag, nothing written", (args, message) => {
    const d = ws(`bad-${Math.random().toString(36).slice(2, 8)}`);
    writeFileSync(join(d, "op.pub"), readFileSync(operatorPub));
    writeFileSync(join(d, "operator"), readFileSync(operatorPub.replace(/\.pub$/, "")));
    const r = runCli(["init", ...args], { cwd: d, input: "host.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB\n" });
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toContain(message);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(readdirSync(d).sort()).toEqual(["op.pub", "operator"]);
  });

  it("a bastion with no pinned key: says how to get one, and that init never fetches it", () => {
    const d = ws("nokey");
    const r = runCli(["init", "--bastion", "eu=bastion.example.com:2222", "--operator-key", operatorPub], { cwd: d });
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(
      "mkoverlay: error: bastion eu ([bastion.example.com]:2222) has no pinned host key\n" +
        "mkoverlay: hint: pin each bastion's key: ssh-keyscan -t ed25519 -p 2222 bastion.example.com | mkoverlay init … --host-keys -, or --host-key-file NAME=FILE with the bastion's /etc/ssh/ssh_host_ed25519_key.pub; mkoverlay never fetches a key by itself\n",
    );
    expect(readdirSync(d)).toEqual([]);
  });

  it("keys for no bastion, and broken lines, are reported with their line", () => {
    const d = ws("badlines");
    const input = `${scan}elsewhere.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB\n127.0.0.1 ssh-ed25519 AAAA-broken\n`;
    const r = runCli(["init", "--bastion", `eu=127.0.0.1:${sshd.port}`, "--host-keys", "-", "--operator-key", operatorPub], { cwd: d, input });
    expect(r.code).toBe(2);
    const n = scan.split("\n").filter(Boolean).length;
    expect(r.stderr).toContain(`mkoverlay: error: --host-keys (stdin):${n + 1}: a key for elsewhere.example.com, which is no bastion given (eu=[127.0.0.1]:${sshd.port})\n`);
    expect(r.stderr).toContain(`mkoverlay: error: --host-keys (stdin):${n + 2}: not a host key line`);
    expect(readdirSync(d)).toEqual([]);
  });

  it("never replaces a file without --force; --force replaces it atomically", () => {
    const d = ws("force");
    writeFileSync(join(d, "mkoverlay.yaml"), "# mine\n");
    const args = ["init", "--bastion", `eu=127.0.0.1:${sshd.port}`, "--host-keys", "-", "--operator-key", operatorPub];
    const r = runCli(args, { cwd: d, input: scan });
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`mkoverlay: error: ${join(d, "mkoverlay.yaml")}: already exists\nmkoverlay: hint: use --force to replace it, or --config FILE to write another\n`);
    expect(readFileSync(join(d, "mkoverlay.yaml"), "utf8")).toBe("# mine\n");
    const f = runCli([...args, "--force", "--json"], { cwd: d, input: scan });
    expect(f.code, f.stderr).toBe(0);
    expect(JSON.parse(f.stdout).replaced).toBe(true);
    expect(readFileSync(join(d, "mkoverlay.yaml"), "utf8")).toMatch(/^# yaml-language-server/);
    noTemp(d);
  });

  it("--config FILE (and $MKOVERLAY_CONFIG) say where to write", () => {
    const d = ws("where");
    const args = ["--bastion", `eu=127.0.0.1:${sshd.port}`, "--host-keys", "-", "--no-operators"];
    expect(runCli(["init", ...args, "--config", "site-a.yaml"], { cwd: d, input: scan }).code).toBe(0);
    expect(runCli(["init", ...args], { cwd: d, input: scan, env: { MKOVERLAY_CONFIG: join(d, "site-b.yaml") } }).code).toBe(0);
    expect(readdirSync(d).sort()).toEqual(["site-a.yaml", "site-b.yaml"]);
    const r = runCli(["--config", "site-a.yaml", "--board", "rpi4", "--bastion", "eu", "-q"], { cwd: d });
    expect(r.code, r.stderr).toBe(0);
  });

  it("without flags and without a terminal: an error at once, no question asked", () => {
    const d = ws("notty");
    const r = runCli(["init"], { cwd: d });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^mkoverlay: error: init: name at least one bastion: --bastion NAME=HOST\[:PORT\]\n/);
    expect(readdirSync(d)).toEqual([]);
  });
});

requires(tools("tmux"))("init on a terminal (tmux)", () => {
  it("asks, checks each answer, pins a pasted key and writes a config that builds", async () => {
    const d = ws("tty");
    const sock = `mko-init-${process.pid}`;
    const t = (...a: string[]) => spawnSync("tmux", ["-L", sock, ...a], { encoding: "utf8" });
    const key = sshd.hostKeyPub.split(" ").slice(0, 2).join(" ");
    t("new-session", "-d", "-x", "200", "-y", "50", `cd ${d} && env HOME=${d} MKOVERLAY_CACHE=${TEST_CACHE} MKOVERLAY_CONFIG= ${process.execPath} ${CLI} init; echo EXIT=$?; sleep 60`);
    const pane = () => t("capture-pane", "-p", "-J", "-t", "0").stdout;
    const waitFor = async (re: RegExp) => {
      const end = Date.now() + 20_000;
      while (!re.test(pane())) {
        if (Date.now() > end) throw new Error(`no ${re} in:\n${pane()}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    const type = async (prompt: RegExp, text: string) => {
      await waitFor(prompt);
      t("send-keys", "-t", "0", "-l", text);
      t("send-keys", "-t", "0", "Enter");
    };
    try {
      await type(/Bastion name \(used as --bastion NAME\) \[eu\]: $/m, "");
      await type(/Its public host name or IP .*: $/m, "bad_host!");
      await waitFor(/the host "bad_host!"/);
      await type(/Bastion name \(used as --bastion NAME\) \[eu\]: $/m, "eu");
      await type(/Its public host name or IP .*: $/m, `127.0.0.1:${sshd.port}`);
      await waitFor(/mkoverlay does not fetch it/);
      await type(/^>: $/m, key);
      await waitFor(/pinned SHA256:/);
      await type(/^>: $/m, "");
      await type(/Another bastion\? \(y\/N\) \[n\]: $/m, "");
      await type(/Operators' public key file\(s\).*: $/m, operatorPub);
      await waitFor(/EXIT=\d+/);
      expect(pane()).toMatch(/EXIT=0/);
    } finally {
      t("kill-server");
    }
    const text = readFileSync(join(d, "mkoverlay.yaml"), "utf8");
    expect(text).toContain(`      - ${key}\n`);
    expect(runCli(["--board", "rpi4", "--bastion", "eu", "-q"], { cwd: d }).code).toBe(0);
  });
});
