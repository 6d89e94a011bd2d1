import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import type { AttrReview, Review } from '../coordinator/review/model.js';
import {
  FakeGitHub,
  INSTALLATION,
  completedChecks,
  deliver,
  pullRequestPayload,
  startGitHubCoordinator,
} from './support/github-app.js';
import { webhookExamples } from './support/github-standin.js';
import { checkedFetch } from './support/api-contract.js';
import { tempDir } from './support/nix-project.js';

const FIXTURE = join(import.meta.dirname, 'fixtures', 'size-history');
const REPO = 'acme/sizes';

interface Point {
  branch: string;
  commit: string;
  job: string;
  output: string;
  narSize: number;
  closureSize: number;
}

/**
 * Sizes over a branch's history, end to end: a push to main records main's sizes; a pull request against a release
 * branch, whose job sets `size_check.base_branch = "main"`, is measured against main's newest build rather than the
 * release branch it targets.
 */
describe('size history and size_check.base_branch', () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem;
  let main: string;
  let release: string;
  let head: string;
  const api = (path: string): string => `http://127.0.0.1:${system.coordinator.httpPort}/api/v1${path}`;

  beforeAll(async () => {
    github = await FakeGitHub.start();
    const repo = github.makeRepo(REPO, FIXTURE);
    [main, release, head] = repo.commits as [string, string, string];
    system = await startGitHubCoordinator(github, join(tempDir('ekaci-sizes-'), 'data'));

    const push = {
      ...webhookExamples('push')[0]!,
      ref: 'refs/heads/main',
      before: '0'.repeat(40),
      after: main,
      deleted: false,
      repository: { full_name: REPO, clone_url: repo.cloneUrl, default_branch: 'main' },
      installation: { id: INSTALLATION },
    };
    expect((await deliver(system, 'push', push)).status).toBe(202);
    expect((await completedChecks(github, REPO, main, 3))['eka-ci / summary']?.conclusion).toBe('success');

    github.api.addPull(REPO, {
      number: 3,
      title: 'grow pkg',
      user: 'alice',
      authorAssociation: 'MEMBER',
      headSha: head,
      headRef: 'change',
      baseSha: release,
      baseRef: 'release',
      mergeable: true,
      commits: [{ sha: head, message: 'grow pkg' }],
    });
    const opened = pullRequestPayload({
      action: 'opened',
      repo: REPO,
      cloneUrl: repo.cloneUrl,
      number: 3,
      base: release,
      head,
    });
    const pr = opened.pull_request as { base: Record<string, unknown> };
    pr.base = { ...pr.base, ref: 'release' };
    expect((await deliver(system, 'pull_request', opened)).status).toBe(202);
    await completedChecks(github, REPO, head, 3);
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
  });

  it("measures the pull request against main's newest build, and warns where that grew past the limit", async () => {
    const review = (await checkedFetch(api(`/reviews?repo=${REPO}&base=${release}&head=${head}`))).json<Review>();
    const attr = (name: string): AttrReview => review.attrs.find((a) => a.attr === name)!;
    const closureOf = (commit: string, name: string): number => {
      const drv = system.coordinator.evaluations.load(REPO, commit)!.jobs[0]!.attrs.find((a) => a.attr === name)!;
      return system.coordinator.store.outputsOf(drv.drvPath!)[0]!.closure_size!;
    };

    // pkg grew 4% over the release branch, but is nine times main's: main is the baseline, and it warns.
    const [pkg] = attr('pkg').sizes!;
    expect(pkg).toMatchObject({
      output: 'out',
      base: { closureSize: closureOf(main, 'pkg') },
      head: { closureSize: closureOf(head, 'pkg') },
      warning: true,
      baseline: { kind: 'branch', branch: 'main', commit: main },
    });
    expect(pkg!.closureSizePercent).toBeGreaterThan(700);
    // `added` is new to the release branch, but main has it: a little growth, within the limit.
    expect(attr('added').change).toBe('added');
    expect(attr('added').sizes).toHaveLength(1);
    expect(attr('added').sizes![0]).toMatchObject({
      base: { closureSize: closureOf(main, 'added') },
      warning: false,
      baseline: { kind: 'branch', branch: 'main', commit: main },
    });
    // main never had `newer`: compared with the pull request's base, as without base_branch, and said so.
    expect(attr('newer').sizes).toHaveLength(1);
    expect(attr('newer').sizes![0]).toMatchObject({
      base: { closureSize: closureOf(release, 'newer') },
      warning: true,
      baseline: { kind: 'pull-request-base', branch: 'main', commit: release },
    });
    expect(review.summary['size-warnings']).toBe(2);
  });

  it("serves an attribute's points per branch, oldest first, as the OpenAPI document says", async () => {
    const all = (await checkedFetch(api(`/sizes?repo=${REPO}&attr=pkg`))).json<{ attr: string; points: Point[] }>();
    expect(all.attr).toBe('pkg');
    // main's from the push; release's from the pull request's base, built for the review.
    expect(all.points.map((p) => [p.branch, p.commit, p.job, p.output])).toEqual([
      ['main', main, 'pkgs', 'out'],
      ['release', release, 'pkgs', 'out'],
    ]);
    expect(all.points[1]!.closureSize).toBeGreaterThan(all.points[0]!.closureSize * 5);
    const onMain = (await checkedFetch(api(`/sizes?repo=${REPO}&attr=pkg&branch=main&output=out&job=pkgs`))).json<{
      points: Point[];
    }>();
    expect(onMain.points.map((p) => p.commit)).toEqual([main]);
    const newest = (await checkedFetch(api(`/sizes?repo=${REPO}&attr=pkg&limit=1`))).json<{ points: Point[] }>();
    expect(newest.points.map((p) => p.branch)).toEqual(['release']);
    // The head of a pull request is on no branch yet: nothing of it is recorded.
    expect(all.points.some((p) => p.commit === head)).toBe(false);

    expect((await checkedFetch(api(`/sizes?repo=${REPO}&attr=pkg&branch=staging`))).status).toBe(404);
    expect((await checkedFetch(api(`/sizes?repo=${REPO}&attr=no-such-attr`))).status).toBe(404);
    expect((await checkedFetch(api(`/sizes?repo=${REPO}`))).status).toBe(400);
    expect((await checkedFetch(api(`/sizes?repo=${REPO}&attr=pkg&limit=0`))).status).toBe(400);
    // A repository nobody knows is private: an anonymous caller learns nothing.
    expect((await checkedFetch(api('/sizes?repo=acme/unknown&attr=pkg'))).status).toBe(401);
    // The sizes read through evaluations are still served.
    expect((await checkedFetch(api(`/repos/${REPO}/attributes/pkg/sizes`))).status).toBe(200);
  });
});
