/**
 * The pure core, in-process (milliseconds, no CLI, no disk but the shipped layers): the tree,
 * systemd enablement, every build step and the verify that walks the same steps, the archive,
 * forwards, authorized_keys lines, config rules and YAML positions.
 */
import { gunzipSync } from "node:zlib";
import { LineCounter, parseDocument } from "yaml";
import { describe, expect, it } from "vitest";
import { authorizedKeysLine, authorizedKeysOptions, deviceLines } from "../src/bastion/line.js";
import type { Bastion, Fleet } from "../src/config/fleet.js";
import { formatPath, positionOf } from "../src/config/positions.js";
import { crossCheck, renderHostname } from "../src/config/rules.js";
import type { FleetRaw } from "../src/config/schema.js";
import { planTunnel, planTunnels, serviceNames } from "../src/config/forwards.js";
import { generateEd25519 } from "../src/keys/ed25519.js";
import { archiveEpoch, FIXED_EPOCH, tarball } from "../src/overlay/archive.js";
import { COMMON, loadLayers, type Layers } from "../src/overlay/layers.js";
import { buildOverlay, STEPS, type DeviceSpec } from "../src/overlay/steps.js";
import { enableUnit, installSection, maskUnit } from "../src/overlay/systemd.js";
import { Tree } from "../src/overlay/tree.js";
import { checkAgainstBuild } from "../src/overlay/verify.js";
import { treeView, type TreeView, type ViewEntry } from "../src/overlay/view.js";
import { loadProfiles } from "../src/config/profiles.js";

const profiles = await loadProfiles();
const key = generateEd25519();
const PIN = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB bastion";

function bastion(name: string, over: Partial<Bastion> = {}): Bastion {
  return { name, host: `bastion-${name}.example.com`, port: 22, user: "reverse-ssh", hostKeys: [PIN], from: undefined, expiry: undefined, jumpUser: undefined, ...over };
}

function fleet(over: Partial<Fleet> = {}): Fleet {
  const eu = bastion("eu");
  const us = bastion("us", { port: 2222 });
  return {
    file: "fleet.yaml",
    registry: "/dev/null",
    hostnameTemplate: "gw-{seq:04}",
    ports: { ssh: { lo: 21000, hi: 21999 }, services: { lo: 22000, hi: 22999 } },
    bastions: new Map([
      ["eu", eu],
      ["us", us],
    ]),
    forwards: [],
    operators: { user: "root", authorizedKeys: [PIN.replace("bastion", "alice")], userCA: undefined, principals: [] },
    ...over,
  };
}

function spec(osId = "raspios", f: Fleet = fleet(), layers?: Layers): DeviceSpec {
  const os = profiles.oses.get(osId)!;
  return {
    hostname: "gw-0001",
    board: profiles.boards.get("rpi4")!,
    os,
    tunnels: planTunnels(f, [...f.bastions.values()], 21000, {}),
    key,
    operators: f.operators,
    layers: layers ?? loadLayers(os.firstBoot.layers),
  };
}

/** A view of `tree` with one entry changed (or removed, with `undefined`). */
function tampered(tree: Tree, path: string, change: (e: ViewEntry) => ViewEntry | undefined): TreeView {
  const v = treeView(tree);
  return {
    ...v,
    get: async (p) => {
      const e = await v.get(p);
      return e && p === path ? change(e) : e;
    },
    list: async () => (await v.list!()).flatMap((e) => (e.path === path ? (change(e) ? [change(e)!] : []) : [e])),
  };
}

describe("the tree", () => {
  it("refuses paths that leave the root, adds parents, refuses duplicates, lists sorted", () => {
    const t = new Tree();
    for (const bad of ["..", "../etc/passwd", "/", "a/\0b"]) expect(() => t.file(bad, "x")).toThrow(/bad overlay path/);
    t.file("/etc/ssh/x", "1", 0o600);
    expect(t.get("etc/ssh")).toEqual({ type: "dir", path: "etc/ssh", mode: 0o755 });
    expect(() => t.file("etc/ssh/x", "2")).toThrow(/added twice/);
    t.symlink("etc/a", "/dev/null");
    expect(t.list().map((e) => e.path)).toEqual(["etc", "etc/a", "etc/ssh", "etc/ssh/x"]);
  });
});

describe("systemd enablement as tree operations", () => {
  it("reads [Install] and makes the links systemctl enable/mask would", () => {
    const unit = "[Unit]\nDescription=x\n[Install]\nWantedBy=multi-user.target\n# WantedBy=no.target\nAlias=sshd.service\nRequiredBy=a.target b.target\n";
    expect(installSection(unit)).toEqual({ wantedBy: ["multi-user.target"], requiredBy: ["a.target", "b.target"], alias: ["sshd.service"] });
    const t = new Tree();
    enableUnit(t, "reverse-ssh@eu.service", "/etc/systemd/system/reverse-ssh@.service", { wantedBy: ["multi-user.target"] });
    maskUnit(t, "regenerate_ssh_host_keys.service");
    expect(t.list().filter((e) => e.type === "symlink")).toEqual([
      { type: "symlink", path: "etc/systemd/system/multi-user.target.wants/reverse-ssh@eu.service", target: "/etc/systemd/system/reverse-ssh@.service" },
      { type: "symlink", path: "etc/systemd/system/regenerate_ssh_host_keys.service", target: "/dev/null" },
    ]);
  });
});

describe("build steps and the verify that walks them", () => {
  it.each([...profiles.oses.keys()])("verify(buildOverlay(spec)) passes for %s, one ok per step", async (os) => {
    const s = spec(os);
    const checks = await checkAgainstBuild(treeView(buildOverlay(s)), s);
    expect(checks.filter((c) => !c.ok)).toEqual([]);
    expect(checks.map((c) => c.what.split(":")[0])).toEqual([...STEPS.map((st) => st.name), "nothing else in the overlay"]);
  });

  it("every entry belongs to a step, and removing any one entry fails exactly its step", async () => {
    const s = spec();
    const tree = buildOverlay(s);
    const owner = new Map<string, string>();
    for (const st of STEPS) {
      const t = new Tree();
      st.build(t, s);
      for (const e of t.list()) if (e.type !== "dir") owner.set(e.path, st.name);
    }
    const files = tree.list().filter((e) => e.type !== "dir");
    expect(files.every((e) => owner.has(e.path))).toBe(true);
    for (const e of files) {
      const failed = (await checkAgainstBuild(tampered(tree, e.path, () => undefined), s)).filter((c) => !c.ok);
      expect(failed.map((c) => c.what), e.path).toEqual([`${owner.get(e.path)}: /${e.path} is missing`]);
    }
  });

  it("a changed byte, mode, owner or link target is named", async () => {
    const s = spec();
    const tree = buildOverlay(s);
    const fail = async (path: string, change: (e: ViewEntry) => ViewEntry) => (await checkAgainstBuild(tampered(tree, path, change), s)).filter((c) => !c.ok).map((c) => c.what);
    expect(await fail("etc/hostname", (e) => ({ ...e, content: Buffer.from("gw-0002\n") }))).toEqual(['hostname: /etc/hostname: line 1 is "gw-0002", not "gw-0001"']);
    expect(await fail("etc/ssh/mkoverlay/ssh_host_ed25519_key", (e) => ({ ...e, mode: 0o644 }))).toEqual(["host key: /etc/ssh/mkoverlay/ssh_host_ed25519_key is mode 0644, not 0600"]);
    expect(await fail("etc/hosts", (e) => ({ ...e, uid: 1000 }))).toEqual(["hostname: /etc/hosts is owned by 1000:0, not root:root"]);
    expect(await fail("etc/systemd/system/regenerate_ssh_host_keys.service", (e) => ({ ...e, target: "/lib/systemd/system/x" }))).toEqual([
      'first-boot guards: /etc/systemd/system/regenerate_ssh_host_keys.service points to "/lib/systemd/system/x", not /dev/null',
    ]);
  });

  it("a root file system's own directories keep their modes; an overlay's own may not", async () => {
    const s = spec();
    const tree = buildOverlay(s);
    const asRoot: TreeView = { ...tampered(tree, "etc", (e) => ({ ...e, mode: 0o750, uid: 5 })), isRoot: true };
    delete asRoot.list;
    expect((await checkAgainstBuild(asRoot, s)).filter((c) => !c.ok)).toEqual([]);
    const asOverlay = tampered(tree, "etc", (e) => ({ ...e, mode: 0o750 }));
    expect((await checkAgainstBuild(asOverlay, s)).filter((c) => !c.ok).map((c) => c.what)).toContain("host key: /etc is mode 0750, not 0755");
  });

  it("lays overlays/common wholesale: a file added to the layer ships and is verified", async () => {
    const base = loadLayers([]);
    const extra = new Map(base);
    extra.set(COMMON, [...base.get(COMMON)!, { path: "etc/mkoverlay/extra.conf", mode: 0o644, content: Buffer.from("x=1\n") }]);
    const s = spec("debian", fleet(), extra);
    const tree = buildOverlay(s);
    expect(tree.get("etc/mkoverlay/extra.conf")).toMatchObject({ type: "file", mode: 0o644 });
    const missing = await checkAgainstBuild(tampered(tree, "etc/mkoverlay/extra.conf", () => undefined), s);
    expect(missing.filter((c) => !c.ok).map((c) => c.what)).toEqual(["common files: /etc/mkoverlay/extra.conf is missing"]);
  });

  it("a path the OS deletes on first boot is caught by its step's check", async () => {
    const s = spec();
    const doomed = { ...s, os: { ...s.os, firstBoot: { ...s.os.firstBoot, deletes: [...s.os.firstBoot.deletes, "/etc/ssh/mkoverlay/*"] } } };
    const failed = (await checkAgainstBuild(treeView(buildOverlay(doomed)), doomed)).filter((c) => !c.ok).map((c) => c.what);
    expect(failed).toContain("first-boot guards: /etc/ssh/mkoverlay/ssh_host_ed25519_key is deleted by raspios's first boot");
  });

  it("an entry nobody built is reported for an overlay alone", async () => {
    const s = spec();
    const tree = buildOverlay(s);
    tree.file("root/.ssh/authorized_keys", "ssh-ed25519 AAAA evil\n");
    const failed = (await checkAgainstBuild(treeView(tree), s)).filter((c) => !c.ok);
    expect(failed).toEqual([{ ok: false, what: "entries mkoverlay did not build", detail: "/root, /root/.ssh, /root/.ssh/authorized_keys" }]);
  });
});

describe("the archive", () => {
  it("is reproducible: same tree, same epoch, same bytes; root:root, clamped times", async () => {
    const tree = buildOverlay(spec());
    const a = await tarball(tree, FIXED_EPOCH);
    expect((await tarball(buildOverlay(spec()), FIXED_EPOCH)).equals(a)).toBe(true);
    expect(a.subarray(4, 8).readUInt32LE(0)).toBe(0); // gzip mtime
    const raw = gunzipSync(a);
    // ustar headers: uid/gid 0, uname/gname root, mtime = the epoch.
    const first = raw.subarray(0, 512);
    expect(parseInt(first.subarray(108, 116).toString(), 8)).toBe(0);
    expect(parseInt(first.subarray(116, 124).toString(), 8)).toBe(0);
    expect(first.subarray(265, 269).toString()).toBe("root");
    expect(parseInt(first.subarray(136, 147).toString(), 8)).toBe(FIXED_EPOCH);
  });

  it("takes SOURCE_DATE_EPOCH, refuses a bad one", () => {
    expect(archiveEpoch({})).toBe(FIXED_EPOCH);
    expect(archiveEpoch({ SOURCE_DATE_EPOCH: "1700000000" })).toBe(1700000000);
    expect(() => archiveEpoch({ SOURCE_DATE_EPOCH: "yesterday" })).toThrow(/SOURCE_DATE_EPOCH="yesterday" is not a number/);
  });
});

describe("forwards and authorized_keys lines", () => {
  const f = fleet({
    forwards: [
      { type: "remote", name: "http", local: 80 },
      { type: "local", name: "salt", bastion: "eu", listen: 4505, to: "localhost:4505" },
      { type: "socks", name: "proxy", bastion: "eu", listen: 1080, allow: ["intranet.example.com:8080"] },
    ],
  });
  const eu = f.bastions.get("eu")!;
  const us = f.bastions.get("us")!;

  it("plans each tunnel: -R everywhere, -L/-D and their permitopen on their one bastion", () => {
    expect(serviceNames(f)).toEqual(["http"]);
    expect(planTunnel(f, eu, 21000, { http: 22000 })).toEqual({
      bastion: eu,
      port: 21000,
      extraArgs: ["-R", "localhost:22000:localhost:80", "-L", "localhost:4505:localhost:4505", "-D", "localhost:1080"],
      extraListen: [22000],
      permitOpen: ["localhost:4505", "intranet.example.com:8080"],
    });
    expect(planTunnel(f, us, 21000, { http: 22000 })).toMatchObject({ extraArgs: ["-R", "localhost:22000:localhost:80"], permitOpen: [] });
    // A device registered before a forward was added has no port for it: skipped, not guessed.
    expect(planTunnel(f, us, 21000, {}).extraArgs).toEqual([]);
  });

  it("renders options in sshd's order: restrict first, then what it re-enables, then the limits", () => {
    const t = planTunnel(f, { ...eu, from: ["198.51.100.0/24"], expiry: "2030-01-02" }, 21000, { http: 22000 });
    expect(authorizedKeysOptions({ hostname: "gw-1", pub: key.pub, tunnel: t, now: new Date("2026-01-01") })).toEqual([
      "restrict",
      "port-forwarding",
      'command="/sbin/nologin"',
      'from="198.51.100.0/24"',
      'expiry-time="203001020000"',
      'permitlisten="localhost:21000"',
      'permitlisten="localhost:22000"',
      'permitopen="localhost:4505"',
      'permitopen="intranet.example.com:8080"',
    ]);
    const line = authorizedKeysLine({ hostname: "gw-1", pub: key.pub, tunnel: planTunnel(f, us, 21000, {}), now: new Date() });
    expect(line).toMatch(/^restrict,port-forwarding,command="\/sbin\/nologin",permitlisten="localhost:21000" ssh-ed25519 \S+ gw-1$/);
    expect(Object.keys(deviceLines("gw-1", key.pub, planTunnels(f, [eu, us], 21000, {}), new Date()))).toEqual(["eu", "us"]);
  });

  it("refuses, never escapes, a value that would break out of its quotes", () => {
    const t = planTunnel(fleet(), { ...eu, from: ['10.0.0.0/8",command="/bin/sh'] }, 21000, {});
    expect(() => authorizedKeysLine({ hostname: "gw-1", pub: key.pub, tunnel: t, now: new Date() })).toThrow(/refusing to emit from=/);
  });
});

describe("config rules and positions", () => {
  const raw = (over: Partial<FleetRaw>): FleetRaw =>
    ({
      registry: "./r.db",
      hostname: "gw-{seq:04}",
      ports: { ssh: "21000-21999", services: "22000-22999" },
      bastions: { eu: { host: "b.example.com", port: 22, user: "reverse-ssh", hostKeys: [PIN] } },
      forwards: [],
      operators: "none",
      ...over,
    }) as FleetRaw;

  it("collects every cross-field problem with its path", () => {
    const problems = crossCheck(
      raw({
        hostname: "gw",
        ports: { ssh: "21000-21999", services: "21500-22500" },
        forwards: [
          { name: "a", type: "local", bastion: "eu", listen: 1, to: "*:22" },
          { name: "a", type: "remote", local: 80 },
        ],
      }),
      new Date(),
    );
    expect(problems.map((p) => formatPath(p.path))).toEqual(["hostname", "ports.services", "forwards[0].to", "forwards[1].name"]);
    expect(renderHostname("gw-{seq:04}", 7)).toBe("gw-0007");
  });

  it("finds the line and column of a path in the YAML", () => {
    const text = "bastions:\n  eu:\n    from:\n      - 10.0.0.0/8\n      - bad\n";
    const lc = new LineCounter();
    const doc = parseDocument(text, { lineCounter: lc });
    expect(positionOf(doc, lc, ["bastions", "eu", "from", 1])).toBe("5:9");
    expect(positionOf(doc, lc, ["bastions", "eu", "missing"])).toBe("3:5");
    expect(formatPath(["bastions", "eu", "from", 1])).toBe("bastions.eu.from[1]");
  });
});
