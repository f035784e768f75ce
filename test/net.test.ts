/**
 * The loopback port blocks tests listen on (helpers/net.ts): a block is never shared by two
 * holders, in this process or another, and never contains a port something already listens on.
 */
import { spawnSync } from "node:child_process";
import { createServer, type Server } from "node:net";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { portBlock, type PortBlock } from "./helpers/net.js";
import { removeDir, REPO, tempDir } from "./helpers/workspace.js";

const held: PortBlock[] = [];
const dir = tempDir("mko-net-");
afterAll(() => {
  held.forEach((b) => b.release());
  removeDir(dir);
});

describe("portBlock", () => {
  it("gives out blocks outside the ephemeral range that no other holder has", async () => {
    const [lo] = spawnSync("cat", ["/proc/sys/net/ipv4/ip_local_port_range"], { encoding: "utf8" }).stdout.trim().split(/\s+/).map(Number);
    for (let i = 0; i < 20; i++) held.push(await portBlock(50));
    const starts = held.map((b) => b.lo);
    expect(new Set(starts).size).toBe(starts.length);
    for (const b of held) {
      expect(b.hi - b.lo).toBe(49);
      expect(b.hi).toBeLessThan(lo!);
      for (const o of held) if (o !== b) expect(o.hi < b.lo || o.lo > b.hi).toBe(true);
    }
  });

  it("another process never gets a block this one holds", async () => {
    // The helper as plain JavaScript (Node 20 does not run TypeScript), in a second process.
    const js = join(dir, "net.mjs");
    const b = spawnSync(join(REPO, "node_modules/.bin/esbuild"), [join(REPO, "test/helpers/net.ts"), "--format=esm", "--platform=node", `--outfile=${js}`], { encoding: "utf8" });
    expect(b.status, b.stderr).toBe(0);
    const script = `import { portBlock } from ${JSON.stringify(js)};
      const out = []; for (let i = 0; i < 20; i++) out.push((await portBlock(50)).lo); console.log(JSON.stringify(out));`;
    const r = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8" });
    expect(r.status, r.stderr).toBe(0);
    const theirs = JSON.parse(r.stdout) as number[];
    for (const b of held) expect(theirs).not.toContain(b.lo);
  });

  it("skips ports something already listens on, and ports another holder has", async () => {
    // Two granules nobody else holds: take them, then let go.
    const b = await portBlock(32);
    b.release();
    const area = { lo: b.lo, hi: b.lo + 31 };
    const s: Server = createServer();
    await new Promise<void>((r) => s.listen(b.lo + 3, "127.0.0.1", () => r()));
    try {
      const c = await portBlock(16, area);
      held.push(c);
      expect(c.lo).toBe(b.lo + 16);
      await expect(portBlock(16, area)).rejects.toThrow(/no free block of 16/);
    } finally {
      s.close();
    }
  });
});
