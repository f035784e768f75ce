/**
 * Commander does the bookkeeping (issue 23): options several commands share are defined once
 * (src/cli/main.ts OPTIONS and its groups), fixed values are commander `.choices()` — refused while the
 * line is parsed, in the words each command always used, and read by completion from the
 * definitions — and options that exclude each other are `.conflicts()`.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { allCommands, commandPath, program } from "../src/cli/main.js";
import { candidates } from "../src/cli/completion.js";
import { removeDir, runCli, tempDir } from "./helpers/workspace.js";

describe("the definitions", () => {
  it("each shared option is written once in cli/main.ts; --config once besides the program's", () => {
    const src = readFileSync(join(import.meta.dirname, "../src/cli/main.ts"), "utf8");
    const defs = (flag: string) => src.split(new RegExp(`(?:option|Option|choice)\\(\\s*"${flag.replace(/[-]/g, "\\-")}[ ",]`)).length - 1;
    expect(defs("--config <file>")).toBe(2); // the program's (before a command word) and OPTIONS.config
    // build's and rotate's --format once; status and registry list have their own formats.
    expect(defs("--format <form>")).toBe(3);
    for (const f of ["--json", "-q, --quiet", "--board <id>", "--bastion <names>", "--os <id>", "--host-key <file>", "--apply <root>", "--root-partition <n>", "--compress <kind>", "--force-config-change", "--grace <duration>", "--attr <key=value>"]) {
      expect(defs(f), f).toBe(1);
    }
  });

  it("build, batch, image, rotate and provisioner-hook share the same option objects' shape", () => {
    const p = program();
    const byPath = new Map(allCommands(p).map((c) => [commandPath(c), c]));
    const flags = (path: string) => byPath.get(path)!.options.map((o) => o.flags);
    for (const path of ["build", "batch", "image"]) expect(flags(path)).toEqual(expect.arrayContaining(["--board <id>", "--bastion <names>", "--os <id>", "--force-config-change", "--config <file>", "--json", "-q, --quiet"]));
    for (const path of ["batch", "image"]) expect(flags(path)).toEqual(expect.arrayContaining(["--root-partition <n>", "--compress <kind>", "--force"]));
    const choices = (path: string, long: string) => byPath.get(path)!.options.find((o) => o.long === long)?.argChoices;
    expect(choices("build", "--format")).toEqual(["tar", "dir"]);
    expect(choices("rotate", "--format")).toEqual(["tar", "dir"]);
    expect(choices("status", "--format")).toEqual(["table", "json", "prometheus"]);
    expect(choices("registry list", "--format")).toEqual(["table", "csv", "markdown"]);
    expect(choices("image", "--compress")).toEqual(["zstd"]);
  });

  it("completion offers exactly what the definitions hold, for every option and argument with choices", async () => {
    const p = program();
    let seen = 0;
    for (const c of allCommands(p)) {
      const words = ["mkoverlay", ...commandPath(c).split(" ")];
      for (const o of c.options.filter((x) => x.argChoices)) {
        expect(await candidates(p, [...words, o.long!, ""], words.length + 1), `${commandPath(c)} ${o.long}`).toEqual(o.argChoices);
        seen++;
      }
      for (const a of c.registeredArguments.filter((x) => x.argChoices)) {
        expect(await candidates(p, [...words, ""], words.length), `${commandPath(c)} <${a.name()}>`).toEqual(a.argChoices);
        seen++;
      }
    }
    // build, batch, rotate --format; status, registry list --format; batch, image --compress; schema, completion.
    expect(seen).toBe(9);
    expect(await candidates(p, ["mkoverlay", "image", "--compress", ""], 3)).toEqual(["zstd"]);
    expect(await candidates(p, ["mkoverlay", "write", ""], 2)).toEqual([":files"]);
    expect(await candidates(p, ["mkoverlay", "bastion", "install", "--mkoverlay", ""], 4)).toEqual([":files"]);
  });
});

describe("on the command line", () => {
  let dir: string;
  const cli = (args: string[]) => runCli(args, { cwd: dir });
  beforeAll(() => {
    dir = tempDir("mko-cli-defs-");
  });
  afterAll(() => removeDir(dir));

  it.each([
    [["--board", "rpi4", "--format", "zip"], 'mkoverlay: error: --format "zip": use tar (a .overlay.tar.gz) or dir (a folder); --apply ROOT lays it over a root file system\n'],
    [["rotate", "gw-0001", "--format", "zip"], 'mkoverlay: error: --format "zip": use tar (a .overlay.tar.gz) or dir (a folder); --apply ROOT lays it over a root file system\n'],
    [["status", "--format", "xml"], 'mkoverlay: error: --format "xml": use table, json or prometheus\n'],
    [["registry", "list", "--format", "xml"], 'mkoverlay: error: --format "xml": use table, csv or markdown (or --json)\n'],
    [["image", "--base", "b.img", "--board", "rpi4", "--compress", "xz"], 'mkoverlay: error: --compress "xz": only zstd is supported\n'],
    [["schema", "yaml"], 'mkoverlay: error: schema "yaml": use fleet, board or os\n'],
    [["completion", "tcsh"], 'mkoverlay: error: completion "tcsh": use bash, zsh or fish\n'],
  ])("%j: a value outside the choices is refused as the line is read, before any config is looked for", (args, stderr) => {
    // No config in this folder: the choice is refused first.
    const r = cli(args);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(stderr);
  });

  it.each([
    [["batch", "--board", "rpi4", "--count", "2", "--hosts", "h.csv"], "option '--count <n>' cannot be used with option '--hosts <file>'", "batch"],
    [["--board", "rpi4", "--apply", "/mnt", "--format", "tar"], "option '--apply <root>' cannot be used with option '--format <form>'", "build"],
    [["rotate", "gw-0001", "--apply", "/mnt", "--format", "dir"], "option '--apply <root>' cannot be used with option '--format <form>'", "rotate"],
    [["batch", "--board", "rpi4", "--count", "2", "--image", "b.img", "--format", "dir"], "option '--image <base>' cannot be used with option '--format <form>'", "batch"],
    [["write", "o.tar.gz", "--image", "x.img", "--device", "/dev/null"], "option '--image <file>' cannot be used with option '--device <dev>'", "write"],
  ])("%j: options that exclude each other are refused by commander", (args, message, cmd) => {
    const r = cli(args);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`mkoverlay: error: ${message}\nmkoverlay: hint: 'mkoverlay ${cmd} --help' lists the options\n`);
  });
});
