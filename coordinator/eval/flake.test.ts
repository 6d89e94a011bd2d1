import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EvaluationError } from '../../common/errors.js';
import { testEvalEnvironment } from '../../test/support/eval-environment.js';
import { nonce, tempDir } from '../../test/support/nix-project.js';
import { NO_EXTRA_POLICY } from './eval-options.js';
import type { EvalResult } from './eval-result.js';
import { type FlakeEvaluatorOptions, evaluateFlake, flakeRef } from './flake.js';

const GIT_ENV = {
  ...process.env,
  GIT_AUTHOR_NAME: 'eka-ci test',
  GIT_AUTHOR_EMAIL: 'test@example.invalid',
  GIT_COMMITTER_NAME: 'eka-ci test',
  GIT_COMMITTER_EMAIL: 'test@example.invalid',
};

function git(dir: string, ...args: string[]): string {
  return execFileSync('git', args, { cwd: dir, env: GIT_ENV, encoding: 'utf8' }).trim();
}

/** A git repository with one commit holding a `flake.nix` (no inputs) whose outputs are `body`; `mk` makes a derivation. */
function flakeRepo(body: string): { dir: string; tag: string; rev: string } {
  const dir = tempDir('ekaci-flake-test-');
  const tag = nonce();
  writeFileSync(
    join(dir, 'flake.nix'),
    `{
  outputs = { self }:
    let
      mk = system: name: derivation {
        name = "\${name}-${tag}";
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" "echo > $out" ];
      };
    in ${body};
}
`,
  );
  git(dir, 'init', '-q');
  git(dir, 'add', 'flake.nix');
  git(dir, 'commit', '-q', '-m', 'flake');
  return { dir, tag, rev: git(dir, 'rev-parse', 'HEAD') };
}

async function run(checkoutDir: string, extra: Partial<FlakeEvaluatorOptions> = {}): Promise<Map<string, EvalResult>> {
  const results = new Map<string, EvalResult>();
  const options: FlakeEvaluatorOptions = {
    checkoutDir,
    outputs: ['checks', 'packages', 'hydraJobs'],
    systems: ['x86_64-linux'],
    gcRootsDir: join(tempDir('ekaci-flake-roots-'), 'roots'),
    workers: 2,
    environment: await testEvalEnvironment(),
    policy: NO_EXTRA_POLICY,
    ...extra,
  };
  for await (const r of evaluateFlake(options)) {
    expect(results.has(r.attr), `${r.attr} reported twice`).toBe(false);
    results.set(r.attr, r);
  }
  return results;
}

const FLAKE = `{
  packages.x86_64-linux.hello = mk "x86_64-linux" "hello";
  packages.x86_64-linux.broken = throw "broken on purpose";
  packages.aarch64-linux.other = mk "aarch64-linux" "other";
  checks.x86_64-linux.t = mk "x86_64-linux" "t";
  hydraJobs.hello.x86_64-linux = mk "x86_64-linux" "job-hello";
  hydraJobs.hello.aarch64-linux = mk "aarch64-linux" "job-hello";
  hydraJobs.single = mk "x86_64-linux" "single";
  apps.x86_64-linux.ignored = throw "not an evaluated output";
}`;

describe('flake evaluation', () => {
  it('evaluates checks, packages and hydraJobs of the wanted systems and isolates a throwing package', async () => {
    const { dir, tag } = flakeRepo(FLAKE);
    const results = await run(dir);
    expect([...results.keys()].sort()).toEqual([
      'checks.x86_64-linux.t',
      'hydraJobs.hello.x86_64-linux',
      'hydraJobs.single',
      'packages.x86_64-linux.broken',
      'packages.x86_64-linux.hello',
    ]);
    expect(results.get('packages.x86_64-linux.broken')?.error).toContain('broken on purpose');
    const names: Record<string, string> = {
      'checks.x86_64-linux.t': 't',
      'hydraJobs.hello.x86_64-linux': 'job-hello',
      'hydraJobs.single': 'single',
      'packages.x86_64-linux.hello': 'hello',
    };
    for (const [attr, name] of Object.entries(names)) {
      const r = results.get(attr)!;
      expect(r.error, attr).toBeUndefined();
      expect(r.skipped, attr).toBeUndefined();
      expect(r.system).toBe('x86_64-linux');
      expect(r.drvPath).toMatch(new RegExp(`^/nix/store/[a-z0-9]{32}-${name}-${tag}\\.drv$`));
      expect(existsSync(r.drvPath!), `${attr}: the .drv is written to the store`).toBe(true);
    }
  });

  it('evaluates only the listed outputs and systems; a missing output is simply absent', async () => {
    const { dir } = flakeRepo(`{
      packages.x86_64-linux.hello = mk "x86_64-linux" "hello";
      packages.aarch64-linux.other = mk "aarch64-linux" "other";
    }`);
    expect([...(await run(dir, { outputs: ['packages', 'checks', 'hydraJobs'] })).keys()]).toEqual([
      'packages.x86_64-linux.hello',
    ]);
    expect([...(await run(dir, { outputs: ['checks'] })).keys()]).toEqual([]);
    const both = await run(dir, { outputs: ['packages'], systems: ['x86_64-linux', 'aarch64-linux'] });
    expect([...both.keys()].sort()).toEqual(['packages.aarch64-linux.other', 'packages.x86_64-linux.hello']);
    expect(both.get('packages.aarch64-linux.other')?.system).toBe('aarch64-linux');
  });

  it('evaluates the committed tree of a worktree, not stray files of the checkout', async () => {
    const { dir, rev } = flakeRepo(`{ checks.x86_64-linux.t = mk "x86_64-linux" "t"; }`);
    const worktree = join(tempDir('ekaci-flake-wt-'), 'wt');
    git(dir, 'worktree', 'add', '-q', '--detach', worktree, rev);
    mkdirSync(join(worktree, 'untracked'));
    writeFileSync(join(worktree, 'flake.nix'), '{ outputs = { self }: throw "uncommitted edit"; }');
    // The worktree's objects live in the repository it was added from, as a coordinator worktree's live in a mirror.
    const results = await run(worktree, { rev, gitDir: join(dir, '.git') });
    expect([...results.keys()]).toEqual(['checks.x86_64-linux.t']);
    expect(results.get('checks.x86_64-linux.t')?.drvPath).toBeDefined();
  });

  it('fails the run when flake.nix does not evaluate', async () => {
    const { dir } = flakeRepo(`throw "no outputs at all"`);
    await expect(run(dir)).rejects.toThrow(EvaluationError);
    await expect(run(dir)).rejects.toThrow(/no outputs at all/);
  });

  it('builds a locked git+file reference', () => {
    const rev = 'a'.repeat(40);
    expect(flakeRef('/srv/eka ci/wt', rev)).toBe(`git+file:///srv/eka%20ci/wt?rev=${rev}`);
    expect(() => flakeRef('/srv/wt', 'HEAD')).toThrow(EvaluationError);
  });
});
