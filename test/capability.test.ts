/**
 * The capability gate (test/helpers/capability.ts), run for real: vitest on a fixture whose
 * blocks need something absent, once as a laptop (CI unset: skipped, the reason in the name) and
 * once as CI (CI=true: failed, naming what is missing). What is present runs either way.
 */
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { REPO } from "./helpers/workspace.js";

interface Report {
  testResults: { assertionResults: { fullName: string; status: string; failureMessages: string[] }[] }[];
}

function runFixture(ci: string | undefined): Map<string, { status: string; failure: string }> {
  const env: Record<string, string | undefined> = { ...process.env, CI: ci };
  if (ci === undefined) delete env.CI;
  const dir = join(REPO, "test/fixtures/capability");
  const r = spawnSync(process.execPath, [join(REPO, "node_modules/vitest/vitest.mjs"), "run", "--root", dir, "--reporter=json"], { cwd: dir, env, encoding: "utf8" });
  const json = r.stdout.slice(r.stdout.indexOf("{"));
  const report = JSON.parse(json) as Report;
  return new Map(report.testResults.flatMap((f) => f.assertionResults.map((a) => [a.fullName, { status: a.status, failure: a.failureMessages.join("\n") }] as const)));
}

describe("the capability gate", () => {
  it("on a laptop: what is missing is skipped, the reason in the name; the rest runs", () => {
    const t = runFixture(undefined);
    expect(t.get("present runs")?.status).toBe("passed");
    const skipped = [...t].filter(([, v]) => v.status !== "passed");
    expect(skipped.map(([n]) => n).sort()).toEqual([
      "absent each a — SKIPPED: needs a unicorn would run",
      "absent each b — SKIPPED: needs a unicorn would run",
      "absent it — SKIPPED: needs a unicorn",
      "absent — SKIPPED: needs a unicorn; no-such-tool-mko (make test-deps installs it) would run",
    ]);
    expect(skipped.every(([, v]) => v.status === "skipped" || v.status === "pending")).toBe(true);
  }, 60_000);

  it("in CI (CI=1): what is missing fails, naming it; the rest runs", () => {
    const t = runFixture("1");
    expect(t.get("present runs")?.status).toBe("passed");
    const failed = [...t].filter(([, v]) => v.status === "failed");
    expect(failed.map(([n]) => n).sort()).toEqual([
      "absent CANNOT RUN: needs a unicorn; no-such-tool-mko (make test-deps installs it)",
      "absent each a CANNOT RUN: needs a unicorn",
      "absent each b CANNOT RUN: needs a unicorn",
      "absent it",
    ]);
    for (const [, v] of failed) expect(v.failure).toMatch(/needs a unicorn.*: in CI \(CI=1\) a test that cannot run is a failure, not a skip/);
  }, 60_000);

  it("CI=false is not CI", () => {
    expect(runFixture("false").get("absent it — SKIPPED: needs a unicorn")?.status).toBe("skipped");
  }, 60_000);
});
