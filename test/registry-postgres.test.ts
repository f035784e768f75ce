/** The registry suite on a real PostgreSQL server, migration and server errors included (test/helpers/registry-suite.ts). */
import { registryTests } from "./helpers/registry-suite.js";

await registryTests("postgres");
