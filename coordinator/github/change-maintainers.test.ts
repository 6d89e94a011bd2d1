import { describe, expect, it } from 'vitest';
import type { EvalResult } from '../eval/eval-result.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import { changesConfig } from '../review/base-policy.js';
import { authorize } from './authorization.js';
import { baseMaintainersOfChange } from './change-maintainers.js';

function evaluation(commit: string, attrs: EvalResult[], configDigest = 'config-1'): CommitEvaluation {
  return {
    commit,
    configDigest,
    jobs: [{ name: 'pkgs', allowEvalFailures: false, maxIncreasePercent: undefined, seconds: 0, attrs }],
  };
}

function pkg(attr: string, drv: string, handles: string[] = []): EvalResult {
  return {
    attr,
    drvPath: `/nix/store/${drv.padEnd(32, '0')}-${attr}.drv`,
    system: 'x86_64-linux',
    meta: { maintainers: handles, githubMaintainers: handles },
  };
}

/** Whether `login` (without write access) may `@eka-ci merge` the change from `base` to `head`. */
function mayMerge(login: string, base: CommitEvaluation, head: CommitEvaluation): string | true {
  if (changesConfig(base, head)) return 'changes eka-ci configuration';
  const d = authorize(
    { kind: 'merge', line: '@eka-ci merge', method: 'merge' },
    { login, permission: 'read' },
    { maintainersOfChanged: baseMaintainersOfChange(base, head) },
  );
  return d.allowed ? true : d.reason;
}

const base = evaluation('base', [pkg('tool', 'a', ['bob']), pkg('other', 'b', ['carol'])]);

describe('who may merge a change without write access', () => {
  it('a maintainer of the changed package, as the base lists maintainers', () => {
    const head = evaluation('head', [pkg('tool', 'c', ['bob']), pkg('other', 'b', ['carol'])]);
    expect(mayMerge('bob', base, head)).toBe(true);
    expect(mayMerge('carol', base, head)).toMatch(/not a maintainer of every changed package \(not of: tool\)/);
  });

  it('not someone who adds themselves as a maintainer in the change', () => {
    const head = evaluation('head', [pkg('tool', 'c', ['bob', 'mallory']), pkg('other', 'b', ['carol'])]);
    expect(mayMerge('mallory', base, head)).toMatch(/not of: tool/);
  });

  it('not anyone, for a change that adds a package (it has no maintainer in the base)', () => {
    const head = evaluation('head', [
      pkg('tool', 'a', ['bob']),
      pkg('other', 'b', ['carol']),
      pkg('new', 'd', ['bob']),
    ]);
    expect(mayMerge('bob', base, head)).toMatch(/not of: new/);
  });

  it('not a maintainer of one package for a change that also removes another', () => {
    const head = evaluation('head', [pkg('tool', 'c', ['bob'])]);
    expect(mayMerge('bob', base, head)).toMatch(/not of: other/);
  });

  it('not anyone, for a change that edits eka-ci’s configuration', () => {
    const head = evaluation('head', [pkg('tool', 'c', ['bob']), pkg('other', 'b', ['carol'])], 'config-2');
    expect(mayMerge('bob', base, head)).toBe('changes eka-ci configuration');
  });

  it('counts an attribute whose evaluation newly fails as changed', () => {
    const head = evaluation('head', [pkg('tool', 'a', ['bob']), { attr: 'other', error: 'error: broken' }]);
    expect([...baseMaintainersOfChange(base, head)]).toEqual([['other', ['carol']]]);
  });
});
