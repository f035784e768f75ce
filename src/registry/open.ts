/**
 * Chooses the registry's database from the config's `registry:` value (or $MKOVERLAY_REGISTRY):
 * a file path is the embedded SQLite registry, `postgres://…` (or `postgresql://…`) PostgreSQL.
 * Each adapter (and its driver) is imported only when it is the one in use; both run the one
 * registry core.
 */
import { UserError } from "../util/errors.js";
import { RegistryCore } from "./core.js";
import { displayLocation, isPostgresUrl, isRegistryUrl } from "../config/registry-location.js";

export async function openRegistry(location: string): Promise<RegistryCore> {
  if (isPostgresUrl(location)) {
    const { PostgresDriver } = await import("./postgres.js");
    return RegistryCore.open(await PostgresDriver.open(location));
  }
  if (isRegistryUrl(location)) {
    throw new UserError(`registry ${displayLocation(location)}: unsupported kind of registry`, {
      hint: "use a file path (embedded SQLite registry) or postgres://user@host:5432/database",
    });
  }
  const { SqliteDriver } = await import("./sqlite.js");
  return RegistryCore.open(new SqliteDriver(location));
}
