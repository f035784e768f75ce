/**
 * The command line itself: how words are routed to commands (build is the default command, so
 * a typo must not turn into a build), and the exit-code contract in --help.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { VERSION } from "../src/util/version.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-cli-");
const cli = (args: string[]) => runCli(args, { cwd: dir });
beforeAll(() => {
  writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
});
afterAll(() => removeDir(dir));

describe("command words", () => {
  it.each([
    [["verfy", "x"], "verfy", "verify"],
    [["biuld"], "biuld", "build"],
    [["--config", "mkoverlay.yaml", "rotat", "gw-0001"], "rotat", "rotate"],
    [["knwon-hosts"], "knwon-hosts", "known-hosts"],
  ])("%j is an unknown command with the nearest one suggested", (args, word, guess) => {
    const r = cli(args);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`mkoverlay: error: unknown command '${word}'\nmkoverlay: hint: did you mean '${guess}'? ('mkoverlay --help' lists the commands)\n`);
    expect(r.stdout).toBe("");
  });

  it("a word like no command gets no guess", () => {
    const r = cli(["xyzzyplugh"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe("mkoverlay: error: unknown command 'xyzzyplugh'\nmkoverlay: hint: 'mkoverlay --help' lists the commands\n");
  });

  it.each([[[]], [["--debug"]], [["--config", "mkoverlay.yaml"]]])("%j (no command) prints the usage on stderr and exits 2", (args) => {
    const r = cli(args);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe("");
    expect(r.stderr).toMatch(/^Usage: mkoverlay \[options\] \[command\]/);
    expect(r.stderr).toMatch(/^ {2}build \[options\]/m);
    // The usage, not build's options (the closing examples may show a build line).
    expect(r.stderr).not.toMatch(/--board <id>/);
  });

  it("options without a command still build (build is the default command)", () => {
    const r = cli(["--board", "rpi4", "--bastion", "eu", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ hostname: "gw-0001" });
    const g = cli(["--config", "mkoverlay.yaml", "--board", "rpi4", "--bastion", "eu", "--json"]);
    expect(g.code, g.stderr).toBe(0);
    expect(JSON.parse(g.stdout)).toMatchObject({ hostname: "gw-0002" });
  });

  it("--help documents the exit codes", () => {
    const r = cli(["--help"]);
    expect(r.code).toBe(0);
    expect(r.stdout.replace(/\n/g, " ")).toMatch(/Exit codes: 0 ok; 1 a check failed .* 2 a usage, input or I\/O error you can fix .* 70 a bug/);
  });
});

describe("conventions: unknown words, the version, one error style", () => {
  it("an unknown option wins over a missing required one, with the nearest option suggested", () => {
    for (const args of [["--bord", "rpi4"], ["build", "--bord", "rpi4"]]) {
      const r = cli(args);
      expect(r.code).toBe(2);
      expect(r.stderr).toBe("mkoverlay: error: unknown option '--bord'\nmkoverlay: hint: did you mean '--board'? ('mkoverlay build --help' lists the options)\n");
    }
    const s = cli(["status", "--stat", "offline"]);
    expect(s.stderr).toMatch(/^mkoverlay: error: unknown option '--stat'\nmkoverlay: hint: did you mean '--state'\?/);
  });

  it("a missing required option still says which, and what it is for", () => {
    const r = cli(["image", "--base", "x.img", "--bastion", "eu"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe("mkoverlay: error: required option '--board <id>' not specified\nmkoverlay: hint: --board: board profile (see 'mkoverlay boards')\n");
  });

  it.each([["-v"], ["-V"], ["--version"]])("%s prints the version", (flag) => {
    const r = cli([flag]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe(`${VERSION}\n`);
    expect(r.stderr).toBe("");
  });

  it("an unknown subcommand gets 'did you mean' in the same style", () => {
    const r = cli(["registry", "lst"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe("mkoverlay: error: unknown command 'lst'\nmkoverlay: hint: did you mean 'list'? ('mkoverlay registry --help' lists the commands)\n");
  });

  const failing = [
    ["--bord", "rpi4"],
    ["verfy", "x"],
    ["registry", "lst"],
    ["status", "--bogus"],
    ["write"],
    ["write", "a", "b", "--image", "x"],
    ["batch", "--board"],
    ["image", "--base", "x.img"],
    ["revoke", "no-such-device"],
    ["--board", "rpi4", "--bastion", "nowhere"],
  ];

  it.each(failing)("%s: every error line is mkoverlay's (one style, nothing of commander's)", (...args) => {
    const r = cli(args);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe("");
    const lines = r.stderr.trimEnd().split("\n");
    expect(lines[0]).toMatch(/^mkoverlay: error: \S/);
    for (const l of lines) expect(l, r.stderr).toMatch(/^mkoverlay: (error|hint): /);
  });

  it.each(failing)("%s --json: the error is one JSON object on stderr", (...args) => {
    const r = cli([...args, "--json"]);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe("");
    expect(r.stderr.endsWith("\n") && r.stderr.trimEnd().split("\n").length === 1, r.stderr).toBe(true);
    const e = JSON.parse(r.stderr) as Record<string, unknown>;
    expect(Object.keys(e).sort()).toEqual(["error", "exitCode", "hint"]);
    expect(e.exitCode).toBe(r.code);
    expect(typeof e.error).toBe("string");
    expect(e.error).not.toMatch(/^error:/);
  });

  it("--json: the hint carries the suggestion; a failure after the command started is JSON too", () => {
    expect(JSON.parse(cli(["--json", "--bord", "rpi4"]).stderr)).toEqual({ error: "unknown option '--bord'", hint: "did you mean '--board'? ('mkoverlay build --help' lists the options)", exitCode: 2 });
    const c = cli(["status", "--json", "--config", "missing.yaml"]);
    expect(JSON.parse(c.stderr)).toMatchObject({ error: expect.stringMatching(/missing\.yaml: config file not found/), hint: expect.any(String), exitCode: 2 });
    // A word after "--" is a value, not the option.
    expect(cli(["--bord", "rpi4", "--", "--json"]).stderr).toMatch(/^mkoverlay: error: unknown option/);
  });
});

describe("start-up: only the command that runs is defined", async () => {
  const { COMMANDS, onlyCommand, program } = await import("../src/cli/main.js");
  it("COMMANDS lists every top-level command program() defines", () => {
    expect(program().commands.map((c) => c.name())).toEqual([...COMMANDS]);
  });
  it("picks the command from the words, and defines them all when in doubt", () => {
    expect(onlyCommand(["--board", "rpi4", "--bastion", "eu"])).toBe("build");
    expect(onlyCommand(["--config", "f.yaml", "batch", "--count", "3"])).toBe("batch");
    expect(onlyCommand(["registry", "list"])).toBe("registry");
    expect(onlyCommand(["batch", "--help"])).toBe("batch");
    for (const args of [[], ["--help"], ["-V"], ["-v"], ["verfy"], ["--debug"], ["--board", "rpi4", "--help"]]) expect(onlyCommand(args), args.join(" ")).toBeUndefined();
    expect(program("batch").commands.map((c) => c.name())).toEqual(["batch"]);
  });
});
