/**
 * Boards and OS profiles are data: YAML files under boards/ and boards/os/, validated by one
 * schema each. Adding a board or an OS is adding a file (plus, for an OS, an optional overlay
 * layer under overlays/).
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import { parseYamlWith } from "./config/load.js";
import { UserError } from "./errors.js";
import { resourceDir } from "./resources.js";
import { didYouMean } from "./validate.js";

const id = z.string().regex(/^[a-z0-9][a-z0-9-]*$/, "must be lower-case letters, digits and '-'");
const unitName = z.string().regex(/^[A-Za-z0-9:_.@-]+\.(service|socket|timer|target|path)$/, "is not a systemd unit name");
const absPath = z.string().regex(/^\/[^\0\n]*$/, "must be an absolute path");

export const BoardSchema = z.strictObject({
  $schema: z.string().optional(),
  id,
  name: z.string().min(1),
  arch: z.enum(["arm64", "armhf", "amd64"]),
  defaultOs: id,
});

export const OsSchema = z.strictObject({
  $schema: z.string().optional(),
  id,
  name: z.string().min(1),
  unitDir: absPath.describe("Where the distribution's units live: the target of enable links"),
  ssh: z.strictObject({
    unit: unitName.describe("The unit that starts sshd"),
    wantedBy: z.array(unitName).min(1),
    aliases: z.array(unitName).default([]),
  }),
  firstBoot: z.strictObject({
    deletes: z.array(absPath).describe("Globs this OS deletes on first boot (checked by mkoverlay verify and the tests)"),
    mask: z.array(unitName).default([]).describe("Units masked (linked to /dev/null) so they never run"),
    layers: z.array(id).default([]).describe("Overlay layers under overlays/ laid in for this OS"),
  }),
});

export type Board = z.output<typeof BoardSchema>;
export type OsProfile = z.output<typeof OsSchema>;

function loadDir<T extends z.ZodType>(dir: string, schema: T): Map<string, z.output<T>> {
  const out = new Map<string, z.output<T>>();
  for (const name of readdirSync(dir).filter((n) => n.endsWith(".yaml")).sort()) {
    const file = join(dir, name);
    const data = parseYamlWith(schema, readFileSync(file, "utf8"), file) as z.output<T> & { id: string };
    if (`${data.id}.yaml` !== name) throw new UserError(`${file}: id '${data.id}' does not match the file name`);
    out.set(data.id, data);
  }
  return out;
}

export interface Profiles {
  boards: Map<string, Board>;
  oses: Map<string, OsProfile>;
}

export function loadProfiles(root: string = resourceDir("boards")): Profiles {
  const boards = loadDir(root, BoardSchema);
  const oses = loadDir(join(root, "os"), OsSchema);
  for (const [bid, b] of boards) {
    if (!oses.has(b.defaultOs)) throw new UserError(`${join(root, bid + ".yaml")}: defaultOs '${b.defaultOs}' has no profile in ${join(root, "os")}`);
  }
  for (const [oid, o] of oses) {
    for (const layer of o.firstBoot.layers) {
      if (!existsSync(resourceDir("overlays", layer))) throw new UserError(`${join(root, "os", oid + ".yaml")}: layer '${layer}' has no folder overlays/${layer}`);
    }
  }
  return { boards, oses };
}

function unknown(kind: string, flag: string, value: string, known: Iterable<string>): UserError {
  const names = [...known];
  const guess = didYouMean(value, names);
  return new UserError(`${flag} ${JSON.stringify(value)}: unknown ${kind}${guess ? ` (did you mean '${guess}'?)` : ""}`, {
    hint: `known ${kind}s: ${names.join(", ")} (see 'mkoverlay boards')`,
  });
}

export function resolveBoardOs(p: Profiles, boardId: string, osId: string | undefined): { board: Board; os: OsProfile } {
  const board = p.boards.get(boardId);
  if (!board) throw unknown("board", "--board", boardId, p.boards.keys());
  const os = p.oses.get(osId ?? board.defaultOs);
  if (!os) throw unknown("OS", "--os", osId ?? board.defaultOs, p.oses.keys());
  return { board, os };
}
