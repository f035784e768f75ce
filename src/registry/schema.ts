/**
 * The registry's tables, once for both databases, as a list of versions. MIGRATIONS[v] takes a
 * registry from schema version v to v + 1; `meta.schema_version` records where one stands, and a
 * registry written by a newer mkoverlay is refused. The SQL is the common subset of SQLite and
 * PostgreSQL (TEXT, INTEGER, BIGINT, CHECK, foreign keys).
 */

export const SCHEMA_VERSION = 6;

export const MIGRATIONS: readonly (readonly string[])[] = [
  // 1: devices, their ports, and the name counter.
  [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    `CREATE TABLE devices (
      hostname    TEXT PRIMARY KEY,
      board       TEXT NOT NULL,
      os          TEXT NOT NULL,
      bastions    TEXT NOT NULL,
      port        INTEGER NOT NULL UNIQUE,
      public_key  TEXT NOT NULL,
      fingerprint TEXT NOT NULL UNIQUE,
      status      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
      overlay     TEXT,
      station     TEXT NOT NULL,
      created     TEXT NOT NULL,
      updated     TEXT NOT NULL
    )`,
    `CREATE TABLE ports (
      port     INTEGER PRIMARY KEY,
      hostname TEXT NOT NULL REFERENCES devices(hostname) ON DELETE CASCADE,
      purpose  TEXT NOT NULL
    )`,
    "CREATE INDEX ports_by_host ON ports(hostname)",
    "INSERT INTO meta(key, value) VALUES ('seq', '0')",
  ],
  // 2: leases on unfinished work (a reservation being built never looks abandoned), rotations
  // in two phases (pending key, then the old key kept for a grace period).
  [
    "ALTER TABLE devices ADD COLUMN lease_until BIGINT",
    "ALTER TABLE devices ADD COLUMN pending_public_key TEXT",
    "ALTER TABLE devices ADD COLUMN pending_fingerprint TEXT",
    "ALTER TABLE devices ADD COLUMN prev_public_key TEXT",
    "ALTER TABLE devices ADD COLUMN prev_fingerprint TEXT",
    "ALTER TABLE devices ADD COLUMN prev_until TEXT",
    // A new key is checked against every device's current, previous and pending key: indexed,
    // so a reservation costs the same with 10 or 40,000 devices.
    "CREATE UNIQUE INDEX devices_by_prev_fingerprint ON devices(prev_fingerprint)",
    "CREATE UNIQUE INDEX devices_by_pending_fingerprint ON devices(pending_fingerprint)",
  ],
  // 3: factory data per device (the extra columns of a --hosts CSV: serial, MAC, site…),
  // looked up by value (a factory maps devices by serial number).
  [
    `CREATE TABLE attributes (
      hostname TEXT NOT NULL REFERENCES devices(hostname) ON DELETE CASCADE,
      key      TEXT NOT NULL,
      value    TEXT NOT NULL,
      PRIMARY KEY (hostname, key)
    )`,
    "CREATE INDEX attributes_by_value ON attributes(key, value)",
  ],
  // 4: what the bastions see (bastion agents write these three tables, and only these): the
  // tunnel ports listening on each bastion, each device's history per bastion, and each
  // agent's heartbeat. An agent writes only changes; "still there" is its heartbeat.
  [
    `CREATE TABLE sightings (
      bastion     TEXT NOT NULL,
      port        INTEGER NOT NULL,
      hostname    TEXT,
      fingerprint TEXT,
      since       TEXT NOT NULL,
      last_seen   TEXT NOT NULL,
      connected   INTEGER NOT NULL,
      PRIMARY KEY (bastion, port)
    )`,
    `CREATE TABLE device_history (
      hostname   TEXT NOT NULL,
      bastion    TEXT NOT NULL,
      first_seen TEXT NOT NULL,
      last_seen  TEXT NOT NULL,
      PRIMARY KEY (hostname, bastion)
    )`,
    `CREATE TABLE heartbeats (
      bastion    TEXT PRIMARY KEY,
      at         TEXT NOT NULL,
      interval_s INTEGER NOT NULL,
      agent      TEXT NOT NULL
    )`,
  ],
  // 5: who holds a tunnel port (issue 19): the tunnel user's sshd session (1), or another
  // process (0, with its uid) — a squatter, which never counts as the device. NULL: recorded by
  // an agent from before this version.
  ["ALTER TABLE sightings ADD COLUMN tunnel INTEGER", "ALTER TABLE sightings ADD COLUMN uid INTEGER"],
  // 6: what each device dials (src/config/compat.ts): per bastion the tunnel user, host, port,
  // pinned host key fingerprints and `from:`, and the port ranges its ports came from, as JSON —
  // for its current key, a rotation's pending key, and a rotated-out key in its grace. A config
  // change that would lock devices out is refused against these. Rows from before this version
  // hold NULL: a build records the config then in use for them at its first run (backfill).
  [
    "ALTER TABLE devices ADD COLUMN dials TEXT",
    "ALTER TABLE devices ADD COLUMN pending_dials TEXT",
    "ALTER TABLE devices ADD COLUMN prev_dials TEXT",
    // Devices built with one config share one value: a build's check reads the groups, not the rows.
    "CREATE INDEX devices_by_dials ON devices(dials, bastions)",
  ],
];
