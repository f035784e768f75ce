/**
 * The architecture, checked: src/ is a stack of layers (docs/ARCHITECTURE.md, "Layers"), and
 * every import — static, dynamic (`import()`), type-only or re-export — goes to the same folder
 * or to a lower layer, and no chain of imports comes back to where it started. A lazy import
 * is still an edge: it only changes when a module loads, not what depends on what.
 */
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { describe, expect, it } from "vitest";

const SRC = join(import.meta.dirname, "..", "src");

/** Lowest first. A module may import its own folder and any folder before it. */
export const LAYERS = ["util", "keys", "config", "registry", "overlay", "image", "fleet", "bastion", "device", "cli", "api"] as const;

function layerOf(file: string, src = SRC): string {
  const rel = relative(src, file);
  const top = rel.split("/")[0]!;
  return rel.includes("/") ? top : top.replace(/\.ts$/, "");
}

function sources(src = SRC): string[] {
  return readdirSync(src, { recursive: true })
    .map(String)
    .filter((f) => f.endsWith(".ts"))
    .map((f) => join(src, f))
    .sort();
}

/** Every relative module a file imports, as absolute .ts paths. */
export function importsOf(file: string): string[] {
  // Comments out first, so a path mentioned in prose is not an edge.
  const text = readFileSync(file, "utf8").replace(/\/\*[\s\S]*?\*\//g, "").replace(/^\s*\/\/.*$/gm, "");
  const out = new Set<string>();
  const re = /(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)(["'])(\.{1,2}\/[^"'\n]+)\1/g;
  for (const m of text.matchAll(re)) {
    const spec = m[2]!;
    out.add(resolve(dirname(file), spec.replace(/\.js$/, ".ts")));
  }
  return [...out];
}

function graph(src = SRC): Map<string, string[]> {
  const g = new Map<string, string[]>();
  for (const f of sources(src)) g.set(f, importsOf(f));
  return g;
}

/** Imports that go from a lower layer to a higher one, as "from -> to". */
function upwardArrows(g: Map<string, string[]>, src = SRC): string[] {
  const rank = (f: string): number => (LAYERS as readonly string[]).indexOf(layerOf(f, src));
  return [...g].flatMap(([f, ts]) => ts.filter((t) => g.has(t) && rank(t) > rank(f)).map((t) => `${relative(src, f)} -> ${relative(src, t)}`));
}

/** Each import cycle once, as a list of src-relative paths. */
function cycles(g: Map<string, string[]>, src = SRC): string[][] {
  const found: string[][] = [];
  const state = new Map<string, 1 | 2>();
  const stack: string[] = [];
  const visit = (f: string): void => {
    state.set(f, 1);
    stack.push(f);
    for (const t of g.get(f) ?? []) {
      if (!g.has(t)) continue;
      if (state.get(t) === 1) found.push(stack.slice(stack.indexOf(t)).concat(t).map((p) => relative(src, p)));
      else if (!state.has(t)) visit(t);
    }
    stack.pop();
    state.set(f, 2);
  };
  for (const f of g.keys()) if (!state.has(f)) visit(f);
  return found;
}

describe("architecture: layers and cycles in src/", () => {
  const g = graph();

  it("every file is in a known layer", () => {
    const unknown = [...g.keys()].map((f) => [relative(SRC, f), layerOf(f)] as const).filter(([, l]) => !(LAYERS as readonly string[]).includes(l));
    expect(unknown).toEqual([]);
  });

  it("every relative import names a file that exists", () => {
    const missing = [...g].flatMap(([f, ts]) => ts.filter((t) => !g.has(t)).map((t) => `${relative(SRC, f)} -> ${relative(SRC, t)}`));
    expect(missing).toEqual([]);
  });

  it("no arrow from a lower layer to a higher one", () => {
    expect(upwardArrows(g)).toEqual([]);
  });

  it("no import cycle, dynamic imports included", () => {
    expect(cycles(g).map((c) => c.join(" -> "))).toEqual([]);
  });

  it("the checker finds what it must: an upward arrow (type-only), and a cycle through a lazy import", () => {
    const src = mkdtempSync(join(tmpdir(), "mko-arch-"));
    try {
      for (const d of ["util", "config", "cli"]) mkdirSync(join(src, d));
      // util (lowest) names a config type: an upward arrow even though it is erased at run time.
      writeFileSync(join(src, "util", "a.ts"), 'import type { C } from "../config/c.js";\nexport type A = C;\n');
      writeFileSync(join(src, "config", "c.ts"), "export type C = number;\n");
      // Two cli modules that need each other, one of them only lazily.
      writeFileSync(join(src, "cli", "x.ts"), 'export async function x() { return (await import("./y.js")).y; }\n');
      writeFileSync(join(src, "cli", "y.ts"), '// import "./nothing.js" in a comment is not an edge\nimport { x } from "./x.js";\nexport const y = x;\n');
      const g = graph(src);
      expect(upwardArrows(g, src)).toEqual(["util/a.ts -> config/c.ts"]);
      expect(cycles(g, src).map((c) => c.join(" -> "))).toEqual(["cli/x.ts -> cli/y.ts -> cli/x.ts"]);
    } finally {
      rmSync(src, { recursive: true, force: true });
    }
  });
});
