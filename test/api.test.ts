/**
 * The programmatic API in-process (the packed tarball is tested in packed.test.ts): it prints
 * nothing, never exits, throws UserError for what the caller can fix, and an AbortSignal stops
 * a batch with nothing left pending.
 */
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from "vitest";
import { batch, build, UserError, verify } from "../src/api.js";
import { readPub, removeDir, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-api-");
let config: string;
const written: string[] = [];

beforeAll(() => {
  config = writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } }, { ports: { ssh: "10000-19999", services: "30000-30999" } });
  process.env.MKOVERLAY_CONFIG = "";
  process.env.MKOVERLAY_REGISTRY = "";
});
afterAll(() => removeDir(dir));

// Whatever mkoverlay writes to the process's own streams is a defect of the API.
beforeEach(() => {
  written.length = 0;
  for (const s of [process.stdout, process.stderr]) {
    vi.spyOn(s, "write").mockImplementation((chunk: string | Uint8Array) => {
      written.push(String(chunk));
      return true;
    });
  }
  vi.spyOn(process, "exit").mockImplementation(((code?: number) => {
    throw new Error(`process.exit(${code}) called`);
  }) as never);
});
afterEach(() => {
  vi.restoreAllMocks();
  expect(written).toEqual([]);
});

const pending = (): number => {
  const db = new Database(join(dir, "registry.db"), { readonly: true });
  try {
    return (db.prepare("SELECT count(*) AS n FROM devices WHERE status = 'pending'").get() as { n: number }).n;
  } finally {
    db.close();
  }
};

describe("the API", () => {
  it("build returns the device, verify checks it", async () => {
    const d = await build({ board: "rpi4", bastion: "eu", config, out: join(dir, "out"), attributes: { serial: "SN1" } });
    expect(d).toMatchObject({ hostname: "gw-0001", port: 10000, attributes: { serial: "SN1" }, rebuilt: false });
    expect(d.authorizedKeys.eu).toMatch(/permitlisten="localhost:10000"/);
    const [v] = await verify(d.overlay, { config });
    expect(v).toMatchObject({ ok: true, mode: "registry", hostname: "gw-0001" });
    const [off] = await verify([d.overlay], { offline: true });
    expect(off).toMatchObject({ ok: true, mode: "offline" });
  });

  it("what the caller can fix is a UserError with message, hint and exit code", async () => {
    const e = await build({ board: "toaster", bastion: "eu", config }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(UserError);
    expect(e).toMatchObject({ message: '--board "toaster": unknown board', exitCode: 2, hint: expect.stringMatching(/^known boards: /) });
    const missing = await build({ board: "rpi4", bastion: "eu", config: join(dir, "nope.yaml") }).catch((x: unknown) => x);
    expect(missing).toBeInstanceOf(UserError);
    expect((missing as UserError).message).toMatch(/config file not found/);
    await expect(batch({ board: "rpi4", bastion: "eu", config })).rejects.toThrow(/exactly one of --count N or --hosts FILE/);
  });

  it("a batch reports each device as it goes and its failures without throwing", async () => {
    const seen: string[] = [];
    const r = await batch({ board: "rpi4", bastion: "eu", config, out: join(dir, "out"), count: 5, onDevice: (d) => seen.push(d.hostname) });
    expect(r).toMatchObject({ total: 5, failed: [], stopped: null, notBuilt: { count: 0, hostnames: [] } });
    expect(seen).toEqual(r.built.map((d) => d.hostname));
  });

  it("an AbortSignal stops a batch: what was built stays, nothing is left pending", async () => {
    const ac = new AbortController();
    let n = 0;
    const r = await batch({ board: "rpi4", bastion: "eu", config, out: join(dir, "out"), count: 2000, signal: ac.signal, onDevice: () => ++n === 70 && ac.abort("shift over") });
    expect(r.stopped).toBe("shift over");
    expect(r.built.length).toBeGreaterThanOrEqual(70);
    expect(r.built.length + r.notBuilt.count).toBe(2000);
    expect(pending()).toBe(0);
    // Aborted before it starts: a build reserves nothing.
    const e = await build({ board: "rpi4", bastion: "eu", config, signal: AbortSignal.abort("no"), out: join(dir, "out") }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(UserError);
    expect((e as UserError).exitCode).toBe(130);
    expect(pending()).toBe(0);
  });
});
