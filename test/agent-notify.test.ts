/**
 * The agent under a NOTIFY flood (issue 19, item 13): any role that may NOTIFY on
 * `mkoverlay_changes` could make the agent queue one full re-read per 20 ms burst. With a real
 * PostgreSQL and the agent in this process (its registry calls counted, a full read made slow
 * as on a big fleet), a flood costs back-to-back re-reads at worst and none once it stops.
 */
import { join } from "node:path";
import pg from "pg";
import { afterAll, expect, it } from "vitest";
import { Agent } from "../src/bastion/agent.js";
import { loadFleet } from "../src/config/load.js";
import { openRegistry } from "../src/registry/open.js";
import type { Registry } from "../src/registry/types.js";
import { need, requires } from "./helpers/capability.js";
import { postgresForTests } from "./helpers/postgres.js";
import { readPub, removeDir, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const { server: pgServer } = await postgresForTests();
const dir = tempDir("mko-agent-notify-");
afterAll(async () => {
  await pgServer?.stop();
  removeDir(dir);
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

requires(need(pgServer, "PostgreSQL (scripts/ensure-postgres.sh)"))("bastion agent: a NOTIFY flood", () => {
  it("keeps at most one re-read pending: the flood costs back-to-back reads, and nothing once it stops", async () => {
    const url = await pgServer!.createDatabase();
    await (await openRegistry(url)).close();
    const cfg = writeFleet(dir, { lo: { host: "127.0.0.1", user: "nobody", hostKeys: [readPub(sshKeygen(dir, "hk"))] } }, { registry: url });
    const fleet = await loadFleet(cfg);
    let reads = 0;
    const open = async (loc: string): Promise<Registry> => {
      const r = await openRegistry(loc);
      const list = r.list.bind(r);
      // A full read of a large fleet takes a while: 200 ms here.
      r.list = async () => {
        reads += 1;
        await sleep(200);
        return list();
      };
      return r;
    };
    const lines: string[] = [];
    const agent = new Agent({ fleet, bastion: fleet.bastions.get("lo")!, stateDir: join(dir, "state"), registry: url, openRegistry: open, tunnelUid: 65534, resyncMs: 600_000, authLog: "none", log: (_l, m) => lines.push(m) });
    await agent.start();
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    try {
      for (let i = 0; i < 100 && !lines.some((l) => /in sync/.test(l)); i++) await sleep(50);
      expect(lines.join("\n")).toMatch(/in sync: 0 key/);
      const before = reads;
      // 2 s of notices, each in its own transaction (delivered one by one), '*' and host names.
      const t0 = Date.now();
      let sent = 0;
      while (Date.now() - t0 < 2000) {
        await c.query("SELECT pg_notify('mkoverlay_changes', $1)", [sent % 2 ? "*" : `gw-${sent}`]);
        sent += 1;
      }
      expect(sent).toBeGreaterThan(200);
      await sleep(1000);
      const settled = reads;
      await sleep(2000);
      // Nothing was left queued behind the flood…
      expect(reads).toBe(settled);
      // …and during it the reads ran back to back at most (2 s / 200 ms, plus the one pending).
      expect(reads - before).toBeLessThanOrEqual(Math.ceil((Date.now() - t0 - 3000) / 200) + 3);
    } finally {
      await c.end();
      await agent.stop();
    }
  }, 30_000);
});
