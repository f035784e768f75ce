import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // The real-tool tests start sshd and spawn the CLI; two cores, so keep parallelism modest.
    maxWorkers: 2,
  },
});
