import { defineConfig } from "vitest/config";

/**
 * The test tiers, as vitest projects; every test file is in exactly one (system takes what the
 * others do not name). This file is the only list: `make test-fast` runs unit + cli
 * (`vitest run --project unit --project cli`), `make test` runs all four.
 *
 * - unit: the sources in-process, and quick local tools (ssh-keygen, systemd-analyze,
 *   shellcheck); no CLI process, no daemon, no root.
 * - cli: the built CLI (bin/mkoverlay → dist/) run as a user runs it; no daemon, no root, no
 *   disk tools, no terminal. A root-only block in one of these files goes through the
 *   capability gate (test/helpers/capability.ts) like any other.
 * - system: real sshds, bastion installs, disk images, terminals (tmux), shells, root.
 * - slow: the booted system, the SIGKILL loops and concurrency runs, the registry on a real
 *   PostgreSQL, the live bastion, the packed install, the fuzz tier, verify's size limits
 *   (CPU-bound: they alone would take a third of test-fast's minute).
 *
 * Whatever a file needs and the machine lacks is decided by the capability gate: a skip on a
 * laptop, a failure in CI (CI=true).
 */
const UNIT = [
  "test/api.test.ts",
  "test/architecture.test.ts",
  "test/bastion-sizing.test.ts",
  "test/bastion-units.test.ts",
  "test/build-first.test.ts",
  "test/capability.test.ts",
  "test/core.test.ts",
  "test/hostport-fingerprint.test.ts",
  "test/keys.test.ts",
  "test/monitor.test.ts",
  "test/net.test.ts",
  "test/pubkey.test.ts",
  "test/units.test.ts",
];

const CLI = [
  "test/cache.test.ts",
  "test/cli-definitions.test.ts",
  "test/cli.test.ts",
  "test/config-ports.test.ts",
  "test/conventions.test.ts",
  "test/doctor.test.ts",
  "test/duration.test.ts",
  "test/expiry-alarms.test.ts",
  "test/expiry-spread.test.ts",
  "test/factory-data.test.ts",
  "test/flow.test.ts",
  "test/golden.test.ts",
  "test/help.test.ts",
  "test/hostile.test.ts",
  "test/hosts-file.test.ts",
  "test/inputs.test.ts",
  "test/json.test.ts",
  "test/operators.test.ts",
  "test/overlay.test.ts",
  "test/secrets.test.ts",
  "test/shift.test.ts",
  "test/ssh-config.test.ts",
  "test/stack.test.ts",
  "test/status.test.ts",
  "test/verify-differences.test.ts",
  "test/verify-offline.test.ts",
];

const SLOW = [
  "test/boot/**",
  "test/registry.test.ts",
  "test/registry-postgres.test.ts",
  "test/registry-defects.test.ts",
  "test/registry-grace.test.ts",
  "test/bastion-agent.test.ts",
  "test/fleet-status.test.ts",
  "test/packed.test.ts",
  "test/recipes-live.test.ts",
  "test/fuzz.test.ts",
  "test/verify-limits.test.ts",
];

/** Every tier: one temp folder for the run, removed at its end (test/helpers/run-dir.ts). */
const RUN_DIR = "test/helpers/run-dir.ts";
/** The tiers that run dist/ build it first when the sources are newer (test/helpers/build-first.ts). */
const BUILD_FIRST = [RUN_DIR, "test/helpers/build-first.ts"];

export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // The real-tool tests start sshd and spawn the CLI; two cores, so keep parallelism modest.
    maxWorkers: 2,
    projects: [
      { extends: true, test: { name: "unit", include: UNIT, globalSetup: [RUN_DIR] } },
      { extends: true, test: { name: "cli", include: CLI, globalSetup: BUILD_FIRST } },
      { extends: true, test: { name: "system", include: ["test/**/*.test.ts"], exclude: [...UNIT, ...CLI, ...SLOW], globalSetup: BUILD_FIRST } },
      { extends: true, test: { name: "slow", include: SLOW.map((g) => (g.endsWith("/**") ? `${g}/*.test.ts` : g)), globalSetup: BUILD_FIRST } },
    ],
  },
});
