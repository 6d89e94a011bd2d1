import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openDatabase } from '../coordinator/db/database.js';
import { EvaluationStore } from '../coordinator/eval/evaluation-store.js';
import { evaluationCheck, summaryCheck } from '../coordinator/github/check-report.js';
import { decideMerge } from '../coordinator/github/merge-policy.js';
import { withBaseGates } from '../coordinator/review/base-policy.js';
import type { Review } from '../coordinator/review/model.js';
import { ekaci, git } from './support/cli.js';
import { nonce, tempDir } from './support/nix-project.js';

/** An empty git repository whose `.eka-ci/config.json` holds `config`, and a fresh tag for its derivations. */
function configuredRepo(config: object): { repo: string; tag: string } {
  const repo = tempDir('ekaci-review-repo-');
  git(repo, 'init', '-q');
  mkdirSync(join(repo, '.eka-ci'));
  writeFileSync(join(repo, '.eka-ci', 'config.json'), JSON.stringify(config));
  return { repo, tag: nonce() };
}

/**
 * A repository whose change covers the common review categories: a library change that reaches an
 * application only through its dependency, a package that starts failing, one that is fixed, one added, one
 * removed, and an attribute whose evaluation breaks.
 */
function changeRepo(job: { allow_eval_failures?: boolean } = {}): { repo: string; base: string; head: string } {
  const { repo, tag } = configuredRepo({ jobs: { pkgs: { file: 'default.nix', ...job } } });
  const write = (body: string): void =>
    writeFileSync(
      join(repo, 'default.nix'),
      `let mk = name: script: deps: derivation {
  name = "\${name}-${tag}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" script ]; inherit deps;
};
in rec {
${body}
}
`,
    );
  const ok = (word: string): string => `"echo ${word} $deps > $out"`;
  write(`lib = mk "lib" ${ok('v1')} [ ];
  app = mk "app" ${ok('app')} [ lib ];
  breaks = mk "breaks" ${ok('fine')} [ ];
  fixed = mk "fixed" "echo broken; exit 1" [ ];
  gone = mk "gone" ${ok('gone')} [ ];
  evals = mk "evals" ${ok('evals')} [ ];`);
  git(repo, 'add', '-A');
  git(repo, 'commit', '-qm', 'base');
  const base = git(repo, 'rev-parse', 'HEAD');
  write(`lib = mk "lib" ${ok('v2')} [ ];
  app = mk "app" ${ok('app')} [ lib ];
  breaks = mk "breaks" "echo this change broke it; exit 2" [ ];
  fixed = mk "fixed" ${ok('repaired')} [ ];
  fresh = mk "fresh" ${ok('fresh')} [ ];
  evals = abort "evaluation broke";`);
  git(repo, 'commit', '-qam', 'head');
  return { repo, base, head: git(repo, 'rev-parse', 'HEAD') };
}

describe('ekaci review', () => {
  it('reports what the change does, writes markdown and JSON, and exits 1 when something is newly failing', async () => {
    const { repo, base, head } = changeRepo();
    const dir = tempDir();
    const args = ['review', '--repo', repo, '--base', base, '--head', head, '--data-dir', join(dir, 'data')];
    const r = await ekaci([...args, '--markdown', join(dir, 'review.md'), '--json', join(dir, 'review.json')]);
    expect(r.code).toBe(1);
    const review = JSON.parse(readFileSync(join(dir, 'review.json'), 'utf8')) as Review;
    expect(review.base.rev).toBe(base);
    expect(review.head.rev).toBe(head);
    const by = Object.fromEntries(review.attrs.map((a) => [a.attr, a]));
    expect(by.lib).toMatchObject({ change: 'changed', outcome: 'still-succeeding' });
    expect(by.app).toMatchObject({ change: 'changed', outcome: 'still-succeeding' }); // only through lib
    expect(by.breaks).toMatchObject({ change: 'changed', outcome: 'newly-failing', head: { build: 'failed' } });
    expect(by.fixed).toMatchObject({ change: 'changed', outcome: 'newly-succeeding', base: { build: 'failed' } });
    expect(by.fresh).toMatchObject({ change: 'added', head: { build: 'succeeded', eval: 'ok' } });
    expect(by.gone).toMatchObject({ change: 'removed' });
    expect(by.evals?.head).toMatchObject({ eval: 'error', build: 'not-built' });
    expect(by.evals?.head?.error).toMatch(/evaluation broke/);
    const sizes = by.lib?.sizes?.[0];
    expect(sizes?.base?.narSize).toBeGreaterThan(0);
    expect(sizes?.head?.closureSize).toBeGreaterThan(0);
    expect(review.summary['newly-failing']).toBe(1);
    expect(review.summary['newly-succeeding']).toBe(1);

    const markdown = readFileSync(join(dir, 'review.md'), 'utf8');
    expect(markdown).toBe(r.stdout);
    expect(markdown.split('\n')[0]).toMatch(/newly failing/i);
    expect(markdown).toMatch(/breaks/);
    expect(markdown.indexOf('breaks')).toBeLessThan(markdown.indexOf('fresh'));

    // The base side's results are remembered: a second review of the same change builds nothing there.
    const again = await ekaci([...args, '--json', join(dir, 'again.json')]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/building \d+ head and 0 base attributes/);
  });

  it('evaluates and diffs only with --no-build; a new evaluation failure still makes it exit 1', async () => {
    const { repo, base, head } = changeRepo();
    const dir = tempDir();
    const r = await reviewWithoutBuilds(repo, base, head, join(dir, 'r.json'), join(dir, 'data'));
    // Evaluation broke for `evals`: that is newly failing even without building.
    expect(r.code).toBe(1);
    const review = JSON.parse(readFileSync(join(dir, 'r.json'), 'utf8')) as Review;
    expect(review.attrs.find((a) => a.attr === 'breaks')?.head?.build).toBe('not-built');
    expect(review.summary['eval-failing']).toBe(1);
  });
});

describe('what ekaci review builds', () => {
  it('is what the GitHub pipeline builds: attributes named in commit titles, never those for another platform', async () => {
    const { repo, tag } = configuredRepo({ jobs: { pkgs: { file: 'default.nix' } } });
    const write = (version: string): void =>
      writeFileSync(
        join(repo, 'default.nix'),
        `let mk = name: derivation {
  name = "\${name}-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
}; in {
  same = mk "same";
  plain = mk "plain-${version}";
  elsewhere = mk "elsewhere-${version}" // { meta.platforms = [ "mips64-plan9" ]; };
}
`,
      );
    write('1');
    git(repo, 'add', '-A');
    git(repo, 'commit', '-qm', 'base');
    const base = git(repo, 'rev-parse', 'HEAD');
    write('2');
    git(repo, 'commit', '-qam', 'same: build it again');
    const dir = tempDir();
    const json = join(dir, 'r.json');
    const args = ['review', '--repo', repo, '--base', base, '--head', 'HEAD', '--json', json];
    const r = await ekaci([...args, '--data-dir', join(dir, 'data')]);
    expect(r.stderr).toMatch(/building 2 head and 1 base attributes/);
    const by = Object.fromEntries((JSON.parse(readFileSync(json, 'utf8')) as Review).attrs.map((a) => [a.attr, a]));
    expect(by.same).toMatchObject({ change: 'unchanged', head: { build: 'succeeded' } });
    expect(by.plain).toMatchObject({ change: 'changed', outcome: 'still-succeeding' });
    expect(by.elsewhere).toMatchObject({ change: 'changed', head: { build: 'not-built', skipped: true } });
    expect(by.elsewhere?.base?.build).toBe('not-built');
    expect(r.code).toBe(0);
  });
});

describe('ekaci review and allow_eval_failures', () => {
  it.each([true, false])(
    'agrees with the summary check, the evaluation check and the merge policy when it is %s',
    async (allow) => {
      const { repo, base, head } = changeRepo({ allow_eval_failures: allow });
      const dir = tempDir();
      const data = join(dir, 'data');
      const json = join(dir, 'r.json');
      const r = await reviewWithoutBuilds(repo, base, head, json, data);
      expect(r.stderr).not.toMatch(/ekaci:/);
      const review = JSON.parse(readFileSync(json, 'utf8')) as Review;
      // `evals` evaluated on base and aborts on head: a new evaluation error, shown either way.
      expect(review.attrs.find((a) => a.attr === 'evals')?.head?.eval).toBe('error');
      expect(r.stdout).toMatch(/### Evaluation errors \(1\)/);

      const db = openDatabase(join(data, 'ekaci.sqlite'));
      const evaluations = new EvaluationStore(db);
      const [baseEval, headEval] = [evaluations.load(repo, base)!, evaluations.load(repo, head)!];
      db.close();
      const checks = [
        summaryCheck(review, undefined),
        evaluationCheck(withBaseGates(headEval, baseEval), baseEval.jobs, undefined),
      ];
      const states = checks.map((c) => ({ name: c.name, status: c.status, conclusion: c.conclusion ?? null }));
      expect({
        exitStatus: r.code,
        verdict: r.stdout.split('\n')[0],
        checks: checks.map((c) => c.conclusion),
        merge: decideMerge({ requestedFor: head, method: 'merge' }, head, states).action,
      }).toEqual(
        allow
          ? {
              exitStatus: 0,
              verdict: '✅ nothing newly failing · ⚠️ 1 new evaluation error allowed by allow_eval_failures',
              checks: ['success', 'success'],
              merge: 'merge',
            }
          : { exitStatus: 1, verdict: '❌ 1 new evaluation error', checks: ['failure', 'failure'], merge: 'refuse' },
      );
    },
  );
});

describe('the demo (npm run demo)', () => {
  it('reviews the example change: nothing newly failing, a size warning, a fix, an addition', () => {
    const dir = tempDir();
    const r = spawnSync('bash', [join(import.meta.dirname, '..', 'examples', 'demo.sh'), '--data-dir', dir], {
      encoding: 'utf8',
    });
    expect(r.stderr).not.toMatch(/ekaci:/);
    expect(r.status).toBe(0);
    expect(r.stdout.split('\n')[0]).toBe('✅ nothing newly failing · ⚠️ 2 size warnings');
    expect(r.stdout).toContain('| `cowsay` | `x86_64-linux` | failed → succeeded |');
    expect(r.stdout).toContain('| `lolcat` | `x86_64-linux` | succeeded |');
    expect(r.stdout).toContain('| `greeting` | 1.0 | 1.1 | `greeting`, `hello` |');
    // The demo's check ran on the embedded agent, in its sandbox.
    expect(r.stdout).toMatch(/\| `whitespace` \| `x86_64-linux` \| ✅ succeeded \| 0 \|/);
  });
});

describe('ekaci review and repository checks', () => {
  it('runs the head’s checks on the embedded agent: a failing one makes it exit 1 with nothing newly failing', async () => {
    const { repo, tag } = configuredRepo({
      jobs: { pkgs: { file: 'default.nix' } },
      checks: { 'no-todo': { command: 'if grep -n TODO notes.txt; then exit 3; fi' } },
    });
    const pkgs = (v: string): string =>
      `{ pkg = derivation { name = "pkg-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${v} > $out" ]; }; }\n`;
    writeFileSync(join(repo, 'default.nix'), pkgs('1'));
    writeFileSync(join(repo, 'notes.txt'), 'all done\n');
    git(repo, 'add', '-A');
    git(repo, 'commit', '-qm', 'base');
    const base = git(repo, 'rev-parse', 'HEAD');
    writeFileSync(join(repo, 'default.nix'), pkgs('2'));
    writeFileSync(join(repo, 'notes.txt'), 'all done\nTODO: the rest\n');
    git(repo, 'commit', '-qam', 'head');
    const dir = tempDir();
    const json = join(dir, 'review.json');
    const r = await ekaci([
      'review',
      '--repo',
      repo,
      '--base',
      base,
      '--head',
      'HEAD',
      '--data-dir',
      join(dir, 'data'),
      '--json',
      json,
    ]);

    expect(r.code).toBe(1);
    expect(r.stdout.split('\n')[0]).toBe('❌ 1 check not passing');
    expect(r.stdout).toMatch(/\| `no-todo` \| `x86_64-linux` \| ❌ failed \| 3 \|/);
    expect(r.stdout).toContain('2:TODO: the rest');
    const review = JSON.parse(readFileSync(json, 'utf8')) as Review;
    expect(review.attrs.filter((a) => a.outcome === 'newly-failing')).toEqual([]);
    expect(review.checks).toEqual([
      expect.objectContaining({
        name: 'no-todo',
        system: 'x86_64-linux',
        state: 'failed',
        exitCode: 3,
        error: 'exit code 3',
      }),
    ]);
  });
});

describe('ekaci review with bad input', () => {
  it('exits 2 naming the problem: unknown revision, unknown job, missing repository, missing option', async () => {
    const { repo } = changeRepo();
    const data = ['--data-dir', join(tempDir(), 'data')];
    const unknownRev = await ekaci(['review', '--repo', repo, '--base', 'nosuch', '--head', 'HEAD', ...data]);
    expect(unknownRev.code).toBe(2);
    expect(unknownRev.stderr).toMatch(/revision 'nosuch' not found/);
    const change = ['review', '--repo', repo, '--base', 'HEAD~1', '--head', 'HEAD'];
    const unknownJob = await ekaci([...change, '--job', 'nope', ...data]);
    expect(unknownJob.code).toBe(2);
    expect(unknownJob.stderr).toMatch(/no job named nope .*\(jobs: pkgs\)/);
    const noRepo = await ekaci(['review', '--repo', join(tempDir(), 'missing'), '--base', 'a', '--head', 'b', ...data]);
    expect(noRepo.code).toBe(2);
    expect(noRepo.stderr).toMatch(/no such directory/);
    const noHead = await ekaci(['review', '--repo', repo, '--base', 'HEAD', ...data]);
    expect(noHead.code).toBe(2);
    expect(noHead.stderr).toMatch(/--head/);
    const badOut = await ekaci([...change, '--json', join(tempDir(), 'no', 'r.json'), ...data]);
    expect(badOut.code).toBe(2);
    expect(badOut.stderr).toMatch(/--json .*does not exist/);
  });
});

/** `ekaci review --no-build` of two commits, its JSON written to `json`, its state in `data`. */
function reviewWithoutBuilds(repo: string, base: string, head: string, json: string, data: string) {
  return ekaci([
    'review',
    '--repo',
    repo,
    '--base',
    base,
    '--head',
    head,
    '--no-build',
    '--json',
    json,
    '--data-dir',
    data,
  ]);
}
