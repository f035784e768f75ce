/**
 * The parts of `--help` that commander does not write: examples, the environment variables
 * that matter to a command, and exit codes where a command has its own. Kept as data beside
 * cli.ts so every command's help has the same sections, and so a test can check that each
 * example is a valid command line and that every variable the code reads is documented.
 */

/** Every environment variable mkoverlay reads (test/help.test.ts greps src/ to keep this whole). */
export const ENV: Record<string, string> = {
  MKOVERLAY_CONFIG: "the fleet config when --config is not given (default ./mkoverlay.yaml)",
  MKOVERLAY_REGISTRY: "the registry (a file, or postgres://user@host/db), instead of the config's registry:",
  MKOVERLAY_CACHE: "where validated configs are cached, or 'off' (default $XDG_CACHE_HOME/mkoverlay)",
  XDG_CACHE_HOME: "base of the default cache folder (default ~/.cache)",
  MKOVERLAY_LEASE_SECONDS: "how long a station's unfinished work stays its own without renewal (default 120)",
  MKOVERLAY_SYNCFS: "0: one fsync per file instead of one syncfs per batch chunk",
  SOURCE_DATE_EPOCH: "timestamp of every archive entry, in seconds (default 2020-01-01)",
  NO_COLOR: "set (non-empty): no colour in the progress bar (use --no-progress for no bar)",
  PGPASSWORD: "password for a postgres:// registry (or ~/.pgpass); never put it in the config",
  TARGET_DEVICE_SERIAL: "set by rpi-sb-provisioner for its hooks: the device provisioner-hook lays into the image",
  JOURNAL_STREAM: "set by systemd: the bastion agent then writes log lines with journal priorities",
};

const CONFIG = ["MKOVERLAY_CONFIG", "MKOVERLAY_REGISTRY", "MKOVERLAY_CACHE", "PGPASSWORD"];
const BUILD = [...CONFIG, "SOURCE_DATE_EPOCH", "MKOVERLAY_LEASE_SECONDS"];

export const EXIT_DEFAULT = "0 done; 2 a usage, input or I/O error you can fix (the message names the file or flag); 70 a bug in mkoverlay";
const INTERRUPTED = "130/143 interrupted by SIGINT/SIGTERM (what was built stays, nothing is left pending)";

export interface HelpSpec {
  examples: [string, string][];
  env: string[];
  /** Exit codes, when they say more than EXIT_DEFAULT. */
  exit?: string;
}

/** By command path (`registry doctor`). Every command has an entry (tested). */
export const HELP: Record<string, HelpSpec> = {
  build: {
    examples: [
      ["mkoverlay --board rpi4 --bastion eu", "one device, named by the config's template, into ./out"],
      ["mkoverlay build --board cm4 --os ubuntu --bastion eu,us --hostname gw-lab-1 --json", "two tunnels, a chosen name, JSON on stdout"],
      ["mkoverlay --board rpi4 --bastion eu --attr serial=SN0042", "record factory data with the device"],
      ["mkoverlay --board rpi4 --bastion eu --host-key old.key --hostname serial=SN0042", "re-flash a registered device (its key) found by serial"],
    ],
    env: BUILD,
    exit: `0 built; 2 a usage, input or I/O error (nothing reserved); ${INTERRUPTED}; 70 a bug`,
  },
  batch: {
    examples: [
      ["mkoverlay batch --board rpi4 --bastion eu --count 200", "200 devices named by the template"],
      ["mkoverlay batch --board rpi4 --bastion eu --hosts shift.csv --json > shift.ndjson", "names and factory data from a CSV, one JSON object per device"],
      ["mkoverlay batch --board rpi4 --bastion eu --count 50 --no-progress", "plain lines instead of the progress bar"],
    ],
    env: [...BUILD, "MKOVERLAY_SYNCFS", "NO_COLOR"],
    exit: `0 all built; 1 some devices failed (the others are built and registered); 2 nothing done (usage or input error); ${INTERRUPTED}; 70 a bug`,
  },
  image: {
    examples: [
      ["mkoverlay image --base 2025-05-13-raspios-bookworm-arm64-lite.img --board rpi4 --bastion eu", "one device as out/<host>.img and out/<host>.img.bmap (flash with bmaptool copy)"],
      ["mkoverlay image --base base.img --board rpi4 --bastion eu --hostname gw-lab-1 --compress zstd", "a compressed image for storing and moving"],
      ["mkoverlay image --base gpt.img --board arm64 --bastion eu --root-partition 3 --json", "a base whose root partition is not found by type and label"],
    ],
    env: BUILD,
    exit: `0 built; 2 a usage, input or I/O error, or a base mkoverlay will not write (mounted, not ext, no room, a file system larger than its partition, a damaged partition table, another device's identity: nothing reserved); ${INTERRUPTED}; 70 a bug`,
  },
  write: {
    examples: [
      ["mkoverlay write out/gw-0001.overlay.tar.gz --image card.img", "lay an overlay into an image, in place (its .bmap is refreshed, or made)"],
      ["mkoverlay write out/gw-0001.overlay.tar.gz --device /dev/sdX --base base.img", "write the base's used blocks to a card, then the overlay"],
      ["mkoverlay write out/gw-0001.overlay.tar.gz --device /dev/sdX", "re-flash the overlay onto a card that already has the base"],
    ],
    env: ["SOURCE_DATE_EPOCH"],
    exit: "0 written and read back; 1 the write or its read-back failed, or debugfs wrote outside the root partition (rolled back); 2 refused (mounted, not ext, no room, a file system larger than its partition, a damaged partition table, another device's identity; --device: a partition instead of the whole disk, the station's own disk) or a usage error; 70 a bug",
  },
  flash: {
    examples: [
      ["mkoverlay flash --base base.img --board rpi4 --bastion eu --hosts shift.csv /dev/sdb /dev/sdc /dev/sdd /dev/sde", "four cards: the next four rows of the shift not built yet"],
      ["mkoverlay flash --base base.img --board rpi4 --bastion eu --hosts shift.csv serial=SN0042@/dev/sdb pj-0007@/dev/sdc", "the rows with that serial and that hostname"],
      ["mkoverlay flash --base base.img --board rpi4 --bastion eu --json /dev/disk/by-id/usb-Card_Reader_1-0:0 /dev/disk/by-id/usb-Card_Reader_2-0:0", "new devices named by the template; one JSON object per card"],
    ],
    env: [...BUILD, "NO_COLOR"],
    exit: `0 every card verified and its device registered; 1 some cards failed (their devices given back, the others registered); 2 nothing done (a usage or input error, a card refused: mounted, a partition, the station's own disk, given twice; nothing reserved); ${INTERRUPTED}; 70 a bug`,
  },
  init: {
    examples: [
      ["ssh-keyscan -t ed25519 bastion.example.com | mkoverlay init --bastion eu=bastion.example.com --host-keys - --operator-key ~/.ssh/id_ed25519.pub", "pin what ssh-keyscan saw (check its fingerprint first)"],
      ["mkoverlay init --bastion eu=bastion.example.com:2222 --host-key-file eu=bastion_ed25519_key.pub --no-operators", "a key file copied from the bastion; the image brings its own logins"],
      ["mkoverlay init", "asks for each value (on a terminal)"],
    ],
    env: ["MKOVERLAY_CONFIG"],
  },
  verify: {
    examples: [
      ["mkoverlay verify out/gw-0001.overlay.tar.gz", "against itself, the fleet config and the registry"],
      ["mkoverlay verify -q out/*.overlay.tar.gz", "many overlays; only failures are printed"],
      ["mkoverlay verify --offline gw-0001.overlay.tar.gz", "no config or registry: the overlay against itself"],
    ],
    env: CONFIG,
    exit: "0 every check passed; 1 a check failed; 2 an overlay could not be read, or a usage error; 70 a bug",
  },
  status: {
    examples: [
      ["mkoverlay status", "which gateways are connected, where and since when; alarms"],
      ["mkoverlay status serial=SN0042 --json", "one device, found by its factory data"],
      ["mkoverlay status --check --never-seen-after 2d", "for monitoring: exit 1 on an alarm"],
      ["mkoverlay status --state offline,never-seen", "only the devices that are not there"],
    ],
    env: CONFIG,
    exit: "0 done (with --check: no alarm); 1 an alarm, with --check; 2 a usage or input error; 70 a bug",
  },
  revoke: {
    examples: [
      ["mkoverlay revoke gw-0042", "out of every export; its ports stay quarantined"],
      ["mkoverlay revoke serial=SN0042 --json", "the device with that factory serial"],
    ],
    env: CONFIG,
  },
  rotate: {
    examples: [
      ["mkoverlay rotate gw-0042", "a new key and overlay; the old key works 7 more days"],
      ["mkoverlay rotate serial=SN0042 --grace 0 --json", "by serial; the old key stops at once"],
    ],
    env: BUILD,
    exit: `0 rotated; 2 a usage, input or I/O error (nothing changed); ${INTERRUPTED}; 70 a bug`,
  },
  "ssh-config": {
    examples: [
      ["mkoverlay ssh-config --known-hosts ~/.ssh/mkoverlay_known_hosts > ~/.ssh/config.d/gateways", "reach every gateway by name"],
      ["mkoverlay ssh-config --bastion us --user admin --json", "through one bastion, as JSON"],
    ],
    env: CONFIG,
  },
  "known-hosts": {
    examples: [["mkoverlay known-hosts > ~/.ssh/mkoverlay_known_hosts", "gateways' and bastions' keys, for strict checking"]],
    env: CONFIG,
  },
  bastion: {
    examples: [
      ["mkoverlay bastion authorized-keys --bastion eu --write /etc/ssh/authorized_keys.d/reverse-ssh", "the tunnel user's file"],
      ["mkoverlay bastion sshd-config --bastion eu", "the Match User block for sshd_config"],
      ["mkoverlay bastion install --bastion eu", "as root on the bastion: all of it, kept live by the agent"],
      ["mkoverlay bastion agent --bastion eu", "the agent the installed unit runs"],
    ],
    env: CONFIG,
  },
  "bastion authorized-keys": {
    examples: [
      ["mkoverlay bastion authorized-keys --bastion eu", "print the tunnel user's authorized_keys"],
      ["mkoverlay bastion authorized-keys --bastion eu --write /etc/ssh/authorized_keys.d/reverse-ssh --json", "replace it atomically (cron-safe)"],
    ],
    env: CONFIG,
  },
  "bastion install": {
    examples: [
      ["mkoverlay bastion install --bastion eu", "as root on the bastion: tunnel user, sshd drop-in, key directory, agent unit"],
      ["mkoverlay bastion install --bastion eu --dry-run", "what it would change, as a diff; nothing is written"],
      ["mkoverlay bastion install --bastion eu --root /mnt/image --mkoverlay /usr/local/bin/mkoverlay --registry postgres://mkoverlay_bastion@db/fleet --json", "into a mounted image: the executable and registry as the bastion sees them"],
      ["mkoverlay bastion install --bastion eu --take-over-user tunnel", "use the existing login account 'tunnel' as the tunnel user (it then logs in only as a tunnel)"],
    ],
    env: CONFIG,
    exit: "0 installed (or already); 1 installed, but systemd or sshd did not take it; 2 a usage or input error; 70 a bug",
  },
  "bastion agent": {
    examples: [["mkoverlay bastion agent --bastion eu", "what mkoverlay-bastion@eu.service runs: keys live from the registry"]],
    env: [...CONFIG, "JOURNAL_STREAM"],
  },
  "bastion sshd-config": {
    examples: [["mkoverlay bastion sshd-config --bastion eu --authorized-keys-file /etc/ssh/authorized_keys.d/%u >> /etc/ssh/sshd_config", "the Match block"]],
    env: CONFIG,
  },
  boards: {
    examples: [
      ["mkoverlay boards", "boards and OS profiles this installation knows"],
      ["mkoverlay boards --json", "the same, as JSON"],
    ],
    env: ["MKOVERLAY_CACHE"],
  },
  registry: {
    examples: [
      ["mkoverlay registry list", "every device, its ports and factory data"],
      ["mkoverlay registry doctor --fix", "after a station was killed"],
      ["mkoverlay registry release gw-0042", "a revoked device's ports back to the pool"],
      ["mkoverlay registry remove-bastion us", "a retired bastion off every device"],
      ["mkoverlay registry migrate --to postgres://mkoverlay@db.factory.lan/fleet", "into PostgreSQL"],
      ["mkoverlay registry import-manufacturing /var/lib/rpi-sb-provisioner/manufacturing.db", "serial, MACs and board from rpi-sb-provisioner"],
    ],
    env: CONFIG,
  },
  "registry list": {
    examples: [
      ["mkoverlay registry list", "a table"],
      ["mkoverlay registry list --format csv > fleet.csv", "for a spreadsheet (factory data as columns)"],
      ["mkoverlay registry list --columns hostname,port,serial,fingerprint", "these columns (fixed ones and factory data names)"],
      ["mkoverlay registry list --json", "every field"],
      ["mkoverlay registry list --old-settings", "devices still dialling what the config changed (rotate them)"],
    ],
    env: CONFIG,
  },
  "registry release": {
    examples: [["mkoverlay registry release gw-0042", "a revoked device's ports go back to the pool"]],
    env: CONFIG,
  },
  "registry remove-bastion": {
    examples: [["mkoverlay registry remove-bastion us --json", "after bastion 'us' was retired"]],
    env: CONFIG,
  },
  "registry doctor": {
    examples: [
      ["mkoverlay registry doctor", "report builds left unfinished by a killed station"],
      ["mkoverlay registry doctor --fix --grace 0", "finish or reclaim them now"],
    ],
    env: [...CONFIG, "MKOVERLAY_LEASE_SECONDS"],
  },
  "registry import-manufacturing": {
    examples: [
      ["mkoverlay registry import-manufacturing /var/lib/rpi-sb-provisioner/manufacturing.db", "board and MACs onto the devices with those serials"],
      ["mkoverlay registry import-manufacturing manufacturing.db --json", "matched, updated and unmatched, as JSON"],
    ],
    env: CONFIG,
  },
  "provisioner-hook": {
    examples: [
      ["mkoverlay provisioner-hook --board cm4 --bastion eu \"$@\"", "what /etc/rpi-sb-provisioner/scripts/naked-provisioner-rootfs-mounted.sh execs (README: Raspberry Pi provisioner)"],
      ["mkoverlay provisioner-hook /mnt/boot /mnt/root --board cm4 --bastion eu", "by hand, with TARGET_DEVICE_SERIAL=… set as the provisioner sets it"],
    ],
    env: [...BUILD, "TARGET_DEVICE_SERIAL"],
    exit: `0 laid (the provisioner flashes the image); 2 refused or failed (the provisioner fails the device; nothing pending); ${INTERRUPTED}; 70 a bug`,
  },
  "registry migrate": {
    examples: [
      ["mkoverlay registry migrate --to postgres://mkoverlay@db.factory.lan/fleet", "into PostgreSQL, for several stations"],
      ["mkoverlay registry migrate --to backup.db --force --json", "a copy in a file"],
    ],
    env: CONFIG,
  },
  schema: {
    examples: [
      ["mkoverlay schema > mkoverlay.schema.json", "the fleet config's JSON Schema"],
      ["mkoverlay schema os --out os.schema.json", "an OS profile's"],
    ],
    env: [],
  },
  completion: {
    examples: [
      ["source <(mkoverlay completion bash)", "bash, this shell (add it to ~/.bashrc to keep it)"],
      ["mkoverlay completion zsh > \"${fpath[1]}/_mkoverlay\"", "zsh"],
      ["mkoverlay completion fish > ~/.config/fish/completions/mkoverlay.fish", "fish"],
    ],
    env: ["MKOVERLAY_CONFIG"],
  },
};

/** The sections appended to a command's --help. */
export function helpAfter(path: string, spec: HelpSpec): string {
  const out: string[] = ["", "Examples:"];
  for (const [cmd, what] of spec.examples) out.push(`  $ ${cmd}`, `      ${what}`);
  if (spec.env.length > 0) {
    out.push("", "Environment:");
    const w = Math.max(...spec.env.map((e) => e.length));
    for (const e of spec.env) out.push(`  ${e.padEnd(w)}  ${ENV[e] ?? "?"}`);
  }
  out.push("", `Exit codes: ${spec.exit ?? EXIT_DEFAULT}`);
  if (path.includes(" ")) out.push("", `See also: mkoverlay help ${path.split(" ")[0]}`);
  return out.join("\n") + "\n";
}

/** The main --help's closing sections. */
export function programHelpAfter(): string {
  const w = Math.max(...Object.keys(ENV).map((e) => e.length));
  return [
    "",
    "Start here:",
    "  $ mkoverlay init                       # write ./mkoverlay.yaml (bastions, pinned keys, operators)",
    "  $ mkoverlay --board rpi4 --bastion eu  # one overlay into ./out, its tunnel port reserved",
    "  $ mkoverlay verify out/gw-0001.overlay.tar.gz",
    "",
    "'mkoverlay help COMMAND [SUBCOMMAND]' shows a command's options and examples.",
    "",
    "Durations (--grace, --never-seen-after, expiry: …): an integer and a unit, s, min (or m), h, d",
    "or w (30min, 12h, 7d); months and years only in expiry:/expiryRenewal: (README.md, Durations).",
    "",
    "Environment:",
    ...Object.entries(ENV).map(([k, v]) => `  ${k.padEnd(w)}  ${v}`),
    "",
    "Exit codes: 0 ok; 1 a check failed (verify) or devices failed (batch); 2 a usage, input or",
    "I/O error you can fix (the message names the file or flag); 70 a bug in mkoverlay (with a stack);",
    "130/143 interrupted by SIGINT/SIGTERM.",
    "",
  ].join("\n");
}
