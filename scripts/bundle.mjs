#!/usr/bin/env node
// Bundles the CLI into dist/: one entry (dist/cli.js) plus a chunk per lazily loaded command.
// A flashing script starts mkoverlay once per device, and loading dozens of files cost more
// than the build itself. Native and optional backends stay external. Used by `make build`
// and by npm's `prepare` (so `npm install -g` from a checkout works).
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, rmSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

// The build id keys the config cache (src/cache.ts): a newer mkoverlay must not trust what an
// older one validated. It hashes what decides validation - the sources, the locked dependency
// versions (yaml, zod) and this script - here, once, so start-up never hashes anything.
function buildId() {
  const h = createHash("sha256");
  const files = readdirSync(join(root, "src"), { recursive: true })
    .map((f) => join(root, "src", String(f)))
    .filter((f) => f.endsWith(".ts"))
    .concat(["package.json", "package-lock.json", "scripts/bundle.mjs"].map((f) => join(root, f)))
    .sort();
  for (const f of files) {
    let data;
    try {
      data = readFileSync(f);
    } catch {
      continue; // no lock file in a packed tarball: the version in package.json still counts
    }
    h.update(relative(root, f)).update("\0").update(String(data.length)).update("\0").update(data);
  }
  return h.digest("hex").slice(0, 16);
}
const { version } = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
rmSync(join(root, "dist"), { recursive: true, force: true });
await build({
  entryPoints: [join(root, "src/cli.ts")],
  outdir: join(root, "dist"),
  bundle: true,
  splitting: true,
  format: "esm",
  platform: "node",
  target: "node20",
  external: ["better-sqlite3", "pg"],
  sourcemap: true,
  minifySyntax: true,
  minifyWhitespace: true,
  logLevel: "warning",
  // The version comes from package.json (src/version.ts reads the file when run from source).
  define: { __MKOVERLAY_VERSION__: JSON.stringify(version), __MKOVERLAY_BUILD_ID__: JSON.stringify(buildId()) },
  // Bundled CommonJS dependencies call require(); give the ESM chunks one.
  banner: { js: "import{createRequire as __mkoCreateRequire}from'node:module';const require=__mkoCreateRequire(import.meta.url);" },
});
