import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { EmbeddedSystem } from '../../cli/embedded.js';
import type { Browser, Page } from 'playwright-core';
import { silentLogger } from '../../common/logging.js';
import { compileCoordinatorConfig } from '../../coordinator/config.js';
import { type GitHttpServer, serveGitOverHttp } from '../../coordinator/git/test-support.js';
import {
  type GitHubStandIn,
  type StandInCheckRun,
  deliverWebhook,
  startGitHubStandIn,
  webhookExamples,
} from './github-standin.js';
import { nonce, tempDir } from './nix-project.js';

const ROOT = join(import.meta.dirname, '..', '..');
export const WEBHOOK_SECRET = 'a-webhook-secret-for-tests';
export const INSTALLATION = 4242;

/**
 * GitHub, as far as eka-ci can tell: the API stand-in (every request validated against GitHub's OpenAPI
 * description) and a git server for the repositories, which accepts the installation tokens the stand-in issued.
 */
export class FakeGitHub {
  private constructor(
    readonly api: GitHubStandIn,
    readonly git: GitHttpServer,
    readonly root: string,
  ) {}

  static async start(): Promise<FakeGitHub> {
    const api = await startGitHubStandIn();
    api.addInstallation(INSTALLATION, 'acme');
    const root = tempDir('ekaci-github-git-');
    // Any token the stand-in issued is accepted here: what is tested is that eka-ci clones with one at all.
    const git = await serveGitOverHttp(
      root,
      (given) => given.username === 'x-access-token' && given.password.startsWith('ghs_'),
    );
    return new FakeGitHub(api, git, root);
  }

  /** A repository made from snapshot directories (one commit each); returns its clone URL and commit ids. */
  makeRepo(fullName: string, snapshots: string): { cloneUrl: string; commits: string[] } {
    const dir = join(this.root, fullName);
    const out = execFileSync('bash', [join(ROOT, 'examples', 'make-repo.sh'), snapshots, dir, nonce()], {
      encoding: 'utf8',
    });
    const [owner = '', name = ''] = fullName.split('/');
    const cloneUrl = `${this.git.base}/${fullName}`;
    this.api.addRepo({ owner, name, installationId: INSTALLATION, cloneUrl, defaultBranch: 'main' });
    return { cloneUrl, commits: out.trim().split('\n') };
  }

  /**
   * A repository made from `snapshots` with a pull request from its first commit (base) to its last (head), known
   * to the stand-in; `payload(action)` is the matching `pull_request` webhook.
   */
  pullRequest(
    fullName: string,
    snapshots: string,
    o: {
      number: number;
      author?: string;
      association?: string;
      commitMessage?: string;
      mergeable?: boolean;
      /** A fork the head comes from (made from the same snapshots). */
      fork?: string;
    },
  ): { cloneUrl: string; base: string; head: string; payload(action: string): Record<string, unknown> } {
    const repo = this.makeRepo(fullName, snapshots);
    const fork = o.fork ? this.makeRepo(o.fork, snapshots) : undefined;
    const base = repo.commits[0]!;
    const head = (fork ?? repo).commits.at(-1)!;
    const author = o.author ?? 'alice';
    const association = o.association ?? 'MEMBER';
    this.api.addPull(fullName, {
      number: o.number,
      title: o.commitMessage ?? 'change',
      user: author,
      authorAssociation: association,
      headSha: head,
      headRef: 'change',
      ...(o.fork ? { headRepo: o.fork } : {}),
      baseSha: base,
      baseRef: 'main',
      mergeable: o.mergeable ?? true,
      commits: [{ sha: head, message: o.commitMessage ?? 'change' }],
    });
    const payload = (action: string) =>
      pullRequestPayload({
        action,
        repo: fullName,
        cloneUrl: repo.cloneUrl,
        number: o.number,
        base,
        head,
        author,
        association,
        ...(fork && o.fork ? { headRepo: { fullName: o.fork, cloneUrl: fork.cloneUrl } } : {}),
      });
    return { cloneUrl: repo.cloneUrl, base, head, payload };
  }

  async close(): Promise<void> {
    await this.api.close();
    await this.git.close();
  }
}

/** An embedded coordinator (with one local agent) configured as a GitHub App against the stand-in. */
export async function startGitHubCoordinator(
  github: FakeGitHub,
  dataDir: string,
  extra: Record<string, unknown> = {},
): Promise<EmbeddedSystem> {
  const credentials = join(dataDir, '..', `app-${nonce()}.json`);
  writeFileSync(
    credentials,
    JSON.stringify({ GITHUB_APP_ID: String(github.api.appId), GITHUB_APP_PRIVATE_KEY: github.api.privateKey }),
    { mode: 0o600 },
  );
  const options = compileCoordinatorConfig(
    {
      data_dir: dataDir,
      lease_ttl_seconds: 2,
      unbuildable_grace_seconds: 0,
      build_no_output_timeout_seconds: 2,
      web: { port: 0 },
      grpc: { port: 0 },
      github_apps: [
        {
          id: 'test',
          credentials: { file: { path: credentials } },
          permissions: extra.permissions ?? { allow_all: true },
          api_url: github.api.url,
        },
      ],
      security: { webhook_secret: WEBHOOK_SECRET, ...((extra.security as object) ?? {}) },
      github: { check_run_update_interval_seconds: 0.2 },
      // Pull requests from people without write access build only in Nix's sandbox: the local agent has it on,
      // as a CI open to fork pull requests would.
      local_agent: { sandbox: true },
      ...Object.fromEntries(Object.entries(extra).filter(([k]) => k !== 'security' && k !== 'permissions')),
    },
    'test',
    {},
  );
  const system = new EmbeddedSystem({ coordinator: options, agents: 1, maxJobs: 2, logger: silentLogger() });
  await system.start();
  return system;
}

export function webhookUrl(system: EmbeddedSystem): string {
  return `http://127.0.0.1:${system.coordinator.httpPort}/github/webhook`;
}

/** GitHub's own `pull_request` example, pointed at a repository, commits and author of the test's choosing. */
export function pullRequestPayload(o: {
  action: string;
  repo: string;
  cloneUrl: string;
  number: number;
  base: string;
  head: string;
  author?: string;
  association?: string;
  headRepo?: { fullName: string; cloneUrl: string };
}): Record<string, unknown> {
  const payload = webhookExamples('pull_request', 'opened')[0]!;
  const repository = {
    ...(payload.repository as object),
    full_name: o.repo,
    clone_url: o.cloneUrl,
    default_branch: 'main',
  };
  const pr = payload.pull_request as Record<string, unknown>;
  const head = pr.head as Record<string, unknown>;
  const base = pr.base as Record<string, unknown>;
  return {
    ...payload,
    action: o.action,
    number: o.number,
    repository,
    installation: { id: INSTALLATION, node_id: 'x' },
    pull_request: {
      ...pr,
      number: o.number,
      draft: false,
      state: o.action === 'closed' ? 'closed' : 'open',
      // As GitHub does: the moment of this event (for a push, when the head moved).
      updated_at: new Date().toISOString(),
      user: { ...(pr.user as object), login: o.author ?? 'alice' },
      author_association: o.association ?? 'MEMBER',
      head: {
        ...head,
        sha: o.head,
        ref: 'change',
        repo: o.headRepo
          ? { ...repository, full_name: o.headRepo.fullName, clone_url: o.headRepo.cloneUrl }
          : repository,
      },
      base: { ...base, sha: o.base, ref: 'main', repo: repository },
    },
  };
}

/** GitHub's own `issue_comment` example, as a comment on a pull request. */
export function commentPayload(o: {
  repo: string;
  cloneUrl: string;
  number: number;
  id: number;
  body: string;
  author: string;
  /** When the comment was written; now by default. */
  createdAt?: Date;
}): Record<string, unknown> {
  const payload = webhookExamples('issue_comment', 'created')[0]!;
  const issue = payload.issue as Record<string, unknown>;
  const comment = payload.comment as Record<string, unknown>;
  return {
    ...payload,
    repository: { ...(payload.repository as object), full_name: o.repo, clone_url: o.cloneUrl },
    installation: { id: INSTALLATION, node_id: 'x' },
    issue: { ...issue, number: o.number, pull_request: { url: 'x' } },
    comment: {
      ...comment,
      id: o.id,
      body: o.body,
      created_at: (o.createdAt ?? new Date()).toISOString(),
      user: { ...(comment.user as object), login: o.author, type: 'User' },
    },
  };
}

export function deliver(
  system: EmbeddedSystem,
  event: string,
  payload: unknown,
  options: { deliveryId?: string; signature?: string } = {},
): Promise<{ status: number; body: string }> {
  return deliverWebhook(webhookUrl(system), WEBHOOK_SECRET, event, payload, options);
}

const byName = (runs: StandInCheckRun[]): Record<string, StandInCheckRun> =>
  Object.fromEntries(runs.map((r) => [r.name, r]));

/** Waits until every eka-ci check run of a commit has completed, and returns them by name. */
export async function completedChecks(github: FakeGitHub, repo: string, sha: string, count: number) {
  try {
    return byName(
      await github.api.waitFor(() => {
        const runs = github.api.checkRuns(repo, sha);
        return runs.length >= count && runs.every((r) => r.status === 'completed') && runs;
      }, `${count} completed check runs on ${sha}`),
    );
  } catch (err) {
    // What there was instead, for a failure that does not reproduce.
    const seen = github.api.checkRuns(repo, sha).map((r) => `${r.name}: ${r.status} ${r.conclusion ?? ''}`);
    throw new Error(`${(err as Error).message}; the check runs were: ${seen.join('; ') || 'none'}`);
  }
}

/**
 * Clicks the page's "Log in with GitHub" as `login` (the user signed in at the stand-in) and waits to be back on the
 * same page of `origin`, logged in.
 */
export async function logInOnPage(page: Page, github: FakeGitHub, login: string, origin: string): Promise<void> {
  github.api.oauth.signedIn = login;
  const back = new URL(page.url()).pathname;
  await page.locator('a[data-action="login"]').click();
  await page.waitForURL((url) => url.pathname === back && url.origin === origin);
  await page.locator('#who .who', { hasText: login }).waitFor();
}

/** Stops what a web UI test against the stand-in started, each part if it did start: browser, coordinator, GitHub. */
export async function stopWebTest(parts: {
  browser?: Browser;
  system?: EmbeddedSystem;
  github?: FakeGitHub;
}): Promise<void> {
  await parts.browser?.close();
  await parts.system?.stop();
  await parts.github?.close();
}
