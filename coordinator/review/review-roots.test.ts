import { describe, expect, it } from 'vitest';
import type { EvalResult } from '../eval/eval-result.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { StoredJobDiff } from '../graph/diff-store.js';
import { diffEvaluations } from '../graph/rebuild-diff.js';
import type { BuildState } from '../scheduler/build-state.js';
import type { BuildRules } from './build-limits.js';
import { type ReviewRoot, reviewRoots } from './review-roots.js';

const SYSTEM = 'x86_64-linux';
const drv = (name: string): string => `/nix/store/${name.padEnd(32, '0').slice(0, 32)}-${name}.drv`;
const pkg = (attr: string, version: string, extra: Partial<EvalResult> = {}): EvalResult => ({
  attr,
  drvPath: drv(`${attr}-${version}`),
  system: SYSTEM,
  ...extra,
});
const evaluation = (commit: string, attrs: EvalResult[]): CommitEvaluation => ({
  commit,
  jobs: [{ name: 'pkgs', allowEvalFailures: false, maxIncreasePercent: undefined, seconds: 0, attrs }],
});

/** The base and head of a change, and its rebuild diff. */
function change(base: EvalResult[], head: EvalResult[]): { head: CommitEvaluation; diffs: StoredJobDiff[] } {
  const graph = { inputsOf: () => [], systemOf: () => SYSTEM };
  return { head: evaluation('head', head), diffs: [{ name: 'pkgs', ...diffEvaluations(base, head, graph) }] };
}

function builds(states: Record<string, BuildState> = {}, causes: Record<string, string> = {}) {
  return {
    derivation: (path: string) =>
      states[path] ? { state: states[path], root_cause: causes[path] ?? null } : undefined,
  };
}

const sides = (roots: ReviewRoot[]): string[] => roots.map((r) => `${r.side} ${r.attr}`).sort();

describe('reviewRoots', () => {
  it('builds the head of changed and added attributes, and the base of the changed ones', () => {
    const c = change(
      [pkg('changed', '1'), pkg('same', '1'), pkg('gone', '1')],
      [pkg('changed', '2'), pkg('same', '1'), pkg('fresh', '1')],
    );
    const roots = reviewRoots({ ...c, named: [], builds: builds() }).roots;
    expect(sides(roots)).toEqual(['base pkgs.changed', 'head pkgs.changed', 'head pkgs.fresh']);
    expect(roots.find((r) => r.side === 'base')).toEqual({
      side: 'base',
      drvPath: drv('changed-1'),
      attr: 'pkgs.changed',
      system: SYSTEM,
    });
  });

  it('never builds an attribute whose meta.platforms excludes its system, on either side', () => {
    const elsewhere = { skipped: 'unsupported-platform' as const };
    const c = change(
      [pkg('moved', '1'), pkg('other', '1')],
      [pkg('moved', '2', elsewhere), pkg('other', '2'), pkg('new', '1', elsewhere)],
    );
    expect(sides(reviewRoots({ ...c, named: ['moved', 'new'], builds: builds() }).roots)).toEqual([
      'base pkgs.other',
      'head pkgs.other',
    ]);
  });

  it('builds attributes named by commands and commit titles, changed or not, and ignores names it does not have', () => {
    const c = change([pkg('hello', '1'), pkg('cowsay', '1')], [pkg('hello', '1'), pkg('cowsay', '1')]);
    const roots = reviewRoots({ ...c, named: ['hello', 'nosuch'], builds: builds() }).roots;
    expect(sides(roots)).toEqual(['head pkgs.hello']);
  });

  it('builds again a base whose build ended without an answer: cancelled, unbuildable, or waiting on such an input', () => {
    const names = ['cancelled', 'unbuildable', 'after-cancelled', 'after-failed', 'failed'];
    const c = change(
      names.map((n) => pkg(n, '1')),
      names.map((n) => pkg(n, '2')),
    );
    const known = builds(
      {
        [drv('cancelled-1')]: 'cancelled',
        [drv('unbuildable-1')]: 'unbuildable',
        [drv('after-cancelled-1')]: 'dependency-failed',
        [drv('after-failed-1')]: 'dependency-failed',
        [drv('failed-1')]: 'failed',
      },
      { [drv('after-cancelled-1')]: drv('cancelled-1'), [drv('after-failed-1')]: drv('failed-1') },
    );
    const bases = reviewRoots({ ...c, named: [], builds: known }).roots.filter((r) => r.side === 'base');
    expect(bases.map((r) => r.attr).sort()).toEqual(['pkgs.after-cancelled', 'pkgs.cancelled', 'pkgs.unbuildable']);
  });

  it('does not build a base whose build already ended with an outcome, whatever it was', () => {
    const c = change([pkg('a', '1'), pkg('b', '1'), pkg('c', '1')], [pkg('a', '2'), pkg('b', '2'), pkg('c', '2')]);
    const known = builds({ [drv('a-1')]: 'failed', [drv('b-1')]: 'succeeded', [drv('c-1')]: 'building' });
    expect(sides(reviewRoots({ ...c, named: [], builds: known }).roots)).toEqual([
      'base pkgs.c',
      'head pkgs.a',
      'head pkgs.b',
      'head pkgs.c',
    ]);
  });

  it('builds only the base of an attribute that fails to evaluate on head', () => {
    const c = change([pkg('broken', '1')], [{ attr: 'broken', error: 'error: boom' }]);
    expect(sides(reviewRoots({ ...c, named: ['broken'], builds: builds() }).roots)).toEqual(['base pkgs.broken']);
  });

  it('without a base (a push), builds every attribute of the head that its platforms allow', () => {
    const head = evaluation('head', [
      pkg('a', '1'),
      pkg('b', '1', { skipped: 'unsupported-platform' }),
      { attr: 'c', error: 'error: boom' },
    ]);
    expect(sides(reviewRoots({ head, diffs: undefined, named: [], builds: builds() }).roots)).toEqual(['head pkgs.a']);
  });
});

describe('reviewRoots under build limits', () => {
  const NAMES = ['a', 'b', 'c', 'd', 'e'];
  /** Five attributes, every one changed: five rebuilds on SYSTEM. */
  const massChange = () =>
    change(
      NAMES.map((n) => pkg(n, '1')),
      NAMES.map((n) => pkg(n, '2')),
    );
  const rules = (
    jobs: Record<string, { maxRebuildCount?: number; skipBuildPaths?: string[] }>,
    o: { server?: number; files?: string[] } = {},
  ): BuildRules => ({
    jobs: new Map(
      Object.entries(jobs).map(([name, j]) => [
        name,
        { maxRebuildCount: j.maxRebuildCount, skipBuildPaths: j.skipBuildPaths },
      ]),
    ),
    serverMaxRebuildCount: o.server ?? 0,
    changedFiles: o.files,
  });

  it('builds nothing of a job whose rebuilds on a system exceed its max_rebuild_count, and says why', () => {
    const plan = reviewRoots({
      ...massChange(),
      named: [],
      builds: builds(),
      rules: rules({ pkgs: { maxRebuildCount: 3 } }),
    });
    expect(plan.roots).toEqual([]);
    expect(plan.limits).toEqual([
      {
        limit: { kind: 'max-rebuild-count', job: 'pkgs', system: SYSTEM, rebuilds: 5, limit: 3, from: 'job' },
        built: [],
      },
    ]);
  });

  it('still builds the attributes named by commands and commit titles, on both sides, and lists them', () => {
    const plan = reviewRoots({
      ...massChange(),
      named: ['a', 'nosuch'],
      builds: builds(),
      rules: rules({ pkgs: { maxRebuildCount: 3 } }),
    });
    expect(sides(plan.roots)).toEqual(['base pkgs.a', 'head pkgs.a']);
    expect(plan.limits[0]!.built).toEqual([{ side: 'head', drvPath: drv('a-2'), attr: 'pkgs.a', system: SYSTEM }]);
  });

  it('builds as usual at the limit itself, without a limit, and for a push', () => {
    for (const r of [rules({ pkgs: { maxRebuildCount: 5 } }), rules({ pkgs: { maxRebuildCount: 0 } }), rules({})]) {
      const plan = reviewRoots({ ...massChange(), named: [], builds: builds(), rules: r });
      expect(plan.limits).toEqual([]);
      expect(plan.roots).toHaveLength(10);
    }
    const push = reviewRoots({
      head: massChange().head,
      diffs: undefined,
      named: [],
      builds: builds(),
      rules: rules({ pkgs: { maxRebuildCount: 1 } }),
    });
    expect(push.limits).toEqual([]);
    expect(push.roots).toHaveLength(5);
  });

  it("takes the smaller of the job's and the server's limit: a job may lower the server's, never lift it", () => {
    const limitOf = (r: BuildRules) =>
      reviewRoots({ ...massChange(), named: [], builds: builds(), rules: r }).limits.map((l) => l.limit);
    expect(limitOf(rules({}, { server: 4 }))).toEqual([expect.objectContaining({ limit: 4, from: 'server' })]);
    expect(limitOf(rules({ pkgs: { maxRebuildCount: 2 } }, { server: 4 }))).toEqual([
      expect.objectContaining({ limit: 2, from: 'job' }),
    ]);
    expect(limitOf(rules({ pkgs: { maxRebuildCount: 0 } }, { server: 4 }))).toEqual([
      expect.objectContaining({ limit: 4, from: 'server' }),
    ]);
    expect(limitOf(rules({ pkgs: { maxRebuildCount: 100 } }, { server: 4 }))).toEqual([
      expect.objectContaining({ limit: 4, from: 'server' }),
    ]);
    expect(limitOf(rules({ pkgs: { maxRebuildCount: 100 } }, { server: 0 }))).toEqual([]);
  });

  it('holds back only the job and the system over the limit', () => {
    const DARWIN = 'aarch64-darwin';
    const onDarwin = (attr: string, version: string): EvalResult => pkg(attr, version, { system: DARWIN });
    const graph = { inputsOf: () => [], systemOf: (d: string) => (d.includes('-mac') ? DARWIN : SYSTEM) };
    const baseAttrs = [pkg('x', '1'), onDarwin('mac1', '1'), onDarwin('mac2', '1')];
    const headAttrs = [pkg('x', '2'), onDarwin('mac1', '2'), onDarwin('mac2', '2')];
    const other = [pkg('y', '1')];
    const otherHead = [pkg('y', '2'), pkg('z', '1')];
    const job = (name: string, attrs: EvalResult[]) => ({
      name,
      allowEvalFailures: false,
      maxIncreasePercent: undefined,
      seconds: 0,
      attrs,
    });
    const head: CommitEvaluation = { commit: 'head', jobs: [job('pkgs', headAttrs), job('other', otherHead)] };
    const diffs = [
      { name: 'pkgs', ...diffEvaluations(baseAttrs, headAttrs, graph) },
      { name: 'other', ...diffEvaluations(other, otherHead, graph) },
    ];
    // pkgs: 2 rebuilds on darwin, 1 on linux; other: 2 on linux, but other sets no limit.
    const plan = reviewRoots({
      head,
      diffs,
      named: [],
      builds: builds(),
      rules: rules({ pkgs: { maxRebuildCount: 1 } }),
    });
    expect(plan.limits.map((l) => l.limit)).toEqual([
      { kind: 'max-rebuild-count', job: 'pkgs', system: DARWIN, rebuilds: 2, limit: 1, from: 'job' },
    ]);
    expect(sides(plan.roots)).toEqual(['base other.y', 'base pkgs.x', 'head other.y', 'head other.z', 'head pkgs.x']);
  });

  it('builds nothing of a job when every changed file matches its skip_build_paths, and names the globs', () => {
    const r = rules(
      { pkgs: { skipBuildPaths: ['doc/**', '*.md', 'unused/**'] } },
      {
        files: ['doc/manual/index.xml', 'README.md', 'pkgs/hello/NOTES.md'],
      },
    );
    const plan = reviewRoots({ ...massChange(), named: [], builds: builds(), rules: r });
    expect(plan.roots).toEqual([]);
    expect(plan.limits.map((l) => l.limit)).toEqual([
      {
        kind: 'skip-build-paths',
        job: 'pkgs',
        files: 3,
        globs: [
          { glob: 'doc/**', files: 1 },
          { glob: '*.md', files: 2 },
        ],
      },
    ]);
    // A named attribute is built even so.
    expect(sides(reviewRoots({ ...massChange(), named: ['e'], builds: builds(), rules: r }).roots)).toEqual([
      'base pkgs.e',
      'head pkgs.e',
    ]);
  });

  it('reports no limit for a job the change rebuilds nothing of, even when every file matches', () => {
    const same = change([pkg('a', '1')], [pkg('a', '1')]);
    const r = rules({ pkgs: { skipBuildPaths: ['*.md'] } }, { files: ['README.md'] });
    expect(reviewRoots({ ...same, named: [], builds: builds(), rules: r })).toEqual({ roots: [], limits: [] });
  });

  it('builds as usual when one changed file matches no glob, when nothing changed, and without the list', () => {
    const globs = { pkgs: { skipBuildPaths: ['doc/**', '*.md'] } };
    for (const files of [['doc/index.md', 'pkgs/hello/default.nix'], [], undefined]) {
      const plan = reviewRoots({ ...massChange(), named: [], builds: builds(), rules: rules(globs, { files }) });
      expect(plan.limits).toEqual([]);
      expect(plan.roots).toHaveLength(10);
    }
  });
});
