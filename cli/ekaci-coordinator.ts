import { Command } from 'commander';
import { join } from 'node:path';
import { createLogger } from '../common/logging.js';
import { type TokenKind, TokenStore } from '../coordinator/access/token-store.js';
import { AuditLog } from '../coordinator/audit-log.js';
import { loadCoordinatorConfig } from '../coordinator/config.js';
import { openDatabase } from '../coordinator/db/database.js';
import { EmbeddedSystem } from './embedded.js';
import { runCli } from './run-cli.js';

/**
 * `ekaci-coordinator`: runs the coordinator (with its embedded local agent unless `[local_agent] enabled =
 * false`), and manages agent tokens.
 */
const program = new Command('ekaci-coordinator')
  .description('the eka-ci coordinator: derivation graph, queues, binary cache and the agent endpoint')
  // `--config` after a subcommand belongs to the subcommand, not to the coordinator itself.
  .enablePositionalOptions()
  .option('--config <file>', 'TOML configuration file')
  .action(async (opts: { config?: string }) => {
    const options = loadCoordinatorConfig(opts.config);
    const logger = createLogger('ekaci-coordinator');
    const system = new EmbeddedSystem({
      coordinator: options,
      agents: options.localAgent.enabled ? 1 : 0,
      maxJobs: options.localAgent.maxJobs,
      logger,
    });
    await system.start();
    logger.info(
      {
        grpc: system.coordinator.grpcTarget,
        cache: system.coordinator.cacheUrl,
        publicKey: system.coordinator.cachePublicKey,
      },
      'ready',
    );
    let stopping = false;
    const stop = (): void => {
      if (stopping) {
        // A second signal: stop at once.
        void system.coordinator.stopNow().then(() => process.exit(1));
        return;
      }
      stopping = true;
      void system.stop().then(() => process.exit(0));
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  });

const actor = `cli:${process.env.SUDO_USER ?? process.env.USER ?? 'unknown'}`;

function withTokens<T>(kind: TokenKind, config: string | undefined, fn: (store: TokenStore) => T): T {
  const options = loadCoordinatorConfig(config);
  const db = openDatabase(join(options.dataDir, 'ekaci.sqlite'));
  try {
    return fn(new TokenStore(db, new AuditLog(db), [], kind));
  } finally {
    db.close();
  }
}

/** `agent-token` and `api-token`: the same three subcommands over the two kinds of token. */
function tokenCommands(kind: TokenKind, what: { create: string; revoke: string; name: string }): void {
  const tokens = program.command(`${kind}-token`).description(`create, revoke and list ${kind} tokens`);
  tokens
    .command('create')
    .argument('<name>', what.name)
    .option('--config <file>', 'TOML configuration file')
    .description(what.create)
    .action((name: string, opts: { config?: string }) => {
      const token = withTokens(kind, opts.config, (s) => s.create(name, actor));
      process.stdout.write(`${token}\n`);
    });
  tokens
    .command('revoke')
    .argument('<name>')
    .option('--config <file>', 'TOML configuration file')
    .description(what.revoke)
    .action((name: string, opts: { config?: string }) => {
      if (!withTokens(kind, opts.config, (s) => s.revoke(name, actor))) {
        process.stderr.write(`ekaci-coordinator: no active ${kind} token named "${name}"\n`);
        process.exitCode = 2;
      }
    });
  tokens
    .command('list')
    .option('--config <file>', 'TOML configuration file')
    .description('list tokens (names and dates; tokens themselves are not stored)')
    .action((opts: { config?: string }) => {
      for (const t of withTokens(kind, opts.config, (s) => s.list())) {
        const state = t.revokedAt ? `revoked ${new Date(t.revokedAt).toISOString()}` : 'active';
        process.stdout.write(`${t.name}\t${new Date(t.createdAt).toISOString()}\t${state}\n`);
      }
    });
}

tokenCommands('agent', {
  name: "the agent's name: the coordinator knows the agent that uses this token by it",
  create: 'create a token and print it once (store it on the agent in a file of mode 0600)',
  revoke: 'revoke a token; agents using it are disconnected within seconds',
});
tokenCommands('api', {
  name: 'who or what will use the token (a person, a dashboard, a script)',
  create: 'create an API token and print it once (send it as "Authorization: Bearer TOKEN")',
  revoke: 'revoke an API token; requests with it are refused from then on',
});

await runCli(program, process.argv);
