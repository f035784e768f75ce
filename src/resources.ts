/** Files shipped beside the code (boards/, overlays/, schema/), found from the package root. */
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

// dist/resources.js (built) and src/resources.ts (tests) both sit one level below the root.
const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

export function resourceDir(...parts: string[]): string {
  return join(ROOT, ...parts);
}
