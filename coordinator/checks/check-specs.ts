import type { CheckPlan } from '../eval/check-shells.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { CheckSpec } from './check-manager.js';

/**
 * What a commit's checks may do, decided by policy rather than by the commit: a check gets the network only when it
 * asks, the base's check of the same name (when there is a base) asks too — a pull request cannot give its own
 * checks the network — and the server permits it for this kind of code (`networkPermitted`: false for an untrusted
 * pull request unless `[security] untrusted_check_network_repos` names the repository). A check without a timeout
 * gets the server's `check_timeout_seconds`.
 */
export function checkSpecs(
  head: CommitEvaluation,
  base: CommitEvaluation | undefined,
  policy: { networkPermitted: boolean; timeoutSeconds: number },
): CheckSpec[] {
  const basePlans = new Map<string, CheckPlan>((base?.checks ?? []).map((p) => [p.name, p]));
  return (head.checks ?? []).flatMap((plan) =>
    plan.systems.map((s): CheckSpec => ({
      name: plan.name,
      system: s.system,
      command: plan.command,
      allowNetwork:
        plan.allowNetwork &&
        policy.networkPermitted &&
        (base === undefined || basePlans.get(plan.name)?.allowNetwork === true),
      roBind: plan.roBind,
      timeoutSeconds: plan.timeoutSeconds ?? policy.timeoutSeconds,
      shellDrv: s.shellDrv,
      error: s.error,
    })),
  );
}
