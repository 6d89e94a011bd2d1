import { describe, expect, it } from 'vitest';
import { isAllowed, type AppPermissions } from './permissions.js';

const permissions: AppPermissions = {
  allowAll: false,
  allowedRepos: ['my-org/*', 'friend/nixpkgs'],
  allowedBranches: ['main', 'release-*', 'staging/**'],
};

describe('GitHub App permissions', () => {
  it('serves the repositories its globs match, ignoring case as GitHub does', () => {
    expect(isAllowed(permissions, 'my-org/packages')).toBe(true);
    expect(isAllowed(permissions, 'My-Org/Packages')).toBe(true);
    expect(isAllowed(permissions, 'my-org/.github')).toBe(true);
    expect(isAllowed(permissions, 'friend/nixpkgs')).toBe(true);
    expect(isAllowed(permissions, 'friend/dotfiles')).toBe(false);
    expect(isAllowed(permissions, 'my-org-evil/packages')).toBe(false);
  });

  it('privileges only the branches its globs match, where * stops at / and ** does not', () => {
    expect(isAllowed(permissions, 'my-org/packages', 'main')).toBe(true);
    expect(isAllowed(permissions, 'my-org/packages', 'release-24.05')).toBe(true);
    expect(isAllowed(permissions, 'my-org/packages', 'release-24.05/fix')).toBe(false);
    expect(isAllowed(permissions, 'my-org/packages', 'staging/next/x')).toBe(true);
    expect(isAllowed(permissions, 'my-org/packages', 'Main')).toBe(false);
    expect(isAllowed(permissions, 'my-org/packages', 'feature')).toBe(false);
  });

  it('grants no branch on a repository it does not serve', () => {
    expect(isAllowed(permissions, 'stranger/repo', 'main')).toBe(false);
  });

  it('privileges no branch when no branch glob is listed', () => {
    expect(isAllowed({ ...permissions, allowedBranches: [] }, 'my-org/packages', 'main')).toBe(false);
    expect(isAllowed({ ...permissions, allowedBranches: [] }, 'my-org/packages')).toBe(true);
  });

  it('treats ! and # in a glob literally instead of negating or commenting', () => {
    const odd: AppPermissions = { allowAll: false, allowedRepos: ['!my-org/*'], allowedBranches: ['#1'] };
    expect(isAllowed(odd, 'other/repo')).toBe(false);
    expect(isAllowed(odd, '!my-org/x', '#1')).toBe(true);
  });

  it('allows everything with allowAll', () => {
    expect(isAllowed({ allowAll: true, allowedRepos: [], allowedBranches: [] }, 'any/repo', 'any-branch')).toBe(true);
  });
});
