/**
 * Command-line front end: parses flags with commander, lazily imports the one command that
 * runs (start-up cost matters when a flashing script calls mkoverlay once per device), and
 * owns the single top-level error handler.
 */
import { Command, CommanderError, Option } from "commander";
import { isUserError } from "./errors.js";

const VERSION = "0.1.0";

function program(): Command {
  const p = new Command("mkoverlay")
    .description("Build rootfs overlays for gateways that keep reverse SSH tunnels to bastions")
    .version(VERSION)
    .option("--debug", "print stack traces for errors")
    .showHelpAfterError("(run with --help for usage)")
    .showSuggestionAfterError(true);

  p.command("build", { isDefault: true })
    .description("build one device's overlay, reserve its port, print its bastion authorized_keys line(s)")
    .requiredOption("--board <id>", "board profile (see 'mkoverlay boards')")
    .option("--bastion <names>", "bastion(s) from the config, comma-separated (e.g. eu,us)")
    .option("--os <id>", "OS profile, instead of the board's default")
    .option("--hostname <name>", "device name (default: the config's hostname template)")
    .option("--host-key <file>", "use this unencrypted ed25519 OpenSSH private key instead of a new one")
    .option("--out <dir>", "output directory (created 0700)", "out")
    .option("--format <form>", "tar (default: <out>/<host>.overlay.tar.gz) or dir (<out>/<host>.overlay/)")
    .option("--apply <root>", "lay the overlay directly over a mounted root file system (as root)")
    .option("--config <file>", "fleet config (default $MKOVERLAY_CONFIG or ./mkoverlay.yaml)")
    .option("--json", "print one JSON object on stdout")
    .option("-q, --quiet", "no progress on stderr")
    .action(async (opts) => (await import("./commands/build.js")).buildCommand(opts));

  p.command("boards")
    .description("list board and OS profiles")
    .option("--json", "JSON output")
    .action(async (opts) => (await import("./commands/boards.js")).boardsCommand(opts));

  const registry = p.command("registry").description("the port registry: list, doctor, release, migrate");
  registry
    .command("doctor")
    .description("finish or reclaim devices left pending by killed builds")
    .option("--fix", "apply (default: report only)")
    .option("--grace <seconds>", "leave builds younger than this alone", "60")
    .option("--config <file>", "fleet config")
    .option("--json", "JSON output")
    .action(async (opts) => (await import("./commands/doctor.js")).doctorCommand(opts));

  p.command("schema")
    .description("print the fleet config JSON Schema (for editors)")
    .addOption(new Option("--out <file>", "write it to a file instead"))
    .action(async (opts) => (await import("./commands/schema.js")).schemaCommand(opts));

  return p;
}

export async function main(argv: string[]): Promise<void> {
  const debug = argv.includes("--debug");
  const p = program();
  p.exitOverride();
  try {
    await p.parseAsync(argv);
  } catch (e) {
    process.exitCode = report(e, debug);
  }
}

function report(e: unknown, debug: boolean): number {
  if (e instanceof CommanderError) {
    // commander already printed its message (unknown option, missing argument, --help…).
    return e.exitCode === 0 ? 0 : 2;
  }
  if (isUserError(e)) {
    const lines = e.message.split("\n");
    process.stderr.write(lines.map((l) => `mkoverlay: error: ${l}\n`).join(""));
    if (e.hint) process.stderr.write(`mkoverlay: hint: ${e.hint}\n`);
    if (debug && e.stack) process.stderr.write(`${e.stack}\n`);
    return e.exitCode;
  }
  const err = e as Error;
  process.stderr.write(`mkoverlay: internal error: ${err?.message ?? String(e)}\n${err?.stack ?? ""}\nThis is a bug in mkoverlay; please report it with the command you ran.\n`);
  return 70;
}
