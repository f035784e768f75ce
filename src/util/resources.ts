/** Files shipped beside the code (boards/, overlays/, schema/), found from the package root. */
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

// The package root: the nearest folder above this file with a package.json. The bundle's
// chunks sit in dist/, one level below it; this file, run from source (tests), in src/util/.
function packageRoot(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  for (let d = here; ; d = dirname(d)) {
    if (existsSync(join(d, "package.json"))) return d;
    if (dirname(d) === d) return join(here, "..");
  }
}
const ROOT = packageRoot();

export function resourceDir(...parts: string[]): string {
  return join(ROOT, ...parts);
}
