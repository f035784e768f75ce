/**
 * The command line itself: how words are routed to commands (build is the default command, so
 * a typo must not turn into a build), and the exit-code contract in --help.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
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

describe("start-up: only the command that runs is defined", async () => {
  const { COMMANDS, onlyCommand, program } = await import("../src/cli.js");
  it("COMMANDS lists every top-level command program() defines", () => {
    expect(program().commands.map((c) => c.name())).toEqual([...COMMANDS]);
  });
  it("picks the command from the words, and defines them all when in doubt", () => {
    expect(onlyCommand(["--board", "rpi4", "--bastion", "eu"])).toBe("build");
    expect(onlyCommand(["--config", "f.yaml", "batch", "--count", "3"])).toBe("batch");
    expect(onlyCommand(["registry", "list"])).toBe("registry");
    expect(onlyCommand(["batch", "--help"])).toBe("batch");
    for (const args of [[], ["--help"], ["-V"], ["verfy"], ["--debug"], ["--board", "rpi4", "--help"]]) expect(onlyCommand(args), args.join(" ")).toBeUndefined();
    expect(program("batch").commands.map((c) => c.name())).toEqual(["batch"]);
  });
});
