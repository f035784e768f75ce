/**
 * The PostgreSQL role docs/bastion.md gives a bastion agent, created exactly as the docs say:
 * read the registry, write its observations (sightings, device history, heartbeats) and
 * nothing else.
 */
import type { PgServer } from "./postgres.js";

export async function agentRole(server: PgServer, url: string, role: string): Promise<string> {
  const db = decodeURIComponent(new URL(url).pathname.slice(1));
  await server.sql("postgres", `DO $$ BEGIN CREATE ROLE ${role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$`);
  await server.sql(url, `GRANT CONNECT ON DATABASE ${db} TO ${role}`);
  await server.sql(url, `GRANT USAGE ON SCHEMA mkoverlay TO ${role}`);
  await server.sql(url, `GRANT SELECT ON ALL TABLES IN SCHEMA mkoverlay TO ${role}`);
  await server.sql(url, `GRANT INSERT, UPDATE ON mkoverlay.sightings, mkoverlay.device_history, mkoverlay.heartbeats TO ${role}`);
  return server.url(db, role);
}
