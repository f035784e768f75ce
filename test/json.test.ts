/**
 * `--json` on every command that reports something: each command runs for real, its output
 * parses, and has the fields docs/json.md documents for it (same names, same nesting), all
 * camelCase. docs/json.md is read here, so the page and the output cannot drift apart.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openRegistry } from "../src/registry/open.js";
import { isRoot, itRequires, root } from "./helpers/capability.js";
import { prepareRoot, secureRoot } from "./helpers/bastion.js";
import { diskTools, makeDisk, makeRootTree } from "./helpers/disk.js";
import { ensureUser } from "./helpers/sshd.js";
import { readPub, REPO, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-json-");
afterAll(() => removeDir(dir));
const cli = (args: string[], input?: string) => runCli(args, { cwd: dir, ...(input === undefined ? {} : { input }) });

/** Documented examples by heading (`mkoverlay revoke DEVICE --json`). */
const DOC = new Map<string, unknown>();
for (const m of readFileSync(join(REPO, "docs/json.md"), "utf8").matchAll(/^## `(mkoverlay [^`]+)`\n(?:(?!\n## )[\s\S])*?```json\n([\s\S]*?)\n```/gm)) DOC.set(m[1]!, JSON.parse(m[2]!));

/** Fields whose keys are the user's names (forwards, bastions, factory data). */
const MAPS = new Set(["services", "authorizedKeys", "attributes", "bastions"]);
/** Fields that appear only when they apply. */
const OPTIONAL = new Set(["detail", "error", "previous", "rotating"]);

/** The field structure: objects by key, arrays by their first element, values as "*". */
function shape(v: unknown, key = ""): unknown {
  if (MAPS.has(key) && v !== null && typeof v === "object" && !Array.isArray(v)) return "map";
  // A list of values is a list whatever its length; a list of objects shows its first; an
  // empty list matches either (see same()).
  if (Array.isArray(v)) return v.length === 0 ? "empty" : v.some((x) => x !== null && typeof x === "object") ? [shape(v[0])] : "list";
  if (v !== null && typeof v === "object") {
    return Object.fromEntries(
      Object.entries(v)
        .filter(([k]) => !OPTIONAL.has(k))
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([k, x]) => [k, shape(x, k)]),
    );
  }
  return "*";
}

/** The shapes agree; an empty list in the output agrees with any list the page shows. */
function same(actual: unknown, doc: unknown): boolean {
  if (actual === "empty") return doc === "empty" || doc === "list" || Array.isArray(doc);
  if (Array.isArray(actual)) return Array.isArray(doc) && same(actual[0], doc[0]);
  if (actual !== null && typeof actual === "object") {
    if (doc === null || typeof doc !== "object" || Array.isArray(doc)) return false;
    const a = Object.keys(actual).sort();
    const d = Object.keys(doc).sort();
    return a.join() === d.join() && a.every((k) => same((actual as Record<string, unknown>)[k], (doc as Record<string, unknown>)[k]));
  }
  return actual === doc;
}

function camelCase(v: unknown, path = "$"): void {
  if (Array.isArray(v)) v.forEach((x, i) => camelCase(x, `${path}[${i}]`));
  else if (v !== null && typeof v === "object") {
    for (const [k, x] of Object.entries(v)) {
      expect(k, `${path}.${k}`).toMatch(/^[a-z][a-zA-Z0-9]*$/);
      if (!MAPS.has(k)) camelCase(x, `${path}.${k}`);
    }
  }
}

const tested = new Set<string>();

function expectDocumented(heading: string, actual: unknown): void {
  tested.add(heading);
  const doc = DOC.get(heading);
  expect(doc, `docs/json.md has "## \`${heading}\`" with a json example`).toBeDefined();
  camelCase(actual);
  const [a, d] = [shape(actual), shape(doc)];
  if (!same(a, d)) expect(a, heading).toEqual(d);
}

function json(args: string[], input?: string): unknown {
  const r = cli(args, input);
  expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(0);
  // --json quiets the notes; a warning still says what needs attention.
  expect(r.stderr.split("\n").filter((l) => l && !l.startsWith("mkoverlay: warning: ")), "--json keeps stderr quiet").toEqual([]);
  return JSON.parse(r.stdout);
}

function ndjson(args: string[], code = 0): unknown[] {
  const r = cli(args);
  expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(code);
  return r.stdout.split("\n").filter(Boolean).map((l) => JSON.parse(l) as unknown);
}

let overlay: string;

beforeAll(() => {
  const key = readPub(sshKeygen(dir, "bastion"));
  writeFleet(dir, { eu: { hostKeys: [key] }, us: { hostKeys: [key], host: "bastion-us.example.com" } }, { forwards: [{ name: "http", local: 80 }] });
  const b = json(["--board", "rpi4", "--bastion", "eu,us", "--attr", "serial=SN0001", "--json"]) as { overlay: string };
  overlay = b.overlay;
  if (isRoot) ensureUser("reverse-ssh");
});

describe("--json: the fields docs/json.md documents, camelCase", () => {
  it("build", () => {
    expectDocumented("mkoverlay build --json", json(["--board", "rpi4", "--bastion", "eu", "--attr", "serial=SN0002", "--json"]));
  });

  it("batch: one line per device, built or failed", () => {
    writeFileSync(join(dir, "shift.csv"), "hostname,serial\nline-a,SN1\ngw-0001,SN2\n");
    // gw-0001 is built, its output in another folder: refused (in this run's --out, it would be skipped).
    const lines = ndjson(["batch", "--board", "rpi4", "--bastion", "eu", "--hosts", "shift.csv", "--out", "shift-out", "--json"], 1);
    expect(lines).toHaveLength(2);
    expectDocumented("mkoverlay build --json", lines.find((l) => !("error" in (l as object))));
    const failed = lines.find((l) => "error" in (l as object)) as { error: string };
    expect(shape(failed)).toEqual({ hostname: "*" });
    expect(Object.keys(failed).sort()).toEqual(Object.keys(DOC.get("mkoverlay batch --json")!).sort());
  });

  it("verify: one line per overlay, with the registry and offline", () => {
    const [online] = ndjson(["verify", overlay, "--json"]);
    expectDocumented("mkoverlay verify --json", online);
    const [offline] = ndjson(["verify", "--offline", overlay, "--json"]);
    expectDocumented("mkoverlay verify --json", { ...(offline as object), notChecked: [] });
    expect((offline as { notChecked: string[] }).notChecked.length).toBeGreaterThan(0);
    const two = ndjson(["verify", overlay, join(dir, "shift.csv"), "--json"], 2);
    expect(two).toHaveLength(2);
    expect(two[1]).toMatchObject({ ok: false, error: expect.stringMatching(/not an mkoverlay overlay/) });
  });

  it("init", () => {
    const d = tempDir("mko-json-init-");
    try {
      const r = runCli(["init", "--bastion", "eu=bastion.example.com", "--host-keys", "-", "--operator-key", join(dir, "bastion.pub"), "--json"], {
        cwd: d,
        input: `bastion.example.com ${readPub(join(dir, "bastion"))}\n`,
      });
      expect(r.code, r.stderr).toBe(0);
      expectDocumented("mkoverlay init --json", JSON.parse(r.stdout));
    } finally {
      removeDir(d);
    }
  });

  it("status, and status DEVICE (by serial)", () => {
    const all = json(["status", "--json"]) as { devices: { hostname: string }[] };
    expect(all.devices.length).toBeGreaterThan(1);
    expectDocumented("mkoverlay status --json", all);
    const one = json(["status", "serial=SN0001", "--json"]) as { devices: { hostname: string }[] };
    expect(one.devices.map((d) => d.hostname)).toEqual(["gw-0001"]);
    expectDocumented("mkoverlay status --json", one);
    tested.add("mkoverlay status DEVICE --json");
  });

  it("registry list", () => {
    expectDocumented("mkoverlay registry list --json", json(["registry", "list", "--json"]));
  });

  it("rotate, revoke, registry release", () => {
    expectDocumented("mkoverlay rotate DEVICE --json", json(["rotate", "serial=SN0002", "--json"]));
    expectDocumented("mkoverlay revoke DEVICE --json", json(["revoke", "serial=SN0002", "--json"]));
    expectDocumented("mkoverlay registry release DEVICE --json", json(["registry", "release", "serial=SN0002", "--json"]));
  });

  it("registry doctor (with a build left pending)", async () => {
    const r = await openRegistry(join(dir, "registry.db"));
    try {
      await r.reserve({
        hostname: "left-pending",
        hostnameTemplate: "gw-{seq:04}",
        range: { lo: 21000, hi: 21999 },
        services: [],
        serviceRange: { lo: 22000, hi: 22999 },
        now: new Date(),
        board: "rpi4",
        os: "raspios",
        bastions: ["eu"],
        publicKey: readPub(join(dir, "bastion")),
        fingerprint: "SHA256:pending-test",
        overlayPath: (h) => join(dir, "out", `${h}.overlay.tar.gz`),
      });
    } finally {
      await r.close();
    }
    const report = json(["registry", "doctor", "--json"]) as unknown[];
    expect(report).toHaveLength(1);
    expectDocumented("mkoverlay registry doctor --json", report);
  });

  it("registry migrate", () => {
    expectDocumented("mkoverlay registry migrate --to TARGET --json", json(["registry", "migrate", "--to", join(dir, "copy.db"), "--json", "-q"]));
  });

  it("boards", () => {
    expectDocumented("mkoverlay boards --json", json(["boards", "--json"]));
  });

  it("bastion authorized-keys (printed), sshd-config", () => {
    const printed = json(["bastion", "authorized-keys", "--bastion", "eu", "--json"]) as { keys: number; text: string };
    expectDocumented("mkoverlay bastion authorized-keys --bastion NAME --json", printed);
    expect(printed.keys).toBe(printed.text.split("\n").filter((l) => l && !l.startsWith("#")).length);
    expectDocumented("mkoverlay bastion sshd-config --bastion NAME --json", json(["bastion", "sshd-config", "--bastion", "eu", "--json"]));
  });

  itRequires(root)("bastion authorized-keys --write (root)", () => {
    const file = join(dir, "ak");
    const w = json(["bastion", "authorized-keys", "--bastion", "eu", "--write", file, "--json"]) as { file: string; text?: string };
    expect(w.file).toBe(file);
    expect(w.text).toBeUndefined();
    expectDocumented("mkoverlay bastion authorized-keys --bastion NAME --json", { ...w, text: "" });
  });

  itRequires(root)("bastion install (into an image folder)", () => {
    const root = secureRoot();
    try {
      prepareRoot(root, 2222);
      const r = json(["bastion", "install", "--bastion", "eu", "--root", root, "--mkoverlay", "/usr/local/bin/mkoverlay", "--registry", "/var/lib/mkoverlay/registry.db", "--json"]) as { written: string[]; started: boolean };
      expect(r.written.length).toBeGreaterThan(0);
      expect(r.started).toBe(false);
      expectDocumented("mkoverlay bastion install --bastion NAME --json", r);
    } finally {
      removeDir(root);
    }
  });

  it("ssh-config, known-hosts", () => {
    expectDocumented("mkoverlay ssh-config --json", json(["ssh-config", "--json"]));
    expectDocumented("mkoverlay known-hosts --json", json(["known-hosts", "--json"]));
  });

  it("registry remove-bastion (last: it changes the devices)", () => {
    const r = json(["registry", "remove-bastion", "us", "--json"]) as { devices: string[] };
    expect(r.devices).toContain("gw-0001");
    expectDocumented("mkoverlay registry remove-bastion NAME --json", r);
  });

  itRequires(diskTools)("image and write (a Raspberry Pi OS-shaped disk made without root)", async () => {
    const root = join(dir, "disk-root");
    makeRootTree(root);
    const base = makeDisk(join(dir, "base.img"), root).path;
    const img = json(["image", "--base", base, "--board", "rpi4", "--bastion", "eu", "--out", join(dir, "img-out"), "--json"]) as { overlay: string };
    expectDocumented("mkoverlay image --base BASE --json", img);
    const archive = json(["--board", "rpi4", "--bastion", "eu", "--out", join(dir, "img-archive"), "--json"]) as { overlay: string };
    expectDocumented("mkoverlay write OVERLAY --image IMG --json", json(["write", archive.overlay, "--image", img.overlay, "--force", "--json"]));
  });

  it("registry import-manufacturing (rpi-sb-provisioner's database)", async () => {
    const { default: Database } = await import("better-sqlite3");
    const file = join(dir, "manufacturing.db");
    const db = new Database(file);
    db.exec("CREATE TABLE devices(id integer primary key, boardname text, serial text, eth_mac text, wifi_mac text, bt_mac text)");
    db.prepare("INSERT INTO devices(boardname, serial, eth_mac, wifi_mac, bt_mac) VALUES ('CM4', 'SN0001', 'd8:3a:dd:00:00:01', '', ''), ('CM5', 'f9999999', '', '', '')").run();
    db.close();
    expectDocumented("mkoverlay registry import-manufacturing DB --json", json(["registry", "import-manufacturing", file, "--json"]));
  });

  it("errors: one JSON object on stderr, as the page's Errors section shows", () => {
    const doc = /^## Errors\n[\s\S]*?```json\n([\s\S]*?)\n```/m.exec(readFileSync(join(REPO, "docs/json.md"), "utf8"));
    expect(doc, "docs/json.md has an Errors section with a json example").not.toBeNull();
    const example = JSON.parse(doc![1]!) as Record<string, unknown>;
    for (const args of [["--bord", "rpi4", "--json"], ["registry", "list", "--json", "--config", "missing.yaml"], ["verfy", "--json"]]) {
      const r = cli(args);
      expect(r.code).toBe(2);
      const e = JSON.parse(r.stderr) as Record<string, unknown>;
      camelCase(e);
      expect(shape(e), args.join(" ")).toEqual(shape(example));
      expect(e.exitCode).toBe(r.code);
    }
    expect(JSON.parse(cli(["--bord", "rpi4", "--json"]).stderr)).toEqual(example);
  });

  it("every command docs/json.md documents was run above", () => {
    expect(DOC.size).toBeGreaterThanOrEqual(17);
    const skipped = [...(root.ok ? [] : ["mkoverlay bastion install --bastion NAME --json"]), ...(diskTools.ok ? [] : ["mkoverlay image --base BASE --json", "mkoverlay write OVERLAY --image IMG --json"])];
    // flash needs cards (loop devices, as root): test/flash.test.ts checks its objects against this page.
    expect([...DOC.keys()].filter((h) => !tested.has(h) && h !== "mkoverlay batch --json" && h !== "mkoverlay flash --json" && !skipped.includes(h))).toEqual([]);
  });
});
