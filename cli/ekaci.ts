import { Command } from 'commander';
import { runCli } from './run-cli.js';
import { buildCommand } from './build-command.js';
import { diffCommand, evalCommand } from './eval-commands.js';
import { logsCommand } from './logs-command.js';
import { agentsCommand, cancelCommand, statusCommand } from './status-commands.js';
import { reviewCommand } from './review-command.js';

/** `ekaci`: the developer's and admin's command line. */
const program = new Command('ekaci').description('eka-ci: continuous integration for Nix package sets');

program
  .command('build')
  .description(
    'evaluate and build attributes of a Nix file on an embedded coordinator with local agents, or with --coordinator on a running one',
  )
  .argument('<file>', 'Nix file to evaluate')
  .option('-A, --attr <attr>', 'attribute to build (repeatable; default: every top-level attribute)', collect, [])
  .option('--agents <n>', 'local agents (more than one: each in its own mount namespace and /nix, as root)', '1')
  .option('--max-jobs <n>', 'build slots per agent (default: Nix max-jobs)')
  .option('--json', 'print the result as JSON')
  .option('--config <file>', 'coordinator TOML configuration (timeouts, data_dir, …)')
  .option('--data-dir <dir>', 'state directory (database, logs, cache); overrides the configuration')
  .option('-v, --verbose', 'log what the coordinator and agents do (JSON on stderr)')
  .option('--coordinator <url>', 'build on this running coordinator (uploads the .drv closure to its cache)')
  .option('--token <token>', 'API token for --coordinator (default: $EKACI_TOKEN)')
  .option('--private', "with --coordinator: the builds' data is readable with a credential only")
  .action(async (file: string, opts: Parameters<typeof buildCommand>[1]) => {
    process.exitCode = await buildCommand(file, opts);
  });

/** A subcommand over commits of a git repository: --repo, --job, --data-dir and -v, shared by all of them. */
function repoCommand(name: string, description: string): Command {
  return program
    .command(name)
    .description(description)
    .requiredOption('--repo <path-or-url>', 'git repository (your checkout is never touched; a mirror is used)')
    .option('--job <name>', 'only this job (repeatable)', collect, [])
    .option('--data-dir <dir>', 'state directory (database, logs, cache, git mirrors, GC roots)')
    .option('--config <file>', 'coordinator TOML configuration ([evaluation] limits and allowed URIs, timeouts, …)')
    .option('-v, --verbose', 'log what happens (JSON on stderr)');
}

repoCommand('eval', "evaluate a commit's jobs (from its .eka-ci/config.json) in a local or remote git repository")
  .requiredOption('--rev <rev>', 'commit, branch or ref to evaluate')
  .option('--json', 'print the evaluation as JSON')
  .action(async (opts: Parameters<typeof evalCommand>[0]) => {
    process.exitCode = await evalCommand(opts);
  });

repoCommand('diff', 'what a change rebuilds: attributes added, removed, changed, with blast radius and rebuild counts')
  .requiredOption('--base <rev>', 'the commit the change is based on')
  .requiredOption('--head <rev>', 'the changed commit')
  .option('--json', 'print the diff as JSON')
  .action(async (opts: Parameters<typeof diffCommand>[0]) => {
    process.exitCode = await diffCommand(opts);
  });

repoCommand('review', 'should I merge this? Evaluate both commits, build what the change touches, and report')
  .requiredOption('--base <rev>', 'the commit the change is based on')
  .requiredOption('--head <rev>', 'the changed commit')
  .option('--agents <n>', 'local agents (more than one: each in its own mount namespace and /nix, as root)', '1')
  .option('--markdown <file>', 'also write the summary as GitHub-flavoured markdown to FILE')
  .option('--json <file>', 'also write the review as JSON to FILE')
  .option('--no-build', 'evaluate and diff only')
  .action(async (opts: Parameters<typeof reviewCommand>[0]) => {
    process.exitCode = await reviewCommand(opts);
  });

program
  .command('logs')
  .description("a build's log from a running coordinator; --follow streams it live until the build ends")
  .argument('<drv>', 'the .drv store path, or its hash; with --repo, an attribute (as its job names it)')
  .requiredOption('--coordinator <url>', "the coordinator's HTTP address (https://ci.example.org)")
  .option('--token <token>', 'API token (default: $EKACI_TOKEN)')
  .option('--repo <owner/name>', "the attribute's repository")
  .option('--commit <sha>', 'the attribute at this commit (a prefix is enough; default: the newest evaluated)')
  .option('--pr <number>', "the attribute at this pull request's head")
  .option('--job <name>', 'the job the attribute is in, when several have it')
  .option('--attempt <n>', 'this attempt instead of the latest')
  .option('-f, --follow', 'follow the log live; the exit status is then the build’s (0: it succeeded)')
  .action(async (drv: string, opts: Parameters<typeof logsCommand>[1]) => {
    process.exitCode = await logsCommand(drv, opts);
  });

const clientOptions = (command: Command): Command =>
  command
    .requiredOption('--coordinator <url>', "the coordinator's HTTP address (https://ci.example.org)")
    .option('--token <token>', 'API token (default: $EKACI_TOKEN)');

clientOptions(
  program.command('status').description('what a running coordinator builds, what waits and why, and its agents'),
)
  .option('--json', 'print queues and agents as JSON')
  .action(async (opts: Parameters<typeof statusCommand>[0]) => {
    process.exitCode = await statusCommand(opts);
  });

clientOptions(
  program
    .command('agents')
    .description("a running coordinator's agents; drain NAME: no new work for it until resume NAME (admins)")
    .argument('[action]', 'drain or resume')
    .argument('[name]', 'the agent'),
)
  .option('--reason <text>', 'why it is drained (shown to operators)')
  .option('--json', 'print the agents as JSON')
  .action(async (action: string | undefined, name: string | undefined, opts: Parameters<typeof agentsCommand>[2]) => {
    process.exitCode = await agentsCommand(action, name, opts);
  });

clientOptions(
  program
    .command('cancel')
    .description('cancels a queued or running build on a running coordinator')
    .argument('<drv>', 'the .drv store path, or its hash'),
).action(async (drv: string, opts: Parameters<typeof cancelCommand>[1]) => {
  process.exitCode = await cancelCommand(drv, opts);
});

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

await runCli(program, process.argv);
