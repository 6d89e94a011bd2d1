import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import { parseRepoUrl } from '../coordinator/git/repo-url.js';
import {
  FakeGitHub,
  INSTALLATION,
  commentPayload,
  completedChecks,
  deliver,
  startGitHubCoordinator,
} from './support/github-app.js';
import { allWebhookExamples, webhookExamples } from './support/github-standin.js';
import { tempDir } from './support/nix-project.js';
import { checkedFetch } from './support/api-contract.js';
import { ekaci } from './support/cli.js';

const ROOT = join(import.meta.dirname, '..');
const REVIEW_FIXTURE = join(ROOT, 'test', 'fixtures', 'review');
const DEMO = join(ROOT, 'examples', 'review');
const REPO = 'acme/pkgs';

describe('eka-ci as a GitHub App', () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem;
  let dataDir: string;
  let repo: ReturnType<FakeGitHub['pullRequest']>;
  let head: string;

  beforeAll(async () => {
    github = await FakeGitHub.start();
    repo = github.pullRequest(REPO, REVIEW_FIXTURE, {
      number: 7,
      commitMessage: 'stable: rebuild it by name\n\nThe OfBorg convention.',
    });
    head = repo.head;
    dataDir = join(tempDir('ekaci-github-'), 'data');
    github.api.setPermission(REPO, 'alice', 'write');
    github.api.setPermission(REPO, 'mallory', 'read');
    system = await startGitHubCoordinator(github, dataDir);
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
  });

  it('refuses a delivery with a bad signature (401) and does nothing for it', async () => {
    const before = github.api.requests.length;
    const payload = repo.payload('opened');
    const r = await deliver(system, 'pull_request', payload, { signature: `sha256=${'0'.repeat(64)}` });
    expect(r.status).toBe(401);
    const unsigned = await deliver(system, 'pull_request', payload, { signature: '' });
    expect(unsigned.status).toBe(401);
    await new Promise((resolve) => setTimeout(resolve, 500));
    expect(github.api.requests.length).toBe(before);
    expect(github.api.checkRuns(REPO, head)).toEqual([]);
  });

  it('evaluates and builds a pull request and reports check runs naming the newly failing attribute', async () => {
    const payload = repo.payload('opened');
    const first = await deliver(system, 'pull_request', payload, { deliveryId: 'delivery-pr-7' });
    expect(first.status).toBe(202);
    // The same delivery again (GitHub's redelivery, or a replay): accepted, processed once.
    const replay = await deliver(system, 'pull_request', payload, { deliveryId: 'delivery-pr-7' });
    expect(replay.status).toBe(200);
    expect(JSON.parse(replay.body)).toMatchObject({ duplicate: true });

    const checks = await completedChecks(github, REPO, head, 3);
    expect(Object.keys(checks).sort()).toEqual([
      'eka-ci / build (x86_64-linux)',
      'eka-ci / evaluation',
      'eka-ci / summary',
    ]);
    // `evals` newly aborts: evaluation fails; `eval-broken` failed before too and is not blamed on the change.
    expect(checks['eka-ci / evaluation']).toMatchObject({ conclusion: 'failure' });
    expect(checks['eka-ci / evaluation']!.output.summary).toMatch(/\*\*new\*\* `pkgs\.evals`/);
    const build = checks['eka-ci / build (x86_64-linux)']!;
    expect(build.conclusion).toBe('failure');
    expect(build.actions).toEqual([expect.objectContaining({ identifier: 'rebuild-failed' })]);
    const summary = checks['eka-ci / summary']!;
    expect(summary.conclusion).toBe('failure');
    expect(summary.output.title).toMatch(/3 newly failing/);
    expect(summary.output.summary).toContain('### Newly failing (3)');
    expect(summary.output.summary).toMatch(/\| `breaks` \| `x86_64-linux` \| succeeded → failed \|/);
    expect(summary.detailsUrl).toMatch(/\/reviews\?repo=acme%2Fpkgs&base=[0-9a-f]{40}&head=[0-9a-f]{40}$/);
    // The details link works: it is the web UI's review page, and the review behind it is served from the
    // coordinator's database.
    const linked = await fetch(summary.detailsUrl!);
    expect(linked.status).toBe(200);
    expect(linked.headers.get('content-type')).toBe('text/html; charset=utf-8');
    const detailsUrl = new URL(summary.detailsUrl!);
    const markdown = await fetch(new URL(`/api/v1/reviews${detailsUrl.search}&format=markdown`, detailsUrl));
    expect(markdown.status).toBe(200);
    expect(await markdown.text()).toContain('### Newly failing (3)');
    // One run for the delivery and its replay: each check run was created once.
    const creations = github.api.requests.filter((r) => r.method === 'POST' && r.path.endsWith('/check-runs'));
    expect(creations.length).toBe(3);
    // `stable` is unchanged, but the commit title names it (the OfBorg convention), so it was built too.
    const stable = system.coordinator.evaluations.load(REPO, head)!.jobs[0]!.attrs.find((a) => a.attr === 'stable')!;
    expect(system.coordinator.store.derivation(stable.drvPath!)?.state).toMatch(/succeeded|substituted/);
    // What happened is visible to Prometheus: webhook latency and GitHub API calls.
    const metrics = await (await fetch(`http://127.0.0.1:${system.coordinator.httpPort}/metrics`)).text();
    expect(metrics).toMatch(/ekaci_github_webhook_wait_seconds_count\{event="pull_request"\} [1-9]/);
    expect(metrics).toMatch(/ekaci_github_api_calls_total\{operation="[^"]*check[^"]*",status="201"\} [1-9]/);
    expect(github.api.invalid).toEqual([]);
  });

  it('ekaci logs finds an attribute’s build by pull request or commit, and says why when there is none', async () => {
    const coordinatorUrl = `http://127.0.0.1:${system.coordinator.httpPort}`;
    const logs = (...args: string[]) => ekaci(['logs', ...args, '--coordinator', coordinatorUrl, '--repo', REPO]);
    const byPr = await logs('breaks', '--pr', '7');
    expect(byPr.stdout).toContain('this change broke it');
    expect(byPr.stderr).toMatch(
      new RegExp(`breaks at ${head.slice(0, 12)} is /nix/store/[a-z0-9]{32}-breaks-1\\.0\\.drv`),
    );
    expect(byPr.code).toBe(0);
    const byCommit = await logs('breaks', '--commit', head.slice(0, 10));
    expect(byCommit.stdout).toBe(byPr.stdout);
    // The base's `breaks` built fine, quietly.
    const byBase = await logs('breaks', '--commit', repo.base);
    expect(byBase.stderr).toContain(`breaks at ${repo.base.slice(0, 12)} is`);
    expect(byBase.stdout).not.toContain('this change broke it');
    const evalError = await logs('evals', '--pr', '7');
    expect(evalError.code).toBe(1);
    expect(evalError.stderr).toContain(`evals did not evaluate at ${head}: `);
    expect(evalError.stderr).toContain('this change broke the evaluation of evals');
    const missing = await logs('no-such-attr', '--pr', '7');
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/ekaci logs: 404: /);
    const noPr = await logs('breaks', '--pr', '999');
    expect(noPr.code).toBe(1);
    expect(noPr.stderr).toMatch(/ekaci logs: 404: /);
  });

  it("shows the repository, its pull requests with their counts, a commit and an attribute's sizes over the API", async () => {
    const api = (path: string) => `http://127.0.0.1:${system.coordinator.httpPort}/api/v1${path}`;
    type Repo = { name: string; github: boolean; private: boolean; openPullRequests: number };
    const repos = (await checkedFetch(api('/repos'))).json<{ repositories: Repo[] }>().repositories;
    expect(repos.find((r) => r.name === REPO)).toMatchObject({ github: true, private: false, openPullRequests: 1 });

    type Pull = {
      number: number;
      title: string;
      rebuilds: number;
      newlyFailing: number | null;
      review: string | null;
      run: { state: string; rebuildCountBySystem: Record<string, number> } | null;
    };
    const pulls = (await checkedFetch(api(`/repos/${REPO}/pulls?sort=failing`))).json<{ pullRequests: Pull[] }>();
    const [pull] = pulls.pullRequests;
    const title = (repo.payload('opened').pull_request as { title: string }).title;
    expect(pull).toMatchObject({ number: 7, title, newlyFailing: 3, run: { state: 'done' } });
    expect(pull!.rebuilds).toBe(Object.values(pull!.run!.rebuildCountBySystem).reduce((a, b) => a + b, 0));
    expect(pull!.rebuilds).toBeGreaterThan(0);
    const review = await checkedFetch(`http://127.0.0.1:${system.coordinator.httpPort}${pull!.review!}`);
    expect(review.json<{ summary: Record<string, number> }>().summary['newly-failing']).toBe(3);
    expect((await checkedFetch(api(`/repos/${REPO}/pulls?sort=size`))).status).toBe(400);
    // A repository nobody knows is private: an anonymous caller learns nothing of it, not even that it is unknown.
    expect((await checkedFetch(api('/repos/acme/unknown/pulls'))).status).toBe(401);

    type Commit = {
      commit: string;
      evaluations: { attrs: number; errors: number }[];
      runs: { state: string; builds: Record<string, number> }[];
      reviews: { base: string }[];
    };
    const commit = (await checkedFetch(api(`/repos/${REPO}/commits/${head.slice(0, 10)}`))).json<Commit>();
    expect(commit.commit).toBe(head);
    expect(commit.evaluations[0]!.attrs).toBeGreaterThan(commit.evaluations[0]!.errors);
    expect(commit.evaluations[0]!.errors).toBeGreaterThan(0);
    expect(commit.runs).toEqual([expect.objectContaining({ state: 'done' })]);
    expect(commit.runs[0]!.builds.failed).toBeGreaterThan(0);
    expect(commit.reviews.map((r) => r.base)).toEqual([repo.base]);

    type Timeline = {
      builds: {
        drvPath: string;
        agentId: string;
        startedAt: number | null;
        finishedAt: number | null;
        critical: boolean;
      }[];
      criticalPath: string[];
    };
    const runId = system.coordinator.github!.runs.runsOf({ repo: REPO, headSha: head })[0]!.id;
    const timeline = (await checkedFetch(api(`/runs/${runId}/timeline`))).json<Timeline>();
    expect(timeline.builds.length).toBeGreaterThan(0);
    expect(timeline.builds.every((b) => b.agentId === 'local-1')).toBe(true);
    // The critical path runs forward in time: each step started once the one before had finished.
    const byDrv = new Map(timeline.builds.filter((b) => b.critical).map((b) => [b.drvPath, b]));
    expect([...byDrv.keys()].sort()).toEqual([...timeline.criticalPath].sort());
    const path = timeline.criticalPath.map((d) => byDrv.get(d)!);
    for (let i = 1; i < path.length; i++) expect(path[i]!.startedAt!).toBeGreaterThanOrEqual(path[i - 1]!.finishedAt!);
    expect(Math.max(...timeline.builds.map((b) => b.finishedAt ?? 0))).toBe(path.at(-1)!.finishedAt);
    expect((await checkedFetch(api('/runs/999999/timeline'))).status).toBe(404);

    type Sizes = { points: { commit: string; outputs: { narSize: number | null }[] }[] };
    const sizes = (await checkedFetch(api(`/repos/${REPO}/attributes/stable/sizes`))).json<Sizes>();
    // Oldest first: the base was evaluated before the head.
    expect(sizes.points.map((p) => p.commit)).toEqual([repo.base, head]);
    expect(sizes.points.every((p) => (p.outputs[0]?.narSize ?? 0) > 0)).toBe(true);
    expect((await checkedFetch(api(`/repos/${REPO}/attributes/no-such-attr/sizes`))).status).toBe(404);
  });

  it('answers comment commands: refused for a reader (-1 and why), accepted for a writer (+1)', async () => {
    const comment = (id: number, author: string, body: string) =>
      deliver(
        system,
        'issue_comment',
        commentPayload({ repo: REPO, cloneUrl: repo.cloneUrl, number: 7, id, body, author }),
      );
    expect((await comment(901, 'mallory', '@eka-ci rebuild')).status).toBe(202);
    await github.api.waitFor(() => github.api.reactions(REPO, 901).length > 0, 'a reaction to 901');
    expect(github.api.reactions(REPO, 901)).toEqual(['-1']);
    const reply = await github.api.waitFor(
      () => github.api.comments(REPO, 7).find((c) => c.body.includes('@eka-ci rebuild')),
      'a reply to the refused command',
    );
    expect(reply.body).toMatch(/@mallory/);

    expect((await comment(902, 'alice', '@eka-ci merge squash')).status).toBe(202);
    await github.api.waitFor(() => github.api.reactions(REPO, 902).length > 0, 'a reaction to 902');
    expect(github.api.reactions(REPO, 902)).toEqual(['+1']);
    // The checks failed: the merge is refused with the reason, and nothing is merged.
    const refused = await github.api.waitFor(
      () => github.api.comments(REPO, 7).find((c) => c.body.includes('not merging')),
      'the merge refusal',
    );
    expect(refused.body).toMatch(/concluded failure/);
    expect(github.api.merges(REPO)).toEqual([]);

    expect((await comment(903, 'alice', '@eka-ci build no-such-package')).status).toBe(202);
    await github.api.waitFor(() => github.api.reactions(REPO, 903).length > 0, 'a reaction to 903');
    expect(github.api.reactions(REPO, 903)).toEqual(['-1']);
    expect(github.api.invalid).toEqual([]);
  });

  it('builds the failed derivations again on the "Rebuild failed" button', async () => {
    const head7 = system.coordinator.evaluations.load(REPO, head)!.jobs[0]!.attrs;
    const breaks = head7.find((a) => a.attr === 'breaks')!.drvPath!;
    const before = system.coordinator.store.derivation(breaks)!.attempts;
    const payload = webhookExamples('check_run', 'requested_action')[0]!;
    const checkRun = payload.check_run as Record<string, unknown>;
    const rerun = {
      ...payload,
      check_run: { ...checkRun, head_sha: head, name: 'eka-ci / build (x86_64-linux)' },
      requested_action: { identifier: 'rebuild-failed' },
      repository: { ...(payload.repository as object), full_name: REPO, clone_url: repo.cloneUrl },
      installation: { id: INSTALLATION },
    };
    expect((await deliver(system, 'check_run', rerun)).status).toBe(202);
    await github.api.waitFor(
      () => system.coordinator.store.derivation(breaks)!.attempts > before,
      'a second attempt at the failed build',
    );
    await completedChecks(github, REPO, head, 3);
    expect(system.coordinator.audit.recent().map((a) => a.action)).toContain('rebuild-failed');
  });

  it('lets a maintainer of every changed package merge without write access, and nobody else', async () => {
    const maintained = github.pullRequest('acme/maintained', join(ROOT, 'test', 'fixtures', 'maintained'), {
      number: 21,
      author: 'bob',
      association: 'CONTRIBUTOR',
      commitMessage: 'tool: 1.0 -> 1.1',
    });
    const mHead = maintained.head;
    github.api.setPermission('acme/maintained', 'bob', 'read');
    github.api.setPermission('acme/maintained', 'carol', 'read');
    const pr = maintained.payload('opened');
    expect((await deliver(system, 'pull_request', pr)).status).toBe(202);
    await completedChecks(github, 'acme/maintained', mHead, 3);
    const say = (id: number, author: string) =>
      deliver(
        system,
        'issue_comment',
        commentPayload({
          repo: 'acme/maintained',
          cloneUrl: maintained.cloneUrl,
          number: 21,
          id,
          body: '@eka-ci merge',
          author,
        }),
      );
    // Carol is listed by name only: a name never authorises the GitHub user who happens to have it.
    expect((await say(961, 'carol')).status).toBe(202);
    await github.api.waitFor(() => github.api.reactions('acme/maintained', 961).length > 0, 'a reaction to carol');
    expect(github.api.reactions('acme/maintained', 961)).toEqual(['-1']);
    const refusal = await github.api.waitFor(
      () => github.api.comments('acme/maintained', 21).find((c) => c.body.includes('@carol')),
      'the reply to carol',
    );
    expect(refusal.body).toMatch(/not a maintainer/);
    expect((await say(962, 'bob')).status).toBe(202);
    const merged = await github.api.waitFor(() => github.api.merges('acme/maintained')[0], 'the merge by bob');
    expect(merged).toMatchObject({ number: 21, sha: mHead });
    expect(github.api.invalid).toEqual([]);
  });

  it('cancels a pending @eka-ci merge when the head moves, and says so', async () => {
    const slow = github.pullRequest('acme/moving', join(ROOT, 'test', 'fixtures', 'slow'), { number: 41 });
    github.api.setPermission('acme/moving', 'alice', 'write');
    expect((await deliver(system, 'pull_request', slow.payload('opened'))).status).toBe(202);
    const merge = commentPayload({
      repo: 'acme/moving',
      cloneUrl: slow.cloneUrl,
      number: 41,
      id: 971,
      body: '@eka-ci merge',
      author: 'alice',
    });
    expect((await deliver(system, 'issue_comment', merge)).status).toBe(202);
    await github.api.waitFor(() => github.api.reactions('acme/moving', 971).includes('+1'), 'the merge accepted');
    // The endless build keeps the checks from going green: the merge waits. Then the author pushes.
    const moved = slow.payload('synchronize') as { pull_request: { head: { sha: string } } };
    moved.pull_request.head.sha = slow.base;
    expect((await deliver(system, 'pull_request', moved)).status).toBe(202);
    const said = await github.api.waitFor(
      () => github.api.comments('acme/moving', 41).find((c) => c.body.includes('merge cancelled')),
      'the merge cancellation',
    );
    expect(said.body).toContain(`from ${slow.head} to ${slow.base}`);
    expect(github.api.merges('acme/moving')).toEqual([]);
    expect((await deliver(system, 'pull_request', slow.payload('closed'))).status).toBe(202);
  });

  it('cancels the builds of a closed pull request', async () => {
    const slow = github.pullRequest('acme/slow', join(ROOT, 'test', 'fixtures', 'slow'), { number: 31 });
    const sHead = slow.head;
    const pr = (action: string) => slow.payload(action);
    expect((await deliver(system, 'pull_request', pr('opened'))).status).toBe(202);
    const slowDrv = await github.api.waitFor(() => {
      const e = system.coordinator.evaluations.load('acme/slow', sHead);
      const drv = e?.jobs[0]?.attrs[0]?.drvPath;
      return drv && system.coordinator.store.derivation(drv)?.state === 'building' && drv;
    }, 'the endless build to start');
    // Another event for the head already being built is answered by the run in progress, not a second one.
    expect((await deliver(system, 'pull_request', pr('reopened'))).status).toBe(202);
    const queue = system.coordinator.github!.queue;
    await github.api.waitFor(() => {
      const c = queue.counts();
      return c.pending + c.processing === 0;
    }, 'the reopened delivery handled');
    expect(system.coordinator.github!.runs.runsOf({ repo: 'acme/slow', prNumber: 31 })).toHaveLength(1);
    expect((await deliver(system, 'pull_request', pr('closed'))).status).toBe(202);
    await github.api.waitFor(
      () => system.coordinator.store.derivation(slowDrv)?.state === 'cancelled',
      'the build to be cancelled',
    );
    const checks = await completedChecks(github, 'acme/slow', sHead, 3);
    expect(checks['eka-ci / summary']?.conclusion).toBe('cancelled');
  });

  it('keeps a run cancelled while its diff was being computed cancelled: nothing is built for it', async () => {
    const pull = github.pullRequest('acme/racing', DEMO, { number: 32 });
    // The diff is held until the pull request is closed: the cancel lands exactly while it is computed.
    const reviews = system.coordinator.reviews;
    const record = reviews.record.bind(reviews);
    let enterDiff!: () => void;
    let releaseDiff!: () => void;
    const inDiff = new Promise<void>((resolve) => (enterDiff = resolve));
    const released = new Promise<void>((resolve) => (releaseDiff = resolve));
    reviews.record = async (...args) => {
      enterDiff();
      await released;
      return record(...args);
    };
    try {
      expect((await deliver(system, 'pull_request', pull.payload('opened'))).status).toBe(202);
      await inDiff;
      expect((await deliver(system, 'pull_request', pull.payload('closed'))).status).toBe(202);
      const [run] = system.coordinator.github!.runs.runsOf({ repo: 'acme/racing', prNumber: 32 });
      await github.api.waitFor(() => system.coordinator.github!.runs.run(run!.id)?.state === 'cancelled', 'the cancel');
      releaseDiff();
      await system.coordinator.github!.pipeline.idle();
    } finally {
      reviews.record = record;
    }
    const [run] = system.coordinator.github!.runs.runsOf({ repo: 'acme/racing', prNumber: 32 });
    expect(run?.state).toBe('cancelled');
    expect(system.coordinator.github!.runs.roots(run!.id)).toEqual([]);
    // The evaluation had succeeded; the summary is cancelled; no build check, since nothing was to be built.
    const checks = await completedChecks(github, 'acme/racing', pull.head, 2);
    expect(checks['eka-ci / summary']?.conclusion).toBe('cancelled');
    expect(Object.keys(checks).sort()).toEqual(['eka-ci / evaluation', 'eka-ci / summary']);
  });
});

describe('eka-ci as a GitHub App: merging, forks, merge groups, approval and restarts', () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem | undefined;
  let dataDir: string;

  beforeAll(async () => {
    github = await FakeGitHub.start();
    dataDir = join(tempDir('ekaci-github-'), 'data');
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
  });

  it('merges on @eka-ci merge once every check is green, and reacts with a rocket', async () => {
    const repo = github.pullRequest('acme/green', DEMO, { number: 3, commitMessage: 'greeting: 1.0 -> 1.1' });
    const head = repo.head;
    github.api.setPermission('acme/green', 'alice', 'write');
    system = await startGitHubCoordinator(github, dataDir);
    const pr = repo.payload('opened');
    expect((await deliver(system, 'pull_request', pr)).status).toBe(202);
    const comment = commentPayload({
      repo: 'acme/green',
      cloneUrl: repo.cloneUrl,
      number: 3,
      id: 950,
      body: 'Looks good.\n@eka-ci merge squash',
      author: 'alice',
    });
    expect((await deliver(system, 'issue_comment', comment)).status).toBe(202);
    const merged = await github.api.waitFor(() => github.api.merges('acme/green')[0], 'the merge');
    expect(merged).toMatchObject({ number: 3, method: 'squash', sha: head });
    // The demo's repository check too: the merge waited for eka-ci / checks like the others.
    const checks = await completedChecks(github, 'acme/green', head, 4);
    expect(Object.keys(checks)).toContain('eka-ci / checks');
    expect(Object.values(checks).map((c) => c.conclusion)).toEqual(['success', 'success', 'success', 'success']);
    await github.api.waitFor(() => github.api.reactions('acme/green', 950).includes('rocket'), 'the rocket');
    expect(github.api.reactions('acme/green', 950)).toEqual(['+1', 'rocket']);
    const audit = system.coordinator.audit.recent().map((a) => a.action);
    expect(audit).toEqual(expect.arrayContaining(['merge-requested', 'merged']));
  });

  it('keeps a merge GitHub refuses for now (branch protection) pending, and merges after a review', async () => {
    const repo = github.pullRequest('acme/protected', DEMO, { number: 4, mergeable: false });
    github.api.setPermission('acme/protected', 'alice', 'write');
    expect((await deliver(system!, 'pull_request', repo.payload('opened'))).status).toBe(202);
    await completedChecks(github, 'acme/protected', repo.head, 3);
    const merge = commentPayload({
      repo: 'acme/protected',
      cloneUrl: repo.cloneUrl,
      number: 4,
      id: 955,
      body: '@eka-ci merge',
      author: 'alice',
    });
    expect((await deliver(system!, 'issue_comment', merge)).status).toBe(202);
    const waiting = await github.api.waitFor(
      () => github.api.comments('acme/protected', 4).find((c) => c.body.includes('will not merge yet')),
      'the explanation why the merge waits',
    );
    expect(waiting.body).toContain('not mergeable');
    // A reviewer approves; branch protection is satisfied now.
    github.api.addPull('acme/protected', {
      number: 4,
      title: 'change',
      user: 'alice',
      authorAssociation: 'MEMBER',
      headSha: repo.head,
      headRef: 'change',
      baseSha: repo.base,
      baseRef: 'main',
      mergeable: true,
    });
    const review = webhookExamples('pull_request_review', 'submitted')[0]!;
    const submitted = {
      ...review,
      pull_request: { ...(review.pull_request as object), number: 4 },
      repository: { ...(review.repository as object), full_name: 'acme/protected', clone_url: repo.cloneUrl },
      installation: { id: INSTALLATION },
    };
    expect((await deliver(system!, 'pull_request_review', submitted)).status).toBe(202);
    const merged = await github.api.waitFor(() => github.api.merges('acme/protected')[0], 'the merge after the review');
    expect(merged).toMatchObject({ number: 4, sha: repo.head });
    expect(github.api.comments('acme/protected', 4).filter((c) => c.body.includes('will not merge yet'))).toHaveLength(
      1,
    );
  });

  it('cancels the builds of a destroyed merge group', async () => {
    const repo = github.makeRepo('acme/queue-slow', join(ROOT, 'test', 'fixtures', 'slow'));
    const [base, head] = repo.commits as [string, string];
    const group = (action: string) => ({
      action,
      merge_group: {
        head_sha: head,
        head_ref: 'refs/heads/gh-readonly-queue/main/pr-2',
        base_sha: base,
        base_ref: 'refs/heads/main',
      },
      repository: { full_name: 'acme/queue-slow', clone_url: repo.cloneUrl, default_branch: 'main' },
      installation: { id: INSTALLATION },
    });
    expect((await deliver(system!, 'merge_group', group('checks_requested'))).status).toBe(202);
    const slowDrv = await github.api.waitFor(() => {
      const drv = system!.coordinator.evaluations.load('acme/queue-slow', head)?.jobs[0]?.attrs[0]?.drvPath;
      return drv && system!.coordinator.store.derivation(drv)?.state === 'building' && drv;
    }, 'the merge group build to start');
    expect((await deliver(system!, 'merge_group', group('destroyed'))).status).toBe(202);
    await github.api.waitFor(
      () => system!.coordinator.store.derivation(slowDrv)?.state === 'cancelled',
      'the cancellation',
    );
    const checks = await completedChecks(github, 'acme/queue-slow', head, 3);
    expect(checks['eka-ci / summary']?.conclusion).toBe('cancelled');
  });

  it('builds a fork pull request from the fork, and reports on the base repository', async () => {
    const upstream = github.pullRequest('acme/upstream', DEMO, {
      number: 11,
      author: 'eve',
      association: 'CONTRIBUTOR',
      fork: 'eve/upstream',
    });
    const head = upstream.head;
    const pr = upstream.payload('opened');
    expect((await deliver(system!, 'pull_request', pr)).status).toBe(202);
    const checks = await completedChecks(github, 'acme/upstream', head, 3);
    expect(checks['eka-ci / summary']?.conclusion).toBe('success');
    expect(github.api.checkRuns('eve/upstream')).toEqual([]);
    // The fork's mirror borrows the base repository's objects instead of holding a second copy of its history.
    // (Computed, not asked of a GitMirrors: a second one on the coordinator's directory would clean up after a
    // crash that did not happen, deleting a mirror the coordinator is creating.)
    const mirrorDir = (url: string) => join(dataDir, 'git', 'mirrors', parseRepoUrl(url).mirrorName);
    const forkUrl = (pr.pull_request as { head: { repo: { clone_url: string } } }).head.repo.clone_url;
    const alternates = readFileSync(join(mirrorDir(forkUrl), 'objects', 'info', 'alternates'), 'utf8');
    expect(alternates.trim()).toBe(join(mirrorDir(upstream.cloneUrl), 'objects'));
  });

  it('builds a merge group and reports on its head commit', async () => {
    const repo = github.makeRepo('acme/queue', DEMO);
    const [base, head] = repo.commits as [string, string];
    const payload = {
      action: 'checks_requested',
      merge_group: {
        head_sha: head,
        head_ref: 'refs/heads/gh-readonly-queue/main/pr-1',
        base_sha: base,
        base_ref: 'refs/heads/main',
      },
      repository: { full_name: 'acme/queue', clone_url: repo.cloneUrl, default_branch: 'main' },
      installation: { id: INSTALLATION },
    };
    expect((await deliver(system!, 'merge_group', payload)).status).toBe(202);
    const checks = await completedChecks(github, 'acme/queue', head, 3);
    expect(checks['eka-ci / summary']?.conclusion).toBe('success');
  });

  it('finishes a pull request accepted just before a restart', async () => {
    const repo = github.pullRequest('acme/restart', DEMO, { number: 5 });
    const head = repo.head;
    const pr = repo.payload('opened');
    await system!.coordinator.github!.queue.stopGracefully();
    // Accepted and stored, but the queue no longer takes work: the coordinator goes down with it pending.
    expect((await deliver(system!, 'pull_request', pr)).status).toBe(202);
    await system!.stop();
    system = await startGitHubCoordinator(github, dataDir);
    const checks = await completedChecks(github, 'acme/restart', head, 3);
    expect(checks['eka-ci / summary']?.conclusion).toBe('success');
    expect(github.api.checkRuns('acme/restart', head).filter((c) => c.name === 'eka-ci / summary')).toHaveLength(1);
  });

  it('asks for approval of an outside contributor, and builds once a writer approves', async () => {
    await system!.stop();
    system = await startGitHubCoordinator(github, dataDir, { security: { require_approval: true } });
    const repo = github.pullRequest('acme/approve', DEMO, {
      number: 9,
      author: 'stranger',
      association: 'FIRST_TIME_CONTRIBUTOR',
    });
    const head = repo.head;
    github.api.setPermission('acme/approve', 'alice', 'write');
    const pr = repo.payload('opened');
    expect((await deliver(system, 'pull_request', pr)).status).toBe(202);
    const waiting = await completedChecks(github, 'acme/approve', head, 2);
    expect(waiting['eka-ci / evaluation']?.conclusion).toBe('action_required');
    const comment = commentPayload({
      repo: 'acme/approve',
      cloneUrl: repo.cloneUrl,
      number: 9,
      id: 990,
      body: '@eka-ci approve',
      author: 'alice',
    });
    expect((await deliver(system, 'issue_comment', comment)).status).toBe(202);
    await github.api.waitFor(
      () =>
        github.api
          .checkRuns('acme/approve', head)
          .find((c) => c.name === 'eka-ci / summary' && c.conclusion === 'success'),
      'the approved pull request built',
    );
    expect(github.api.reactions('acme/approve', 990)).toEqual(['+1']);
    // The approval was for that commit: a new push from the outside contributor waits for approval again.
    const beforePush = new Date();
    await new Promise((resolve) => setTimeout(resolve, 5));
    const pushed = repo.payload('synchronize') as { pull_request: { head: { sha: string } } };
    pushed.pull_request.head.sha = repo.base;
    expect((await deliver(system, 'pull_request', pushed)).status).toBe(202);
    const again = await completedChecks(github, 'acme/approve', repo.base, 2);
    expect(again['eka-ci / evaluation']?.conclusion).toBe('action_required');

    // A re-run clicked on the waiting head (by anyone) goes through approval too: nothing is built.
    const example = webhookExamples('check_run', 'rerequested')[0]!;
    const rerun = {
      ...example,
      check_run: { ...(example.check_run as object), head_sha: repo.base, name: 'eka-ci / evaluation' },
      repository: { ...(example.repository as object), full_name: 'acme/approve', clone_url: repo.cloneUrl },
      installation: { id: INSTALLATION },
      sender: { ...(example.sender as object), login: 'stranger' },
    };
    const runsBefore = system.coordinator.github!.runs.runsOf({ repo: 'acme/approve', prNumber: 9 }).length;
    expect((await deliver(system, 'check_run', rerun)).status).toBe(202);
    const queue = system.coordinator.github!.queue;
    await github.api.waitFor(() => {
      const c = queue.counts();
      return c.pending + c.processing === 0;
    }, 'the re-run handled');
    const runs = system.coordinator.github!.runs.runsOf({ repo: 'acme/approve', prNumber: 9, headSha: repo.base });
    expect(runs.map((r) => r.state)).toEqual(['awaiting-approval']);
    expect(system.coordinator.github!.runs.runsOf({ repo: 'acme/approve', prNumber: 9 }).length).toBe(runsBefore);
    expect(
      system.coordinator.audit.recent().some((a) => a.action === 'rebuild-failed' && a.actor === 'github:stranger'),
    ).toBe(true);

    // An approval written before that push covers the commit the approver saw, not the one pushed after it.
    const late = commentPayload({
      repo: 'acme/approve',
      cloneUrl: repo.cloneUrl,
      number: 9,
      id: 991,
      body: '@eka-ci approve',
      author: 'alice',
      // Written while the first head was current, delivered after the push.
      createdAt: beforePush,
    });
    github.api.updatePull('acme/approve', 9, { headSha: repo.base });
    expect((await deliver(system, 'issue_comment', late)).status).toBe(202);
    const said = await github.api.waitFor(
      () => github.api.comments('acme/approve', 9).find((c) => c.body.includes('moved on')),
      'the reply to an approval of an older head',
    );
    expect(said.body).toContain(`approved ${head}`);
    expect(said.body).toContain(`moved on to ${repo.base}`);
    expect(
      github.api.checkRuns('acme/approve', repo.base).find((c) => c.name === 'eka-ci / summary')?.conclusion,
    ).not.toBe('success');
    expect(github.api.invalid).toEqual([]);
  });
});

describe("eka-ci as a GitHub App: pushes and GitHub's own example payloads", () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem;

  beforeAll(async () => {
    github = await FakeGitHub.start();
    // Only acme/* is served: the examples' repositories are not, so they must be turned away cleanly.
    system = await startGitHubCoordinator(github, join(tempDir('ekaci-github-'), 'data'), {
      permissions: { allowed_repos: ['acme/*'], allowed_branches: ['main'] },
    });
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
  });

  it('builds every attribute of a push to the default branch', async () => {
    const repo = github.makeRepo('acme/history', DEMO);
    const [base, head] = repo.commits as [string, string];
    const payload = {
      ...webhookExamples('push')[0]!,
      ref: 'refs/heads/main',
      before: base,
      after: head,
      deleted: false,
      repository: { full_name: 'acme/history', clone_url: repo.cloneUrl, default_branch: 'main' },
      installation: { id: INSTALLATION },
    };
    expect((await deliver(system, 'push', payload)).status).toBe(202);
    const checks = await completedChecks(github, 'acme/history', head, 3);
    expect(checks['eka-ci / summary']).toMatchObject({ conclusion: 'success', output: { title: '5 of 5 built' } });
    const attrs = system.coordinator.evaluations.load('acme/history', head)!.jobs[0]!.attrs;
    for (const a of attrs)
      expect(system.coordinator.store.derivation(a.drvPath!)?.state).toMatch(/succeeded|substituted/);
  });

  it('fails a run whose pull request commits GitHub answers in another shape, naming the operation', async () => {
    const repo = github.pullRequest('acme/odd-answer', DEMO, { number: 21 });
    // A success whose body is not the list of commits: what a proxy or an incident at GitHub may answer.
    github.api.failNext(
      { method: 'GET', pathPrefix: '/repos/acme/odd-answer/pulls/21/commits' },
      { status: 200, body: { message: 'Service temporarily rerouted' } },
    );
    expect((await deliver(system, 'pull_request', repo.payload('opened'))).status).toBe(202);
    const checks = await completedChecks(github, 'acme/odd-answer', repo.head, 2);
    const evaluation = checks['eka-ci / evaluation']!;
    expect(evaluation.conclusion).toBe('failure');
    expect(evaluation.output.summary).toContain(
      'GitHub answered GET /repos/{owner}/{repo}/pulls/{pull_number}/commits (200) with an object where a list of ' +
        'commits, each with commit.message was expected: {"message":"Service temporarily rerouted"}',
    );
    expect(checks['eka-ci / summary']?.conclusion).toBe('failure');
    expect(github.api.invalid).toEqual([]);
  });

  it('shows an evaluation error that quotes the pull request as code: a fence in it cannot end the block', async () => {
    const snapshots = tempDir('ekaci-fenced-error-');
    cpSync(DEMO, snapshots, { recursive: true });
    // The job's attribute path is the pull request's to write, and the error names it: it closes a ``` block and
    // goes on as a heading and a link, if it can.
    const words = ['```', '## eka-ci: every check passed', '[merge](https://example.invalid)', '```'];
    const config = join(snapshots, '2-head', '.eka-ci', 'config.json');
    const parsed = JSON.parse(readFileSync(config, 'utf8')) as { jobs: { packages: Record<string, unknown> } };
    parsed.jobs.packages.attr_path = ['none', ...words, 'x'].join('\n');
    writeFileSync(config, JSON.stringify(parsed));
    const repo = github.pullRequest('acme/fenced-error', snapshots, { number: 22 });
    expect((await deliver(system, 'pull_request', repo.payload('opened'))).status).toBe(202);
    const checks = await completedChecks(github, 'acme/fenced-error', repo.head, 2);
    const evaluation = checks['eka-ci / evaluation']!;
    expect(evaluation.conclusion).toBe('failure');
    const lines = evaluation.output.summary!.split('\n');
    expect(lines.slice(0, 2)).toEqual(['eka-ci could not evaluate this commit:', '']);
    const fence = lines[2]!;
    expect(fence).toMatch(/^`{4,}$/);
    // The first line that could close the block (CommonMark: as many backticks or more, up to 3 spaces before) is
    // the last line: all the pull request wrote is inside it.
    const closes = new RegExp(`^ {0,3}\`{${fence.length},}\\s*$`);
    expect(lines.findIndex((l, i) => i > 2 && closes.test(l))).toBe(lines.length - 1);
    expect(lines.slice(3, -1)).toEqual(expect.arrayContaining(words));
    expect(checks['eka-ci / summary']?.output.summary).toBe(evaluation.output.summary);
  });

  it('takes every example payload GitHub publishes, and handles each without error', async () => {
    const events = allWebhookExamples();
    let n = 0;
    for (const { event, payload } of events) {
      const r = await deliver(system, event, payload, { deliveryId: `example-${n++}` });
      expect(r.status, `${event} example ${n}`).toBe(202);
    }
    const queue = system.coordinator.github!.queue;
    const counts = await github.api.waitFor(() => {
      const c = queue.counts();
      return c.pending + c.processing === 0 && c;
    }, 'every example handled');
    const failures = system.coordinator.db
      .prepare("SELECT event, action, last_error FROM webhook_deliveries WHERE state = 'failed'")
      .all();
    expect(failures).toEqual([]);
    expect(counts.failed).toBe(0);
    expect(counts.done).toBeGreaterThanOrEqual(events.length);
    expect(github.api.invalid).toEqual([]);
  });
});
