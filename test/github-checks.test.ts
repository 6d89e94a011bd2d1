import { mkdirSync, writeFileSync } from 'node:fs';
import { type Server, createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import { FakeGitHub, INSTALLATION, completedChecks, deliver, startGitHubCoordinator } from './support/github-app.js';
import { checkedFetch } from './support/api-contract.js';
import { launchBrowser, openPage, screenshot } from './support/browser.js';
import { webhookExamples } from './support/github-standin.js';
import { tempDir } from './support/nix-project.js';

/**
 * Repository checks end to end: a pull request's `.eka-ci/config.json` checks are evaluated with the commit, run on
 * the embedded agent in its sandbox, and reported as `eka-ci / checks`; the network is the base's and the server's
 * to give, never the pull request's.
 */

const CHECKS = 'eka-ci / checks';

let port: number;
let server: Server;

/** Two snapshots (base, head) whose checks: one in a shell with a tool of its own, one failing, one on the network. */
function snapshots(): string {
  const dir = tempDir('ekaci-check-snapshots-');
  for (const [snapshot, version] of [
    ['1-base', '1.0'],
    ['2-head', '1.1'],
  ] as const) {
    mkdirSync(join(dir, snapshot, '.eka-ci'), { recursive: true });
    writeFileSync(
      join(dir, snapshot, 'default.nix'),
      `let inherit (import ./lib.nix) mk; in rec {
  hello = mk { name = "hello"; version = "${version}"; script = "echo hello > $out"; };
  lint-tool = mk {
    name = "lint-tool";
    version = "1";
    script = ''
      /bin/mkdir -p $out/bin
      echo '#!/bin/sh' > $out/bin/lint-tool
      echo 'echo "lint-tool checked $1: $LINT_MODE"' >> $out/bin/lint-tool
      /bin/chmod +x $out/bin/lint-tool
    '';
  };
  shells.lint = derivation {
    name = "lint-shell";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out" ];
    tools = [ lint-tool ];
    LINT_MODE = "strict";
  };
}
`,
    );
    writeFileSync(
      join(dir, snapshot, '.eka-ci', 'config.json'),
      JSON.stringify({
        jobs: { pkgs: { file: 'default.nix' } },
        checks: {
          lint: { command: 'lint-tool default.nix', shell: 'shells.lint' },
          style: { command: 'echo "bad style in $(ls default.nix)"; exit 4' },
          net: {
            command: `exec 3<>/dev/tcp/127.0.0.1/${port} && read -r line <&3 && echo "got $line"`,
            allow_network: true,
          },
        },
      }),
    );
  }
  return dir;
}

describe('repository checks of a pull request, reported on GitHub', () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem;
  let fixture: string;

  beforeAll(async () => {
    server = createServer((socket) => socket.end('reached\n'));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as { port: number }).port;
    fixture = snapshots();
    github = await FakeGitHub.start();
    system = await startGitHubCoordinator(github, join(tempDir('ekaci-github-checks-'), 'data'));
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
    server?.close();
  });

  it('runs the checks on the agent and reports each one, failing the check run for the one that failed', async () => {
    const repo = github.pullRequest('acme/checked', fixture, { number: 21 });
    github.api.setPermission('acme/checked', 'alice', 'write');
    expect((await deliver(system, 'pull_request', repo.payload('opened'))).status).toBe(202);

    const runs = await completedChecks(github, 'acme/checked', repo.head, 4);
    const checks = runs[CHECKS]!;

    expect(checks.conclusion).toBe('failure');
    expect(checks.output.title).toBe('1 of 3 not passing: style (failed)');
    expect(checks.output.summary).toMatch(/\| `lint` \| `x86_64-linux` \| ✅ succeeded \| 0 \| [\d.]+ s \|/);
    expect(checks.output.summary).toMatch(/\| `net` \| `x86_64-linux` \| ✅ succeeded \| 0 \|/);
    expect(checks.output.summary).toMatch(/\| `style` \| `x86_64-linux` \| ❌ failed \| 4 \|/);
    expect(checks.output.summary).toContain('bad style in default.nix');
    expect(checks.actions).toEqual([expect.objectContaining({ identifier: 'rebuild-failed' })]);
    // The shell's environment: its input's bin on PATH, its attributes as variables.
    const results = system.coordinator.checks.resultsOf('acme/checked', repo.head);
    expect(results.find((c) => c.name === 'lint')!.logTail).toContain('lint-tool checked default.nix: strict');
    expect(results.find((c) => c.name === 'net')!.logTail).toContain('got reached');
    // The review says it too.
    const review = await system.coordinator.reviews.reviewOf('acme/checked', repo.base, repo.head);
    expect(review!.checks!.map((c) => [c.name, c.state, c.exitCode])).toEqual([
      ['lint', 'succeeded', 0],
      ['net', 'succeeded', 0],
      ['style', 'failed', 4],
    ]);
    expect(github.api.invalid).toEqual([]);
    // And the API: the commit lists its checks, each with a link to its whole output.
    const base = `http://127.0.0.1:${system.coordinator.httpPort}`;
    const commit = await checkedFetch(`${base}/api/v1/repos/acme/checked/commits/${repo.head}`);
    const listed = commit.json<{ checks: Array<{ name: string; state: string; logUrl: string }> }>().checks;
    expect(listed.map((c) => [c.name, c.state])).toEqual([
      ['lint', 'succeeded'],
      ['net', 'succeeded'],
      ['style', 'failed'],
    ]);
    const log = await checkedFetch(`${base}${listed.find((c) => c.name === 'style')!.logUrl}`);
    expect(log.status).toBe(200);
    expect(log.text).toContain('bad style in default.nix');

    // "Rebuild failed" on the checks' check run runs the failed check again, and only that one.
    const before = system.coordinator.checks.checksOf('acme/checked', repo.head);
    const payload = webhookExamples('check_run', 'requested_action')[0]!;
    const rerun = {
      ...payload,
      check_run: { ...(payload.check_run as object), head_sha: repo.head, name: CHECKS },
      requested_action: { identifier: 'rebuild-failed' },
      repository: { ...(payload.repository as object), full_name: 'acme/checked', clone_url: repo.cloneUrl },
      installation: { id: INSTALLATION },
    };
    expect((await deliver(system, 'check_run', rerun)).status).toBe(202);
    await github.api.waitFor(
      () =>
        system.coordinator.checks.checksOf('acme/checked', repo.head).find((c) => c.name === 'style')!.attempts === 2 &&
        system.coordinator.checks
          .checksOf('acme/checked', repo.head)
          .every((c) => c.state !== 'queued' && c.state !== 'running'),
      'the failed check run again',
    );
    const after = system.coordinator.checks.checksOf('acme/checked', repo.head);
    expect(after.find((c) => c.name === 'lint')!.attempts).toBe(before.find((c) => c.name === 'lint')!.attempts);
    expect(after.find((c) => c.name === 'style')!.state).toBe('failed');

    // The review page (the summary's Details link) shows them: a row each, the failed one's output, its whole log.
    const browser = await launchBrowser();
    const errors: string[] = [];
    try {
      const page = await openPage(browser, runs['eka-ci / summary']!.detailsUrl!, errors);
      await page.locator('#checks').waitFor();
      expect(await page.locator('.verdict').textContent()).toContain('1 check not passing');
      const rows = await page
        .locator('#checks table tbody tr')
        .evaluateAll((trs) => trs.map((tr) => [...tr.querySelectorAll('td')].slice(0, 4).map((td) => td.textContent)));
      expect(rows).toEqual([
        ['lint', 'x86_64-linux', 'succeeded', '0'],
        ['net', 'x86_64-linux', 'succeeded', '0'],
        ['style', 'x86_64-linux', 'failed', '4'],
      ]);
      const failure = page.locator('.check-failure[data-check="style"]');
      expect(await failure.locator('.problem').textContent()).toBe('exit code 4');
      await failure.locator('.log-tail', { hasText: 'bad style in default.nix' }).waitFor();
      await screenshot(page, 'review-checks.png');
      const logLink = page.locator('#checks table tbody tr', { hasText: 'style' }).locator('a', { hasText: 'log' });
      const log = await fetch(
        new URL(String(await logLink.getAttribute('href')), runs['eka-ci / summary']!.detailsUrl),
      );
      expect(await log.text()).toContain('bad style in default.nix');
      expect(errors).toEqual([]);
    } finally {
      await browser.close();
    }
  });

  it('gives an untrusted pull request’s check no network, whatever its configuration asks', async () => {
    const repo = github.pullRequest('acme/untrusted', fixture, {
      number: 22,
      author: 'eve',
      association: 'CONTRIBUTOR',
      fork: 'eve/untrusted',
    });
    expect((await deliver(system, 'pull_request', repo.payload('opened'))).status).toBe(202);

    const runs = await completedChecks(github, 'acme/untrusted', repo.head, 4);

    expect(runs[CHECKS]!.output.summary).toMatch(/\| `net` \| `x86_64-linux` \| ❌ failed \|/);
    const net = system.coordinator.checks.checksOf('acme/untrusted', repo.head).find((c) => c.name === 'net')!;
    expect(net.allow_network).toBe(0);
    expect(net.untrusted).toBe(1);
    const tail = system.coordinator.checks
      .resultsOf('acme/untrusted', repo.head)
      .find((c) => c.name === 'net')!.logTail;
    expect(tail).not.toContain('got reached');
  });
});
