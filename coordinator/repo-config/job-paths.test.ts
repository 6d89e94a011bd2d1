import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { RepoConfigError } from './errors.js';
import { type FileJob, compileRepoConfig, loadRepoConfig } from './repo-config.js';
import { type Entry, json, makeClonedRepo, makeTree, temp } from './test-support.js';

afterAll(() => temp.removeAll());

const SOURCE = '.eka-ci/config.json';

async function compileJob(dir: string, file: string): Promise<FileJob> {
  const config = await compileRepoConfig({ jobs: { hello: { file } } }, SOURCE, dir);
  return config.jobs[0] as FileJob;
}

/** The message `file` fails with, in a checkout holding `entries`. */
async function jobFileError(entries: Record<string, Entry>, file: string): Promise<string> {
  const dir = await makeTree(entries);
  const error: unknown = await compileJob(dir, file).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(RepoConfigError);
  return (error as RepoConfigError).message;
}

describe('job file paths', () => {
  it('resolves a relative and a root-absolute spelling to the same file, in a cloned git repository', async () => {
    const dir = await makeClonedRepo({
      '.eka-ci/config.json': json({ jobs: { relative: { file: 'ci/jobs.nix' }, absolute: { file: '/ci/jobs.nix' } } }),
      'ci/jobs.nix': '{}',
    });
    const config = await loadRepoConfig(dir);
    const files = config?.jobs.map((j) => (j as FileJob).file);
    expect(files).toEqual([join(dir, 'ci/jobs.nix'), join(dir, 'ci/jobs.nix')]);
    expect(config?.jobs.map((j) => (j as FileJob).relativeFile)).toEqual(['ci/jobs.nix', 'ci/jobs.nix']);
  });

  it('takes a directory as its default.nix', async () => {
    const dir = await makeTree({ 'ci/default.nix': '{}', 'default.nix': '{}' });
    expect((await compileJob(dir, 'ci')).file).toBe(join(dir, 'ci/default.nix'));
    expect((await compileJob(dir, '/')).relativeFile).toBe('default.nix');
  });

  it('allows ".." that stays inside the checkout', async () => {
    const dir = await makeTree({ 'default.nix': '{}', 'ci/readme': '' });
    expect((await compileJob(dir, 'ci/../default.nix')).relativeFile).toBe('default.nix');
  });

  it('follows a symbolic link that stays inside the checkout', async () => {
    const dir = await makeTree({ 'nix/jobs.nix': '{}', 'ci/jobs.nix': { link: '../nix/jobs.nix' } });
    expect((await compileJob(dir, 'ci/jobs.nix')).file).toBe(join(dir, 'nix/jobs.nix'));
  });

  it('names a missing job file and the job', async () => {
    expect(await jobFileError({}, 'ci/jobs.nix')).toBe(
      `${SOURCE}: job hello: file ci/jobs.nix does not exist in the repository (paths are relative to the repository root)`,
    );
  });

  it('reads /etc/passwd as a path inside the checkout, which does not exist', async () => {
    expect(await jobFileError({ 'default.nix': '{}' }, '/etc/passwd')).toBe(
      `${SOURCE}: job hello: file /etc/passwd does not exist in the repository (paths are relative to the repository root)`,
    );
  });

  it('rejects ".." that climbs out of the checkout', async () => {
    expect(await jobFileError({ 'ci/jobs.nix': '{}' }, 'ci/../../outside.nix')).toMatch(
      /job hello: file ci\/\.\.\/\.\.\/outside\.nix is outside the repository: "\.\." goes above the repository root/,
    );
  });

  it('rejects a job file that is a symbolic link to a host file', async () => {
    const outside = await makeTree({ hostname: 'host' });
    const message = await jobFileError({ 'ci/jobs.nix': { link: join(outside, 'hostname') } }, 'ci/jobs.nix');
    expect(message).toContain(`job hello: file ci/jobs.nix is outside the repository: symbolic link ci/jobs.nix ->`);
  });

  it('rejects a link out of the checkout even when its target does not exist', async () => {
    const message = await jobFileError({ 'ci.nix': { link: '/nonexistent/eka-ci/ci.nix' } }, 'ci.nix');
    expect(message).toContain('symbolic link ci.nix -> /nonexistent/eka-ci/ci.nix leads out of it');
  });

  it('rejects a path through a symlinked directory that points outside', async () => {
    const outside = await makeTree({ 'jobs.nix': '{}' });
    const message = await jobFileError({ ci: { link: outside } }, 'ci/jobs.nix');
    expect(message).toContain(`file ci/jobs.nix is outside the repository: symbolic link ci -> ${outside} leads out`);
  });

  it('rejects a relative link that climbs out through ".."', async () => {
    const message = await jobFileError({ 'ci/jobs.nix': { link: '../../../../../../../etc/hostname' } }, 'ci/jobs.nix');
    expect(message).toContain('is outside the repository: symbolic link ci/jobs.nix -> ../../');
  });

  it('rejects a directory without default.nix', async () => {
    expect(await jobFileError({ 'ci/jobs.nix': '{}' }, 'ci')).toBe(
      `${SOURCE}: job hello: file ci is a directory without default.nix`,
    );
  });

  it('rejects a path with a NUL byte', async () => {
    expect(await jobFileError({ 'default.nix': '{}' }, 'default.nix\0.txt')).toContain('contains a NUL byte');
  });

  it('rejects a symbolic link loop instead of hanging', async () => {
    expect(await jobFileError({ a: { link: 'b' }, b: { link: 'a' } }, 'a')).toContain('too many symbolic links');
  });

  it('applies the same rules to check ro_bind paths', async () => {
    const dir = await makeTree({ secrets: { link: '/etc' } });
    const raw = { checks: { lint: { command: 'true', ro_bind: ['secrets', 'missing'] } } };
    const error = await compileRepoConfig(raw, SOURCE, dir).catch((e: unknown) => e);
    expect((error as RepoConfigError).problems).toEqual([
      'check lint: ro_bind path secrets is outside the repository: symbolic link secrets -> /etc leads out of it ' +
        '(paths are relative to the repository root)',
      'check lint: ro_bind path missing does not exist in the repository (paths are relative to the repository root)',
    ]);
  });
});
