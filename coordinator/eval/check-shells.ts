import { join } from 'node:path';
import type { Checkout } from '../git/git-mirrors.js';
import type { RepoCheck, RepoConfig } from '../repo-config/repo-config.js';
import type { EvalEnvironment } from './eval-environment.js';
import type { EvalPolicy } from './eval-options.js';
import type { EvalResult } from './eval-result.js';
import { evaluate } from './evaluator.js';
import { evaluateFlake } from './flake.js';

/**
 * A repository check as a commit's evaluation plans it: what runs, and per system the shell derivation whose
 * environment it runs in. Stored with the commit's evaluation; the coordinator's check manager runs it on agents.
 */
export interface CheckPlan {
  name: string;
  command: string;
  /** What the commit's own configuration asks; a pull request's base decides what it gets. */
  allowNetwork: boolean;
  /** Relative to the checkout root. */
  roBind: string[];
  timeoutSeconds: number | undefined;
  systems: CheckSystemPlan[];
}

export interface CheckSystemPlan {
  system: string;
  /** The shell derivation, when the check names one and it evaluated. */
  shellDrv?: string;
  /** Why the shell did not evaluate to a derivation for this system: the check is unbuildable there. */
  error?: string;
}

/**
 * Evaluates the shells of a commit's checks: `shell` is an attribute path in the job's file (from the file's top,
 * whatever the job's `attr_path`), or `devShells.<system>.<shell>` of a flake job. A shell that throws, is not a derivation, or is for
 * another system gives its check an error on that system, not a failed evaluation. Checks without a shell run on
 * `defaultSystem` unless they list systems.
 */
export async function planChecks(
  config: RepoConfig,
  checkout: Checkout,
  defaultSystem: string,
  environment: EvalEnvironment,
  policy: EvalPolicy,
  gcRootsDir: string,
): Promise<CheckPlan[]> {
  const plans: CheckPlan[] = [];
  for (const check of config.checks) {
    const systems = check.systems ?? [defaultSystem];
    const perSystem: CheckSystemPlan[] = [];
    for (const system of systems) {
      perSystem.push(
        check.shell === undefined
          ? { system }
          : await shellFor(check, check.shell, system, checkout, environment, policy, gcRootsDir),
      );
    }
    plans.push({
      name: check.name,
      command: check.command,
      allowNetwork: check.allowNetwork,
      roBind: check.roBind,
      timeoutSeconds: check.timeoutSeconds,
      systems: perSystem,
    });
  }
  return plans;
}

async function shellFor(
  check: RepoCheck,
  shell: NonNullable<RepoCheck['shell']>,
  system: string,
  checkout: Checkout,
  environment: EvalEnvironment,
  policy: EvalPolicy,
  gcRootsDir: string,
): Promise<CheckSystemPlan> {
  const { job } = shell;
  const results: EvalResult[] = [];
  const name = job.kind === 'flake' ? ['devShells', system, ...shell.attrPath].join('.') : shell.attrPath.join('.');
  const where = job.kind === 'flake' ? `flake output ${name}` : `${job.relativeFile} attribute ${name}`;
  try {
    if (job.kind === 'flake') {
      const evaluated = evaluateFlake({
        checkoutDir: checkout.dir,
        gitDir: checkout.gitDir,
        rev: checkout.commit,
        outputs: ['devShells'],
        systems: [system],
        gcRootsDir,
        workers: 1,
        environment,
        policy,
      });
      for await (const r of evaluated) if (r.attr === name) results.push(r);
    } else {
      const evaluated = evaluate({
        file: job.file,
        attrPath: shell.attrPath,
        gcRootsDir,
        workers: 1,
        launcher: environment.launcher({ roots: [checkout.dir], policy }),
      });
      for await (const r of evaluated) results.push(r);
    }
  } catch (err) {
    return { system, error: `shell ${where} does not evaluate: ${stripped((err as Error).message, checkout)}` };
  }
  if (results.length === 0) return { system, error: `shell ${where} does not exist` };
  const lone = results.length === 1 ? results[0]! : undefined;
  if (lone?.error !== undefined)
    return { system, error: `shell ${where} does not evaluate: ${stripped(lone.error, checkout)}` };
  if (lone?.drvPath === undefined) {
    return { system, error: `shell ${where} of check ${check.name} is not a derivation` };
  }
  if (lone.system !== system) {
    return { system, error: `shell ${where} is for ${lone.system ?? 'no system'}, not ${system}` };
  }
  return { system, shellDrv: lone.drvPath };
}

function stripped(text: string, checkout: Checkout): string {
  return text.split(join(checkout.dir, '/')).join('');
}
