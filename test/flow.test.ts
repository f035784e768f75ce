/**
 * The one device flow (issue 23) where its callers meet it: a batch whose port range runs full
 * stops at once with the reason (issue 21: it used to fail device by device and then say "the
 * others are built"), and the API hands the flow typed requests (factory data is a record, not
 * `KEY=VALUE` strings parsed again).
 */
import Database from "better-sqlite3";
import { existsSync, mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { batch, build } from "../src/api.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-flow-");
afterAll(() => removeDir(dir));
let pub = "";
beforeAll(() => {
  pub = readPub(sshKeygen(dir, "bastion"));
});

/** A fleet of its own whose tunnel port range holds `ports` ports. */
function fleet(name: string, ports: number): string {
  const ws = join(dir, name);
  mkdirSync(ws);
  writeFleet(ws, { eu: { hostKeys: [pub] } }, { ports: { ssh: `21000-${21000 + ports - 1}`, services: "22000-22999" } });
  return ws;
}

const rows = (ws: string): { hostname: string; status: string }[] => {
  const db = new Database(join(ws, "registry.db"), { readonly: true });
  try {
    return db.prepare("SELECT hostname, status FROM devices ORDER BY hostname").all() as { hostname: string; status: string }[];
  } finally {
    db.close();
  }
};

describe("a full port range stops a batch at once", () => {
  it("CLI: the devices that fit are built, the batch stops with the range's message and its hint, one failure line, nothing pending", () => {
    const ws = fleet("cli", 5);
    const t = Date.now();
    const r = runCli(["batch", "--board", "rpi4", "--bastion", "eu", "--count", "300", "-q"], { cwd: ws });
    expect(Date.now() - t).toBeLessThan(20_000);
    expect(r.code).toBe(1);
    const errors = r.stderr.split("\n").filter((l) => l.startsWith("mkoverlay: error:"));
    expect(errors).toEqual([
      "mkoverlay: error: device 6: no free tunnel port left in ports.ssh 21000-21004",
      "mkoverlay: error: no free tunnel port left in ports.ssh 21000-21004: the batch stopped there; 5 of 300 device(s) built and registered (gw-0001 … gw-0005), 294 not built (nothing reserved for them)",
    ]);
    expect(r.stderr).toMatch(/hint: widen ports\.ssh in the config/);
    expect(r.stderr).not.toMatch(/the others are built/);
    expect(rows(ws).map((d) => d.status)).toEqual(["active", "active", "active", "active", "active"]);
    expect(readdirSync(join(ws, "out")).filter((f) => f.endsWith(".overlay.tar.gz"))).toHaveLength(5);
  });

  it("CLI: a range already full builds nothing and says so", () => {
    const ws = fleet("full", 1);
    expect(runCli(["--board", "rpi4", "--bastion", "eu"], { cwd: ws }).code).toBe(0);
    const r = runCli(["batch", "--board", "rpi4", "--bastion", "eu", "--count", "100000", "-q"], { cwd: ws });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("no free tunnel port left in ports.ssh 21000-21000: the batch stopped there; 0 of 100000 device(s) built and registered, 99999 not built (nothing reserved for them)");
    expect(rows(ws)).toHaveLength(1);
  });

  it("API: one failure with the reason, the rest not built, nothing pending", async () => {
    const ws = fleet("api", 3);
    const failures: string[] = [];
    const s = await batch({ board: "rpi4", bastion: ["eu"], count: 200, config: join(ws, "mkoverlay.yaml"), out: join(ws, "out"), onFailure: (f) => failures.push(f.error) });
    expect(s.built).toHaveLength(3);
    expect(failures).toEqual(["no free tunnel port left in ports.ssh 21000-21002"]);
    expect(s.notBuilt.count).toBe(196);
    expect(rows(ws).every((d) => d.status === "active")).toBe(true);
  });
});

describe("the API hands the flow typed requests", () => {
  it("factory data is a record: a name with '=' in it is refused, not split into another name and value", async () => {
    const ws = fleet("typed", 10);
    const config = join(ws, "mkoverlay.yaml");
    await expect(build({ board: "rpi4", bastion: "eu", config, out: join(ws, "out"), attributes: { "serial=SN1": "x" } })).rejects.toThrow(/'serial=SN1' is not a usable name/);
    expect(existsSync(join(ws, "registry.db")) ? rows(ws) : []).toEqual([]);
    const d = await build({ board: "rpi4", bastion: ["eu"], config, out: join(ws, "out"), attributes: { serial: "a=b" } });
    expect(d.attributes).toEqual({ serial: "a=b" });
  });
});
