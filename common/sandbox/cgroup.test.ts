import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, utimesSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest';
import { descendants } from '../process-tree.js';
import { removeDir } from './cgroup-files.js';
import { AGENT_LEAF, CgroupV2 } from './cgroup-v2.js';
import { SandboxCgroups, type SandboxCgroup } from './cgroup.js';
import { sandboxAvailable, sandboxCommand } from './sandbox.js';

const LIMITS = { memoryBytes: 64 * 2 ** 20, maxProcesses: 20 };
const isRoot = process.getuid?.() === 0;
// Whether this process may make cgroups here (root, or a delegated cgroup): the tests of real limits need it.
const here = await SandboxCgroups.probe(LIMITS);
const skipped = here.unavailable === null ? '' : ` (skipped: this process cannot make cgroups: ${here.unavailable})`;

beforeAll(async () => {
  await sandboxAvailable();
});

/** A shell script in the sandbox, in `cgroup`; resolves once it printed `ready`. */
async function sandboxed(script: string, cgroup: SandboxCgroup): Promise<ChildProcess> {
  const c = sandboxCommand('/bin/sh', ['-c', script], {
    mounts: [],
    network: false,
    env: { PATH: '/usr/bin:/bin' },
    cwd: '/tmp',
    cgroupProcs: cgroup.procsFiles,
  });
  const child = spawn(c.file, c.args, { env: c.env, stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    let out = '';
    child.stdout?.setEncoding('utf8').on('data', (s: string) => {
      out += s;
      if (out.includes('ready')) resolve();
    });
    child.on('exit', () => reject(new Error(`the sandbox ended before it was ready: ${out}`)));
  });
  return child;
}

function procs(file: string): number[] {
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    .map(Number)
    .sort((a, b) => a - b);
}

function running(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat[stat.lastIndexOf(')') + 2] !== 'Z';
  } catch {
    return false;
  }
}

/** Puts every process of a sandbox in `cgroup`, then kills it through the cgroup alone. */
async function killThroughCgroup(cgroup: SandboxCgroup): Promise<void> {
  const child = await sandboxed('for i in 1 2 3; do /bin/sleep 30 & done; echo ready; wait', cgroup);
  try {
    const exited = new Promise((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
    const wrapper = child.pid as number;
    const inside = [wrapper, ...descendants(wrapper).map((p) => p.pid)].sort((a, b) => a - b);
    expect(inside.length).toBeGreaterThanOrEqual(6); // bubblewrap, its init, sh, three sleeps

    for (const file of cgroup.procsFiles) expect(procs(file)).toEqual(inside);
    await cgroup.kill();

    expect(inside.filter(running)).toEqual([]);
    for (const file of cgroup.procsFiles) expect(procs(file)).toEqual([]);
    expect(await exited).toBe('SIGKILL');
    await cgroup.remove();
    for (const dir of cgroup.dirs) expect(existsSync(dir)).toBe(false);
  } finally {
    child.kill('SIGKILL');
    await cgroup.remove();
  }
}

describe(`cgroups for sandboxes on this host${skipped}`, () => {
  it.skipIf(here.unavailable !== null)(
    'makes a cgroup per sandbox below its own, with the limits written, and removes it',
    async () => {
      const cgroup = (await here.create('lease/1 odd')) as SandboxCgroup;
      onTestFinished(() => cgroup.remove());

      expect(cgroup.dirs.length).toBe(here.version === 'v1' ? 2 : 1);
      for (const dir of cgroup.dirs) expect(basename(dir)).toMatch(/^ekaci-check-lease_1_odd-[0-9a-f]{8}$/);
      const limit = (file: string): string[] =>
        cgroup.dirs.filter((d) => existsSync(join(d, file))).map((d) => readFileSync(join(d, file), 'utf8').trim());
      expect(limit('pids.max')).toEqual(['20']);
      expect(limit(here.version === 'v1' ? 'memory.limit_in_bytes' : 'memory.max')).toEqual([String(64 * 2 ** 20)]);
      expect(here.describe()).toBe(`64 MiB of memory, 20 processes and threads (cgroup ${here.version})`);

      await cgroup.remove();
      for (const dir of cgroup.dirs) expect(existsSync(dir)).toBe(false);
    },
  );

  it.skipIf(here.unavailable !== null)(
    'puts every process of a sandbox in its cgroup, and kill() leaves none of them',
    async () => {
      await killThroughCgroup((await here.create('kill')) as SandboxCgroup);
    },
  );

  it.skipIf(here.unavailable !== null)(
    'removes at start-up the empty cgroups that an agent killed mid-check left behind, and no other',
    async () => {
      const hourAgo = new Date(Date.now() - 3600_000);
      const left = (await here.create('left-behind')) as SandboxCgroup;
      const fresh = (await here.create('just-made')) as SandboxCgroup;
      const busy = (await here.create('still-running')) as SandboxCgroup;
      for (const dir of [...left.dirs, ...busy.dirs]) utimesSync(dir, hourAgo, hourAgo);
      const child = await sandboxed('echo ready; exec /bin/sleep 30', busy);
      try {
        const again = await SandboxCgroups.probe(LIMITS);

        expect(again.swept).toBeGreaterThanOrEqual(left.dirs.length); // and any that earlier runs left
        for (const dir of left.dirs) expect(existsSync(dir)).toBe(false);
        for (const dir of [...fresh.dirs, ...busy.dirs]) expect(existsSync(dir)).toBe(true);
      } finally {
        child.kill('SIGKILL');
        await Promise.all([fresh.remove(), busy.remove()]);
      }
    },
  );
});

describe('without cgroups it may use', () => {
  it('says why and what would give limits when no hierarchy is mounted under its root', async () => {
    const none = await SandboxCgroups.probe(LIMITS, { root: '/nonexistent/cgroup' });

    expect(none.version).toBeNull();
    expect(none.unavailable).toBe('no cgroup hierarchy is mounted under /nonexistent/cgroup');
    expect(none.describe()).toBe('none');
    expect(await none.create('lease')).toBeNull();
  });

  it('makes none when both limits are 0', async () => {
    const none = await SandboxCgroups.probe({ memoryBytes: 0, maxProcesses: 0 });

    expect(none.version).toBeNull();
    expect(none.unavailable).toBe('both limits are 0');
  });

  it.skipIf(!isRoot)('tells a user who may not make cgroups how to get them: root or Delegate=yes', () => {
    // The module, probed by a process of `nobody`: what an unprivileged agent without a delegated cgroup sees.
    const module = fileURLToPath(new URL('./cgroup.ts', import.meta.url));
    const script =
      `const { SandboxCgroups } = await import(${JSON.stringify(module)});` +
      `const c = await SandboxCgroups.probe(${JSON.stringify(LIMITS)});` +
      'process.stdout.write(JSON.stringify({ version: c.version, unavailable: c.unavailable }));';
    const r = spawnAs(65534, [process.execPath, '--import', 'tsx', '--input-type=module', '-e', script]);

    const answer = JSON.parse(r) as { version: string | null; unavailable: string };
    expect(answer.version).toBeNull();
    expect(answer.unavailable).toMatch(
      /cannot create the cgroup \/sys\/fs\/cgroup\/.*(EACCES|EROFS|permission denied)/i,
    );
    expect(answer.unavailable).toMatch(/run the agent as root, or under systemd with Delegate=yes/);
  });
});

// The unified hierarchy as a delegated cgroup looks to the agent: a cgroup of the test's own, with this process in
// it. Needs root and a cgroup v2 hierarchy; whether it offers memory and pids (here: not on a hybrid host) decides
// which cases can run.
const v2 = unifiedHierarchy();
describe(`a delegated cgroup v2${v2 === null ? ' (skipped: no cgroup v2 hierarchy, or not root)' : ''}`, () => {
  let own = '';
  let original = '';
  beforeAll(() => {
    if (v2 === null) return;
    original = v2.self;
    own = join(v2.mount, `ekaci-test-${randomBytes(4).toString('hex')}`);
    mkdirSync(own);
    writeFileSync(join(own, 'cgroup.procs'), String(process.pid));
  });
  afterAll(async () => {
    if (v2 === null) return;
    writeFileSync(join(original, 'cgroup.procs'), String(process.pid));
    // Also what a failed test left: the cgroups below are emptied first.
    for (const child of readdirSync(own, { withFileTypes: true }).filter((e) => e.isDirectory())) {
      writeFileSync(join(own, child.name, 'cgroup.kill'), '1');
      await removeDir(join(own, child.name));
    }
    await removeDir(own);
  });

  it.skipIf(v2 === null)(
    'moves this process into a leaf of its cgroup, makes sandbox cgroups beside it, and kills one at once',
    async () => {
      const layout = await CgroupV2.delegate(own, { memoryBytes: 0, maxProcesses: 0 });

      expect(ownV2Cgroup()).toBe(join(own, AGENT_LEAF));
      // An agent started again in the same process takes the same cgroup, not one below its leaf.
      expect((await CgroupV2.delegate(ownV2Cgroup(), { memoryBytes: 0, maxProcesses: 0 })).own).toBe(own);
      const cgroup = await layout.create('ekaci-check-v2');
      expect(cgroup.dirs).toEqual([join(own, 'ekaci-check-v2')]);

      await killThroughCgroup(cgroup);
    },
  );

  it.skipIf(v2 === null || v2.offers.includes('memory'))(
    'refuses limits whose controllers the hierarchy does not offer, leaving this process where it was',
    async () => {
      const before = ownV2Cgroup();

      await expect(CgroupV2.delegate(own, LIMITS)).rejects.toThrow(
        `${own} is not offered the memory and pids controller (a cgroup v1 hierarchy may hold it)`,
      );
      expect(ownV2Cgroup()).toBe(before);
    },
  );
});

/** The cgroup v2 mount, this process's cgroup in it and the controllers it offers; null when not usable here. */
function unifiedHierarchy(): { mount: string; self: string; offers: string[] } | null {
  if (!isRoot) return null;
  const line = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .find((l) => l.includes(' - cgroup2 ') && l.split(' ')[4]?.startsWith('/sys/fs/cgroup'));
  const mount = line?.split(' ')[4];
  if (mount === undefined) return null;
  const self = ownV2Cgroup(mount);
  return { mount, self, offers: readFileSync(join(self, 'cgroup.controllers'), 'utf8').trim().split(/\s+/) };
}

function ownV2Cgroup(mount = v2?.mount ?? ''): string {
  const path = /^0::(.*)$/m.exec(readFileSync('/proc/self/cgroup', 'utf8'))?.[1] ?? '/';
  return join(mount, path).replace(/\/$/, '');
}

/** Runs a command as `uid` (and the group of that number) from the repository's root; answers its output. */
function spawnAs(uid: number, argv: string[]): string {
  const [file, ...args] = argv;
  const repository = fileURLToPath(new URL('../..', import.meta.url));
  const r = spawnSync(file ?? '', args, { uid, gid: uid, encoding: 'utf8', cwd: repository });
  if (r.status !== 0) throw new Error(`${argv.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}
