/**
 * Boards and OS profiles are data: YAML files under boards/ and boards/os/, validated by one
 * schema each. Adding a board or an OS is adding a file (plus, for an OS, an optional overlay
 * layer under overlays/).
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { cached } from "../util/cache.js";
import { UserError } from "../util/errors.js";
import type { BoardData, OsData } from "./profiles-schema.js";
import { resourceDir } from "../util/resources.js";
import { didYouMean } from "../util/validate.js";

export type Board = BoardData;
export type OsProfile = OsData;

interface ProfileFile {
  file: string;
  name: string;
  text: string;
}

function readDir(dir: string): ProfileFile[] {
  return readdirSync(dir)
    .filter((n) => n.endsWith(".yaml"))
    .sort()
    .map((name) => ({ file: join(dir, name), name, text: readFileSync(join(dir, name), "utf8") }));
}

async function validateAll(boardFiles: ProfileFile[], osFiles: ProfileFile[]): Promise<{ boards: Board[]; oses: OsProfile[] }> {
  const [{ parseYamlWith }, { BoardSchema, OsSchema }] = await Promise.all([import("./yaml-schema.js"), import("./profiles-schema.js")]);
  const parse = <T extends { id: string }>(f: ProfileFile, schema: Parameters<typeof parseYamlWith>[0]): T => {
    const data = parseYamlWith(schema, f.text, f.file) as T;
    if (`${data.id}.yaml` !== f.name) throw new UserError(`${f.file}: id '${data.id}' does not match the file name`);
    return data;
  };
  return { boards: boardFiles.map((f) => parse<Board>(f, BoardSchema)), oses: osFiles.map((f) => parse<OsProfile>(f, OsSchema)) };
}

export interface Profiles {
  boards: Map<string, Board>;
  oses: Map<string, OsProfile>;
}

/** Profiles, validated once per content (the cache key is every file's name and text, and the build). */
export async function loadProfiles(root: string = resourceDir("boards")): Promise<Profiles> {
  const boardFiles = readDir(root);
  const osFiles = readDir(join(root, "os"));
  const key = [...boardFiles, ...osFiles].flatMap((f) => [f.file, f.text]);
  const data = await cached("profiles", key, () => validateAll(boardFiles, osFiles));
  const boards = new Map(data.boards.map((b) => [b.id, b]));
  const oses = new Map(data.oses.map((o) => [o.id, o]));
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
