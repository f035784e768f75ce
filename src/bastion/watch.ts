/**
 * How the agent hears about registry changes without polling.
 *
 * PostgreSQL: its own connection LISTENs on `mkoverlay_changes`; stations NOTIFY it inside the
 * transaction of each change, with the device's hostname as payload, so a notice arrives only
 * for a committed change and after it is visible. LISTEN needs no privilege beyond CONNECT.
 *
 * SQLite (a registry on the bastion itself): the database file and its -wal are watched
 * (inotify through fs.watch on their directory, debounced); a change says "something changed",
 * the agent re-reads. The agent's periodic full re-read covers whatever a watch misses.
 */
import { watch, type FSWatcher } from "node:fs";
import { basename, dirname } from "node:path";

export interface Watch {
  close(): Promise<void>;
}

/**
 * LISTENs on `channel`. `onNotice(payload)` per notice; `onLost(error)` once when the connection
 * fails or ends (the caller reconnects). Rejects when it cannot connect.
 */
export async function listenPostgres(url: string, channel: string, onNotice: (payload: string) => void, onLost: (e: Error) => void): Promise<Watch> {
  const { default: pg } = await import("pg");
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10_000, application_name: "mkoverlay-bastion-agent", keepAlive: true });
  let closing = false;
  let lost = false;
  const lose = (e: Error) => {
    if (closing || lost) return;
    lost = true;
    onLost(e);
  };
  client.on("error", lose);
  client.on("end", () => lose(new Error("the LISTEN connection ended")));
  client.on("notification", (n) => {
    if (n.channel === channel) onNotice(n.payload ?? "*");
  });
  try {
    await client.connect();
    await client.query(`LISTEN ${channel}`);
  } catch (e) {
    closing = true;
    await client.end().catch(() => undefined);
    throw e;
  }
  return {
    async close() {
      closing = true;
      await client.end().catch(() => undefined);
    },
  };
}

/** Calls `onChange` (at most every `debounceMs`) when the SQLite file or its -wal changes. */
export function watchSqlite(file: string, onChange: () => void, debounceMs = 100): Watch {
  const names = new Set([basename(file), `${basename(file)}-wal`]);
  let timer: NodeJS.Timeout | undefined;
  const fire = () => {
    if (timer) return;
    timer = setTimeout(() => {
      timer = undefined;
      onChange();
    }, debounceMs);
  };
  let w: FSWatcher | undefined;
  try {
    w = watch(dirname(file), { persistent: false }, (_ev, name) => {
      if (name === null || names.has(String(name))) fire();
    });
    w.on("error", () => undefined); // the periodic re-read still runs
  } catch {
    w = undefined;
  }
  return {
    async close() {
      if (timer) clearTimeout(timer);
      w?.close();
    },
  };
}
