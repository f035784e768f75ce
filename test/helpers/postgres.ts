/**
 * A throwaway PostgreSQL server for the registry tests: Debian's server binaries (installed
 * with scripts/ensure-postgres.sh when missing and running as root), its own data directory
 * in a temp dir, its own free port on 127.0.0.1, trust login for the test role `mko`, and a
 * password-only role `mko_pw` (scram-sha-256) for the bad-credentials case. initdb and postgres
 * refuse to run as root, so as root they run as the `postgres` system user. The server is
 * stopped by its PID (SIGINT: fast shutdown) and the directory removed.
 *
 * When PostgreSQL cannot be installed or started, `postgresForTests` says so loudly; with
 * $CI set that is an error (the test file fails), never a silent skip.
 */
import { inCI, isRoot } from "./capability.js";
import { freePort } from "./net.js";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chownSync, closeSync, existsSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import pg from "pg";
import { REPO, removeDir, tempDir } from "./workspace.js";

export const PW_ROLE = { user: "mko_pw", password: "right-password" };

export interface PgServer {
  port: number;
  /** A registry URL for `db` (default role: mko, trust login). */
  url(db: string, user?: string, password?: string): string;
  /** A new empty database owned by `mko`; returns its registry URL. */
  createDatabase(): Promise<string>;
  /** Runs SQL as the superuser in `db` (a database name or one of this server's URLs). */
  sql<T extends pg.QueryResultRow = Record<string, unknown>>(db: string, text: string, values?: unknown[]): Promise<T[]>;
  /** Stops the server (fast shutdown: clients are disconnected) but keeps its data. */
  halt(): Promise<void>;
  /** Starts a halted server again, same data and port. */
  resume(): Promise<void>;
  stop(): Promise<void>;
}

/** A 127.0.0.1 port nothing listens on (for the "unreachable server" case). */
export const closedPort = freePort;

function binDir(): string {
  const r = spawnSync("bash", [join(REPO, "scripts/ensure-postgres.sh")], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`scripts/ensure-postgres.sh failed (exit ${r.status}): ${(r.stderr || r.error?.message || "").trim()}`);
  const dir = r.stdout.trim().split("\n").pop() ?? "";
  if (!existsSync(join(dir, "initdb")) || !existsSync(join(dir, "postgres"))) throw new Error(`no initdb/postgres in '${dir}'`);
  return dir;
}

/** As root: the postgres system user (created by the Debian package). */
function runAs(): { uid: number; gid: number } | undefined {
  if (!isRoot) return undefined;
  const r = spawnSync("id", ["-u", "postgres"], { encoding: "utf8" });
  const g = spawnSync("id", ["-g", "postgres"], { encoding: "utf8" });
  if (r.status !== 0 || g.status !== 0) throw new Error("running as root, but there is no 'postgres' system user to run initdb/postgres as");
  return { uid: Number(r.stdout.trim()), gid: Number(g.stdout.trim()) };
}

function exited(child: ChildProcess): Promise<void> {
  return new Promise((res) => {
    if (child.exitCode !== null || child.signalCode !== null) return res();
    child.once("exit", () => res());
  });
}

/** Used by bench/bastion.mjs through a bundle (bench/lib.mjs), which knip cannot follow. @public */
export async function startPostgres(): Promise<PgServer> {
  const bin = binDir();
  const as = runAs();
  const dir = tempDir("mko-pg-");
  if (as) chownSync(dir, as.uid, as.gid);
  const data = join(dir, "data");
  const logFile = join(dir, "postgres.log");
  const ids = as ? { uid: as.uid, gid: as.gid } : {};
  const env = { ...process.env, LC_ALL: "C", LANG: "C", HOME: dir };
  const init = spawnSync(join(bin, "initdb"), ["-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"], {
    ...ids,
    cwd: dir,
    env,
    encoding: "utf8",
  });
  if (init.status !== 0) {
    removeDir(dir);
    throw new Error(`initdb failed (exit ${init.status}): ${(init.stderr || init.error?.message || "").trim()}`);
  }
  // First match wins: the password role must give a password; everyone else is trusted.
  const hba = join(data, "pg_hba.conf");
  writeFileSync(hba, ["local all all trust", `host all ${PW_ROLE.user} 127.0.0.1/32 scram-sha-256`, "host all all 127.0.0.1/32 trust", ""].join("\n"));
  if (as) chownSync(hba, as.uid, as.gid);

  // postgres runs under a small guardian shell that reads our end of a pipe: when this
  // process goes away in any way (even SIGKILL), the pipe closes and the guardian stops the
  // server, so an aborted test run leaves no server behind.
  const guardian = 'exec 3<&0; "$@" </dev/null & pid=$!; (read -r _ <&3; kill -INT "$pid" 2>/dev/null) & wait "$pid"';
  let child: ChildProcess | undefined;
  let port = 0;
  const launch = (): ChildProcess => {
    const log = openSync(logFile, "a");
    if (as) chownSync(logFile, as.uid, as.gid);
    const c = spawn(
      "sh",
      [
        "-c", guardian, "sh",
        join(bin, "postgres"),
        "-D", data,
        "-p", String(port),
        "-c", "listen_addresses=127.0.0.1",
        "-c", `unix_socket_directories=${dir}`,
        "-c", "fsync=off",
        "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off",
        "-c", "max_connections=200",
        "-c", "logging_collector=off",
      ],
      { ...ids, cwd: dir, env, stdio: ["pipe", log, log] },
    );
    closeSync(log);
    return c;
  };
  for (let attempt = 0; attempt < 5 && !child; attempt++) {
    port = await freePort();
    const c = launch();
    const ready = await waitReady(c, port);
    if (ready) child = c;
    else {
      await stopServer(c, data);
    }
  }
  if (!child) {
    const tail = existsSync(logFile) ? readFileSync(logFile, "utf8").split("\n").slice(-15).join("\n") : "";
    removeDir(dir);
    throw new Error(`postgres did not start on 127.0.0.1 (5 attempts); log:\n${tail}`);
  }
  let server = child;

  const admin = async <T extends pg.QueryResultRow>(db: string, text: string, values: unknown[] = []): Promise<T[]> => {
    const name = db.includes("://") ? decodeURIComponent(new URL(db).pathname.slice(1)) : db;
    const c = new pg.Client({ host: "127.0.0.1", port, user: "postgres", database: name });
    await c.connect();
    try {
      return (await c.query<T>(text, values)).rows;
    } finally {
      await c.end();
    }
  };
  await admin("postgres", `CREATE ROLE mko LOGIN CREATEDB`);
  await admin("postgres", `CREATE ROLE ${PW_ROLE.user} LOGIN PASSWORD '${PW_ROLE.password}'`);

  let n = 0;
  return {
    port,
    url: (db, user = "mko", password) =>
      `postgres://${encodeURIComponent(user)}${password === undefined ? "" : `:${encodeURIComponent(password)}`}@127.0.0.1:${port}/${encodeURIComponent(db)}`,
    async createDatabase() {
      n += 1;
      const db = `reg_${process.pid}_${n}`;
      await admin("postgres", `CREATE DATABASE ${db} OWNER mko`);
      await admin("postgres", `GRANT CONNECT ON DATABASE ${db} TO ${PW_ROLE.user}`);
      return `postgres://mko@127.0.0.1:${port}/${db}`;
    },
    sql: admin,
    async halt() {
      await stopServer(server, data);
    },
    async resume() {
      const c = launch();
      if (!(await waitReady(c, port))) throw new Error(`postgres did not start again on 127.0.0.1:${port}`);
      server = c;
    },
    async stop() {
      await stopServer(server, data);
      removeDir(dir);
    },
  };
}

/** The postmaster's PID, from its lock file in the data directory. */
function postmasterPid(data: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(data, "postmaster.pid"), "utf8").split("\n")[0]);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Stops the server by its PID (SIGINT: fast shutdown, clients disconnected), SIGKILL after 10 s. */
async function stopServer(guard: ChildProcess, data: string): Promise<void> {
  const pid = postmasterPid(data);
  const signal = (sig: NodeJS.Signals) => {
    try {
      if (pid) process.kill(pid, sig);
    } catch {
      // already gone
    }
  };
  signal("SIGINT");
  guard.stdin?.end(); // the guardian's cue as well
  const timer = setTimeout(() => signal("SIGKILL"), 10_000);
  await exited(guard);
  clearTimeout(timer);
}

async function waitReady(child: ChildProcess, port: number): Promise<boolean> {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) return false;
    const c = new pg.Client({ host: "127.0.0.1", port, user: "postgres", database: "postgres", connectionTimeoutMillis: 2_000 });
    c.on("error", () => undefined);
    try {
      await c.connect();
      await c.end();
      return true;
    } catch {
      await c.end().catch(() => undefined);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return false;
}

/**
 * The server for a test file, or undefined (with a loud warning) when PostgreSQL is not
 * available outside CI. In CI (CI=true) unavailability throws: the PostgreSQL tests fail.
 */
export async function postgresForTests(): Promise<{ server: PgServer | undefined; reason: string }> {
  try {
    return { server: await startPostgres(), reason: "" };
  } catch (e) {
    const reason = (e as Error).message;
    const banner = `\n${"!".repeat(78)}\n!! PostgreSQL registry tests CANNOT RUN: ${reason}\n${"!".repeat(78)}\n`;
    if (inCI) throw new Error(`PostgreSQL is required in CI (CI=${process.env.CI}) but could not be started: ${reason}`);
    process.stderr.write(`${banner}!! Not in CI, so they are SKIPPED here. Install PostgreSQL (bash scripts/ensure-postgres.sh as root).\n`);
    return { server: undefined, reason };
  }
}
