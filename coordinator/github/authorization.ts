import type { PrCommand } from './commands.js';

/**
 * Who may run which pull-request command.
 *
 * Users with write access to the repository (`write`, `maintain`, `admin`) may run every command. Everyone else
 * may only merge, and only a pull request whose changed packages all list them as a maintainer (their `github`
 * handle in `meta.maintainers`): a maintainer may merge updates to their own packages, as in Nixpkgs'
 * merge-bot, but not a pull request that also touches somebody else's. `build`, `rebuild` and `approve` spend
 * build capacity or trust an author, so they need write access.
 */

/** A user's permission on the repository, as GitHub's collaborator permission API names it. */
export type RepoPermission = 'admin' | 'maintain' | 'write' | 'triage' | 'read' | 'none';

export interface Actor {
  login: string;
  permission: RepoPermission;
}

export interface AuthorizationContext {
  /** Every attribute the pull request changes → the GitHub handles of its maintainers. */
  maintainersOfChanged: ReadonlyMap<string, readonly string[]>;
}

export type Authorization = { allowed: true } | { allowed: false; reason: string };

/** An invalid command is answered with its reason, never run, so it is not authorized. */
export type RunnableCommand = Exclude<PrCommand, { kind: 'invalid' }>;

const WRITE_ACCESS: ReadonlySet<RepoPermission> = new Set(['write', 'maintain', 'admin']);

// A treewide pull request changes thousands of packages; a reply naming them all would drown the one it answers.
const MAX_NAMED_PACKAGES = 10;

export function authorize(command: RunnableCommand, actor: Actor, context: AuthorizationContext): Authorization {
  if (WRITE_ACCESS.has(actor.permission)) return { allowed: true };
  const who = `@${actor.login}`;
  if (command.kind !== 'merge' && command.kind !== 'merge-cancel') {
    return { allowed: false, reason: `${who} needs write access to this repository to run \`${command.kind}\`.` };
  }
  const changed = [...context.maintainersOfChanged];
  if (changed.length === 0) {
    return {
      allowed: false,
      reason: `${who} needs write access to merge this pull request: it changes no package, so no maintainer may merge it.`,
    };
  }
  const login = actor.login.toLowerCase();
  const notOf = changed
    .filter(([, maintainers]) => !maintainers.some((m) => m.toLowerCase() === login))
    .map(([attr]) => attr);
  if (notOf.length === 0) return { allowed: true };
  return {
    allowed: false,
    reason: `${who} is not a maintainer of every changed package (not of: ${nameSome(notOf)}).`,
  };
}

function nameSome(attrs: readonly string[]): string {
  const named = attrs.slice(0, MAX_NAMED_PACKAGES).join(', ');
  const more = attrs.length - MAX_NAMED_PACKAGES;
  return more > 0 ? `${named} and ${more} more` : named;
}
