/**
 * Readable stacks from the bundle: the CLI ships as minified chunks with source maps beside
 * them (scripts/bundle.mjs), and a stack printed for a bug or with --debug is mapped back to
 * `src/…ts:line:col` here. Node could do it for every run (--enable-source-maps), but that
 * costs every start ~10 ms; this runs only when a stack is printed.
 */
import { readFileSync } from "node:fs";
import { SourceMap } from "node:module";
import { fileURLToPath } from "node:url";

const cache = new Map<string, SourceMap | null>();

function mapFor(file: string): SourceMap | null {
  let m = cache.get(file);
  if (m === undefined) {
    try {
      m = new SourceMap(JSON.parse(readFileSync(`${file}.map`, "utf8")) as ConstructorParameters<typeof SourceMap>[0]);
    } catch {
      m = null; // not from the bundle (tests run the sources), or no map shipped
    }
    cache.set(file, m);
  }
  return m;
}

/** `at fn (file:///…/dist/chunk-X.js:1:234)` → `at fn (src/registry/core.ts:120:7)`. */
export function readableStack(stack: string): string {
  return stack.replace(/((?:file:\/\/)?\/[^\s():]+\.js):(\d+):(\d+)/g, (whole, url: string, line: string, col: string) => {
    const file = url.startsWith("file://") ? fileURLToPath(url) : url;
    const entry = mapFor(file)?.findEntry(Number(line) - 1, Number(col) - 1);
    if (!entry || !("originalSource" in entry) || !entry.originalSource) return whole;
    const src = entry.originalSource.replace(/^.*?\/(src\/)/, "$1");
    return `${src}:${entry.originalLine + 1}:${entry.originalColumn + 1}`;
  });
}
