/**
 * The life of a derivation (ARCHITECTURE §5):
 *
 *   queued ──inputs done──▶ buildable ──leased──▶ building ──▶ succeeded | failed | timed-out | cancelled
 *     │                        │  ▲                  │
 *     │                        │  └── infra failure ─┘   (retried, on another agent where one exists)
 *     │                        └──no capable agent past the grace period──▶ unbuildable
 *     ├──outputs already in a cache──▶ substituted
 *     └──an input failed──▶ dependency-failed (root_cause names the failed derivation)
 *
 * `unbuildable` and `dependency-failed` go back to `queued` when what blocked them is gone (a capable agent
 * joined; the failed root was rebuilt successfully).
 */
export type BuildState =
  | 'queued'
  | 'buildable'
  | 'building'
  | 'succeeded'
  | 'failed'
  | 'dependency-failed'
  | 'timed-out'
  | 'cancelled'
  | 'unbuildable'
  | 'substituted';

export const TERMINAL_STATES: ReadonlySet<BuildState> = new Set([
  'succeeded',
  'failed',
  'dependency-failed',
  'timed-out',
  'cancelled',
  'unbuildable',
  'substituted',
]);

/** States whose outputs exist in the cache: dependents may build. */
export const SUCCESS_STATES: ReadonlySet<BuildState> = new Set(['succeeded', 'substituted']);

/** States that make every dependent `dependency-failed`. */
export const FAILURE_STATES: ReadonlySet<BuildState> = new Set([
  'failed',
  'timed-out',
  'dependency-failed',
  'unbuildable',
  'cancelled',
]);

const TRANSITIONS: Record<BuildState, readonly BuildState[]> = {
  queued: ['buildable', 'substituted', 'dependency-failed', 'cancelled'],
  buildable: ['building', 'unbuildable', 'dependency-failed', 'cancelled', 'substituted'],
  building: ['succeeded', 'failed', 'timed-out', 'cancelled', 'buildable'],
  unbuildable: ['queued'],
  'dependency-failed': ['queued'],
  cancelled: ['queued'],
  failed: ['queued'],
  'timed-out': ['queued'],
  succeeded: [],
  substituted: [],
};

/** Every state, in the order of the life above (for documents that list them, such as the API's). */
export const BUILD_STATES = Object.keys(TRANSITIONS) as BuildState[];

/** The states a derivation may reach `to` from. */
export function statesBefore(to: BuildState): BuildState[] {
  return (Object.keys(TRANSITIONS) as BuildState[]).filter((from) => TRANSITIONS[from].includes(to));
}

export function isTerminal(state: BuildState): boolean {
  return TERMINAL_STATES.has(state);
}

export function isBuildState(s: string): s is BuildState {
  return s in TRANSITIONS;
}
