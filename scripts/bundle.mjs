#!/usr/bin/env node
// Bundles the CLI into dist/: one entry (dist/cli.js) plus a chunk per lazily loaded command.
// A flashing script starts mkoverlay once per device, and loading dozens of files cost more
// than the build itself. Native and optional backends stay external. Used by `make build`
// and by npm's `prepare` (so `npm install -g` from a checkout works).
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

// The build id keys the config cache (src/util/cache.ts): a newer mkoverlay must not trust what an
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
  // The CLI, and the programmatic API (`import { build, batch, verify } from "mkoverlay"`); they
  // share chunks, so an API caller's `instanceof UserError` is the class the code throws.
  entryPoints: { cli: join(root, "src/cli/main.ts"), api: join(root, "src/api.ts") },
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
  // The version comes from package.json (src/util/version.ts reads the file when run from source).
  define: { __MKOVERLAY_VERSION__: JSON.stringify(version), __MKOVERLAY_BUILD_ID__: JSON.stringify(buildId()) },
  // Bundled CommonJS dependencies call require(); give the ESM chunks one.
  banner: { js: "import{createRequire as __mkoCreateRequire}from'node:module';const require=__mkoCreateRequire(import.meta.url);" },
});

// The API's type declarations (package.json "types"). src/api.ts spells its public types out,
// so its declarations are its own plus util/errors.ts's: emitted file by file without a full
// type-check (tsc checks everything in `make typecheck`; test/api.test.ts compiles a separate
// package against these). TypeScript is a dev dependency: a packed tarball ships the result.
const ts = (await import("typescript")).default;
for (const name of ["api", "util/errors"]) {
  const src = readFileSync(join(root, "src", `${name}.ts`), "utf8");
  const r = ts.transpileDeclaration(src, {
    fileName: `${name}.ts`,
    compilerOptions: { module: ts.ModuleKind.NodeNext, target: ts.ScriptTarget.ES2022, strict: true },
    reportDiagnostics: true,
  });
  if (r.diagnostics?.length) {
    const msg = r.diagnostics.map((d) => `src/${name}.ts: ${ts.flattenDiagnosticMessageText(d.messageText, "\n")}`).join("\n");
    throw new Error(`declarations for src/${name}.ts need explicit types:\n${msg}`);
  }
  mkdirSync(dirname(join(root, "dist", `${name}.d.ts`)), { recursive: true });
  writeFileSync(join(root, "dist", `${name}.d.ts`), r.outputText);
}
