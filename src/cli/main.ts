/**
 * Command-line front end: parses flags with commander, lazily imports the one command that
 * runs (start-up cost matters when a flashing script calls mkoverlay once per device), and
 * owns the single top-level error handler.
 */
import { Argument, Command, CommanderError, Option } from "commander";
import type * as CliHelp from "./help.js";
import { ioUserError, isUserError, UserError } from "../util/errors.js";
import { stderrLog } from "../util/log.js";
import { VERSION } from "../util/version.js";

/* eslint-disable @typescript-eslint/no-explicit-any -- commander hands actions untyped arguments */
type Action = (...args: any[]) => Promise<void>;
/** Imports a command's module only when that command runs. */
function lazy<M>(load: () => Promise<M>, run: (m: M, ...args: any[]) => unknown): Action {
  return async (...args) => {
    // commander passes (...positionals, options, command): merge in the program-level options,
    // so `mkoverlay --config F batch …` means the same as `mkoverlay batch --config F …`.
    const cmd = args[args.length - 1] as Command;
    checkRequired(cmd);
    const merged = [...args.slice(0, -2), { ...cmd.optsWithGlobals() }, cmd];
    await run(await load(), ...merged);
  };
}
/* eslint-enable @typescript-eslint/no-explicit-any */

/**
 * Options declared with requiredOption(). commander checks them before unknown options, so a
 * typo (`--bord rpi4`) was reported as the option it failed to spell; they are checked here
 * instead, in the action, which commander runs only after its unknown-option check.
 */
const REQUIRED = new WeakSet<Option>();

function checkRequired(cmd: Command): void {
  for (const o of cmd.options) {
    if (REQUIRED.has(o) && cmd.getOptionValue(o.attributeName()) === undefined) {
      throw new UserError(`required option '${o.flags}' not specified`, { hint: `${o.long ?? o.flags}: ${o.description}` });
    }
  }
}

/** What to say after commander's own errors, by its code: where the user finds the right words. */
const AFTER: Record<string, string> = {
  "commander.unknownCommand": "lists the commands",
  "commander.unknownOption": "lists the options",
  "commander.optionMissingArgument": "lists the options",
  "commander.conflictingOption": "lists the options",
};

/**
 * commander's own errors (unknown option or subcommand, missing argument…) as UserErrors, so
 * they print in mkoverlay's one style (or as JSON with --json), commander's suggestion as the
 * hint. Help and version are not errors and go through as they are.
 */
function usageError(e: CommanderError, c: Command): UserError | CommanderError {
  const m = /^error: ([\s\S]*?)(?:\n\(Did you mean (.+)\?\))?$/.exec(e.message);
  if (e.exitCode === 0 || !m) return e;
  const help = `'${["mkoverlay", commandPath(c), "--help"].filter(Boolean).join(" ")}' ${AFTER[e.code] ?? "shows the usage"}`;
  return new UserError(m[1]!, { hint: m[2] ? `did you mean '${m[2]}'? (${help})` : help });
}

const CFG = "fleet config (default $MKOVERLAY_CONFIG or ./mkoverlay.yaml)";

/** `--attr KEY=VALUE`, repeatable. */
const collect = (v: string, prev: string[] = []): string[] => [...prev, v];

/**
 * An option with fixed values: commander lists them (`--help`, and completion.ts reads them from
 * here), and a value outside them is refused while the line is parsed with `message`, the words
 * each command has always used.
 */
function choice(flags: string, description: string, values: readonly string[], message: (v: string) => string): Option {
  return new Option(flags, description).choices(values).argParser((v: string) => {
    if (!values.includes(v)) throw new UserError(message(v));
    return v;
  });
}

/** A positional argument with fixed values, checked the same way. */
function choiceArgument(name: string, description: string, values: readonly string[], message: (v: string) => string): Argument {
  return new Argument(name, description).choices(values).argParser((v: string) => {
    if (!values.includes(v)) throw new UserError(message(v));
    return v;
  });
}

const mandatory = (o: Option): Option => o.makeOptionMandatory();

/**
 * Options several commands share, defined once; a command adds them by name with `add()` (the
 * description may be the command's own). Groups below add the runs build, batch, image, rotate
 * and provisioner-hook all had.
 */
const OPTIONS = {
  config: (d = CFG) => new Option("--config <file>", d),
  json: (d = "JSON output") => new Option("--json", d),
  quiet: (d = "no progress on stderr") => new Option("-q, --quiet", d),
  board: (d = "board profile (see 'mkoverlay boards')") => mandatory(new Option("--board <id>", d)),
  bastions: (d = "bastion(s) from the config, comma-separated (e.g. eu,us)") => new Option("--bastion <names>", d),
  bastion: (d = "the bastion") => new Option("--bastion <name>", d),
  os: () => new Option("--os <id>", "OS profile, instead of the board's default"),
  hostname: (d = "device name (default: the config's hostname template)") => new Option("--hostname <name>", d),
  hostKey: (d = "use this unencrypted ed25519 OpenSSH private key instead of a new one") => new Option("--host-key <file>", d),
  attr: (d: string) => new Option("--attr <key=value>", d).argParser(collect),
  out: (d = "output directory (created 0700)") => new Option("--out <dir>", d).default("out"),
  format: (d = "tar (default: <out>/<host>.overlay.tar.gz) or dir (<out>/<host>.overlay/)") =>
    choice("--format <form>", d, ["tar", "dir"], (v) => `--format ${JSON.stringify(v)}: use tar (a .overlay.tar.gz) or dir (a folder); --apply ROOT lays it over a root file system`),
  apply: (d = "lay the overlay directly over a mounted root file system (as root)") => new Option("--apply <root>", d),
  rootPartition: (d = "the root partition's number (default: found by type, label and file system)") => new Option("--root-partition <n>", d),
  compress: (d = "zstd: write <host>.img.zst instead of <host>.img") => choice("--compress <kind>", d, ["zstd"], (v) => `--compress ${JSON.stringify(v)}: only zstd is supported`),
  force: (d: string) => new Option("--force", d),
  forceConfigChange: (d = "build even though the config would lock out registered devices (they are served side by side; docs/bastion.md)") => new Option("--force-config-change", d),
  grace: (d: string, def: string) => new Option("--grace <duration>", d).default(def),
  serialAttr: () => new Option("--serial-attr <name>", "the factory data name the serial is recorded under").default("serial"),
  registry: (d: string, def?: string) => new Option("--registry <location>", d).default(def),
  neverSeenAfter: (d: string) => new Option("--never-seen-after <duration>", d).default("24h"),
  expiringWithin: (d: string) => new Option("--expiring-within <duration>", d).default("30d"),
} satisfies Record<string, (...a: never[]) => Option>;

function add(c: Command, ...options: Option[]): Command {
  for (const o of options) c.addOption(o);
  return c;
}

/** What a new device is built from: --board, --bastion, --os. */
const deviceOptions = (c: Command, board?: string, bastions?: string): Command => add(c, OPTIONS.board(board), OPTIONS.bastions(bastions), OPTIONS.os());
/** Into a base image: --root-partition, --compress, --force. */
const imageOptions = (c: Command, force = "lay the overlay even over another device's mkoverlay identity in the base", rootPartition?: string, compress?: string): Command =>
  add(c, OPTIONS.rootPartition(rootPartition), OPTIONS.compress(compress), OPTIONS.force(force));
/** What a station's run ends with: --force-config-change, --config, --json, -q. */
const stationOptions = (c: Command, json = "print one JSON object on stdout"): Command => add(c, OPTIONS.forceConfigChange(), OPTIONS.config(), OPTIONS.json(json), OPTIONS.quiet());
/** A fleet command that reports: --config, --json. */
const reportOptions = (c: Command, json?: string): Command => add(c, OPTIONS.config(), OPTIONS.json(json));

/**
 * The command line. `only`: define just that command (main() knows which one runs); `help`:
 * the examples, environment and exit codes for --help (loaded only when help may be shown).
 */
export function program(only?: string, help?: typeof CliHelp): Command {
  const p = new Command("mkoverlay")
    .description("Build rootfs overlays for gateways that keep reverse SSH tunnels to bastions")
    .version(VERSION, "-v, --version")
    // -V, commander's default, still works (hidden: one spelling in the help).
    .addOption(new Option("-V").hideHelp())
    .on("option:V", () => {
      process.stdout.write(`${VERSION}\n`);
      throw new CommanderError(0, "commander.version", VERSION);
    })
    .option("--debug", "print stack traces for errors")
    .option("--config <file>", CFG)
    .showSuggestionAfterError(true)
    .addHelpText("after", () => help?.programHelpAfter() ?? "")
    // Set before the subcommands are added so they inherit them: commander prints no error of
    // its own (report() prints them all, in one style), and one exit path for every error.
    .configureOutput({ outputError: () => undefined })
    .exitOverride();
  const device = "HOST, or KEY=VALUE of its factory data (e.g. serial=SN0042)";

  // Only the command that runs, when main() knows it: building every command and its options costs
  // each start several milliseconds (a flashing script starts mkoverlay once per device).
  const def = (name: string, define: () => void): void => {
    if (only === undefined || only === name) define();
  };

  const defs: Defs = { p, def, device };
  defineBuildCommands(defs);
  defineCardCommands(defs);
  defineBastionCommands(defs);
  defineFleetCommands(defs);
  defineRegistryCommands(defs);
  defineToolCommands(defs);

  for (const c of [p, ...allCommands(p)]) {
    c.exitOverride((e) => {
      throw usageError(e, c);
    });
    for (const o of c.options) {
      if (!o.mandatory) continue;
      REQUIRED.add(o);
      o.mandatory = false;
    }
  }
  for (const c of help ? allCommands(p) : []) {
    const spec = help!.HELP[commandPath(c)];
    // Rendered only when help is shown.
    if (spec) c.addHelpText("after", () => help!.helpAfter(commandPath(c), spec));
  }
  return p;
}

/** Defines one top-level command unless main() knows another one runs (`program`'s `only`). */
type Def = (name: string, define: () => void) => void;

/** What each group of command definitions works with: the program, `def`, and the device argument's description. */
interface Defs {
  p: Command;
  def: Def;
  device: string;
}

/** Building devices: build, batch, image. */
function defineBuildCommands({ p, def }: Defs): void {
  def("build", () => {
    const c = p.command("build", { isDefault: true }).description("build one device's overlay, reserve its port, print its bastion authorized_keys line(s)");
    deviceOptions(c);
    add(
      c,
      OPTIONS.hostname("device name (default: the config's hostname template); KEY=VALUE names a registered device by its factory data (with --host-key)"),
      OPTIONS.hostKey(),
      OPTIONS.attr("factory data to record with the device (repeatable), e.g. serial=SN0042"),
      OPTIONS.out(),
      OPTIONS.format(),
      OPTIONS.apply().conflicts("format"),
    );
    stationOptions(c).action(lazy(() => import("./commands/build.js"), (m, opts) => m.buildCommand(opts)));
  });

  def("batch", () => {
    const c = p.command("batch").description("build many devices: --count N (names from the template) or --hosts FILE");
    deviceOptions(c, "board profile", "bastion(s), comma-separated");
    add(
      c,
      new Option("--count <n>", "this many devices, named by the hostname template").conflicts("hosts"),
      new Option("--hosts <file>", "one hostname a line, or CSV with a hostname column (other columns are kept as factory data)"),
      OPTIONS.attr("factory data recorded with every device of the batch (repeatable)"),
      OPTIONS.out(),
      OPTIONS.format("tar or dir"),
      new Option("--image <base>", "one disk image per device from this base image (<out>/<host>.img + .bmap)").conflicts("format"),
    );
    imageOptions(c, "with --image: lay overlays even over another device's identity in the base", "with --image: the root partition's number", "with --image: zstd writes <host>.img.zst");
    stationOptions(c, "one JSON object per device on stdout");
    c.addOption(new Option("--no-progress", "no progress bar on a terminal: a plain line per device instead"));
    c.action(lazy(() => import("./commands/batch.js"), (m, opts) => m.batchCommand(opts)));
  });

  def("image", () => {
    const c = p.command("image").description("build one device as a disk image: the base with its overlay laid into the root partition (+ a bmap)");
    c.addOption(mandatory(new Option("--base <image>", "the OS image to start from (e.g. a Raspberry Pi OS .img; MBR or GPT)")));
    deviceOptions(c);
    add(
      c,
      OPTIONS.hostname("device name (default: the config's hostname template); KEY=VALUE names a registered device by its factory data (with --host-key)"),
      OPTIONS.hostKey(),
      OPTIONS.attr("factory data to record with the device (repeatable), e.g. serial=SN0042"),
      OPTIONS.out("output directory (created 0700): <out>/<host>.img and .img.bmap"),
    );
    imageOptions(c);
    stationOptions(c).action(lazy(() => import("./commands/image.js"), (m, opts) => m.imageCommand(opts)));
  });

}

/** Cards and the config: write, flash, init. */
function defineCardCommands({ p, def }: Defs): void {
  def("write", () => {
    const c = p
      .command("write <overlay>")
      .description("lay an existing overlay (archive or folder) into a disk image or an already-flashed card")
      .addOption(new Option("--image <file>", "the image to write into, in place").conflicts("device"))
      .option("--device <dev>", "the card (block device) to write, e.g. /dev/sdX")
      .option("--base <image>", "with --device: write this base image's used blocks first");
    add(c, OPTIONS.rootPartition(), OPTIONS.force("lay the overlay even over another device's mkoverlay identity"), OPTIONS.json("print one JSON object on stdout"), OPTIONS.quiet());
    c.action(lazy(() => import("./commands/write.js"), (m, overlay, opts) => m.writeCommand(overlay, opts)));
  });

  def("flash", () => {
    const c = p
      .command("flash")
      .description("flash many cards at once, each a different device of the shift: base, overlay, read back, then registered")
      .argument("<cards...>", "each card as /dev/sdX, or WHO@/dev/sdX for the device WHO (a hostname, or serial=… of its factory data)")
      .addOption(mandatory(new Option("--base <image>", "the OS image whose used blocks (its bmap) go on every card")));
    deviceOptions(c);
    add(
      c,
      new Option("--hosts <file>", "the shift's CSV: a card takes the row its WHO@ names, else the next row not built"),
      OPTIONS.attr("factory data recorded with every device (repeatable)"),
      OPTIONS.out("output directory (created 0700): each device's overlay archive"),
      OPTIONS.rootPartition(),
      OPTIONS.forceConfigChange(),
      OPTIONS.config(),
      OPTIONS.json("one JSON object per card on stdout"),
      new Option("--no-progress", "no redrawn lines on a terminal: a plain line per card instead"),
      OPTIONS.quiet(),
    );
    c.action(lazy(() => import("./commands/flash.js"), (m, cards, opts) => m.flashCommand(cards, opts)));
  });

  def("init", () => {
    const c = p
      .command("init")
      .description("write a commented fleet config (./mkoverlay.yaml, or --config FILE) from flags or answers")
      .option("--bastion <name=host[:port]>", "a bastion the gateways tunnel to (repeatable)", collect)
      .option("--host-key-file <[name=]file>", "pin the bastion host key(s) in FILE: ssh-keyscan output, known_hosts lines, or a .pub (NAME= when several bastions) (repeatable)", collect)
      .option("--host-keys <->", "read ssh-keyscan output from stdin ('-'); lines are matched to bastions by host")
      .option("--tunnel-user <user>", "the tunnel user on the bastions", "reverse-ssh")
      .option("--operator-key <file>", "an operator's public key file, e.g. ~/.ssh/id_ed25519.pub (repeatable)", collect)
      .option("--operator-ca <file>", "an SSH user CA's public key: certificates it signs for --principal may log in")
      .option("--principal <name>", "a certificate principal for --operator-ca (repeatable)", collect)
      .option("--operator-user <user>", "the account operators log in as", "root")
      .option("--no-operators", "add no login access (the OS image brings its own)");
    add(
      c,
      OPTIONS.registry("registry file (relative to the config) or postgres://user@host/db", "./mkoverlay.db"),
      new Option("--hostname <template>", "device names: {seq} or {seq:0N} is the sequence number").default("gw-{seq:04}"),
      new Option("--ssh-ports <range>", "one tunnel port per device from this range").default("21000-21999"),
      new Option("--service-ports <range>", "ports for service tunnels").default("22000-22999"),
      OPTIONS.force("replace an existing file"),
      OPTIONS.config("where to write it (default $MKOVERLAY_CONFIG or ./mkoverlay.yaml)"),
      OPTIONS.json("print what was written as JSON"),
    );
    c.addHelpText(
      "after",
      "\nmkoverlay init never fetches a host key itself: pinning a bastion's key is your decision. Get it\n" +
        "from the bastion (its /etc/ssh/ssh_host_ed25519_key.pub) or from ssh-keyscan, and compare the\n" +
        "fingerprint init prints with 'ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub' run on the bastion.\n",
    ).action(lazy(() => import("./commands/init.js"), (m, opts) => m.initCommand(opts)));
  });

}

/** The bastion's side and the operators': bastion, ssh-config, known-hosts. */
function defineBastionCommands({ p, def }: Defs): void {
  def("bastion", () => {
    const bastion = p.command("bastion").description("the bastion's side: authorized-keys, sshd-config, install (as root), agent (the live key follower)");
    const keys = bastion.command("authorized-keys").description("the tunnel user's complete authorized_keys file, from the registry");
    add(keys, mandatory(OPTIONS.bastion()), new Option("--write <file>", "replace FILE atomically instead of printing (0600, the tunnel user's; a new file is created for it)"));
    reportOptions(keys).action(lazy(() => import("./commands/bastion.js"), (m, opts) => m.authorizedKeysCommand(opts)));
    const sshd = bastion.command("sshd-config").description("the Match User block the bastion's sshd_config needs");
    add(sshd, mandatory(OPTIONS.bastion()), new Option("--authorized-keys-file <path>", "add an AuthorizedKeysFile line (e.g. /etc/ssh/authorized_keys.d/%u)"));
    reportOptions(sshd).action(lazy(() => import("./commands/bastion.js"), (m, opts) => m.sshdConfigCommand(opts)));
    const install = bastion.command("install").description("set this host (or --root DIR) up as the bastion: tunnel user, sshd drop-in, key directory, agent unit");
    add(
      install,
      mandatory(OPTIONS.bastion()),
      new Option("--root <dir>", "install into a mounted image instead of this host (like systemctl --root)"),
      OPTIONS.registry("the registry the agent reads, as the bastion reaches it (default: the config's; required with --root), e.g. postgres://mkoverlay_bastion@db/fleet"),
      new Option("--no-create-user", "fail instead of creating a missing tunnel user"),
      new Option("--mkoverlay <path>", "mkoverlay's executable on the bastion, for the unit (default: this one; required with --root)"),
      new Option("--take-over-user <name>", "let an existing login account (a shell, a password or keys) become the tunnel user: it then logs in only as a tunnel"),
      new Option("--dry-run", "check everything and print what would change, as a diff; change nothing"),
      OPTIONS.forceConfigChange("install even though the config would lock out registered devices: old tunnel users keep their Match block"),
      new Option("--sshd-version <major.minor>", "the bastion's OpenSSH version (e.g. 10.0), when its sshd cannot run here (--root of another architecture)"),
    );
    reportOptions(install, "what was installed (or would be), as JSON").action(lazy(() => import("./commands/bastion-install.js"), (m, opts) => m.bastionInstallCommand(opts)));
    const agent = bastion.command("agent").description("keep sshd's tunnel keys equal to the registry, live (runs in mkoverlay-bastion@NAME.service)");
    add(
      agent,
      mandatory(OPTIONS.bastion()),
      new Option("--state-dir <dir>", "key directory and state (default /var/lib/mkoverlay/bastion/NAME)"),
      new Option("--auth-log <source>", "where sshd logs logins: journal, a file (sshd -E), or none").default("journal"),
      new Option("--resync <duration>", "full re-read period (seconds or a duration; default 60 on PostgreSQL, 10 on SQLite)"),
      new Option("--interval <duration>", "how often to record the tunnels this bastion sees (mkoverlay status; seconds or a duration)").default("15"),
      new Option("--metrics-listen <host:port>", "serve this bastion's fleet view for Prometheus on a loopback address (GET /metrics)"),
      OPTIONS.neverSeenAfter("for the metrics: a device built this long ago and never connected is an alarm"),
      OPTIONS.expiringWithin("for the metrics: a key that expires on this bastion within this is an alarm (e.g. 30d, 6w; 0: only expired)"),
      OPTIONS.config(),
    );
    agent.action(lazy(() => import("./commands/bastion-agent.js"), (m, opts) => m.bastionAgentCommand(opts)));
  });

  def("ssh-config", () => {
    const c = p
      .command("ssh-config")
      .description("~/.ssh/config entries that reach every live device by name through its bastion")
      .addOption(OPTIONS.bastion("route through this bastion (default: each device's first)"))
      .option("--user <name>", "login user on the devices", "root")
      .option("--known-hosts <file>", "add UserKnownHostsFile FILE (e.g. where you saved 'mkoverlay known-hosts')");
    reportOptions(c).action(lazy(() => import("./commands/operator.js"), (m, opts) => m.sshConfigCommand(opts)));
  });

  def("known-hosts", () => {
    const c = p.command("known-hosts").description("known_hosts lines for every live device (matching ssh-config's HostKeyAlias)");
    reportOptions(c).action(lazy(() => import("./commands/operator.js"), (m, opts) => m.knownHostsCommand(opts)));
  });

}

/** A device's life and the fleet: revoke, rotate, verify, boards, status. */
function defineFleetCommands({ p, def, device }: Defs): void {
  def("revoke", () => {
    const c = p.command("revoke").description("take a device out of every export; its ports stay quarantined").argument("<device>", device);
    reportOptions(c).action(lazy(() => import("./commands/lifecycle.js"), (m, host, opts) => m.revokeCommand(host, opts)));
  });

  def("rotate", () => {
    const c = p.command("rotate").description("a new key for a device (same name and ports) and a new overlay").argument("<device>", device);
    add(
      c,
      OPTIONS.hostKey("use this key instead of a new one"),
      OPTIONS.grace("bastions keep accepting the old key this long (a duration: 30min, 12h, 7d, 2w; 0: drop it now)", "7d"),
      OPTIONS.out(),
      OPTIONS.format("tar or dir"),
      OPTIONS.apply("lay the overlay over a mounted root file system").conflicts("format"),
    );
    stationOptions(c, "JSON output").action(lazy(() => import("./commands/lifecycle.js"), (m, host, opts) => m.rotateCommand(host, opts)));
  });

  def("verify", () => {
    const c = p
      .command("verify")
      .description("check overlays (archives, folders, disk images, .img.zst, cards) against themselves, the fleet config and the registry")
      .argument("<overlay...>", "overlay archives, folders, images or cards");
    add(
      c,
      OPTIONS.rootPartition("for an image: the root partition's number"),
      new Option("--offline", "no config or registry: check each overlay against itself and what this mkoverlay builds for it"),
      OPTIONS.config(),
      OPTIONS.json("one JSON object per overlay"),
      OPTIONS.quiet("print only failures (the exit code says the rest)"),
    );
    c.action(lazy(() => import("./commands/verify.js"), (m, paths, opts) => m.verifyCommand(paths, opts)));
  });

  def("boards", () => {
    p.command("boards")
      .description("list board and OS profiles")
      .addOption(OPTIONS.json())
      .action(lazy(() => import("./commands/boards.js"), (m, opts) => m.boardsCommand(opts)));
  });

  def("status", () => {
    const c = p
      .command("status")
      .description("which gateways are connected, where and since when; which never came online; alarms")
      .argument("[device]", "only this device: HOST, or KEY=VALUE of its factory data (e.g. serial=SN0042)");
    add(
      c,
      OPTIONS.bastion("only this bastion"),
      choice("--format <form>", "table, json or prometheus", ["table", "json", "prometheus"], (v) => `--format ${JSON.stringify(v)}: use table, json or prometheus`).default("table"),
      OPTIONS.json("same as --format json"),
      new Option("--state <states>", "only devices in these states, comma-separated: connected, offline, never-seen, new, unknown"),
      new Option("--check", "exit 1 when there is an alarm (for monitoring)"),
      OPTIONS.neverSeenAfter("a device built this long ago and never connected is an alarm (a duration: 90min, 24h, 2d; 0: never)"),
      OPTIONS.expiringWithin("a key that expires on a bastion within this is an `expiring` alarm (a duration: 30d, 6w, 72h; 0: only expired)"),
      OPTIONS.config(),
    );
    c.action(lazy(() => import("./commands/status.js"), (m, dev, opts) => m.statusCommand(dev, opts)));
  });

}

/** The registry and the provisioner's hook: registry, provisioner-hook. */
function defineRegistryCommands({ p, def, device }: Defs): void {
  def("registry", () => {
    const registry = p.command("registry").description("the port registry: list, release, remove-bastion, doctor, migrate, import-manufacturing");
    const list = registry.command("list").description("the port allocation table, with each device's factory data");
    add(
      list,
      choice("--format <form>", "table, csv or markdown", ["table", "csv", "markdown"], (v) => `--format ${JSON.stringify(v)}: use table, csv or markdown (or --json)`).default("table"),
      new Option("--columns <names>", "these columns, comma-separated (fixed ones and factory data names); default: a table that fits 80 columns, every column in CSV and Markdown"),
      OPTIONS.json("a JSON array"),
      new Option("--old-settings", "only devices whose overlay still dials a setting the config has changed since (docs/bastion.md)"),
      OPTIONS.config(),
    );
    list.action(lazy(() => import("./commands/registry-list.js"), (m, opts) => m.registryListCommand(opts)));
    const release = registry.command("release").description("give a revoked device's quarantined ports back").argument("<device>", device);
    reportOptions(release).action(lazy(() => import("./commands/lifecycle.js"), (m, host, opts) => m.releaseCommand(host, opts)));
    const remove = registry.command("remove-bastion <name>").description("take a retired bastion off every registered device (exports and lists stop naming it)");
    reportOptions(remove).action(lazy(() => import("./commands/lifecycle.js"), (m, name, opts) => m.removeBastionCommand(name, opts)));
    const doctor = registry.command("doctor").description("finish or reclaim devices left pending by killed builds").option("--fix", "apply (default: report only)");
    doctor.addOption(OPTIONS.grace("wait this long after a lease ran out before acting (a duration, or seconds: 60, 5min; a dead station of this host: at once)", "60"));
    reportOptions(doctor).action(lazy(() => import("./commands/doctor.js"), (m, opts) => m.doctorCommand(opts)));

    const migrate = registry
      .command("migrate")
      .description("copy the registry in use into another backend (keeps ports, keys, statuses, name counter)")
      .addOption(mandatory(new Option("--to <registry>", "target: postgres://user@host:5432/db, or a registry file")))
      .addOption(OPTIONS.force("replace a target that already holds devices"));
    add(reportOptions(migrate), OPTIONS.quiet("no reminder on stderr")).action(lazy(() => import("./commands/registry-migrate.js"), (m, opts) => m.registryMigrateCommand(opts)));

    const importing = registry
      .command("import-manufacturing")
      .description("attach rpi-sb-provisioner's manufacturing data (board, MACs) to the devices with those serials")
      .argument("<db>", "the provisioner's manufacturing database (SQLite; opened read-only)")
      .addOption(OPTIONS.serialAttr());
    reportOptions(importing).action(lazy(() => import("./commands/provisioner-import.js"), (m, db, opts) => m.importManufacturingCommand(db, opts)));
  });

  def("provisioner-hook", () => {
    const c = p
      .command("provisioner-hook")
      .description("rpi-sb-provisioner's rootfs-mounted hook: lay the device with serial $TARGET_DEVICE_SERIAL into the mounted ROOT")
      .argument("<boot>", "the image's mounted boot partition ($1 of the hook; not written)")
      .argument("<root>", "the image's mounted root file system ($2 of the hook)");
    deviceOptions(c, "board profile for a new device (e.g. cm4)", "bastion(s) for a new device, comma-separated");
    add(
      c,
      OPTIONS.serialAttr(),
      new Option("--out <dir>", "where the lines files go (default: out/ beside the fleet config)"),
      OPTIONS.grace("re-provisioning a device rotates its key: how long the old one stays valid", "0"),
      OPTIONS.config(),
      OPTIONS.quiet(),
    );
    c.action(lazy(() => import("./commands/provisioner-hook.js"), (m, boot, root, opts) => m.provisionerHookCommand(boot, root, opts)));
  });

}

/** The tool's own: schema, completion. */
function defineToolCommands({ p, def }: Defs): void {
  def("schema", () => {
    p.command("schema")
      .description("print a JSON Schema for editors: fleet (default), board or os")
      .addArgument(choiceArgument("[kind]", "", ["fleet", "board", "os"], (v) => `schema ${JSON.stringify(v)}: use fleet, board or os`))
      .addOption(new Option("--out <file>", "write it to a file instead"))
      .action(lazy(() => import("./commands/schema.js"), (m, kind, opts) => m.schemaCommand(kind, opts)));
  });

  def("completion", () => {
    p.command("completion")
      .description("print a shell completion script: bash, zsh or fish")
      .addArgument(choiceArgument("<shell>", "bash, zsh or fish", ["bash", "zsh", "fish"], (v) => `completion ${JSON.stringify(v)}: use bash, zsh or fish`))
      .action(lazy(() => import("./completion.js"), (m, shell) => m.completionCommand(shell)));
  });

}

/** The top-level commands, as program() defines them (a test keeps the two equal). */
export const COMMANDS: readonly string[] = ["build", "batch", "image", "write", "flash", "init", "bastion", "ssh-config", "known-hosts", "revoke", "rotate", "verify", "boards", "status", "registry", "provisioner-hook", "schema", "completion"];

/**
 * The one command this command line runs, when that is plain from its words: a known command
 * word, or build's options and no word at all. Undefined (define them all) for help, version,
 * completion, a bare `mkoverlay`, or a word to be reported as unknown.
 */
export function onlyCommand(args: readonly string[]): string | undefined {
  let sawOption = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === "--debug" || a.startsWith("--config=")) continue;
    if (a === "--config") {
      i++;
      continue;
    }
    if (a === "-h" || a === "--help" || a === "-v" || a === "-V" || a === "--version") return undefined;
    if (a.startsWith("-")) {
      sawOption = true;
      continue;
    }
    // After an option, a word is that option's value (build's options come first).
    if (sawOption) continue;
    return COMMANDS.includes(a) ? a : undefined;
  }
  return sawOption ? "build" : undefined;
}

/** Every command below `p`, depth first (hidden ones included). */
export function allCommands(p: Command): Command[] {
  return p.commands.flatMap((c) => [c, ...allCommands(c)]);
}

/** `registry doctor` for the doctor command. */
export function commandPath(c: Command): string {
  const names: string[] = [];
  for (let x: Command | null = c; x && x.parent; x = x.parent) names.unshift(x.name());
  return names.join(" ");
}

/**
 * build is the default command, so commander hands it every word it does not know: a typo
 * (`mkoverlay verfy x`) or nothing at all failed on build's missing --board. build takes no
 * positional argument, so a first word that names no command is an unknown command, and a
 * line with no command and no build option asks for the usage. Options of build
 * (`mkoverlay --board rpi4 --bastion eu`) still mean build.
 */
async function commandWord(p: Command, args: string[]): Promise<"usage" | undefined> {
  const names = [...p.commands.flatMap((c) => [c.name(), ...c.aliases()]), "help"];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === "--debug" || a.startsWith("--config=")) continue;
    if (a === "--config") {
      i++;
      continue;
    }
    // An option of build (the default command), --help, --version, or "--": commander's.
    if (a.startsWith("-")) return undefined;
    if (names.includes(a)) return undefined;
    // Only on this error path: keeps the validators out of every start.
    const guess = (await import("../util/validate.js")).didYouMean(a, names.filter((n) => n !== "help"));
    const list = "'mkoverlay --help' lists the commands";
    throw new UserError(`unknown command '${a}'`, { hint: guess ? `did you mean '${guess}'? (${list})` : list });
  }
  return "usage";
}

/**
 * `mkoverlay help registry doctor` shows that subcommand's help, as `registry doctor --help`
 * does (commander's own help command stops at the first word). An unknown word is an error
 * naming the nearest command, as for any command line.
 */
async function helpArgs(p: Command, argv: string[]): Promise<string[]> {
  const i = argv.slice(2).findIndex((a) => !a.startsWith("-"));
  if (i < 0 || argv[2 + i] !== "help") return argv;
  const words = argv.slice(3 + i).filter((a) => !a.startsWith("-"));
  let c = p;
  for (const w of words) {
    const sub = c.commands.find((x) => x.name() === w || x.aliases().includes(w));
    if (!sub) {
      const names = c.commands.map((x) => x.name());
      const where = c === p ? "command" : `subcommand of '${commandPath(c)}'`;
      if (names.length === 0) throw new UserError(`'${commandPath(c)}' has no subcommands`, { hint: `mkoverlay help ${commandPath(c)}` });
      const guess = (await import("../util/validate.js")).didYouMean(w, names);
      throw new UserError(`help: unknown ${where} '${w}'`, { hint: `${guess ? `did you mean '${guess}'? ` : ""}known: ${names.join(", ")}` });
    }
    c = sub;
  }
  return [...argv.slice(0, 2), ...argv.slice(2, 2 + i), ...words, "--help"];
}

/**
 * `--json` anywhere on the line (or `--format json`): a script reads the outcome, so an error is
 * one JSON object too. Words after `--` are values, not options.
 */
export function wantsJson(args: readonly string[]): boolean {
  const end = args.indexOf("--");
  const opts = end < 0 ? args : args.slice(0, end);
  return opts.some((a, i) => a === "--json" || a === "--format=json" || (a === "--format" && opts[i + 1] === "json"));
}

export async function main(argv: string[]): Promise<void> {
  const debug = argv.includes("--debug");
  const json = wantsJson(argv.slice(2));
  // `mkoverlay registry list | head`: a reader that stops early is not an error.
  process.stdout.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code === "EPIPE") process.exit(0);
    throw e;
  });
  const args = argv.slice(2);
  const only = argv[2] === "__complete" || args.includes("help") ? undefined : onlyCommand(args);
  // Help text only where help may be shown: a --help, a help word, or a line that is not plainly
  // one command (a bare `mkoverlay` prints the usage).
  const mayHelp = only === undefined || args.some((a) => a === "-h" || a === "--help");
  const p = program(only, mayHelp ? await import("./help.js") : undefined);
  try {
    // What the completion scripts call (the raw words, so commander must not parse them).
    if (argv[2] === "__complete") {
      await (await import("./completion.js")).completeCommand(p, argv.slice(3));
      return;
    }
    argv = await helpArgs(p, argv);
    if ((await commandWord(p, argv.slice(2))) === "usage") {
      // Like git and npm: usage on stderr and a non-zero exit, since nothing was done (a script
      // whose command word came from an empty variable must not pass); 2 as for any usage error.
      p.outputHelp({ error: true });
      process.exitCode = 2;
      return;
    }
    await p.parseAsync(argv);
  } catch (e) {
    process.exitCode = await report(e, { debug, json });
  }
}

const BUG = "this is a bug in mkoverlay; please report it with the command you ran";

/**
 * The one place errors are printed. A user error: `mkoverlay: error: …` and `mkoverlay: hint: …`
 * (a run stopped on purpose, by SIGINT or SIGTERM, says `mkoverlay: interrupted by …`: it is not
 * a failure of anything); a bug: its stack. With --json: one JSON object on stderr instead,
 * `{"error", "hint", "exitCode"}` (docs/json.md), plus `signal` for an interrupted run and
 * `stack` for a bug or with --debug.
 */
async function report(e: unknown, o: { debug: boolean; json: boolean }): Promise<number> {
  if (e instanceof CommanderError) {
    // Help and version (printed already), or a group named without its subcommand (its help was
    // printed on stderr). commander's errors arrive here as UserErrors (usageError).
    return e.exitCode === 0 ? 0 : 2;
  }
  // A full disk, a read-only mount, a missing permission: the station's to fix, not a bug.
  const io = isUserError(e) ? undefined : ioUserError(e);
  const user = io ?? (isUserError(e) ? e : undefined);
  const log = stderrLog(false);
  if (user) {
    const raw = (io ? (e as Error) : user).stack;
    const stack = o.debug && raw ? await readable(raw) : undefined;
    // By name: station.ts (and what it loads) stays out of every start.
    const signal = user.name === "Interrupted" ? String((user as UserError & { reason: unknown }).reason) : undefined;
    if (o.json) {
      process.stderr.write(`${JSON.stringify({ error: user.message, hint: user.hint ?? null, exitCode: user.exitCode, ...(signal ? { signal } : {}), ...(stack ? { stack } : {}) })}\n`);
      return user.exitCode;
    }
    if (signal) {
      for (const line of user.message.split("\n")) log.info(line);
      if (user.hint) log.progress(`mkoverlay: hint: ${user.hint}\n`);
    } else log.error(user.message, user.hint);
    if (stack) log.progress(`${stack}\n`);
    return user.exitCode;
  }
  const err = e as Error;
  const stack = await readable(err?.stack ?? "");
  const message = `internal error: ${err?.message ?? String(e)}`;
  if (o.json) process.stderr.write(`${JSON.stringify({ error: message, hint: BUG, exitCode: 70, stack })}\n`);
  else log.progress(`mkoverlay: ${message}\n${stack}\n${BUG[0]!.toUpperCase()}${BUG.slice(1)}.\n`);
  return 70;
}

/** The stack with bundle positions mapped back to the sources (only when one is printed). */
async function readable(stack: string): Promise<string> {
  try {
    return (await import("../util/stack.js")).readableStack(stack);
  } catch {
    return stack;
  }
}
