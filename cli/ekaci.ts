import { Command } from 'commander';
import { runCli } from './run-cli.js';
import { buildCommand } from './build-command.js';

/** `ekaci`: the developer's and admin's command line. */
const program = new Command('ekaci').description('eka-ci: continuous integration for Nix package sets');

program
  .command('build')
  .description('evaluate and build attributes of a Nix file on an embedded coordinator with local agents')
  .argument('<file>', 'Nix file to evaluate')
  .option('-A, --attr <attr>', 'attribute to build (repeatable; default: every top-level attribute)', collect, [])
  .option('--agents <n>', 'local agents (more than one: each in its own mount namespace and /nix, as root)', '1')
  .option('--max-jobs <n>', 'build slots per agent (default: Nix max-jobs)')
  .option('--json', 'print the result as JSON')
  .option('--config <file>', 'coordinator TOML configuration (timeouts, data_dir, …)')
  .option('--data-dir <dir>', 'state directory (database, logs, cache); overrides the configuration')
  .option('-v, --verbose', 'log what the coordinator and agents do (JSON on stderr)')
  .action(async (file: string, opts: Parameters<typeof buildCommand>[1]) => {
    process.exitCode = await buildCommand(file, opts);
  });

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

await runCli(program, process.argv);
