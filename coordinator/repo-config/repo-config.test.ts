import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { RepoConfigError } from './errors.js';
import { MAX_CONFIG_BYTES, compileRepoConfig, loadRepoConfig } from './repo-config.js';
import { json, makeClonedRepo, makeTree, temp } from './test-support.js';

afterAll(() => temp.removeAll());

const HELLO = { jobs: { hello: { file: 'default.nix' } } };

async function loadError(dir: string): Promise<RepoConfigError> {
  const error: unknown = await loadRepoConfig(dir).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(RepoConfigError);
  return error as RepoConfigError;
}

describe('finding the config file', () => {
  it('reads .eka-ci/config.json and reports it as the source', async () => {
    const dir = await makeTree({ '.eka-ci/config.json': json(HELLO), 'default.nix': '{}' });
    const config = await loadRepoConfig(dir);
    expect(config?.source).toBe('.eka-ci/config.json');
    expect(config?.jobs.map((j) => j.name)).toEqual(['hello']);
  });

  it('falls back to .ekaci/config.json', async () => {
    const dir = await makeTree({ '.ekaci/config.json': json(HELLO), 'default.nix': '{}' });
    expect((await loadRepoConfig(dir))?.source).toBe('.ekaci/config.json');
  });

  it('prefers .eka-ci over .ekaci and never reads the latter when both exist', async () => {
    const dir = await makeTree({
      '.eka-ci/config.json': json(HELLO),
      '.ekaci/config.json': '{ this is not even JSON',
      'default.nix': '{}',
    });
    expect((await loadRepoConfig(dir))?.source).toBe('.eka-ci/config.json');
  });

  it('returns undefined, not an error, for a repository without any config', async () => {
    const dir = await makeTree({ 'default.nix': '{}', '.eka-ci/README': 'no config here' });
    expect(await loadRepoConfig(dir)).toBeUndefined();
  });

  it('refuses a config file that is a symbolic link out of the checkout, without reading it', async () => {
    const outside = await makeTree({ 'config.json': json(HELLO) });
    const dir = await makeTree({ '.eka-ci/config.json': { link: join(outside, 'config.json') } });
    const error = await loadError(dir);
    expect(error.message).toContain('.eka-ci/config.json: the config file is outside the repository');
  });
});

describe('file limits and JSON syntax', () => {
  it('rejects a config over 1 MiB, naming the file and the limit', async () => {
    const padding = ' '.repeat(MAX_CONFIG_BYTES);
    const dir = await makeTree({ '.eka-ci/config.json': `{${padding}}` });
    const error = await loadError(dir);
    expect(error.message).toMatch(/^\.eka-ci\/config\.json: is 1048578 bytes; the limit is 1048576 bytes \(1 MiB\)$/);
  });

  it('reports invalid JSON with the file, line, column and position', async () => {
    const dir = await makeTree({ '.eka-ci/config.json': '{\n  "jobs": {\n    "hello": { "file": }\n  }\n}' });
    const error = await loadError(dir);
    expect(error.code).toBe('EKACI_ERR_REPO_CONFIG');
    expect(error.message).toMatch(
      /^\.eka-ci\/config\.json: invalid JSON at line 3, column 24 \(position 37\): Unexpected token '}'$/,
    );
  });

  it('gives two commits with the same file the same digest, and any change another', async () => {
    const same = [await makeTree({ '.eka-ci/config.json': json(HELLO), 'default.nix': '{}' })];
    same.push(await makeTree({ '.eka-ci/config.json': json(HELLO), 'default.nix': '{ x = 1; }' }));
    const changed = await makeTree({ '.eka-ci/config.json': `${json(HELLO)}\n`, 'default.nix': '{}' });
    const digests = await Promise.all([...same, changed].map(async (d) => (await loadRepoConfig(d))!.digest));
    expect(digests[0]).toMatch(/^[0-9a-f]{64}$/);
    expect(digests[1]).toBe(digests[0]);
    expect(digests[2]).not.toBe(digests[0]);
  });

  it('accepts a config saved with a byte order mark', async () => {
    const dir = await makeTree({ '.eka-ci/config.json': `\uFEFF${json(HELLO)}`, 'default.nix': '{}' });
    expect((await loadRepoConfig(dir))?.jobs).toHaveLength(1);
  });
});

describe('compiled config', () => {
  it('fills in every default for a file job and a check', async () => {
    const dir = await makeTree({ 'default.nix': '{}' });
    const config = await compileRepoConfig(
      { jobs: { hello: { file: 'default.nix' } }, checks: { fmt: { command: 'nixfmt --check .' } } },
      '.eka-ci/config.json',
      dir,
    );
    expect(config).toEqual({
      source: '.eka-ci/config.json',
      digest: '',
      jobs: [
        {
          name: 'hello',
          kind: 'file',
          file: join(dir, 'default.nix'),
          relativeFile: 'default.nix',
          attrPath: [],
          allowEvalFailures: false,
          caches: [],
          sizeCheck: undefined,
          systems: undefined,
        },
      ],
      checks: [
        {
          name: 'fmt',
          command: 'nixfmt --check .',
          shell: undefined,
          allowNetwork: false,
          roBind: [],
          timeoutSeconds: undefined,
          systems: undefined,
        },
      ],
    });
  });

  it('splits attr_path on dots and carries the optional job settings over', async () => {
    const dir = await makeTree({ 'ci/jobs.nix': '{}' });
    const config = await compileRepoConfig(
      {
        jobs: {
          'pkgs.hello': {
            file: 'ci/jobs.nix',
            attr_path: 'legacyPackages.x86_64-linux.hello',
            allow_eval_failures: true,
            caches: ['main'],
            size_check: { max_increase_percent: 5, base_branch: 'release-24.05' },
            systems: ['x86_64-linux'],
            max_rebuild_count: 500,
            skip_build_paths: ['doc/**', '*.md', '/LICENSE'],
          },
        },
      },
      '.eka-ci/config.json',
      dir,
    );
    expect(config.jobs[0]).toMatchObject({
      name: 'pkgs.hello',
      attrPath: ['legacyPackages', 'x86_64-linux', 'hello'],
      allowEvalFailures: true,
      caches: ['main'],
      sizeCheck: { maxIncreasePercent: 5, baseBranch: 'release-24.05' },
      systems: ['x86_64-linux'],
      maxRebuildCount: 500,
      skipBuildPaths: ['doc/**', '*.md', '/LICENSE'],
    });
  });

  it('compiles a flake job with its outputs and no file', async () => {
    const dir = await makeTree({});
    const config = await compileRepoConfig(
      { jobs: { flake: { flake: { outputs: ['checks', 'hydraJobs'] }, systems: ['aarch64-linux'] } } },
      '.eka-ci/config.json',
      dir,
    );
    expect(config.jobs).toEqual([
      {
        name: 'flake',
        kind: 'flake',
        outputs: ['checks', 'hydraJobs'],
        systems: ['aarch64-linux'],
        allowEvalFailures: false,
        caches: [],
        sizeCheck: undefined,
      },
    ]);
  });

  it('parses checks with their settings and resolves ro_bind paths inside the checkout', async () => {
    const dir = await makeTree({ 'pkgs/a.nix': '{}', 'treefmt.toml': '' });
    const config = await compileRepoConfig(
      {
        checks: {
          lint: {
            shell: 'shells.lint',
            command: 'treefmt --fail-on-change',
            allow_network: true,
            ro_bind: ['/pkgs', 'treefmt.toml'],
            timeout_seconds: 600,
            systems: ['x86_64-linux', 'aarch64-darwin'],
          },
        },
        jobs: { pkgs: { file: 'pkgs/a.nix' } },
      },
      '.eka-ci/config.json',
      dir,
    );
    expect(config.checks).toEqual([
      {
        name: 'lint',
        command: 'treefmt --fail-on-change',
        shell: { attrPath: ['shells', 'lint'], job: config.jobs[0] },
        allowNetwork: true,
        roBind: ['pkgs', 'treefmt.toml'],
        timeoutSeconds: 600,
        systems: ['x86_64-linux', 'aarch64-darwin'],
      },
    ]);
  });

  it('loads a config committed to git, from a fresh clone of the repository', async () => {
    const dir = await makeClonedRepo({
      '.eka-ci/config.json': json({ jobs: { hello: { file: '/ci/jobs.nix', attr_path: 'hello' } } }),
      'ci/jobs.nix': '{ hello = null; }',
    });
    const config = await loadRepoConfig(dir);
    expect(config?.jobs).toMatchObject([{ name: 'hello', file: join(dir, 'ci/jobs.nix'), attrPath: ['hello'] }]);
  });
});

describe('schema errors name the field and the file', () => {
  async function problems(raw: unknown): Promise<string> {
    const dir = await makeTree({ '.eka-ci/config.json': json(raw), 'default.nix': '{}' });
    return (await loadError(dir)).message;
  }

  it('rejects an unknown top-level field', async () => {
    expect(await problems({ ...HELLO, job: {} })).toBe('.eka-ci/config.json: job: unknown field');
  });

  it('rejects an unknown field in a job', async () => {
    expect(await problems({ jobs: { hello: { file: 'default.nix', atr_path: 'x' } } })).toBe(
      '.eka-ci/config.json: jobs.hello.atr_path: unknown field',
    );
  });

  it('rejects an unknown field in size_check', async () => {
    const job = { file: 'default.nix', size_check: { max_increase_percent: 1, max_decrease_percent: 1 } };
    expect(await problems({ jobs: { hello: job } })).toBe(
      '.eka-ci/config.json: jobs.hello.size_check.max_decrease_percent: unknown field',
    );
  });

  it('rejects a job with both file and flake', async () => {
    expect(await problems({ jobs: { hello: { file: 'default.nix', flake: { outputs: ['checks'] } } } })).toBe(
      '.eka-ci/config.json: jobs.hello: give either file or flake, not both',
    );
  });

  it('rejects a job with neither file nor flake', async () => {
    expect(await problems({ jobs: { hello: { systems: ['x86_64-linux'] } } })).toMatch(
      /^\.eka-ci\/config\.json: jobs\.hello: needs file .* or flake/,
    );
  });

  it('rejects a flake job with no outputs', async () => {
    expect(await problems({ jobs: { hello: { flake: { outputs: [] } } } })).toBe(
      '.eka-ci/config.json: jobs.hello.flake.outputs: list at least one of checks, packages, hydraJobs',
    );
  });

  it('rejects attr_path on a flake job', async () => {
    expect(await problems({ jobs: { hello: { flake: { outputs: ['packages'] }, attr_path: 'hello' } } })).toBe(
      '.eka-ci/config.json: jobs.hello.attr_path: only file jobs take attr_path',
    );
  });

  it('rejects an invalid job name, quoting it', async () => {
    expect(await problems({ jobs: { '-hello world': { file: 'default.nix' } } })).toMatch(
      /^\.eka-ci\/config\.json: jobs\["-hello world"\]: names start with a letter or digit/,
    );
  });

  it('reads shell as the attribute of a shell derivation: the old meaning (an interpreter) is an error saying so', async () => {
    expect(await problems({ checks: { fmt: { shell: 'bash', command: 'true' } } })).toMatch(
      /^\.eka-ci\/config\.json: checks\.fmt\.shell: "bash" reads as an interpreter, but shell names the shell derivation/,
    );
    expect(await problems({ checks: { fmt: { shell: '/bin/sh', command: 'true' } } })).toMatch(
      /reads as an interpreter/,
    );
  });

  it('needs the job a check’s shell comes from when there are several, and a job that exists', async () => {
    const jobs = { a: { file: 'default.nix' }, b: { file: 'default.nix' } };
    expect(await problems({ jobs, checks: { fmt: { shell: 'dev', command: 'true' } } })).toBe(
      '.eka-ci/config.json: check fmt: shell dev needs the job whose file or flake it is in: name it with "job" (jobs: a, b)',
    );
    expect(await problems({ jobs, checks: { fmt: { shell: 'dev', job: 'c', command: 'true' } } })).toBe(
      '.eka-ci/config.json: check fmt: job c is not a job of this file',
    );
    expect(await problems({ jobs, checks: { fmt: { job: 'a', command: 'true' } } })).toBe(
      '.eka-ci/config.json: check fmt: job is only read with shell',
    );
  });

  it('rejects a check without a command', async () => {
    expect(await problems({ checks: { fmt: { timeout_seconds: 5 } } })).toMatch(
      /^\.eka-ci\/config\.json: checks\.fmt\.command: /,
    );
  });

  it('rejects a max_rebuild_count that is negative or not a whole number', async () => {
    for (const bad of [-1, 2.5, '100']) {
      expect(await problems({ jobs: { hello: { file: 'default.nix', max_rebuild_count: bad } } })).toMatch(
        /^\.eka-ci\/config\.json: jobs\.hello\.max_rebuild_count: /,
      );
    }
  });

  it('rejects each bad skip_build_paths glob, naming its place in the list and what is wrong', async () => {
    const globs = ['doc/**', '', '!doc/**', 'doc/', '../x', './doc/**', 'a[b', '*.md', 'doc//x'];
    const message = await problems({ jobs: { hello: { file: 'default.nix', skip_build_paths: globs } } });
    expect(message.split('\n')).toEqual([
      '.eka-ci/config.json: jobs.hello.skip_build_paths[1]: an empty glob matches no file',
      '.eka-ci/config.json: jobs.hello.skip_build_paths[2]: "!doc/**": negation is not supported: list the paths that skip building',
      '.eka-ci/config.json: jobs.hello.skip_build_paths[3]: "doc/" matches no file (paths name files): write "doc/**" for everything under it',
      '.eka-ci/config.json: jobs.hello.skip_build_paths[4]: "../x": no ".", ".." or empty parts: paths are relative to the repository root, as git prints them',
      '.eka-ci/config.json: jobs.hello.skip_build_paths[5]: "./doc/**": no ".", ".." or empty parts: paths are relative to the repository root, as git prints them',
      '.eka-ci/config.json: jobs.hello.skip_build_paths[6]: "a[b": "[" opens a class that is never closed (write "\\[" for a literal "[")',
      '.eka-ci/config.json: jobs.hello.skip_build_paths[8]: "doc//x": no ".", ".." or empty parts: paths are relative to the repository root, as git prints them',
    ]);
    expect(await problems({ jobs: { hello: { file: 'default.nix', skip_build_paths: 'doc/**' } } })).toMatch(
      /^\.eka-ci\/config\.json: jobs\.hello\.skip_build_paths: /,
    );
  });

  it('lists every problem, one per line', async () => {
    const message = await problems({ x: 1, jobs: { a: { file: 'default.nix', y: 2 } } });
    expect(message.split('\n').sort()).toEqual([
      '.eka-ci/config.json: jobs.a.y: unknown field',
      '.eka-ci/config.json: x: unknown field',
    ]);
  });

  it('keeps a problem quoting a path with a newline or a control character on one line, escaping them', async () => {
    const dir = await makeTree({
      '.eka-ci/config.json': json({
        checks: { lint: { command: 'true', ro_bind: ['default.\nix', 'a\u001b[2Jb\u2028c'], shell: 'x\r\ty' } },
      }),
      'default.nix': '{}',
    });
    expect((await loadError(dir)).message.split('\n')).toEqual([
      '.eka-ci/config.json: check lint: ro_bind path default.\\nix does not exist in the repository ' +
        '(paths are relative to the repository root)',
      '.eka-ci/config.json: check lint: ro_bind path a\\u001b[2Jb\\u2028c does not exist in the repository ' +
        '(paths are relative to the repository root)',
      '.eka-ci/config.json: check lint: shell x\\r\\ty needs the job whose file or flake it is in: name it with ' +
        '"job" (jobs: none)',
    ]);
  });
});
