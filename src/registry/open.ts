/** Chooses the registry backend from the config's `registry:` value. */
import { UserError } from "../errors.js";
import type { Registry } from "./types.js";

export async function openRegistry(location: string): Promise<Registry> {
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(location)) {
    throw new UserError(`registry ${location}: this mkoverlay only supports the embedded SQLite registry (a file path)`);
  }
  const { SqliteRegistry } = await import("./sqlite.js");
  return new SqliteRegistry(location);
}
