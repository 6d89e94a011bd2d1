import type { BuiltOutput, CachePushResult, Outcome } from '../../common/proto/ekaci/agent/v1/agent.js';

// Longest `Finished.error`: a summary for tables and check runs; the full story is in the log.
export const ERROR_TEXT_MAX_CHARS = 2000;

/** What a lease's work ends with: the fields of `Finished` the job decides. */
export interface JobResult {
  outcome: Outcome;
  error: string;
  outputs: BuiltOutput[];
  finishedAtMs: number;
  /** A check's command exit status; absent for builds and for a command that never ran or was killed. */
  exitCode?: number;
  /** How the lease's pushes to the operator's caches went (`Assign.pushes`). */
  pushes?: CachePushResult[];
  /** The outputs stayed in the coordinator's store, which this agent shares, instead of being uploaded. */
  outputsInCoordinatorStore?: boolean;
}

/**
 * The work of one lease as the workload drives it: a `Build` (a derivation) or a `Check` (a repository's command in
 * the sandbox). `run()` never rejects: every failure is an outcome. `cancel` is graceful (SIGTERM, SIGKILL after
 * `graceMs`), `kill` forced; both resolve once the job's processes are gone and `run()` has settled.
 */
export interface Job {
  /** 'done' once `run()` settled; any other state means processes may still run. */
  readonly status: string;
  run(): Promise<JobResult>;
  cancel(reason: string, graceMs: number): Promise<void>;
  kill(reason: string): Promise<void>;
}
