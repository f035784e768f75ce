/** The registry suite on the embedded SQLite backend (test/helpers/registry-suite.ts). */
import { registryTests } from "./helpers/registry-suite.js";

await registryTests("sqlite");
