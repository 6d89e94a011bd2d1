import { join } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import type { Review } from '../coordinator/review/model.js';
import { closePages, launchBrowser, openPage, screenshot } from './support/browser.js';
import { FakeGitHub, completedChecks, deliver, startGitHubCoordinator, stopWebTest } from './support/github-app.js';
import type { StandInCheckRun } from './support/github-standin.js';
import { tempDir } from './support/nix-project.js';

/**
 * The overview, a pull request's review, a build's actions, the run's timeline and the agents' controls, in headless
 * Chromium, on a real run: a GitHub App (the stand-in) delivers a pull request of test/fixtures/review, a coordinator
 * and its agent evaluate and build it, and the pages show what it found. Screenshots go to test-output/screenshots/.
 */

const REPO = 'acme/pkgs';
const REVIEW_FIXTURE = join(import.meta.dirname, 'fixtures', 'review');
const TOKEN = 'ekaci_api-token-of-a-reader-for-the-review-page-tests';
const ADMIN_TOKEN = 'ekaci_api-token-of-an-operator-for-the-review-page-test';

let browser: Browser;
let github: FakeGitHub;
let system: EmbeddedSystem;
let pr: ReturnType<FakeGitHub['pullRequest']>;
let summary: StandInCheckRun;
let review: Review;
const pageErrors: string[] = [];

beforeAll(async () => {
  browser = await launchBrowser();
  github = await FakeGitHub.start();
  pr = github.pullRequest(REPO, REVIEW_FIXTURE, { number: 7 });
  github.api.setPermission(REPO, 'alice', 'write');
  system = await startGitHubCoordinator(github, join(tempDir('ekaci-web-review-'), 'data'), {
    web: { port: 0, admins: ['operator'] },
    api_tokens: [
      { name: 'reader', token: TOKEN },
      { name: 'operator', token: ADMIN_TOKEN },
    ],
  });
  expect((await deliver(system, 'pull_request', pr.payload('opened'))).status).toBe(202);
  summary = (await completedChecks(github, REPO, pr.head, 3))['eka-ci / summary']!;
  review = (await api(`/reviews?repo=${encodeURIComponent(REPO)}&base=${pr.base}&head=${pr.head}`)) as Review;
}, 180_000);

afterAll(() => stopWebTest({ browser, system, github }));

afterEach(() => closePages(browser, pageErrors));

const site = (path: string): string => `http://127.0.0.1:${system.coordinator.httpPort}${path}`;

async function api(path: string, init: RequestInit = {}, token = TOKEN): Promise<unknown> {
  const r = await fetch(site(`/api/v1${path}`), { ...init, headers: { Authorization: `Bearer ${token}` } });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

/** What the API answers a POST it refuses (which changes nothing), as the page shows it: `message (status)`. */
async function refusalOf(path: string, token: string | null): Promise<string> {
  const r = await fetch(site(`/api/v1${path}`), {
    method: 'POST',
    headers: token ? { Authorization: `Bearer ${token}` } : {},
  });
  expect(r.status).toBeGreaterThanOrEqual(400);
  return `${((await r.json()) as { error: { message: string } }).error.message} (${r.status})`;
}

/** A page in a fresh browser context, with an API token in its localStorage or none. */
function open(path: string, token: string | null = TOKEN): Promise<Page> {
  return openPage(browser, site(path), pageErrors, token ?? undefined);
}

const shot = screenshot;

/** The head derivation of a reviewed attribute, and its /builds/ hash. */
function headOf(attr: string): { drvPath: string; hash: string } {
  const drvPath = review.attrs.find((a) => a.attr === attr)!.head!.drv!;
  return { drvPath, hash: drvPath.slice('/nix/store/'.length, '/nix/store/'.length + 32) };
}

/** The title GitHub's example payload gives the pull request. */
const prTitle = (): string => (pr.payload('opened').pull_request as { title: string }).title;

/** Marks the page so that a reload would show: the mark is gone after one. */
const markPage = (page: Page): Promise<void> =>
  page.evaluate(() => void ((window as unknown as { mark: number }).mark = 42));
const stillMarked = (page: Page): Promise<boolean> =>
  page.evaluate(() => (window as unknown as { mark?: number }).mark === 42);

describe('the overview and the review of a pull request', () => {
  it('lists the open pull requests with rebuilds per system, newly failing and run status, sorted as asked', async () => {
    const page = await open('/');
    const row = page.locator(`section[data-repo="${REPO}"] tr[data-pull="7"]`);
    await row.waitFor();
    expect(await row.locator('a').textContent()).toBe(`#7 ${prTitle()}`);
    expect(await row.locator('td').nth(1).textContent()).toBe('alice');
    const { pullRequests } = (await api(`/repos/${REPO}/pulls`)) as {
      pullRequests: Array<{ run: { rebuildCountBySystem: Record<string, number> } }>;
    };
    const [system, count] = Object.entries(pullRequests[0]!.run.rebuildCountBySystem)[0]!;
    expect(await row.locator(`[data-system="${system}"] strong`).textContent()).toBe(String(count));
    expect(await row.locator('td.newly-failing').textContent()).toBe('3');
    expect(await row.locator('.badge').textContent()).toBe('done');
    // The agents at a glance, below.
    await page.locator('.stat', { hasText: 'Agents connected' }).waitFor();
    await shot(page, 'overview-pulls.png');

    // Sorting asks the API for that order, and the address keeps it.
    const sorted = page.waitForRequest((r) => r.url().includes(`/api/v1/repos/${REPO}/pulls?sort=rebuilds`));
    await page.locator('button[data-sort="rebuilds"]').click();
    await sorted;
    expect(new URL(page.url()).search).toBe('?sort=rebuilds');
    expect(await page.locator('button[data-sort="rebuilds"]').getAttribute('aria-pressed')).toBe('true');

    await markPage(page);
    await row.locator('a').click();
    await page.locator('#run-state').waitFor();
    expect(new URL(page.url()).pathname).toBe(`/repos/${REPO}/pulls/7`);
    expect(await stillMarked(page)).toBe(true);
  });

  it('shows the review of a pull request: newly failing first with roots and logs, errors, sizes, links to builds', async () => {
    // Public repository data on a public coordinator: no token needed to read it.
    const page = await open(`/repos/${REPO}/pulls/7`, null);
    await page.locator('.review .verdict').waitFor();
    expect(await page.locator('h1').textContent()).toBe(`${prTitle()} #7 `);
    expect(await page.locator('#run-state').textContent()).toBe('done');
    const run = (await api(`/repos/${REPO}/commits/${pr.head}`)) as { runs: Array<{ id: number }> };
    expect(await page.locator(`a[href="/runs/${run.runs[0]!.id}"]`).textContent()).toBe('build timeline');
    expect(await page.locator('.verdict').textContent()).toMatch(/^✗ 3 newly failing, 1 new evaluation error/);

    const sections = await page.locator('section.review-section').evaluateAll((s) => s.map((e) => e.id));
    expect(sections).toEqual([
      'newly-failing',
      'eval-errors',
      'sizes',
      'dependencies',
      'newly-succeeding',
      'still-failing',
      'not-built',
      'added',
      'removed',
      'package-changes',
    ]);
    const failing = page.locator('#newly-failing');
    const attrs = await failing
      .locator('table a.attr')
      .evaluateAll((as) => as.map((a) => [a.getAttribute('data-attr'), a.getAttribute('href')]));
    expect(attrs).toEqual(['breaks', 'hangs', 'uses-breaks'].map((a) => [a, `/builds/${headOf(a).hash}`]));
    // `breaks` fails by itself and takes `uses-breaks` with it: one root, its log read for the page.
    const root = failing.locator(`.root-cause[data-root="${headOf('breaks').drvPath}"]`);
    expect(await root.locator('h3').textContent()).toMatch(/^breaks-1\.0 failed, breaking uses-breaks$/);
    await root.locator('.log-tail', { hasText: 'this change broke it' }).waitFor();
    expect(await page.locator('#eval-errors').textContent()).toContain('this change broke the evaluation of evals');

    // `app` grew past the job's size check; its figures are small enough to read in bytes.
    const sizes = review.attrs.find((a) => a.attr === 'app')!.sizes![0]!;
    const [base, head] = [sizes.base!.closureSize, sizes.head!.closureSize];
    expect(head).toBeLessThan(1024);
    const app = page.locator('#sizes tr.size-row', { has: page.locator('a[data-attr="app"]') });
    expect(await app.getAttribute('class')).toContain('warning');
    expect(await app.textContent()).toContain(`${base} B → ${head} B`);
    expect(await app.locator('.size-delta').textContent()).toBe(
      `+${head - base} B (+${sizes.closureSizePercent!.toFixed(1)} %)`,
    );
    expect(await app.locator('svg.size-bars rect').count()).toBe(2);
    // Its size over the evaluated commits, the review's head marked.
    await app.locator('svg.sparkline circle.head').waitFor();
    expect(await page.locator('#dependencies').textContent()).toMatch(/lib\s*1\.0\s*2\.0/);
    expect(await page.locator('#still-failing a.attr').getAttribute('href')).toBe(`/builds/${headOf('broken').hash}`);
    await shot(page, 'review-pull.png');

    // What the change does to the packages: versions (parsed from the derivation names here), new and removed ones.
    const changes = page.locator('#package-changes');
    expect(await changes.locator('h2').textContent()).toBe('Package changes (7)');
    expect(await changes.locator('.change-counts').textContent()).toBe(
      '5 version changes, 1 new package, 1 removed package.',
    );
    const kinds = await changes.locator('.change-kind').evaluateAll((ks) => ks.map((k) => k.getAttribute('data-kind')));
    expect(kinds).toEqual(['versions', 'new-packages', 'removed-packages']);
    const lib = changes.locator('[data-kind="versions"] tr', { has: page.locator('a[data-attr="lib"]') });
    expect(await lib.locator('td').allTextContents()).toEqual(['lib', 'lib', '1.0 → 2.0']);
    expect(await lib.locator('a.attr').getAttribute('href')).toBe(`/builds/${headOf('lib').hash}`);
    const removed = changes.locator('[data-kind="removed-packages"] td');
    expect(await removed.allTextContents()).toEqual(['gone', 'gone', '1.0']);

    // Each attribute's link opens its build, in the same page.
    await markPage(page);
    await failing.locator('a[data-attr="hangs"]').click();
    await page.locator('#build-state', { hasText: 'timed-out' }).waitFor();
    expect(await stillMarked(page)).toBe(true);
  });

  it('opens the check run’s Details link on the review page', async () => {
    expect(summary.detailsUrl).toBe(site(`/reviews?repo=acme%2Fpkgs&base=${pr.base}&head=${pr.head}`));
    const page = await open(summary.detailsUrl!.slice(site('').length), null);
    await page.locator('.review .verdict').waitFor();
    expect(await page.locator('h1').textContent()).toBe(`Review of ${REPO}`);
    expect(await page.locator('#newly-failing h2').textContent()).toBe('Newly failing (3)');
    await shot(page, 'review.png');
  });
});

describe('a build: its dependency chain, rebuilding it, live updates', () => {
  it('follows a dependency failure down to the failed root and shows the root’s log', async () => {
    const page = await open(`/builds/${headOf('uses-breaks').hash}`, null);
    await page.locator('.chain .log-text', { hasText: 'this change broke it' }).waitFor();
    const chain = await page.locator('.chain-links li').evaluateAll((lis) => lis.map((li) => li.textContent));
    expect(chain).toEqual(['uses-breaks-1.0 dependency-failed', 'breaks-1.0 failed']);
    await shot(page, 'build-dependency-failed.png');
  });

  it('shows the refusal to rebuild without a token, and rebuilds with one: a new attempt, followed live', async () => {
    const { drvPath, hash } = headOf('breaks');
    const attempts = (): number => system.coordinator.store.attemptsOf(drvPath).length;
    expect(attempts()).toBe(1);
    const anonymous = await open(`/builds/${hash}`, null);
    await anonymous.locator('button[data-action="rebuild"]').click();
    const refusal = anonymous.locator('.action-message[data-state="error"]');
    await refusal.waitFor();
    expect(await refusal.textContent()).toMatch(/needs an API token.* \(401\)$/);
    expect(await refusal.textContent()).toBe(await refusalOf(`/derivations/${hash}/rebuild`, null));
    expect(attempts()).toBe(1);
    await shot(anonymous, 'build-rebuild-refused.png');

    const page = await open(`/builds/${hash}`);
    await page.locator('#build-state', { hasText: 'failed' }).waitFor();
    expect(await page.evaluate(() => document.documentElement.dataset.live)).toBe('open');
    await markPage(page);
    await page.locator('button[data-action="rebuild"]').click();
    const tabs = page.locator('button.attempt-tab');
    await tabs.nth(1).waitFor();
    await page.locator('.log-text', { hasText: 'this change broke it' }).waitFor();
    await expect.poll(() => tabs.nth(1).textContent()).toMatch(/^#2 failed local-1$/);
    expect(await page.locator('#build-state').textContent()).toBe('failed');
    expect(attempts()).toBe(2);
    expect(await stillMarked(page)).toBe(true);
    await shot(page, 'build-rebuilt.png');
  });

  it('shows a change made elsewhere without reloading, and reads the build again only for its own events', async () => {
    const { drvPath, hash } = headOf('hangs');
    const page = await open(`/builds/${hash}`);
    await page.locator('#build-state', { hasText: 'timed-out' }).waitFor();
    await markPage(page);
    const reads: string[] = [];
    page.on('request', (r) => {
      if (r.url().includes(`/api/v1/derivations/${hash}`) && !r.url().includes('/log')) reads.push(r.url());
    });
    // Another build changes: the page has nothing to read.
    const other = headOf('broken');
    const before = system.coordinator.store.attemptsOf(other.drvPath).length;
    await api(`/derivations/${other.hash}/rebuild`, { method: 'POST' });
    await expect.poll(() => system.coordinator.store.attemptsOf(other.drvPath).at(before)?.finished_at).toBeTruthy();
    await page.waitForTimeout(1000);
    expect(reads).toEqual([]);

    // This one is rebuilt by someone else: the page shows it building, then timing out again.
    await api(`/derivations/${hash}/rebuild`, { method: 'POST' });
    await page.locator('#build-state', { hasText: 'building' }).waitFor();
    await page.locator('button.attempt-tab').nth(1).waitFor();
    await page.locator('#build-state', { hasText: 'timed-out' }).waitFor({ timeout: 30_000 });
    expect(system.coordinator.store.attemptsOf(drvPath)).toHaveLength(2);
    expect(reads.length).toBeGreaterThan(0);
    expect(await stillMarked(page)).toBe(true);
  });
});

describe('the timeline of a run', () => {
  it('draws the builds of each agent over time and marks the critical path', async () => {
    const { runs } = (await api(`/repos/${REPO}/commits/${pr.head}`)) as { runs: Array<{ id: number }> };
    const id = runs[0]!.id;
    const timeline = (await api(`/runs/${id}/timeline`)) as { builds: unknown[]; criticalPath: string[] };
    // The pull request's page links to its run's timeline. Followed from the keyboard: a click leaves the pointer
    // where the link was, where the chart may then draw a bar under it, and a bar the pointer reaches gets its tooltip.
    const page = await open(`/repos/${REPO}/pulls/7`);
    await page.locator(`a[href="/runs/${id}"]`).focus();
    await page.keyboard.press('Enter');
    const bars = page.locator('svg.timeline-chart rect.bar');
    await bars.first().waitFor();
    expect(await page.locator('.run-facts').textContent()).toMatch(/^done pull request #7, head [0-9a-f]{12} onto/);
    expect(await bars.count()).toBe(timeline.builds.length);
    expect(await page.locator('svg.timeline-chart rect.bar.critical').count()).toBeGreaterThan(0);
    expect(await page.locator('.critical-path li').count()).toBe(timeline.criticalPath.length);
    // A bar's tooltip is written when the pointer reaches it.
    expect(await page.locator('svg.timeline-chart a.bar-link title').count()).toBe(0);
    await bars.first().hover();
    const title = await page.locator('svg.timeline-chart a.bar-link title').first().textContent();
    expect(title).toMatch(/attempt \d+\): \w+/);
    expect(title).toMatch(/\/nix\/store\/.+\.drv/);
    await shot(page, 'timeline.png');
  });
});

describe('the agents page', () => {
  it('refuses a drain to a plain token with the API’s message, and drains and resumes for an operator', async () => {
    const reader = await open('/agents');
    const row = reader.locator('tr[data-agent="local-1"]');
    await row.locator('button[data-action="drain"]').click();
    const refusal = row.locator('.action-message[data-state="error"]');
    await refusal.waitFor();
    expect(await refusal.textContent()).toBe(await refusalOf('/agents/local-1/drain', TOKEN));
    expect(await refusal.textContent()).toMatch(/admins \(403\)$/);
    await shot(reader, 'agents-drain-refused.png');

    const page = await open('/agents', ADMIN_TOKEN);
    const admin = page.locator('tr[data-agent="local-1"]');
    await admin.locator('input.reason').fill('kernel update');
    await admin.locator('button[data-action="drain"]').click();
    await admin.locator('.drained', { hasText: 'by api:operator: kernel update' }).waitFor();
    // The reader's page learns of it from the event, without reloading.
    await row.locator('.drained').waitFor();
    await shot(page, 'agents-drained.png');
    await admin.locator('button[data-action="resume"]').click();
    await admin.locator('button[data-action="drain"]').waitFor();
    expect(await admin.locator('.drained').count()).toBe(0);
    await row.locator('button[data-action="drain"]').waitFor();
  });
});
