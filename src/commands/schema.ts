/** `mkoverlay schema`: the fleet config's JSON Schema, derived from the validator itself. */
import { fleetJsonSchema } from "../config/schema.js";
import { writeFileAtomic } from "../fsutil.js";
import { out } from "../output.js";

export function schemaText(): string {
  return JSON.stringify(fleetJsonSchema(), null, 2) + "\n";
}

export function schemaCommand(opts: { out?: string }): void {
  if (opts.out) writeFileAtomic(opts.out, schemaText(), 0o644);
  else out(schemaText());
}
