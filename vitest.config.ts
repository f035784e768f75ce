import { defineConfig } from "vitest/config";

/**
 * The slow tiers: the booted system, the SIGKILL loops and concurrency runs, everything against a
 * real PostgreSQL, the bastion with a real sshd and agent, the packed install. `make test` runs
 * them all; `make test-fast` (MKOVERLAY_SKIP_SLOW=1) leaves these files out for a quick loop.
 */
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
];

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    exclude: process.env.MKOVERLAY_SKIP_SLOW === "1" ? SLOW : [],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // The real-tool tests start sshd and spawn the CLI; two cores, so keep parallelism modest.
    maxWorkers: 2,
  },
});
