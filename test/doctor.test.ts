/**
 * `registry doctor`: the two ways a killed build can end. Killed after its archive reached the
 * final name → activated; killed before → its port given back (after the grace period only).
 */
import Database from "better-sqlite3";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-doctor-");
afterAll(() => removeDir(dir));

describe("registry doctor", () => {
  writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
  const cli = (args: string[]) => runCli(args, { cwd: dir });
  const build = () => JSON.parse(cli(["--board", "rpi4", "--bastion", "eu", "--json"]).stdout) as { hostname: string; port: number; overlay: string };
  const a = build();
  const b = build();
  // Put both back to where a SIGKILL between the steps would leave them.
  const db = new Database(join(dir, "registry.db"));
  db.prepare("UPDATE devices SET status='pending', updated=? WHERE hostname IN (?, ?)").run(new Date(Date.now() - 3600_000).toISOString(), a.hostname, b.hostname);
  db.close();
  rmSync(b.overlay); // b was killed before its archive got its final name

  it("reports without --fix and changes nothing", () => {
    const r = cli(["registry", "doctor"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`${a.hostname}\\tport ${a.port}\\twould be: overlay was written; device is live`));
    expect(r.stdout).toMatch(new RegExp(`${b.hostname}\\tport ${b.port}\\twould be: build never finished; port given back`));
    expect(cli(["registry", "doctor", "--json"]).stdout).toContain('"fixed":false');
  });

  it("--fix activates a finished build at once, but leaves an unfinished one alone during the grace period", () => {
    const r = cli(["registry", "doctor", "--fix", "--grace", "86400", "--json"]);
    expect(JSON.parse(r.stdout)).toEqual([
      { hostname: a.hostname, port: a.port, action: "activated", fixed: true },
      { hostname: b.hostname, port: b.port, action: "waiting", fixed: false },
    ]);
  });

  it("--fix reclaims the unfinished one after the grace period; the next build gets its port", () => {
    const r = cli(["registry", "doctor", "--fix", "--json"]);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual([{ hostname: b.hostname, port: b.port, action: "reclaimed", fixed: true }]);
    const list = JSON.parse(cli(["registry", "list", "--json"]).stdout) as { hostname: string; status: string }[];
    expect(list).toEqual([expect.objectContaining({ hostname: a.hostname, status: "active" })]);
    expect(cli(["registry", "doctor"]).stdout).toMatch(/healthy/);
    expect(build().port).toBe(b.port);
  });
});
