import { afterAll } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { EvalEnvironment, type NixLauncher } from '../../coordinator/eval/eval-environment.js';
import { DEFAULT_EVALUATION_OPTIONS, type EvalPolicy, NO_EXTRA_POLICY } from '../../coordinator/eval/eval-options.js';

let shared: Promise<EvalEnvironment> | undefined;

/**
 * The evaluation environment of a test file: sandboxed, restricted and with a store daemon, as the coordinator
 * evaluates. Opened once per file (forks pool: one process per file) and closed after its last test.
 */
export function testEvalEnvironment(): Promise<EvalEnvironment> {
  if (!shared) {
    shared = EvalEnvironment.open(DEFAULT_EVALUATION_OPTIONS, silentLogger()).then(async (env) => {
      await env.prepare();
      return env;
    });
    afterAll(async () => (await shared)?.close());
  }
  return shared;
}

/** A launcher for evaluating files under `roots` with the default (no extra) policy. */
export async function testLauncher(
  roots: readonly string[],
  policy: EvalPolicy = NO_EXTRA_POLICY,
): Promise<NixLauncher> {
  return (await testEvalEnvironment()).launcher({ roots, policy });
}
