/**
 * mkoverlay's version, from package.json: the bundle has it built in (scripts/bundle.mjs),
 * and code run from source (the tests) reads the file.
 */
import { readFileSync } from "node:fs";
import { resourceDir } from "./resources.js";

declare const __MKOVERLAY_VERSION__: string | undefined;

function fromPackageJson(): string {
  try {
    return (JSON.parse(readFileSync(resourceDir("package.json"), "utf8")) as { version?: string }).version ?? "0.0.0";
  } catch {
    return "0.0.0";
  }
}

export const VERSION: string = typeof __MKOVERLAY_VERSION__ === "string" ? __MKOVERLAY_VERSION__ : fromPackageJson();
