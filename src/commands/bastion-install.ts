import { UserError } from "../errors.js"; export async function bastionInstallCommand(_o: unknown): Promise<void> { throw new UserError("not yet"); }
