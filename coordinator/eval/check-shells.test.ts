import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { git } from '../../test/support/cli.js';
import { testEvalEnvironment } from '../../test/support/eval-environment.js';
import { nonce, tempDir } from '../../test/support/nix-project.js';
import { GitMirrors } from '../git/git-mirrors.js';
import { NO_EXTRA_POLICY } from './eval-options.js';
import { evaluateCommit } from './repo-evaluation.js';

/** A commit's checks as its evaluation plans them: each check's shell evaluated per system, problems per check. */

function commit(files: Record<string, string>): { dir: string; rev: string } {
  const dir = tempDir('ekaci-check-shells-');
  for (const [path, text] of Object.entries(files)) {
    mkdirSync(join(dir, path, '..'), { recursive: true });
    writeFileSync(join(dir, path), text);
  }
  git(dir, 'init', '-q');
  git(dir, 'add', '.');
  git(dir, 'commit', '-q', '-m', 'checks');
  return { dir, rev: git(dir, 'rev-parse', 'HEAD') };
}

async function plan(files: Record<string, string>) {
  const repo = commit(files);
  const dataDir = tempDir('ekaci-check-shells-data-');
  const e = await evaluateCommit({
    mirrors: new GitMirrors({ dir: join(dataDir, 'git'), logger: silentLogger() }),
    dataDir,
    repo: repo.dir,
    rev: repo.rev,
    environment: await testEvalEnvironment(),
    policy: NO_EXTRA_POLICY,
    defaultSystem: 'x86_64-linux',
  });
  return e.checks ?? [];
}

const drv = (tag: string, name: string, system = 'x86_64-linux'): string =>
  `derivation { name = "${name}-${tag}"; system = "${system}"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }`;

describe('checks planned by a commit’s evaluation', () => {
  it('evaluates a file job’s shell attribute per system, and reports one that throws or is missing on its check', async () => {
    const tag = nonce();
    const checks = await plan({
      'default.nix': `{ hello = ${drv(tag, 'hello')}; shells = { lint = ${drv(tag, 'lint-shell')}; broken = throw "no shell here"; }; }`,
      '.eka-ci/config.json': JSON.stringify({
        jobs: { main: { file: 'default.nix', attr_path: 'hello' } },
        checks: {
          plain: { command: 'true' },
          lint: { command: 'lint .', shell: 'shells.lint', job: 'main', ro_bind: ['default.nix'], timeout_seconds: 30 },
          broken: { command: 'true', shell: 'shells.broken', job: 'main' },
          missing: { command: 'true', shell: 'shells.nothing', job: 'main' },
          elsewhere: { command: 'true', shell: 'shells.lint', job: 'main', systems: ['aarch64-linux'] },
        },
      }),
    });
    const byName = new Map(checks.map((c) => [c.name, c]));

    expect(byName.get('plain')).toEqual({
      name: 'plain',
      command: 'true',
      allowNetwork: false,
      roBind: [],
      timeoutSeconds: undefined,
      systems: [{ system: 'x86_64-linux' }],
    });
    const lint = byName.get('lint')!;
    expect(lint).toMatchObject({ command: 'lint .', roBind: ['default.nix'], timeoutSeconds: 30 });
    expect(lint.systems).toHaveLength(1);
    expect(lint.systems[0]!.shellDrv).toMatch(new RegExp(`^/nix/store/[a-z0-9]{32}-lint-shell-${tag}\\.drv$`));
    expect(byName.get('broken')!.systems[0]!.error).toBe(
      'shell default.nix attribute shells.broken does not evaluate: default.nix (attribute path shells.broken): error: no shell here',
    );
    expect(byName.get('missing')!.systems[0]!.error).toMatch(
      /^shell default\.nix attribute shells\.nothing does not evaluate: default\.nix \(attribute path shells\.nothing\): error: attribute 'nothing' missing/,
    );
    expect(byName.get('missing')!.systems[0]!.error).not.toContain('/tmp/');
    expect(byName.get('missing')!.systems[0]!.shellDrv).toBeUndefined();
    expect(byName.get('elsewhere')!.systems).toEqual([
      {
        system: 'aarch64-linux',
        error: 'shell default.nix attribute shells.lint is for x86_64-linux, not aarch64-linux',
      },
    ]);
  });

  it('takes a flake job’s shell from devShells.<system>.<name>', async () => {
    const tag = nonce();
    const checks = await plan({
      'flake.nix': `{ outputs = { self }: {
        packages.x86_64-linux.hello = ${drv(tag, 'hello')};
        devShells.x86_64-linux.lint = ${drv(tag, 'flake-shell')};
      }; }`,
      '.eka-ci/config.json': JSON.stringify({
        jobs: { flake: { flake: { outputs: ['packages'] }, systems: ['x86_64-linux'] } },
        checks: { lint: { command: 'true', shell: 'lint' }, gone: { command: 'true', shell: 'nope' } },
      }),
    });
    const byName = new Map(checks.map((c) => [c.name, c]));

    expect(byName.get('lint')!.systems[0]!.shellDrv).toMatch(new RegExp(`-flake-shell-${tag}\\.drv$`));
    expect(byName.get('gone')!.systems[0]).toEqual({
      system: 'x86_64-linux',
      error: 'shell flake output devShells.x86_64-linux.nope does not exist',
    });
  });
});
