import { join } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import type { Review } from '../coordinator/review/model.js';
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
 * Logging in to the web UI through GitHub's OAuth web flow (the stand-in's) in headless Chromium, and what a login
 * may do there: a writer rebuilds a failed build and runs a pull request's failed builds again; a reader and an
 * anonymous visitor are refused, with the coordinator's reason shown beside the button.
 */

const REPO = 'acme/web-login';
const REVIEW_FIXTURE = join(import.meta.dirname, 'fixtures', 'review');

let browser: Browser;
let github: FakeGitHub;
let system: EmbeddedSystem;
let pr: ReturnType<FakeGitHub['pullRequest']>;
let base: string;
const pageErrors: string[] = [];

beforeAll(async () => {
  browser = await launchBrowser();
  github = await FakeGitHub.start();
  pr = github.pullRequest(REPO, REVIEW_FIXTURE, { number: 3 });
  github.api.setPermission(REPO, 'alice', 'write');
  github.api.setPermission(REPO, 'mallory', 'read');
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  system = await startGitHubCoordinator(github, join(tempDir('ekaci-web-login-'), 'data'), {
    web: { port },
    oauth: {
      client_id: github.api.oauth.clientId,
      client_secret: github.api.oauth.clientSecret,
      redirect_url: `${base}/auth/callback`,
      jwt_secret: 'the-web-login-test-session-secret-0123456789',
      api_url: github.api.url,
    },
  });
  expect((await deliver(system, 'pull_request', pr.payload('opened'))).status).toBe(202);
  await completedChecks(github, REPO, pr.head, 3);
}, 180_000);

afterAll(() => stopWebTest({ browser, system, github }));

afterEach(() => closePages(browser, pageErrors));

function open(path: string): Promise<Page> {
  return openPage(browser, `${base}${path}`, pageErrors);
}

const logIn = (page: Page, login: string): Promise<void> => logInOnPage(page, github, login, base);

async function failedBuild(): Promise<{ drvPath: string; hash: string }> {
  const r = await fetch(`${base}/api/v1/reviews?repo=${encodeURIComponent(REPO)}&base=${pr.base}&head=${pr.head}`);
  const review = (await r.json()) as Review;
  const drvPath = review.attrs.find((a) => a.attr === 'breaks')!.head!.drv!;
  return { drvPath, hash: drvPath.slice('/nix/store/'.length, '/nix/store/'.length + 32) };
}

const shot = screenshot;

describe('logging in with GitHub in the web UI', () => {
  it('refuses an anonymous visitor, then logs a writer in, who rebuilds a failed build', async () => {
    const { drvPath, hash } = await failedBuild();
    const attempts = (): number => system.coordinator.store.attemptsOf(drvPath).length;
    const before = attempts();
    const page = await open(`/builds/${hash}`);
    await page.locator('#build-state', { hasText: 'failed' }).waitFor();
    await page.locator('button[data-action="rebuild"]').click();
    const refusal = page.locator('.action-message[data-state="error"]');
    await refusal.waitFor();
    expect(await refusal.textContent()).toMatch(/write access to acme\/web-login \(401\)$/);
    expect(attempts()).toBe(before);

    await logIn(page, 'alice');
    await shot(page, 'login-writer.png');
    await page.locator('button[data-action="rebuild"]').click();
    // The page follows the new attempt live (it redraws, the button's note with it).
    await expect.poll(attempts, { timeout: 30_000 }).toBe(before + 1);
    await page.locator('button.attempt-tab').nth(before).waitFor();
    expect(system.coordinator.audit.recent().find((a) => a.action === 'api.build-restarted')?.actor).toBe(
      'github:alice',
    );
  });

  it("refuses a reader, with the coordinator's reason; a writer runs the pull request's failed builds again", async () => {
    const page = await open(`/repos/${REPO}/pulls/3`);
    await page.locator('a[data-action="login"]').waitFor();
    await logIn(page, 'mallory');
    await page.locator('button[data-action="rebuild-failed"]').click();
    const refusal = page.locator('.action-message[data-state="error"]');
    await refusal.waitFor();
    expect(await refusal.textContent()).toMatch(/write access to acme\/web-login \(403\)$/);
    await shot(page, 'login-reader-refused.png');

    const runs = () => system.coordinator.github!.runs.runsOf({ repo: REPO }).length;
    const before = runs();
    const writer = await open(`/repos/${REPO}/pulls/3`);
    await logIn(writer, 'alice');
    await writer.locator('button[data-action="rebuild-failed"]').click();
    await writer.locator('.action-message[data-state="done"]').waitFor();
    expect(runs()).toBe(before + 1);
    // Logging out ends the session: the login link is back.
    await writer.locator('button[data-action="logout"]').click();
    await writer.locator('a[data-action="login"]').waitFor();
  });
});
