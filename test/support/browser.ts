import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Browser, chromium, type Page } from 'playwright-core';
import { expect } from 'vitest';
import { buildWeb } from '../../web/build.js';

/**
 * Headless Chromium for the web UI's tests: Debian's (playwright's own browser download cannot work offline), with
 * pages that record what went wrong inside them — uncaught errors and anything the Content-Security-Policy refused.
 */

export const SCREENSHOTS = fileURLToPath(new URL('../../test-output/screenshots/', import.meta.url));
const CHROMIUM = process.env.EKACI_CHROMIUM ?? '/usr/bin/chromium';

/** Builds the UI (dist/web) and starts the browser. */
export async function launchBrowser(): Promise<Browser> {
  await buildWeb();
  mkdirSync(SCREENSHOTS, { recursive: true });
  return chromium.launch({
    executablePath: CHROMIUM,
    // Nothing but loopback is reachable here: Chromium's own background traffic would only fail.
    args: ['--disable-gpu', '--disable-quic', '--disable-background-networking', '--disable-component-update'],
  });
}

/**
 * A page of `url` in a fresh browser context (an API token in its localStorage when given); what goes wrong inside it
 * is pushed to `errors`.
 */
export async function openPage(browser: Browser, url: string, errors: string[], token?: string): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  if (token) await context.addInitScript((t) => localStorage.setItem('ekaci.token', t), token);
  const page = await context.newPage();
  page.on('pageerror', (err) => errors.push(err.message));
  page.on('console', (m) => {
    if (m.text().includes('Content Security Policy')) errors.push(m.text());
  });
  await page.goto(url);
  return page;
}

/** After a test: its pages closed, and nothing went wrong inside them (`errors` is emptied for the next test). */
export async function closePages(browser: Browser, errors: string[]): Promise<void> {
  for (const context of browser.contexts()) await context.close();
  expect(errors.splice(0)).toEqual([]);
}

export const screenshot = (page: Page, name: string): Promise<Buffer> =>
  page.screenshot({ path: join(SCREENSHOTS, name), fullPage: true });
