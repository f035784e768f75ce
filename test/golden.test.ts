/**
 * Golden files for everything mkoverlay renders: the archive listing (path, mode, owner,
 * content hash) as GNU tar reads it, the per-instance env files, known_hosts, and the
 * bastion lines. Fixed key, fixed epoch, fixed config. `UPDATE_GOLDEN=1` rewrites them;
 * review the diff like code.
 */
import { createHash } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { inCI } from "./helpers/capability.js";
import { extract, removeDir, run, runCli, tempDir } from "./helpers/workspace.js";

const FIX = join(import.meta.dirname, "fixtures");
const GOLD = join(import.meta.dirname, "golden");
const dir = tempDir("mko-golden-");
afterAll(() => removeDir(dir));

function golden(name: string, actual: string): void {
  const file = join(GOLD, name);
  if (process.env.UPDATE_GOLDEN || !existsSync(file)) {
    if (!process.env.UPDATE_GOLDEN && inCI) throw new Error(`golden file ${name} is missing (run UPDATE_GOLDEN=1)`);
    writeFileSync(file, actual);
  }
  expect(actual, `golden ${name} (UPDATE_GOLDEN=1 to accept)`).toBe(readFileSync(file, "utf8"));
}

describe("golden", () => {
  copyFileSync(join(FIX, "fleet.yaml"), join(dir, "mkoverlay.yaml"));
  const r = runCli(["--board", "rpi4", "--bastion", "eu,us", "--host-key", join(FIX, "device_ed25519_key"), "--json"], {
    cwd: dir,
    env: { SOURCE_DATE_EPOCH: "1700000000" },
  });
  const b = JSON.parse(r.stdout || "{}") as { overlay: string; authorizedKeys: Record<string, string>; authorizedKeysFile: string };
  const root = join(dir, "root");

  it("builds", () => expect(r.code, r.stderr).toBe(0));

  it("archive listing", () => {
    const listing = run("tar", ["--numeric-owner", "--full-time", "-tvzf", b.overlay], { env: { TZ: "UTC" } }).stdout;
    mkdirSync(root, { recursive: true });
    extract(b.overlay, root);
    const lines = listing.trim().split("\n").map((l) => {
      const f = l.split(/\s+/);
      const path = f[5]!;
      const rest = f.slice(6).join(" ");
      const hash = f[0]!.startsWith("-") ? createHash("sha256").update(readFileSync(join(root, path))).digest("hex").slice(0, 16) : "";
      return `${f[0]} ${f[1]} ${f[3]} ${f[4]} ${path}${rest ? " " + rest : ""}${hash ? " sha256:" + hash : ""}`;
    });
    golden("overlay-listing.txt", lines.join("\n") + "\n");
  });

  it("bastion lines", () => golden("authorized_keys.txt", readFileSync(b.authorizedKeysFile, "utf8")));
  it("tunnel env files", () => {
    golden("eu.env", readFileSync(join(root, "etc/mkoverlay/tunnels/eu.env"), "utf8"));
    golden("us.env", readFileSync(join(root, "etc/mkoverlay/tunnels/us.env"), "utf8"));
  });
  it("operator access drop-in", () => golden("51-mkoverlay-operators.conf", readFileSync(join(root, "etc/ssh/sshd_config.d/51-mkoverlay-operators.conf"), "utf8")));
  it("known_hosts", () => golden("known_hosts", readFileSync(join(root, "etc/ssh/mkoverlay/known_hosts"), "utf8")));
  it("units", () => {
    for (const u of ["reverse-ssh@.service", "reverse-ssh-monitor.service", "reverse-ssh-monitor.timer"]) {
      golden(u, readFileSync(join(root, "etc/systemd/system", u), "utf8"));
    }
  });
});
