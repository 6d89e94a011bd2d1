/**
 * cgroup v1 (hybrid hosts, where `memory` and `pids` each have a hierarchy of their own and a process is in one
 * cgroup of each): a sandbox's cgroup is a directory under this process's own cgroup in each hierarchy a limit
 * needs — `pids.max` in `pids`; `memory.limit_in_bytes` in `memory`, and `memory.memsw.limit_in_bytes` (memory plus
 * swap) where the kernel accounts swap, so that swapping cannot stretch the limit. v1 has no rule against
 * processes in inner cgroups: this process stays where it is. Killing signals every process `cgroup.procs` lists
 * until none is left (v1 has no `cgroup.kill`).
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import {
  CgroupDirs,
  type CgroupLayout,
  type CgroupLimits,
  type SandboxCgroup,
  cgroupName,
  writeControl,
} from './cgroup-files.js';

/** This process's own cgroup directory in the hierarchy of each controller a limit needs. */
export interface V1Hierarchies {
  pids?: string;
  memory?: string;
}

export class CgroupV1 implements CgroupLayout {
  readonly version = 'v1';

  private constructor(
    private readonly own: V1Hierarchies,
    private readonly limits: CgroupLimits,
  ) {}

  /** The layout, once a cgroup with the limits could be made and removed under `own`; throws saying why not. */
  static async open(own: V1Hierarchies, limits: CgroupLimits): Promise<CgroupV1> {
    const layout = new CgroupV1(own, limits);
    await (await layout.create(cgroupName('ekaci-probe-', String(process.pid)))).remove();
    return layout;
  }

  get parents(): string[] {
    return [this.own.pids, this.own.memory].filter((d) => d !== undefined);
  }

  async create(name: string): Promise<SandboxCgroup> {
    const pids = this.limits.maxProcesses > 0 && this.own.pids !== undefined ? join(this.own.pids, name) : null;
    const memory = this.limits.memoryBytes > 0 && this.own.memory !== undefined ? join(this.own.memory, name) : null;
    const made: string[] = [];
    try {
      // pids first: the first directory's cgroup.procs lists the processes to kill.
      if (pids !== null) {
        await makeDir(pids, made);
        await writeControl(pids, 'pids.max', String(this.limits.maxProcesses));
      }
      if (memory !== null) {
        await makeDir(memory, made);
        // memsw may never be below the memory limit: the memory limit goes first.
        await writeControl(memory, 'memory.limit_in_bytes', String(this.limits.memoryBytes));
        await writeControl(memory, 'memory.memsw.limit_in_bytes', String(this.limits.memoryBytes), true);
      }
    } catch (err) {
      await new CgroupDirs(made, NO_EVENTS, null).remove().catch(() => {});
      throw err;
    }
    return new CgroupDirs(
      made,
      {
        oomKills: memory === null ? null : [join(memory, 'memory.oom_control'), 'oom_kill'],
        forksRefused: pids === null ? null : [join(pids, 'pids.events'), 'max'],
      },
      null,
    );
  }
}

const NO_EVENTS = { oomKills: null, forksRefused: null };

async function makeDir(dir: string, made: string[]): Promise<void> {
  try {
    await mkdir(dir);
  } catch (err) {
    throw new Error(`cannot create the cgroup ${dir}: ${(err as Error).message}`, { cause: err });
  }
  made.push(dir);
}
