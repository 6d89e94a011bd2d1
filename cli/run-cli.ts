import type { Command } from 'commander';
import { CommanderError } from 'commander';
import { EkaciError } from '../common/errors.js';

/** Exit status for bad usage or bad input, for every eka-ci command. */
export const EXIT_USAGE = 2;
// Errors that are the user's to fix (exit 2) rather than a failure of the run (exit 1).
const INPUT_CODES = new Set([
  'EKACI_ERR_USAGE',
  'EKACI_ERR_CONFIG',
  'EKACI_ERR_EVALUATION',
  'EKACI_ERR_DRV_PARSE',
  'EKACI_ERR_REPO_CONFIG',
  'EKACI_ERR_GIT_REVISION',
  'EKACI_ERR_GIT_URL',
]);

/**
 * Runs a commander program with eka-ci's exit conventions: 2 for bad usage or input with the message on
 * stderr, 1 for other failures. Actions set `process.exitCode` themselves for their own results.
 */
export async function runCli(program: Command, argv: string[]): Promise<void> {
  program.exitOverride().configureOutput({ writeErr: (s) => process.stderr.write(s) });
  for (const c of program.commands) c.exitOverride();
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      process.exitCode = e.exitCode === 0 ? 0 : EXIT_USAGE;
      return;
    }
    if (e instanceof EkaciError) {
      process.stderr.write(`${program.name()}: ${e.message} [${e.code}]\n`);
      process.exitCode = INPUT_CODES.has(e.code) ? EXIT_USAGE : 1;
      return;
    }
    process.stderr.write(`${program.name()}: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exitCode = 1;
  }
}
