import { describe, expect, it } from 'vitest';
import { type CheckRunState, decideMerge } from './merge-policy.js';

const HEAD = 'a'.repeat(40);
const request = { requestedFor: HEAD, method: 'squash' as const };

const check = (name: string, status: string, conclusion: string | null = null): CheckRunState => ({
  name: `eka-ci / ${name}`,
  status,
  conclusion,
});

describe('decideMerge', () => {
  it('merges with the requested method once every check succeeded or was neutral', () => {
    const checks = [check('build (x86_64-linux)', 'completed', 'success'), check('eval', 'completed', 'neutral')];
    expect(decideMerge(request, HEAD, checks)).toEqual({ action: 'merge', method: 'squash' });
  });

  it('waits while any check is queued or in progress', () => {
    for (const status of ['queued', 'in_progress', 'waiting', 'requested', 'pending']) {
      const checks = [check('eval', 'completed', 'success'), check('build (x86_64-linux)', status)];
      expect(decideMerge(request, HEAD, checks), status).toEqual({ action: 'wait' });
    }
  });

  it('waits while the head has no eka-ci check yet', () => {
    expect(decideMerge(request, HEAD, [])).toEqual({ action: 'wait' });
  });

  it('refuses on a failing conclusion, naming the check', () => {
    for (const conclusion of ['failure', 'cancelled', 'timed_out', 'action_required']) {
      const checks = [check('eval', 'completed', 'success'), check('build (x86_64-linux)', 'completed', conclusion)];
      expect(decideMerge(request, HEAD, checks), conclusion).toEqual({
        action: 'refuse',
        reason: `eka-ci / build (x86_64-linux) concluded ${conclusion}`,
      });
    }
  });

  it('refuses as soon as one check failed, without waiting for the others', () => {
    const checks = [
      check('build (aarch64-linux)', 'in_progress'),
      check('build (x86_64-linux)', 'completed', 'failure'),
    ];
    expect(decideMerge(request, HEAD, checks)).toEqual({
      action: 'refuse',
      reason: 'eka-ci / build (x86_64-linux) concluded failure',
    });
  });

  it('names every failed check in the refusal', () => {
    const checks = [
      check('a', 'completed', 'failure'),
      check('b', 'completed', 'success'),
      check('c', 'completed', 'timed_out'),
    ];
    expect(decideMerge(request, HEAD, checks)).toEqual({
      action: 'refuse',
      reason: 'eka-ci / a concluded failure, eka-ci / c concluded timed_out',
    });
  });

  it('does not treat an unknown or missing conclusion as passing', () => {
    expect(decideMerge(request, HEAD, [check('a', 'completed', 'skipped')])).toMatchObject({ action: 'refuse' });
    expect(decideMerge(request, HEAD, [check('a', 'completed', 'stale')])).toMatchObject({ action: 'refuse' });
    expect(decideMerge(request, HEAD, [check('a', 'completed', null)])).toEqual({
      action: 'refuse',
      reason: 'eka-ci / a concluded without a conclusion',
    });
  });

  it('cancels when the head moved after the merge command, whatever the checks say', () => {
    const moved = 'b'.repeat(40);
    const green = [check('eval', 'completed', 'success')];
    expect(decideMerge(request, moved, green)).toEqual({
      action: 'cancel',
      reason: `the head moved from ${HEAD} to ${moved} after the merge command`,
    });
    expect(decideMerge(request, moved, [])).toMatchObject({ action: 'cancel' });
  });

  it('compares head shas case-insensitively', () => {
    const green = [check('eval', 'completed', 'success')];
    expect(decideMerge(request, HEAD.toUpperCase(), green)).toEqual({ action: 'merge', method: 'squash' });
  });
});
