#!/usr/bin/env node
// Bundles the CLI into dist/: one entry (dist/cli.js) plus a chunk per lazily loaded command.
// A flashing script starts mkoverlay once per device, and loading dozens of files cost more
// than the build itself. Native and optional backends stay external. Used by `make build`
// and by npm's `prepare` (so `npm install -g` from a checkout works).
import { build } from "esbuild";
import { readFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
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
  minifySyntax: true,
  minifyWhitespace: true,
  logLevel: "warning",
  // The version comes from package.json (src/version.ts reads the file when run from source).
  define: { __MKOVERLAY_VERSION__: JSON.stringify(version) },
  // Bundled CommonJS dependencies call require(); give the ESM chunks one.
  banner: { js: "import{createRequire as __mkoCreateRequire}from'node:module';const require=__mkoCreateRequire(import.meta.url);" },
});
