// What several benchmarks share (bench/bastion.mjs, tunnel-storm.mjs, pg-growth.mjs).
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { build } from "esbuild";

/** Loopback LISTEN ports from /proc/net/tcp (one read for hundreds of ports). */
export function listening() {
  const out = new Set();
  for (const line of readFileSync("/proc/net/tcp", "utf8").split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[3] === "0A" && f[1]?.startsWith("0100007F:")) out.add(Number.parseInt(f[1].split(":")[1], 16));
  }
  return out;
}

// The helper's capability gate imports vitest's describe/it, which only a test run has: stubbed.
const noVitest = {
  name: "no-vitest",
  setup(b) {
    b.onResolve({ filter: /^vitest$/ }, () => ({ path: "vitest", namespace: "stub" }));
    b.onLoad({ filter: /.*/, namespace: "stub" }, () => ({ contents: "export const describe = () => undefined; export const it = () => undefined;", loader: "js" }));
  },
};

/**
 * The tests' throwaway PostgreSQL server (test/helpers/postgres.ts: Debian's server binaries,
 * its own data directory and port on 127.0.0.1), bundled into bench/work (inside the checkout,
 * so its `import "pg"` finds node_modules); the bundle finds the repository as the helper does.
 */
export async function postgresHelper(root) {
  const dir = join(root, "bench/work");
  mkdirSync(dir, { recursive: true });
  const outfile = join(dir, `pg-helper-${process.pid}.mjs`);
  await build({
    entryPoints: [join(root, "test/helpers/postgres.ts")],
    outfile,
    bundle: true,
    platform: "node",
    format: "esm",
    external: ["pg"],
    plugins: [noVitest],
    logLevel: "warning",
    define: { "import.meta.dirname": JSON.stringify(join(root, "test/helpers")) },
  });
  return import(pathToFileURL(outfile).href);
}
