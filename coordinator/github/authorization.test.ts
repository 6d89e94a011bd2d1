import { describe, expect, it } from 'vitest';
import { type Actor, type RepoPermission, type RunnableCommand, authorize } from './authorization.js';

const build: RunnableCommand = { kind: 'build', line: '@eka-ci build hello', attrs: ['hello'] };
const rebuild: RunnableCommand = { kind: 'rebuild', line: '@eka-ci rebuild' };
const approve: RunnableCommand = { kind: 'approve', line: '@eka-ci approve' };
const merge: RunnableCommand = { kind: 'merge', line: '@eka-ci merge', method: 'merge' };
const cancel: RunnableCommand = { kind: 'merge-cancel', line: '@eka-ci merge cancel' };
const ALL = [build, rebuild, approve, merge, cancel];

const alice = (permission: RepoPermission): Actor => ({ login: 'alice', permission });

function changed(entries: Record<string, string[]>): { maintainersOfChanged: Map<string, string[]> } {
  return { maintainersOfChanged: new Map(Object.entries(entries)) };
}

describe('authorize', () => {
  it('lets users with write, maintain or admin permission run every command, maintainers or not', () => {
    const context = changed({ foo: ['bob'] });
    for (const permission of ['write', 'maintain', 'admin'] as const) {
      for (const command of ALL) expect(authorize(command, alice(permission), context)).toEqual({ allowed: true });
    }
    for (const command of ALL) expect(authorize(command, alice('write'), changed({}))).toEqual({ allowed: true });
  });

  it('lets a user without write access merge when they maintain every changed package', () => {
    const context = changed({ foo: ['bob', 'alice'], bar: ['alice'] });
    for (const permission of ['triage', 'read', 'none'] as const) {
      expect(authorize(merge, alice(permission), context)).toEqual({ allowed: true });
      expect(authorize(cancel, alice(permission), context)).toEqual({ allowed: true });
    }
  });

  it('compares GitHub handles case-insensitively', () => {
    const context = changed({ foo: ['Alice'] });
    expect(authorize(merge, { login: 'ALICE', permission: 'read' }, context)).toEqual({ allowed: true });
  });

  it('refuses a maintainer of only some changed packages, naming the others', () => {
    const context = changed({ foo: ['bob'], mine: ['alice'], bar: [] });
    expect(authorize(merge, alice('read'), context)).toEqual({
      allowed: false,
      reason: '@alice is not a maintainer of every changed package (not of: foo, bar).',
    });
    expect(authorize(cancel, alice('none'), context)).toMatchObject({ allowed: false });
  });

  it('names at most ten packages a user does not maintain', () => {
    const many = Object.fromEntries(Array.from({ length: 13 }, (_, i) => [`p${i}`, ['bob']]));
    const r = authorize(merge, alice('read'), changed(many));
    expect(r).toEqual({
      allowed: false,
      reason:
        '@alice is not a maintainer of every changed package (not of: p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 and 3 more).',
    });
  });

  it('refuses a merge by a user without write access when no package changed', () => {
    const r = authorize(merge, alice('triage'), changed({}));
    expect(r).toEqual({
      allowed: false,
      reason:
        '@alice needs write access to merge this pull request: it changes no package, so no maintainer may merge it.',
    });
  });

  it('requires write access for build, rebuild and approve, even from a maintainer', () => {
    const context = changed({ hello: ['alice'] });
    for (const permission of ['triage', 'read', 'none'] as const) {
      expect(authorize(build, alice(permission), context)).toEqual({
        allowed: false,
        reason: '@alice needs write access to this repository to run `build`.',
      });
      expect(authorize(rebuild, alice(permission), context)).toMatchObject({ allowed: false });
      expect(authorize(approve, alice(permission), context)).toMatchObject({ allowed: false });
    }
  });
});
