/**
 * A check's memory and process limits: a cgroup of its own (common/sandbox/cgroup.ts), made before its sandbox
 * starts, which joins it before its first fork, and removed after the check's last process — what is still in it
 * is killed first. A check never fails because its cgroup cannot be made: it runs without limits, and the agent's
 * log says why. What the kernel did at the limits (a process killed for memory, forks refused) is told as notes
 * for the check's error and log.
 */
import type { Logger } from '../../common/logging.js';
import {
  type CgroupEvents,
  type CgroupLimits,
  type SandboxCgroup,
  type SandboxCgroups,
  mebibytes,
} from '../../common/sandbox/cgroup.js';

export class CheckLimits {
  private constructor(
    private readonly cgroup: SandboxCgroup | null,
    private readonly limits: CgroupLimits,
    /** The limits as the check's log states them. */
    readonly description: string,
  ) {}

  /** The check's cgroup where the agent has limits (`cgroups`, probed at its start); none otherwise. */
  static async make(cgroups: SandboxCgroups | null, leaseId: string, logger: Logger): Promise<CheckLimits> {
    const none = { memoryBytes: 0, maxProcesses: 0 };
    if (cgroups === null || cgroups.version === null) return new CheckLimits(null, none, 'none on this agent');
    try {
      return new CheckLimits(await cgroups.create(leaseId), cgroups.limits, cgroups.describe());
    } catch (err) {
      logger.warn({ err: message(err) }, 'cannot make the cgroup of a check: it runs without limits');
      return new CheckLimits(null, none, 'none: the agent could not make its cgroup');
    }
  }

  /** The cgroup's directories while the check may run; none without limits. */
  get dirs(): readonly string[] {
    return this.cgroup?.dirs ?? [];
  }

  /** What the sandbox joins (SandboxSpec.cgroupProcs). */
  get procsFiles(): readonly string[] {
    return this.cgroup?.procsFiles ?? [];
  }

  /** SIGKILL to everything in the cgroup, for a sandbox whose wrapper would not die. */
  kill(): void {
    void this.cgroup?.kill();
  }

  /**
   * After the check's last process: what the kernel did at the limits, as a user reads it (nothing when they were
   * not reached); then the cgroup is emptied and removed.
   */
  async release(logger: Logger): Promise<string[]> {
    const cgroup = this.cgroup;
    if (cgroup === null) return [];
    const notes = limitNotes(await cgroup.events(), this.limits);
    await cgroup.remove().catch((err: unknown) => {
      logger.warn({ err: message(err), dirs: cgroup.dirs }, 'cannot remove the cgroup of a check');
    });
    return notes;
  }
}

function limitNotes(events: CgroupEvents, limits: CgroupLimits): string[] {
  const notes: string[] = [];
  if (events.oomKills > 0) {
    const what = events.oomKills === 1 ? 'a process' : `${events.oomKills} processes`;
    notes.push(`out of memory: the kernel killed ${what} at the check's limit of ${mebibytes(limits.memoryBytes)} MiB`);
  }
  if (events.forksRefused > 0) {
    const what = events.forksRefused === 1 ? 'a fork' : `${events.forksRefused} forks`;
    notes.push(`${what} refused at the check's limit of ${limits.maxProcesses} processes and threads`);
  }
  return notes;
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
