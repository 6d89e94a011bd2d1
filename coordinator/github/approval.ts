/**
 * Whether a pull request waits for approval before eka-ci builds it. Building runs the author's Nix code on the
 * agents, so a repository may require that someone with write access vouch for an outside author first — by the
 * `approve` command, or once and for all by listing them in `approvedUsers`.
 */

/** GitHub's `author_association` values for people the repository already trusts with its code. */
export const TRUSTED_ASSOCIATIONS: readonly string[] = ['OWNER', 'MEMBER', 'COLLABORATOR'];

export interface ApprovalSettings {
  requireApproval: boolean;
  /** GitHub logins, compared case-insensitively as GitHub does. */
  approvedUsers: readonly string[];
}

export function needsApproval(
  pr: { authorAssociation: string; author: string },
  settings: ApprovalSettings,
  approvedByCommand: boolean,
): boolean {
  if (TRUSTED_ASSOCIATIONS.includes(pr.authorAssociation.toUpperCase())) return false;
  if (!settings.requireApproval || approvedByCommand) return false;
  const author = pr.author.toLowerCase();
  return !settings.approvedUsers.some((u) => u.toLowerCase() === author);
}
