import type { Db } from '../db/database.js';
import { isAllowed } from '../github/permissions.js';
import type { HookSpec } from './hook-config.js';

/**
 * Who asked for a derivation as a root, as hooks see it: a GitHub run's root (its repository, the branch it is for,
 * the attribute, the commit) or a CLI/API request's (no repository or branch: only a hook allowed for all serves
 * it).
 *
 * A derivation several runs root gets one run of each hook per result, not one per run: it was built once, its
 * outputs are the same for every run, and a hook's effects (a push, a notification) should happen once. The hook
 * takes the newest context it may serve — its permissions allow the repository and branch and, for a hook with
 * credentials, the code is trusted — since the newest run is the one whose rebuild produced this result, or the
 * freshest reason for it. When no context qualifies the run is recorded as skipped, with the newest refusal as why.
 */
export interface HookContext {
  /** The GitHub run; null for a CLI/API request. */
  runId: number | null;
  repo: string;
  /** A pull request's or merge group's base branch, or the pushed (default) branch; '' for a CLI/API request. */
  branch: string;
  attr: string;
  commitSha: string;
  job: string;
  /** Code of someone without write access (a pull request's head from outside): never given credentials. */
  untrusted: boolean;
  /** How the reason of a skip names it. */
  label: string;
}

interface RunRootRow {
  run_id: number;
  repo: string;
  kind: string;
  pr_number: number | null;
  head_sha: string;
  base_sha: string | null;
  untrusted: number;
  side: 'base' | 'head';
  attr: string;
  branch: string | null;
  base_ref: string | null;
  default_branch: string | null;
}

export class HookContexts {
  private readonly s;

  constructor(db: Db) {
    this.s = {
      runRoots: db.prepare(
        `SELECT g.id AS run_id, g.repo, g.kind, g.pr_number, g.head_sha, g.base_sha, g.untrusted, r.side, r.attr,
           g.branch, p.base_ref, repo.default_branch
         FROM github_run_roots r JOIN github_runs g ON g.id = r.run_id
           LEFT JOIN github_pull_requests p ON g.kind = 'pull_request' AND p.repo = g.repo AND p.number = g.pr_number
           LEFT JOIN github_repositories repo ON repo.full_name = g.repo
         WHERE r.drv_path = ? ORDER BY g.id DESC, r.side DESC`,
      ),
      // Requests a GitHub run made are its roots already.
      requestRoots: db.prepare(
        `SELECT r.attr, q.source FROM request_roots r JOIN requests q ON q.id = r.request_id
         WHERE r.drv_path = ? AND q.source NOT LIKE 'github %' ORDER BY q.id DESC`,
      ),
      jobs: db.prepare('SELECT job FROM evaluations WHERE repo = ? AND commit_sha = ?'),
    };
  }

  /** Every context in which `drvPath` is a root, newest first; [] for a derivation only built as a dependency. */
  of(drvPath: string): HookContext[] {
    const runs = (this.s.runRoots.all(drvPath) as RunRootRow[]).map((r): HookContext => {
      const commitSha = r.side === 'base' ? (r.base_sha ?? r.head_sha) : r.head_sha;
      // Runs recorded before runs had their branch: push runs were made for the default branch only, and GitHub's
      // merge queue merges into it too.
      const branch = r.branch ?? (r.kind === 'pull_request' ? r.base_ref : undefined) ?? r.default_branch ?? '';
      const what =
        r.kind === 'pull_request' ? `pull request ${r.repo}#${r.pr_number ?? '?'}` : `${r.kind} of ${r.repo}`;
      return {
        runId: r.run_id,
        repo: r.repo,
        branch,
        attr: r.attr,
        commitSha,
        job: this.jobOf(r.repo, commitSha, r.attr),
        // The base side is the repository's own code; only a head can be someone else's.
        untrusted: r.side === 'head' && r.untrusted === 1,
        label: `${what} (${r.side}, branch ${branch || '?'})`,
      };
    });
    const requests = (this.s.requestRoots.all(drvPath) as Array<{ attr: string; source: string }>).map(
      (r): HookContext => ({
        runId: null,
        repo: '',
        branch: '',
        attr: r.attr,
        commitSha: '',
        job: '',
        untrusted: false,
        label: `a request by ${r.source} (no repository)`,
      }),
    );
    return [...runs, ...requests];
  }

  /** The job of `<job>.<attr>`: job names may contain dots, so the commit's evaluated jobs decide. */
  private jobOf(repo: string, commit: string, attr: string): string {
    const jobs = (this.s.jobs.all(repo, commit) as Array<{ job: string }>).map((j) => j.job);
    return jobs.filter((j) => attr.startsWith(`${j}.`)).sort((a, b) => b.length - a.length)[0] ?? '';
  }
}

/** The context a hook runs in for a build, or why it does not run (see HookContexts). */
export function chooseContext(
  hook: HookSpec,
  contexts: readonly HookContext[],
  drvUntrusted: boolean,
): { context: HookContext } | { skip: string; context: HookContext } {
  let refusal: string | undefined;
  for (const c of contexts) {
    const why = refusalOf(hook, c, drvUntrusted);
    if (why === undefined) return { context: c };
    refusal ??= why;
  }
  return { skip: refusal!, context: contexts[0]! };
}

function refusalOf(hook: HookSpec, c: HookContext, drvUntrusted: boolean): string | undefined {
  if (!isAllowed(hook.permissions, c.repo, c.branch) || (c.repo === '' && !hook.permissions.allowAll)) {
    return `the hook's permissions do not allow ${c.label}`;
  }
  if (hook.credentials !== undefined && (c.untrusted || drvUntrusted)) {
    return `the hook has credentials and ${c.label} is untrusted code (a pull request by someone without write access)`;
  }
  return undefined;
}
