/**
 * Where a registry lives, as the user wrote it: a file path (the embedded SQLite registry) or a
 * URL (`postgres://…`). A leaf module: the backends, `open` and `copy` all use it, and nothing
 * here imports a driver.
 */

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
