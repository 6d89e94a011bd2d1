/**
 * Memory and process-count limits for sandboxed commands (a repository's checks on an agent), where the host's
 * cgroups let this process make cgroups of its own. Measured once at start-up (`SandboxCgroups.probe`), in the
 * first layout that works:
 *
 * - cgroup v2, when its hierarchy offers the controllers the limits need (cgroup-v2.ts: the agent moves into a leaf
 *   of its own cgroup, and each sandbox's cgroup is that leaf's sibling);
 * - cgroup v1, when `memory` and `pids` have hierarchies of their own (hybrid hosts; cgroup-v1.ts: each sandbox's
 *   cgroup is a directory under this process's cgroup in each of them);
 * - neither: no limits, and `unavailable` says why and what would give them. A sandbox never fails for want of
 *   limits.
 *
 * Either layout is taken only after a cgroup with the limits was made and removed. The hierarchies are those
 * mounted (/proc/self/mountinfo) under `/sys/fs/cgroup`; this process's place in each is from /proc/self/cgroup.
 * A sandbox joins its cgroup before it starts anything (SandboxSpec.cgroupProcs), and its cgroup is removed once
 * its last process is gone. Cgroup names carry a random suffix: on a v1 host the hierarchy is shared with every
 * process of the same cgroup (often its root), and a cgroup of another agent is never touched — but for the empty
 * ones that agents killed mid-check left behind, which the probe removes.
 */
import { readFile } from 'node:fs/promises';
import { PLATFORM } from '../platform.js';
import {
  type CgroupLayout,
  type CgroupLimits,
  type SandboxCgroup,
  cgroupName,
  controllersFor,
  sweepStale,
} from './cgroup-files.js';
import { CgroupV1, type V1Hierarchies } from './cgroup-v1.js';
import { CgroupV2 } from './cgroup-v2.js';

export type { CgroupEvents, CgroupLimits, SandboxCgroup } from './cgroup-files.js';

const CGROUP_ROOT = '/sys/fs/cgroup';
const SANDBOX_PREFIX = 'ekaci-check-';

/** What would give limits on a host that has cgroups but does not let this process make any. */
const FIX =
  'to have them, run the agent as root, or under systemd with Delegate=yes (and without ProtectControlGroups=) ' +
  'on a cgroup v2 host';

export interface CgroupProbeOptions {
  /** Where the hierarchies are mounted: those mounted elsewhere are not used. */
  root?: string;
}

/** The cgroups of this process's sandboxes: made by the layout the probe found, or none. */
export class SandboxCgroups {
  private constructor(
    readonly limits: CgroupLimits,
    private readonly layout: CgroupLayout | null,
    /** Why sandboxes get no limits here, or null when they do. */
    readonly unavailable: string | null,
    /** Empty cgroups of sandboxes that earlier agents left behind (killed mid-check), removed by the probe. */
    readonly swept = 0,
  ) {}

  /** Finds the layout that works here (see the header). Never rejects: what fails is the answer's `unavailable`. */
  static async probe(limits: CgroupLimits, options: CgroupProbeOptions = {}): Promise<SandboxCgroups> {
    const none = (why: string): SandboxCgroups => new SandboxCgroups(limits, null, why);
    const found = async (layout: CgroupLayout): Promise<SandboxCgroups> => {
      let swept = 0;
      for (const parent of layout.parents) swept += await sweepStale(parent, SANDBOX_PREFIX);
      return new SandboxCgroups(limits, layout, null, swept);
    };
    if (controllersFor(limits).length === 0) return none('both limits are 0');
    if (PLATFORM !== 'linux') return none(`cgroups are Linux's, and this is ${PLATFORM}`);
    const root = options.root ?? CGROUP_ROOT;
    let hierarchies: Hierarchy[];
    let own: Map<string, string>;
    try {
      hierarchies = parseMountinfo(await readFile('/proc/self/mountinfo', 'utf8'), root);
      own = parseProcCgroup(await readFile('/proc/self/cgroup', 'utf8'));
    } catch (err) {
      return none(`cannot read this process's cgroups: ${message(err)}`);
    }
    if (hierarchies.length === 0) return none(`no cgroup hierarchy is mounted under ${root}`);
    const reasons: string[] = [];
    const v2 = dirIn(
      hierarchies.find((h) => h.version === 2),
      own.get(''),
    );
    if (v2 !== null) {
      try {
        return await found(await CgroupV2.delegate(v2, limits));
      } catch (err) {
        reasons.push(`cgroup v2: ${message(err)}`);
      }
    }
    const v1: V1Hierarchies = {};
    for (const controller of controllersFor(limits)) {
      const dir = dirIn(
        hierarchies.find((h) => h.version === 1 && h.controllers.includes(controller)),
        own.get(controller),
      );
      if (dir !== null) v1[controller] = dir;
    }
    const inV1 = Object.keys(v1).length;
    if (inV1 === controllersFor(limits).length) {
      try {
        return await found(await CgroupV1.open(v1, limits));
      } catch (err) {
        reasons.push(`cgroup v1: ${message(err)}`);
      }
    } else if (inV1 > 0 || v2 === null) {
      reasons.push(`no cgroup hierarchy under ${root} has the ${controllersFor(limits).join(' and ')} controller`);
    }
    return none(`${reasons.join('; ')}; ${FIX}`);
  }

  /** Which layout makes the cgroups: null without limits. */
  get version(): 'v1' | 'v2' | null {
    return this.layout?.version ?? null;
  }

  /** The limits as a sandbox's log states them. */
  describe(): string {
    if (this.layout === null) return 'none';
    const { memoryBytes, maxProcesses } = this.limits;
    const parts = [
      ...(memoryBytes > 0 ? [`${mebibytes(memoryBytes)} MiB of memory`] : []),
      ...(maxProcesses > 0 ? [`${maxProcesses} processes and threads`] : []),
    ];
    return `${parts.join(', ')} (cgroup ${this.layout.version})`;
  }

  /** A new cgroup with the limits for the sandbox `name` (a lease id); null where there are no limits. */
  async create(name: string): Promise<SandboxCgroup | null> {
    return this.layout === null ? null : this.layout.create(cgroupName(SANDBOX_PREFIX, name));
  }
}

export function mebibytes(bytes: number): number {
  return Math.round(bytes / 2 ** 20);
}

interface Hierarchy {
  version: 1 | 2;
  /** v1: the controllers mounted there (`memory`, `pids`, `name=systemd`, …). */
  controllers: string[];
  mountPoint: string;
  /** The hierarchy's path that is mounted there: `/` but in some containers. */
  mountRoot: string;
}

/** The cgroup hierarchies mounted at or under `root`. */
function parseMountinfo(text: string, root: string): Hierarchy[] {
  const found: Hierarchy[] = [];
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    const dash = fields.indexOf('-');
    const type = fields[dash + 1];
    if (dash < 0 || (type !== 'cgroup' && type !== 'cgroup2')) continue;
    const mountPoint = unescape(fields[4] ?? '');
    if (mountPoint !== root && !mountPoint.startsWith(`${root}/`)) continue;
    found.push({
      version: type === 'cgroup2' ? 2 : 1,
      controllers: (fields[dash + 3] ?? '').split(','),
      mountPoint,
      mountRoot: unescape(fields[3] ?? '/'),
    });
  }
  return found;
}

/** This process's cgroup path in each hierarchy: by controller (v1), '' for v2. */
function parseProcCgroup(text: string): Map<string, string> {
  const paths = new Map<string, string>();
  for (const line of text.split('\n')) {
    const match = /^\d+:([^:]*):(.*)$/.exec(line);
    if (match === null) continue;
    for (const controller of (match[1] ?? '').split(',')) paths.set(controller, match[2] ?? '');
  }
  return paths;
}

/** Where `path` of a hierarchy is in the file system; null when it is not mounted here (or not at all). */
function dirIn(hierarchy: Hierarchy | undefined, path: string | undefined): string | null {
  if (hierarchy === undefined || path === undefined) return null;
  const root = hierarchy.mountRoot === '/' ? '' : hierarchy.mountRoot;
  if (path !== root && !path.startsWith(`${root}/`)) return null;
  return (hierarchy.mountPoint + path.slice(root.length)).replace(/\/+$/, '') || '/';
}

// mountinfo writes space, tab, newline and backslash in paths as octal escapes.
function unescape(path: string): string {
  return path.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
