import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Browser, Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Agent } from '../agent/agent.js';
import { silentLogger } from '../common/logging.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { launchBrowser, openPage, screenshot } from './support/browser.js';
import { startWithAgent } from './support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

/**
 * The web UI in headless Chromium (Debian's, driven by playwright-core) against a real coordinator and a real agent
 * building real derivations. Screenshots go to test-output/screenshots/.
 */

const TOKEN = 'ekaci_api-token-for-the-web-ui-tests-0123456789';

let browser: Browser;
let coordinator: Coordinator | undefined;
let agent: Agent | undefined;
/** What went wrong inside the pages: uncaught errors, and anything the Content-Security-Policy refused. */
let pageErrors: string[] = [];

beforeAll(async () => {
  browser = await launchBrowser();
});

afterAll(async () => {
  await browser?.close();
});

afterEach(async () => {
  for (const context of browser.contexts()) await context.close();
  await agent?.stopNow();
  agent = undefined;
  await coordinator?.stopNow();
  coordinator = undefined;
  expect(pageErrors).toEqual([]);
  pageErrors = [];
});

async function start(overrides: Record<string, unknown> = {}): Promise<Coordinator> {
  ({ coordinator, agent } = await startWithAgent(TOKEN, 'browser-agent', overrides));
  return coordinator;
}

const site = (path: string): string => `http://127.0.0.1:${coordinator!.httpPort}${path}`;

/** A page in a fresh browser context, holding the API token unless told not to. */
function open(path: string, withToken = true): Promise<Page> {
  return openPage(browser, site(path), pageErrors, withToken ? TOKEN : undefined);
}

async function submit(script: string, extra = ''): Promise<{ drvPath: string; hash: string; request: number }> {
  const file = writeNixFile(tempDir(), nonce(), `{ x = mk "ui" { script = ${JSON.stringify(script)}; ${extra} }; }`);
  const drvPath = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, '-A', 'x'])).trim();
  const request = await coordinator!.manager.submit([{ attr: 'x', drvPath }], 'test');
  return { drvPath, hash: drvPath.slice('/nix/store/'.length, '/nix/store/'.length + 32), request };
}

/** A directory for gate files (see `until`) that Nix's build users can read. */
function gateDir(): string {
  const dir = tempDir();
  chmodSync(dir, 0o755);
  return dir;
}

/**
 * A builder step that waits until the test creates `file`, so that what the page shows before is shown while the
 * build runs (builds here are not sandboxed and see /tmp). Bounded, so a sandboxed builder goes on by itself.
 */
const until = (file: string): string =>
  `i=0; while [ ! -e ${file} ] && [ $i -lt 600 ]; do /bin/sleep 0.1; i=$((i+1)); done`;

const shot = screenshot;

describe('the build page', () => {
  it('follows a running build’s log live, renders its colours, keeps markup as text, and shows how it ended', async () => {
    await start();
    const gates = gateDir();
    const gate = (n: number): string => join(gates, `gate-${n}`);
    const { drvPath, hash } = await submit(
      [
        'echo "first line"',
        "printf '\\033[31mred words\\033[0m then \\033[1;92mbold bright green\\033[0m\\n'",
        `echo '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'`,
        until(gate(1)),
        'echo "second line"',
        until(gate(2)),
        'echo "last line"; echo > $out',
      ].join('; '),
    );
    const page = await open(`/builds/${hash}`);
    const log = page.locator('.log-text');

    await page.locator('.log-text', { hasText: 'first line' }).waitFor();
    expect(await page.locator('#build-state').textContent()).toBe('building');
    await page.locator('.log-status', { hasText: 'Following live' }).waitFor();
    expect(await log.textContent()).not.toContain('second line');
    writeFileSync(gate(1), '');
    await page.locator('.log-text', { hasText: 'second line' }).waitFor();
    expect(await log.textContent()).not.toContain('last line');
    await shot(page, 'build-live.png');

    writeFileSync(gate(2), '');
    await page.locator('#build-state', { hasText: 'succeeded' }).waitFor();
    await page.locator('.log-text', { hasText: 'last line' }).waitFor();
    await page.locator('.log-status', { hasText: 'Attempt 1 succeeded' }).waitFor();
    expect(await page.locator('#attempt-state').textContent()).toBe('succeeded');

    // Colours are classes on spans; the escapes themselves are gone.
    const red = log.locator('span.fg-1');
    expect(await red.textContent()).toBe('red words');
    expect(await red.evaluate((el) => getComputedStyle(el).color)).toBe('rgb(255, 123, 114)');
    const green = log.locator('span.fg-10.b');
    expect(await green.textContent()).toBe('bold bright green');
    expect(await green.evaluate((el) => getComputedStyle(el).fontWeight)).toBe('700');
    // What the builder printed as markup is text on the page: no element made of it, nothing run.
    expect(await log.locator('script, img').count()).toBe(0);
    expect(await page.title()).not.toBe('pwned');
    // Tail, live chunks and the end: every byte once, in order.
    const stored = readFileSync(coordinator!.store.attemptsOf(drvPath)[0]!.log_path, 'utf8');
    expect(stored).toContain('\x1b[31m');
    expect(await log.textContent()).toBe(stored.replace(/\x1b\[[0-9;]*m/g, ''));
    expect(await log.textContent()).toContain('<script>document.title="pwned"</script><img src=x onerror=alert(1)>');
    await shot(page, 'build-succeeded.png');
  });

  it('switches between attempts, each with its own log, and moves to a new attempt by itself', async () => {
    await start();
    const gates = gateDir();
    chmodSync(gates, 0o777);
    // The first run marks the directory (Nix's build users may write there), so the second knows it is the second.
    const { hash } = await submit(
      `if [ -e ${gates}/ran ]; then echo "second run"; else : > ${gates}/ran; echo "first run"; fi; ` +
        `${until(join(gates, 'gate'))}; echo > $out`,
    );
    const page = await open(`/builds/${hash}`);
    await page.locator('.log-text', { hasText: 'first run' }).waitFor();

    // The agent goes away mid-build; once its lease lapses, another agent builds it again.
    await agent!.stopNow();
    agent = new Agent({
      coordinator: coordinator!.grpcTarget,
      token: coordinator!.localAgentToken('second-agent'),
      agentId: 'second-agent',
      maxJobs: 1,
      spoolDir: join(tempDir(), 'spool'),
      logger: silentLogger(),
    });
    await agent.start();
    // The second build waits for the first one's build process to be gone (its lock on the output): on a loaded
    // machine that can take a while.
    await page.locator('.log-text', { hasText: 'second run' }).waitFor({ timeout: 90_000 });
    const tabs = page.locator('button.attempt-tab');
    expect(await tabs.count()).toBe(2);
    expect(await tabs.nth(0).textContent()).toMatch(/^#1 (lost|infra-error) browser-agent$/);
    expect(await tabs.nth(1).getAttribute('aria-selected')).toBe('true');
    await page.locator('.log-status', { hasText: 'Following live' }).waitFor();

    await tabs.nth(0).click();
    await page.locator('.log-text', { hasText: 'first run' }).waitFor();
    expect(await page.locator('.log-text').textContent()).not.toContain('second run');
    expect(await page.locator('dl.attempt').textContent()).toContain('browser-agent');
    await shot(page, 'build-attempts.png');

    await tabs.nth(1).click();
    await page.locator('.log-text', { hasText: 'second run' }).waitFor();
    writeFileSync(join(gates, 'gate'), '');
    await page.locator('#build-state', { hasText: 'succeeded' }).waitFor();
    expect(await tabs.nth(1).textContent()).toBe('#2 succeeded second-agent');
  });

  it('opens a long log at its tail and pages backwards to its first line', async () => {
    await start();
    const { drvPath, hash, request } = await submit(
      'i=0; while [ $i -lt 6000 ]; do echo "line $i of a long log, long enough to need a few pages"; i=$((i+1)); done; ' +
        'echo > $out',
    );
    expect((await coordinator!.manager.waitFor(request))[0]?.state).toBe('succeeded');
    const stored = readFileSync(coordinator!.store.attemptsOf(drvPath)[0]!.log_path, 'utf8');
    expect(Buffer.byteLength(stored)).toBeGreaterThan(320 * 1024);

    const page = await open(`/builds/${hash}`);
    const log = page.locator('.log-text');
    await page.locator('.log-text', { hasText: 'line 5999 of' }).waitFor();
    expect(await log.textContent()).not.toContain('line 0 of');
    const earlier = page.locator('button.log-earlier');
    let pages = 0;
    while (await earlier.isVisible()) {
      await earlier.click();
      await page.waitForFunction(() => {
        const b = document.querySelector<HTMLButtonElement>('button.log-earlier')!;
        return b.hidden || !b.disabled;
      });
      pages++;
      expect(pages).toBeLessThan(5);
    }
    expect(pages).toBe(2);
    expect(await log.textContent()).toBe(stored);
  });
});

describe('the agents page', () => {
  it('asks for a token, then shows the agent, what it runs (linked to the build) and why a lane waits', async () => {
    await start({ unbuildable_grace_seconds: 3600 });
    const gate = join(gateDir(), 'gate');
    const running = await submit(`echo building now; ${until(gate)}; echo > $out`);
    // A feature no host here has: Nix adds `kvm` to system-features by itself where /dev/kvm exists.
    await submit('echo > $out', 'requiredSystemFeatures = [ "cuda" ];');
    await expect.poll(() => coordinator!.store.attemptsOf(running.drvPath).length).toBe(1);

    const page = await open('/agents', false);
    const form = page.locator('form.token-form');
    await form.waitFor();
    expect(await form.textContent()).toContain('this coordinator is not public');
    await shot(page, 'token-prompt.png');
    await form.locator('input').fill(TOKEN);
    await form.locator('button').click();

    const row = page.locator('tr[data-agent="browser-agent"]');
    await row.waitFor();
    expect(await row.locator('.badge').textContent()).toBe('connected');
    expect(await row.textContent()).toContain('1 of 1 busy');
    const lease = row.locator(`a[href="/builds/${running.hash}"]`);
    expect(await lease.textContent()).toBe(running.drvPath.slice(44, -'.drv'.length));
    const lane = page.locator('table.queues tr.stuck');
    const system = coordinator!.store.derivation(running.drvPath)!.system;
    expect(await lane.textContent()).toContain(`no connected agent builds ${system} with features cuda`);
    await shot(page, 'agents.png');

    await page.locator('nav a', { hasText: 'Overview' }).click();
    await page.locator('.stat', { hasText: 'Agents connected' }).waitFor();
    expect(await page.locator('.stat', { hasText: 'Agents connected' }).locator('.stat-value').textContent()).toBe(
      '1 of 1',
    );
    await shot(page, 'overview.png');

    // The lease's link opens its build, in the same page, following its log.
    await page.locator(`a[href="/builds/${running.hash}"]`).click();
    await page.locator('.log-text', { hasText: 'building now' }).waitFor();
    expect(new URL(page.url()).pathname).toBe(`/builds/${running.hash}`);
    writeFileSync(gate, '');
    await page.locator('#build-state', { hasText: 'succeeded' }).waitFor();
  });
});

describe('serving the web UI', () => {
  it('serves pages and hashed assets to anyone, with their types and caching, and nothing outside them', async () => {
    await start();
    const pages = ['/', '/agents', `/builds/${'0'.repeat(32)}`, '/repos/acme/pkgs/pulls/7', '/reviews', '/runs/1'];
    for (const path of pages) {
      const page = await fetch(site(path));
      expect(page.status, path).toBe(200);
      expect(page.headers.get('content-type')).toBe('text/html; charset=utf-8');
      expect(page.headers.get('cache-control')).toBe('no-cache');
      expect(page.headers.get('content-security-policy')).toContain("script-src 'self'");
      await page.text();
    }
    const html = await (await fetch(site('/'))).text();
    const script = /src="(\/assets\/main-[A-Z0-9]{8}\.js)"/.exec(html)?.[1];
    const style = /href="(\/assets\/style-[A-Z0-9]{8}\.css)"/.exec(html)?.[1];
    expect(script && style).toBeTruthy();
    for (const [path, type] of [
      [script!, 'text/javascript; charset=utf-8'],
      [style!, 'text/css; charset=utf-8'],
    ] as const) {
      const asset = await fetch(site(path));
      expect(asset.status).toBe(200);
      expect(asset.headers.get('content-type')).toBe(type);
      expect(asset.headers.get('cache-control')).toBe('public, max-age=31536000, immutable');
      expect((await asset.text()).length).toBeGreaterThan(100);
    }
    // The data behind the pages still needs the credential.
    expect((await fetch(site('/api/v1/agents'))).status).toBe(401);
    expect((await fetch(site('/agents'), { method: 'POST' })).status).toBe(401);

    const missing = await fetch(site('/assets/nothing-ABCDEFGH.js'));
    expect(missing.status).toBe(404);
    expect(((await missing.json()) as { error: { code: string } }).error.code).toBe('EKACI_ERR_NOT_FOUND');
    // dist/web/assets/../../../ is the checkout: its eslint.config.js has a type the UI serves.
    for (const path of [
      '/assets/../../../eslint.config.js',
      '/assets/..%2f..%2f..%2feslint.config.js',
      '/assets/%2e%2e/%2e%2e/%2e%2e/eslint.config.js',
      '/assets/.%2e%2f.%2e%2f.%2e%2feslint.config.js',
      '/assets/..%5c..%5c..%5ceslint.config.js',
      `/assets/${encodeURIComponent(fileURLToPath(new URL('../eslint.config.js', import.meta.url)))}`,
    ]) {
      const r = await rawGet(site(path));
      expect(r.status, path).toBe(404);
      expect(r.body, path).not.toContain('typescript-eslint');
    }
  });
});

/** A GET that sends its path exactly as written (fetch would resolve the dot segments first). */
function rawGet(url: string): Promise<{ status: number; body: string }> {
  const { hostname, port } = new URL(url);
  const path = url.slice(url.indexOf('/', 'http://'.length));
  return new Promise((resolve, reject) => {
    request({ hostname, port, path }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    })
      .on('error', reject)
      .end();
  });
}
