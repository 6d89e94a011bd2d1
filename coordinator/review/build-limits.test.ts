import { mkdir, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { GitMirrors } from '../git/git-mirrors.js';
import { TempDirs, TestRepo, testGitEnv } from '../git/test-support.js';
import { RepoConfigError } from '../repo-config/errors.js';
import type { CheckSpec } from '../checks/check-manager.js';
import {
  type AppliedLimit,
  type BuildLimit,
  heldBackOf,
  limitChecks,
  limitReport,
  readBuildRules,
} from './build-limits.js';

const temp = new TempDirs();
afterAll(() => temp.removeAll());

const mass = (system: string, rebuilds: number, limit: number): BuildLimit => ({
  kind: 'max-rebuild-count',
  job: 'pkgs',
  system,
  rebuilds,
  limit,
  from: 'job',
});

describe('limitReport', () => {
  it('says plainly what was held back, what was built anyway, and the rebuilds per system', () => {
    const applied: AppliedLimit[] = [
      {
        limit: mass('x86_64-linux', 12_345, 5_000),
        built: [
          { attr: 'pkgs.openssl', system: 'x86_64-linux' },
          { attr: 'pkgs.curl', system: 'x86_64-linux' },
        ],
      },
    ];
    const report = limitReport(applied, { rebuildCountBySystem: { 'x86_64-linux': 12_345, 'aarch64-linux': 900 } })!;
    expect(report.title).toBe(
      'Mass rebuild: 12,345 rebuilds on x86_64-linux exceed max_rebuild_count 5,000; built only the 2 attributes ' +
        'named by commands/commit titles',
    );
    expect(report.lines).toContain(
      "- job `pkgs`: 12,345 rebuilds on `x86_64-linux` exceed max_rebuild_count 5,000 (the base's jobs.pkgs.max_rebuild_count)",
    );
    expect(report.lines).toContain(
      'Built only the attributes named by commands or commit titles (2): `pkgs.curl`, `pkgs.openssl`',
    );
    expect(report.lines).toContain('Rebuilds per system: `aarch64-linux` 900, `x86_64-linux` 12,345.');
  });

  it("reports a system's own limits to its build check, and a path rule to every system", () => {
    const applied: AppliedLimit[] = [{ limit: mass('x86_64-linux', 10, 3), built: [] }];
    expect(limitReport(applied, { system: 'aarch64-linux' })).toBeUndefined();
    expect(limitReport(applied, { system: 'x86_64-linux' })!.title).toBe(
      'Mass rebuild: 10 rebuilds on x86_64-linux exceed max_rebuild_count 3; built nothing',
    );
    const paths: AppliedLimit = {
      limit: {
        kind: 'skip-build-paths',
        job: 'pkgs',
        files: 3,
        globs: [
          { glob: 'doc/**', files: 2 },
          { glob: '*.md', files: 1 },
        ],
      },
      built: [{ attr: 'pkgs.manual', system: 'x86_64-linux' }],
    };
    expect(limitReport([paths], { system: 'aarch64-linux' })!.title).toBe(
      'Only files matching skip_build_paths changed: 3 files (doc/** matched 2, *.md matched 1); built nothing',
    );
    const whole = limitReport([paths, ...applied])!;
    expect(whole.title).toBe(
      'Only files matching skip_build_paths changed: 3 files (doc/** matched 2, *.md matched 1) (and 1 more limit); ' +
        'built only the 1 attribute named by commands/commit titles',
    );
    expect(whole.lines).toContain(
      '- job `pkgs`: all 3 changed files match its skip_build_paths: `doc/**` (2), `*.md` (1)',
    );
    expect(limitReport([])).toBeUndefined();
  });
});

describe('limitChecks', () => {
  const spec = (name: string, system: string, shellDrv?: string): CheckSpec => ({
    name,
    system,
    command: 'true',
    allowNetwork: false,
    roBind: [],
    timeoutSeconds: 60,
    shellDrv,
    error: undefined,
  });
  const base = {
    checks: [
      {
        name: 'lint',
        command: 'true',
        allowNetwork: false,
        roBind: [],
        timeoutSeconds: undefined,
        systems: [
          { system: 'x86_64-linux', shellDrv: '/nix/store/aaaa-lint-shell.drv' },
          { system: 'aarch64-linux', shellDrv: '/nix/store/bbbb-lint-shell.drv' },
        ],
      },
    ],
  };
  const specs = [
    spec('lint', 'x86_64-linux', '/nix/store/cccc-lint-shell.drv'), // a new shell on the held-back system
    spec('lint', 'aarch64-linux', '/nix/store/dddd-lint-shell.drv'), // a new shell on a system building as usual
    spec('tests', 'x86_64-linux', '/nix/store/eeee-tests-shell.drv'), // a check the base does not have
    spec('format', 'x86_64-linux'), // no shell: nothing to build
  ];

  it("holds back a check on a held-back system whose shell is not the base's, and runs the rest", () => {
    const applied: AppliedLimit[] = [{ limit: mass('x86_64-linux', 10, 3), built: [] }];
    const { run, held } = limitChecks(specs, base, applied);
    expect(held).toEqual([
      { name: 'lint', system: 'x86_64-linux' },
      { name: 'tests', system: 'x86_64-linux' },
    ]);
    expect(run.map((s) => `${s.name} ${s.system}`)).toEqual(['lint aarch64-linux', 'format x86_64-linux']);
    const report = heldBackOf(applied, { 'x86_64-linux': 10 }, held)!;
    expect(report.checks).toEqual(held);
    expect(report.lines).toContain(
      'Checks not run, their shells would build what is held back: `lint` on `x86_64-linux`, `tests` on `x86_64-linux`.',
    );
  });

  it("runs a check whose shell is the base's, and every check when nothing is held back", () => {
    const same = [spec('lint', 'x86_64-linux', '/nix/store/aaaa-lint-shell.drv')];
    expect(limitChecks(same, base, [{ limit: mass('x86_64-linux', 10, 3), built: [] }]).held).toEqual([]);
    expect(limitChecks(specs, base, []).run).toEqual(specs);
    expect(heldBackOf([{ limit: mass('x86_64-linux', 10, 3), built: [] }], {})!.checks).toBeUndefined();
  });

  it('holds back new shells on every system when only skip_build_paths files changed', () => {
    const paths: AppliedLimit = {
      limit: { kind: 'skip-build-paths', job: 'pkgs', files: 1, globs: [{ glob: 'doc/**', files: 1 }] },
      built: [],
    };
    expect(limitChecks(specs, base, [paths]).held.map((c) => c.system)).toEqual([
      'x86_64-linux',
      'aarch64-linux',
      'x86_64-linux',
    ]);
  });
});

describe('readBuildRules', () => {
  async function setUp() {
    const repo = await TestRepo.create(join(await temp.make('ekaci-limits-src-'), 'repo'));
    const mirrors = new GitMirrors({
      dir: await temp.make('ekaci-limits-mirrors-'),
      logger: silentLogger(),
      env: testGitEnv(),
    });
    const read = (base: string, head: string, server = 0) =>
      readBuildRules(mirrors, { baseUrl: repo.dir, headUrl: repo.dir, base, head, serverMaxRebuildCount: server });
    return { repo, read };
  }
  const config = (job: object): string => JSON.stringify({ jobs: { pkgs: { file: 'default.nix', ...job } } });

  it("reads the base's rules, never the head's, and the files the change touches from the merge base", async () => {
    const { repo, read } = await setUp();
    await repo.commit('base', {
      '.eka-ci/config.json': config({ max_rebuild_count: 3, skip_build_paths: ['doc/**'] }),
      'default.nix': '{ }',
      'pkgs/a.nix': 'a',
      'doc/index.md': 'docs',
    });
    await repo.git('checkout', '--quiet', '-b', 'change');
    const head = await repo.commit('change', {
      '.eka-ci/config.json': config({ max_rebuild_count: 99999 }),
      'doc/index.md': 'better docs',
    });
    // The base branch moves on meanwhile: what it changed is not the pull request's.
    await repo.git('checkout', '--quiet', 'main');
    const moved = await repo.commit('elsewhere', { 'pkgs/b.nix': 'b' });
    expect(await read(moved, head, 7)).toEqual({
      jobs: new Map([['pkgs', { maxRebuildCount: 3, skipBuildPaths: ['doc/**'] }]]),
      serverMaxRebuildCount: 7,
      changedFiles: ['.eka-ci/config.json', 'doc/index.md'],
    });
  });

  it('counts a rename as both its paths, so moving a file into doc/ is no documentation-only change', async () => {
    const { repo, read } = await setUp();
    const base = await repo.commit('base', {
      '.eka-ci/config.json': config({ skip_build_paths: ['doc/**'] }),
      'default.nix': '{ }',
      'pkgs/notes.txt': 'a long enough text for git to see the same file under a new name\n'.repeat(5),
    });
    await mkdir(join(repo.dir, 'doc'));
    await repo.git('mv', 'pkgs/notes.txt', 'doc/notes.txt');
    await repo.git('commit', '--quiet', '-m', 'move');
    const head = await repo.git('rev-parse', 'HEAD');
    expect((await read(base, head)).changedFiles).toEqual(['doc/notes.txt', 'pkgs/notes.txt']);
  });

  it('lists no files when no job of the base has skip_build_paths', async () => {
    const { repo, read } = await setUp();
    const base = await repo.commit('base', { '.eka-ci/config.json': config({}), 'default.nix': '{ }' });
    const head = await repo.commit('head', { 'default.nix': '{ a = 1; }' });
    expect((await read(base, head)).changedFiles).toBeUndefined();
  });

  it('falls back to .ekaci/config.json, following a symbolic link inside the repository', async () => {
    const { repo, read } = await setUp();
    await repo.commit('files', {
      'ci/eka.json': config({ max_rebuild_count: 5 }),
      'default.nix': '{ }',
      '.ekaci/x': '',
    });
    await symlink('../ci/eka.json', join(repo.dir, '.ekaci', 'config.json'));
    const base = await repo.commit('link', {});
    const head = await repo.commit('head', { 'default.nix': '{ a = 1; }' });
    expect((await read(base, head)).jobs.get('pkgs')?.maxRebuildCount).toBe(5);
  });

  it('refuses a configuration that is a link out of the repository', async () => {
    const { repo, read } = await setUp();
    await repo.commit('files', { 'default.nix': '{ }', '.eka-ci/x': '' });
    await symlink('../../outside.json', join(repo.dir, '.eka-ci', 'config.json'));
    const base = await repo.commit('link', {});
    const head = await repo.commit('head', { 'default.nix': '{ a = 1; }' });
    await expect(read(base, head)).rejects.toThrow(
      `.eka-ci/config.json at the base ${base.slice(0, 12)}: is a symbolic link out of the repository, not a file`,
    );
  });

  it('refuses a base configuration with a bad glob, naming the key and the base', async () => {
    const { repo, read } = await setUp();
    const base = await repo.commit('base', {
      '.eka-ci/config.json': config({ skip_build_paths: ['doc/'] }),
      'default.nix': '{ }',
    });
    const head = await repo.commit('head', { 'default.nix': '{ a = 1; }' });
    const error = await read(base, head).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RepoConfigError);
    expect((error as Error).message).toBe(
      `.eka-ci/config.json at the base ${base.slice(0, 12)}: jobs.pkgs.skip_build_paths[0]: "doc/" matches no file ` +
        '(paths name files): write "doc/**" for everything under it',
    );
  });
});
