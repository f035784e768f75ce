/** `mkoverlay schema [fleet|board|os]`: JSON Schemas derived from the validators themselves. */
import { z } from "zod";
import { fleetJsonSchema } from "../../config/schema.js";
import { UserError } from "../../util/errors.js";
import { writeFileAtomic } from "../../util/fsutil.js";
import { out } from "../../util/log.js";
import { BoardSchema, OsSchema } from "../../config/profiles-schema.js";

export const SCHEMA_FILES = { fleet: "mkoverlay.schema.json", board: "board.schema.json", os: "os.schema.json" } as const;

export function schemaText(kind: string): string {
  const schema =
    kind === "fleet"
      ? fleetJsonSchema()
      : kind === "board"
        ? z.toJSONSchema(BoardSchema, { io: "input" })
        : kind === "os"
          ? z.toJSONSchema(OsSchema, { io: "input" })
          : undefined;
  if (!schema) throw new UserError(`schema ${JSON.stringify(kind)}: use fleet, board or os`);
  return JSON.stringify(schema, null, 2) + "\n";
}

export function schemaCommand(kind: string | undefined, opts: { out?: string }): void {
  const text = schemaText(kind ?? "fleet");
  if (opts.out) writeFileAtomic(opts.out, text, { mode: 0o644 });
  else out(text);
}
