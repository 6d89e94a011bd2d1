/**
 * cgroup v2 (the unified hierarchy: NixOS, current Debian and Ubuntu): one tree, in which a cgroup that hands a
 * controller to its children may hold no process of its own ("no internal processes"). This process's own cgroup
 * (`0::/path` in /proc/self/cgroup) is changed only where it may be: systemd delegated it (`Delegate=yes`), or the
 * agent runs as root. The agent moves into a leaf of its own, `<own>/ekaci-agent`, enables the controllers the
 * limits need in `<own>/cgroup.subtree_control`, and makes each sandbox's cgroup beside that leaf: `<own>/<name>`
 * with `memory.max`, `memory.swap.max` 0 (swap would stretch the memory limit) and `pids.max`. Killing writes
 * `cgroup.kill` (Linux 5.14+), which kills the whole cgroup at once, racing no fork.
 */
import { mkdir, readFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import {
  CgroupDirs,
  type CgroupLayout,
  type CgroupLimits,
  type SandboxCgroup,
  cgroupName,
  controllersFor,
  removeDir,
  writeControl,
} from './cgroup-files.js';

/** The leaf this process moves into, so that its own cgroup may hand controllers down. */
export const AGENT_LEAF = 'ekaci-agent';

export class CgroupV2 implements CgroupLayout {
  readonly version = 'v2';

  private constructor(
    readonly own: string,
    private readonly limits: CgroupLimits,
  ) {}

  /**
   * Takes over `own`, this process's cgroup directory, as described above; throws saying why it cannot (the
   * controllers are not offered, a directory cannot be made, other processes share the cgroup).
   */
  static async delegate(own: string, limits: CgroupLimits): Promise<CgroupV2> {
    // A process that moved into its leaf before (an agent started again in the same process) takes the leaf's parent.
    if (basename(own) === AGENT_LEAF) own = dirname(own);
    const needed = controllersFor(limits);
    const offered = words(await readFile(join(own, 'cgroup.controllers'), 'utf8'));
    const missing = needed.filter((c) => !offered.includes(c));
    if (missing.length > 0) {
      throw new Error(
        `${own} is not offered the ${missing.join(' and ')} controller (a cgroup v1 hierarchy may hold it)`,
      );
    }
    const leaf = join(own, AGENT_LEAF);
    await mkdir(leaf).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw new Error(`cannot create the cgroup ${leaf}: ${err.message}`, { cause: err });
    });
    try {
      await writeControl(leaf, 'cgroup.procs', String(process.pid));
      const enabled = words(await readFile(join(own, 'cgroup.subtree_control'), 'utf8'));
      for (const c of needed) if (!enabled.includes(c)) await writeControl(own, 'cgroup.subtree_control', `+${c}`);
    } catch (err) {
      const others = words(await readFile(join(own, 'cgroup.procs'), 'utf8').catch(() => ''));
      // Back where it was: a leaf that serves nothing is not left behind.
      await writeControl(own, 'cgroup.procs', String(process.pid)).catch(() => {});
      await removeDir(leaf).catch(() => {});
      if (others.length === 0) throw err;
      throw new Error(
        `${own} holds other processes than this one (${others.slice(0, 5).join(', ')}), so it cannot hand ` +
          'controllers to cgroups below it: run the agent as the main process of its systemd unit',
        { cause: err },
      );
    }
    const layout = new CgroupV2(own, limits);
    await (await layout.create(cgroupName('ekaci-probe-', String(process.pid)))).remove();
    return layout;
  }

  get parents(): string[] {
    return [this.own];
  }

  async create(name: string): Promise<SandboxCgroup> {
    const dir = join(this.own, name);
    const { memoryBytes, maxProcesses } = this.limits;
    try {
      await mkdir(dir);
    } catch (err) {
      throw new Error(`cannot create the cgroup ${dir}: ${(err as Error).message}`, { cause: err });
    }
    const cgroup = new CgroupDirs(
      [dir],
      {
        oomKills: memoryBytes > 0 ? [join(dir, 'memory.events'), 'oom_kill'] : null,
        forksRefused: maxProcesses > 0 ? [join(dir, 'pids.events'), 'max'] : null,
      },
      join(dir, 'cgroup.kill'),
    );
    try {
      if (memoryBytes > 0) {
        await writeControl(dir, 'memory.max', String(memoryBytes));
        await writeControl(dir, 'memory.swap.max', '0', true);
      }
      if (maxProcesses > 0) await writeControl(dir, 'pids.max', String(maxProcesses));
    } catch (err) {
      await cgroup.remove().catch(() => {});
      throw err;
    }
    return cgroup;
  }
}

function words(text: string): string[] {
  return text.split(/\s+/).filter((w) => w !== '');
}
