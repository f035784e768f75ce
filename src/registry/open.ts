/**
 * Chooses the registry backend from the config's `registry:` value (or $MKOVERLAY_REGISTRY):
 * a file path is the embedded SQLite registry, `postgres://…` (or `postgresql://…`) the
 * PostgreSQL one. Each backend (and its driver) is imported only when it is the one in use.
 */
import { UserError } from "../errors.js";
import type { Registry } from "./types.js";

export function isRegistryUrl(location: string): boolean {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(location);
}

export function isPostgresUrl(location: string): boolean {
  return /^postgres(ql)?:\/\//i.test(location);
}

/** The location as it may be printed: a URL's password is never shown. */
export function displayLocation(location: string): string {
  if (!isRegistryUrl(location)) return location;
  try {
    const u = new URL(location);
    if (u.password) u.password = "***";
    for (const k of [...u.searchParams.keys()]) if (/pass/i.test(k)) u.searchParams.set(k, "***");
    return u.toString();
  } catch {
    return location.replace(/\/\/([^/@:]*):[^/@]*@/, "//$1:***@");
  }
}

export async function openRegistry(location: string): Promise<Registry> {
  if (isPostgresUrl(location)) {
    const { PostgresRegistry } = await import("./postgres.js");
    return PostgresRegistry.open(location);
  }
  if (isRegistryUrl(location)) {
    throw new UserError(`registry ${displayLocation(location)}: unsupported kind of registry`, {
      hint: "use a file path (embedded SQLite registry) or postgres://user@host:5432/database",
    });
  }
  const { SqliteRegistry } = await import("./sqlite.js");
  return new SqliteRegistry(location);
}
