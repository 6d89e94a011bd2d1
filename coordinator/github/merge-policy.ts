import type { MergeMethod } from './commands.js';

/**
 * When a pending `merge` command may be carried out. The command is bound to the head it was given for: code
 * pushed afterwards was not seen by whoever asked, so a moved head cancels the request rather than merging
 * unreviewed commits. For the head it was given for, the pull request merges once every eka-ci check has passed.
 *
 * A failed check refuses at once, even while others still run: nothing later can make that head pass, and the
 * author hears about it without waiting for the slowest build. A refused or cancelled request is finished; a new
 * `merge` command starts another.
 */

export interface PendingMerge {
  /** The head sha of the pull request when the command was given. */
  requestedFor: string;
  method: MergeMethod;
}

/** One eka-ci check run on the current head, as GitHub reports it. */
export interface CheckRunState {
  name: string;
  /** `queued`, `in_progress`, `completed`; GitHub also has `waiting`, `requested` and `pending`. */
  status: string;
  /** Set once `status` is `completed`. */
  conclusion: string | null;
}

export type MergeDecision =
  | { action: 'wait' }
  | { action: 'merge'; method: MergeMethod }
  | { action: 'cancel'; reason: string }
  | { action: 'refuse'; reason: string };

/**
 * Conclusions that count as passing. `neutral` is a check with nothing to build; any other conclusion — GitHub
 * adds new ones from time to time — does not pass, so it can never merge by accident.
 */
const PASSING: ReadonlySet<string> = new Set(['success', 'neutral']);

export function decideMerge(request: PendingMerge, headSha: string, checks: readonly CheckRunState[]): MergeDecision {
  if (request.requestedFor.toLowerCase() !== headSha.toLowerCase()) {
    return {
      action: 'cancel',
      reason: `the head moved from ${request.requestedFor} to ${headSha} after the merge command`,
    };
  }
  const failed = checks.filter((c) => c.status === 'completed' && !PASSING.has(c.conclusion ?? ''));
  if (failed.length > 0) {
    return {
      action: 'refuse',
      reason: failed.map((c) => `${c.name} concluded ${c.conclusion ?? 'without a conclusion'}`).join(', '),
    };
  }
  // No checks yet means eka-ci has not created them for this head, not that there is nothing to wait for.
  if (checks.length === 0 || checks.some((c) => c.status !== 'completed')) return { action: 'wait' };
  return { action: 'merge', method: request.method };
}
