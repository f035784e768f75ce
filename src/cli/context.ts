/** Commands that read the fleet and its registry: load both, run, always close. */
import type { Fleet } from "../config/fleet.js";
import { configPath, loadFleet } from "../config/load.js";
import { openRegistry } from "../registry/open.js";
import type { Registry } from "../registry/types.js";

export async function withFleetRegistry<T>(config: string | undefined, fn: (fleet: Fleet, registry: Registry) => Promise<T>): Promise<T> {
  const fleet = await loadFleet(configPath(config));
  const registry = await openRegistry(fleet.registry);
  try {
    return await fn(fleet, registry);
  } finally {
    await registry.close();
  }
}
