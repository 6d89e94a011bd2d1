import { UsageError } from '../common/errors.js';
import { type Logger, createLogger, silentLogger } from '../common/logging.js';
import { loadCoordinatorConfig } from '../coordinator/config.js';
import { join, resolve } from 'node:path';
import { EvalEnvironment } from '../coordinator/eval/eval-environment.js';
import { policyFor } from '../coordinator/eval/eval-options.js';
import { instantiate } from '../coordinator/eval/instantiate.js';
import type { BuildResult } from '../coordinator/scheduler/build-manager.js';
import { SUCCESS_STATES } from '../coordinator/scheduler/build-state.js';
import { EmbeddedSystem } from './embedded.js';
import { plural } from '../coordinator/review/numbers.js';
import { Progress } from './progress.js';
import { remoteBuild } from './remote-build.js';

export interface BuildCommandOptions {
  attr: string[];
  agents: string;
  json?: boolean;
  config?: string;
  dataDir?: string;
  maxJobs?: string;
  verbose?: boolean;
  /** Build on this running coordinator instead of an embedded one. */
  coordinator?: string;
  token?: string;
  private?: boolean;
}

/**
 * `ekaci build FILE [-A ATTR]…`: evaluates the attributes, builds them on the embedded system and prints one
 * line per attribute. Returns the exit status: 0 when all succeeded, 1 when any did not.
 */
export async function buildCommand(file: string, opts: BuildCommandOptions): Promise<number> {
  const agents = Number(opts.agents);
  if (!Number.isInteger(agents) || agents < 0)
    throw new UsageError(`--agents takes a whole number, got "${opts.agents}"`);
  const maxJobs = opts.maxJobs === undefined ? undefined : Number(opts.maxJobs);
  if (maxJobs !== undefined && (!Number.isInteger(maxJobs) || maxJobs < 1)) {
    throw new UsageError(`--max-jobs takes a whole number ≥ 1, got "${opts.maxJobs}"`);
  }
  // With local agents only, nobody else can join later: what they cannot build is unbuildable at once.
  const config = loadCoordinatorConfig(opts.config, process.env, agents > 0 ? { unbuildable_grace_seconds: 0 } : {});
  if (opts.dataDir) config.dataDir = opts.dataDir;
  if (agents > 0) {
    // A private run: agents are ours, so the ports need not be known in advance.
    config.web = { ...config.web, address: '127.0.0.1', port: 0 };
    config.grpc = { ...config.grpc, address: '127.0.0.1', port: 0 };
  }
  const logger = opts.verbose ? createLogger('ekaci') : silentLogger();
  // The embedded system starts while the file is evaluated: neither waits for the other (≈0.2 s of bench/dispatch).
  const system = opts.coordinator
    ? undefined
    : new EmbeddedSystem({ coordinator: config, agents, maxJobs: maxJobs ?? config.localAgent.maxJobs, logger });
  const starting = system?.start();
  // Its failure is awaited below, after the evaluation's; it is handled from now on, not an unhandled rejection.
  starting?.catch(() => undefined);
  let roots;
  try {
    roots = await evaluate(file, opts.attr, config, logger);
  } catch (err) {
    await starting?.catch(() => undefined);
    await system?.stop();
    throw err;
  }
  // The same lines and exit status wherever it was built.
  const report = (results: BuildResult[], seconds: number): number => {
    process.stdout.write(opts.json ? `${JSON.stringify(toJson(results), null, 2)}\n` : renderText(results, seconds));
    return results.every((r) => SUCCESS_STATES.has(r.state)) ? 0 : 1;
  };
  if (opts.coordinator || system === undefined) {
    return remoteBuild(
      roots,
      { coordinator: opts.coordinator ?? '', token: opts.token, private: opts.private },
      report,
    );
  }
  const started = Date.now();
  await starting;
  const onSignal = (): void => {
    process.stderr.write('interrupted: cancelling builds…\n');
    system.coordinator.manager.cancel(system.coordinator.manager.activeDerivations(), 'interrupted by the user');
  };
  process.once('SIGINT', onSignal);
  // What is queued, running and done, with the ETA, on stderr as `ekaci review` shows it; `--json` keeps quiet.
  const progress = opts.json ? undefined : new Progress(process.stderr);
  try {
    const requestId = await system.coordinator.manager.submit(
      roots.map((r) => ({ attr: r.attr, drvPath: r.drvPath })),
      `ekaci build ${file}`,
    );
    progress?.line(`building ${plural(roots.length, 'attribute')}…`);
    progress?.watch(system.coordinator.manager, system.coordinator.store);
    const results = await system.coordinator.manager.waitFor(requestId);
    progress?.stop();
    return report(results, (Date.now() - started) / 1000);
  } finally {
    progress?.stop();
    process.off('SIGINT', onSignal);
    await system.stop();
  }
}

/**
 * Evaluated into the data directory's evaluation store, then the roots' .drv closures put into the Nix store: a
 * derivation evaluated before costs no round trip to a nix-daemon (a closure of 30,000 derivations: 1.6 s, not 7).
 */
async function evaluate(
  file: string,
  attrs: string[],
  config: ReturnType<typeof loadCoordinatorConfig>,
  logger: Logger,
): Promise<Awaited<ReturnType<typeof instantiate>>> {
  const environment = await EvalEnvironment.open(config.evaluation, logger.child({ component: 'eval' }), {
    evalStoreDir: join(config.dataDir, 'eval-store'),
  });
  try {
    const roots = await instantiate(file, attrs, environment, policyFor(config.evaluation, resolve(file)));
    await environment.importDerivations(roots.map((r) => r.drvPath));
    return roots;
  } finally {
    environment.close();
  }
}

export function toJson(results: readonly BuildResult[]): unknown {
  return {
    builds: results.map((r) => ({
      attr: r.attr,
      drv: r.drvPath,
      state: r.state,
      attempts: r.attempts,
      agent: r.agent,
      outputs: r.outputs.map((o) => ({ name: o.name, path: o.path, narSize: o.narSize, closureSize: o.closureSize })),
      ...(r.rootCause ? { rootCause: r.rootCause } : {}),
      ...(r.error ? { error: r.error } : {}),
    })),
  };
}

function renderText(results: readonly BuildResult[], seconds: number): string {
  const width = Math.max(...results.map((r) => r.attr.length), 4);
  const lines = results.map((r) => {
    let line = `${r.state.padEnd(17)} ${r.attr.padEnd(width)} ${r.drvPath}`;
    if (r.rootCause) line += `\n${' '.repeat(18)}root cause: ${r.rootCause}`;
    if (r.error && !SUCCESS_STATES.has(r.state)) line += `\n${' '.repeat(18)}${r.error.split('\n')[0]}`;
    return line;
  });
  const counts = new Map<string, number>();
  for (const r of results) counts.set(r.state, (counts.get(r.state) ?? 0) + 1);
  const summary = [...counts].map(([state, n]) => `${n} ${state}`).join(', ');
  return `${lines.join('\n')}\n\n${summary} (${results.length} attributes, ${seconds.toFixed(1)} s)\n`;
}
