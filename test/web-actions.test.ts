import { join } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import { closePages, launchBrowser, openPage, screenshot } from './support/browser.js';
import { freePort } from './support/coordinator-harness.js';
import {
  FakeGitHub,
  completedChecks,
  deliver,
  startGitHubCoordinator,
  logInOnPage,
  stopWebTest,
} from './support/github-app.js';
import { tempDir } from './support/nix-project.js';

/**
 * The pull request page's "Approve" and "Merge when green" buttons in headless Chromium, against the real
 * coordinator, its agent and the GitHub stand-in: a writer logged in with GitHub approves an outside contributor's
 * pull request (its run starts) and merges a green one (GitHub merges it); a reader is refused, with the
 * coordinator's reason shown beside the button, and nothing changes; an anonymous visitor has no working action.
 */

// An outside contributor's pull request, from a fork: it waits for a writer's approval before anything is built.
const APPROVE_REPO = 'acme/web-approve';
// A member's pull request whose checks pass: a writer may have it merged when green.
const MERGE_REPO = 'acme/web-merge';
const DEMO = join(import.meta.dirname, '..', 'examples', 'review');

let browser: Browser;
let github: FakeGitHub;
let system: EmbeddedSystem;
let outside: ReturnType<FakeGitHub['pullRequest']>;
let green: ReturnType<FakeGitHub['pullRequest']>;
let base: string;
const pageErrors: string[] = [];

beforeAll(async () => {
  browser = await launchBrowser();
  github = await FakeGitHub.start();
  outside = github.pullRequest(APPROVE_REPO, DEMO, {
    number: 5,
    author: 'eve',
    association: 'CONTRIBUTOR',
    fork: 'eve/web-approve',
  });
  green = github.pullRequest(MERGE_REPO, DEMO, { number: 6, commitMessage: 'greeting: 1.0 -> 1.1' });
  for (const repo of [APPROVE_REPO, MERGE_REPO]) {
    github.api.setPermission(repo, 'alice', 'write');
    github.api.setPermission(repo, 'mallory', 'read');
  }
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  system = await startGitHubCoordinator(github, join(tempDir('ekaci-web-actions-'), 'data'), {
    security: { require_approval: true },
    web: { port },
    oauth: {
      client_id: github.api.oauth.clientId,
      client_secret: github.api.oauth.clientSecret,
      redirect_url: `${base}/auth/callback`,
      jwt_secret: 'the-web-actions-test-session-secret-0123456789',
      api_url: github.api.url,
    },
  });
  expect((await deliver(system, 'pull_request', outside.payload('opened'))).status).toBe(202);
  expect((await deliver(system, 'pull_request', green.payload('opened'))).status).toBe(202);
  const waiting = await completedChecks(github, APPROVE_REPO, outside.head, 2);
  expect(waiting['eka-ci / evaluation']?.conclusion).toBe('action_required');
  const checks = await completedChecks(github, MERGE_REPO, green.head, 4);
  expect(Object.values(checks).map((c) => c.conclusion)).toEqual(['success', 'success', 'success', 'success']);
}, 180_000);

afterAll(() => stopWebTest({ browser, system, github }));

afterEach(() => closePages(browser, pageErrors));

function open(path: string): Promise<Page> {
  return openPage(browser, `${base}${path}`, pageErrors);
}

const logIn = (page: Page, login: string): Promise<void> => logInOnPage(page, github, login, base);

/** Clicks the action button `name` and returns what the coordinator answered beside it, once it has. */
async function click(page: Page, name: string): Promise<{ state: string; text: string }> {
  const group = page.locator('.action-group', { has: page.locator(`button[data-action="${name}"]`) });
  await group.locator('button').click();
  const message = group.locator('.action-message[data-state]');
  await message.waitFor();
  return { state: (await message.getAttribute('data-state'))!, text: (await message.textContent())! };
}

/** The states of the outside contributor's runs, as the coordinator has them. */
const approvalRuns = (): string[] =>
  system.coordinator.github!.runs.runsOf({ repo: APPROVE_REPO, prNumber: 5 }).map((r) => r.state);

// What the coordinator answers a command given by nobody in particular.
const LOG_IN_FIRST = { state: 'error', text: 'commands are given as a GitHub user: log in with GitHub (401)' };

/** What the audit log holds of one action. */
const audited = (action: string) => system.coordinator.audit.recent().filter((a) => a.action === action);

describe("a pull request's Approve and Merge buttons in the web UI", () => {
  it('gives an anonymous visitor no working action: the coordinator refuses both buttons and nothing changes', async () => {
    const page = await open(`/repos/${APPROVE_REPO}/pulls/5`);
    await page.locator('a[data-action="login"]').waitFor();
    await page.locator('button[data-action="approve"]', { hasText: `Approve ${outside.head.slice(0, 7)}` }).waitFor();
    expect(await click(page, 'approve')).toEqual(LOG_IN_FIRST);
    await screenshot(page, 'web-actions-anonymous.png');
    expect(approvalRuns()).toEqual(['awaiting-approval']);

    const merge = await open(`/repos/${MERGE_REPO}/pulls/6`);
    await merge.locator('a[data-action="login"]').waitFor();
    expect(await click(merge, 'merge')).toEqual(LOG_IN_FIRST);
    expect(github.api.merges(MERGE_REPO)).toEqual([]);
    expect(system.coordinator.github!.runs.pullRequest(MERGE_REPO, 6)?.merge_method).toBeNull();
    expect([...audited('approve'), ...audited('merge-requested')]).toEqual([]);
  });

  it("refuses a reader's approval with the coordinator's reason, and the run waits; a writer's approval starts it", async () => {
    const page = await open(`/repos/${APPROVE_REPO}/pulls/5`);
    await page.locator('#run-state', { hasText: 'awaiting-approval' }).waitFor();
    await logIn(page, 'mallory');
    expect(await click(page, 'approve')).toEqual({
      state: 'error',
      text: '@mallory needs write access to this repository to run `approve`. (403)',
    });
    await screenshot(page, 'web-approve-refused.png');
    expect(approvalRuns()).toEqual(['awaiting-approval']);
    expect(audited('approve')).toEqual([]);

    const writer = await open(`/repos/${APPROVE_REPO}/pulls/5`);
    await logIn(writer, 'alice');
    expect(await click(writer, 'approve')).toEqual({ state: 'done', text: 'Done.' });
    // The approved head is evaluated and built (in the sandbox: its author is not trusted), and its checks complete.
    await github.api.waitFor(
      () =>
        github.api
          .checkRuns(APPROVE_REPO, outside.head)
          .find((c) => c.name === 'eka-ci / summary' && c.conclusion === 'success'),
      'the approved pull request built',
    );
    const checks = await completedChecks(github, APPROVE_REPO, outside.head, 4);
    expect(Object.values(checks).map((c) => c.conclusion)).toEqual(['success', 'success', 'success', 'success']);
    // The page follows the run it started.
    await writer.locator('#run-state', { hasText: 'done' }).waitFor();
    await screenshot(writer, 'web-approve.png');
    // The parked run is answered by the one the approval started.
    expect(approvalRuns()).toEqual(['cancelled', 'done']);
    const approvals = audited('approve');
    expect(approvals.map((a) => [a.actor, JSON.parse(a.detail) as unknown])).toEqual([
      ['github:alice', { repo: APPROVE_REPO, pr: 5, head: outside.head }],
    ]);
    expect(github.api.invalid).toEqual([]);
  });

  it("refuses a reader's merge with the coordinator's reason; a writer's merge when green merges the pull request", async () => {
    const page = await open(`/repos/${MERGE_REPO}/pulls/6`);
    await logIn(page, 'mallory');
    expect(await click(page, 'merge')).toEqual({
      state: 'error',
      text: '@mallory is not a maintainer of every changed package (not of: cowsay, greeting, hello, lolcat). (403)',
    });
    await screenshot(page, 'web-merge-refused.png');
    expect(github.api.merges(MERGE_REPO)).toEqual([]);
    expect(system.coordinator.github!.runs.pullRequest(MERGE_REPO, 6)?.merge_method).toBeNull();
    expect(audited('merge-requested')).toEqual([]);

    const writer = await open(`/repos/${MERGE_REPO}/pulls/6`);
    await logIn(writer, 'alice');
    expect(await click(writer, 'merge')).toEqual({ state: 'done', text: 'Done.' });
    await screenshot(writer, 'web-merge.png');
    const merged = await github.api.waitFor(() => github.api.merges(MERGE_REPO)[0], 'the merge');
    expect(merged).toMatchObject({ number: 6, sha: green.head });
    expect(github.api.merges(MERGE_REPO)).toHaveLength(1);
    expect(audited('merged').map((a) => a.actor)).toEqual(['github:alice']);
    expect(github.api.invalid).toEqual([]);
  });
});
