import { describe, expect, it } from 'vitest';
import { needsApproval } from './approval.js';

const on = { requireApproval: true, approvedUsers: ['Carol'] };
const off = { requireApproval: false, approvedUsers: [] };

describe('needsApproval', () => {
  it('never holds back owners, members or collaborators', () => {
    for (const authorAssociation of ['OWNER', 'MEMBER', 'COLLABORATOR', 'member']) {
      expect(needsApproval({ authorAssociation, author: 'mallory' }, on, false), authorAssociation).toBe(false);
    }
  });

  it('holds back any other author while approval is required', () => {
    for (const authorAssociation of ['CONTRIBUTOR', 'FIRST_TIME_CONTRIBUTOR', 'FIRST_TIMER', 'MANNEQUIN', 'NONE']) {
      expect(needsApproval({ authorAssociation, author: 'mallory' }, on, false), authorAssociation).toBe(true);
    }
  });

  it('holds back nobody when approval is not required', () => {
    expect(needsApproval({ authorAssociation: 'NONE', author: 'mallory' }, off, false)).toBe(false);
  });

  it('lets a listed user through, comparing logins case-insensitively', () => {
    expect(needsApproval({ authorAssociation: 'NONE', author: 'carol' }, on, false)).toBe(false);
  });

  it('lets a pull request approved by command through', () => {
    expect(needsApproval({ authorAssociation: 'FIRST_TIME_CONTRIBUTOR', author: 'mallory' }, on, true)).toBe(false);
  });
});
