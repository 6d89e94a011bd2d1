import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Coordinator } from '../coordinator/coordinator.js';
import { ekaci, type CliRun } from './support/cli.js';
import { startCoordinator } from './support/coordinator-harness.js';
import { nonce, tempDir } from './support/nix-project.js';

interface ApiError {
  error: { code: string; message: string };
}

const ROOT = join(import.meta.dirname, '..');
const FIXTURE = join(ROOT, 'test', 'fixtures', 'review');

/**
 * The review fixture (test/fixtures/review, one snapshot per commit) covers every category a review reports:
 * unchanged, changed only through a dependency, added, removed, newly failing, still failing, newly succeeding,
 * a silent build that times out, a derivation needing a feature no agent has, a dependency failure with its root
 * cause, an evaluation error on both sides, a new `abort`, and a size warning. `expected.json` is the review,
 * with store hashes and commit ids replaced by placeholders.
 */
describe('the review of the fixture change', () => {
  let repo: string;
  let dataDir: string;
  let base: string;
  let head: string;
  let first: CliRun;
  let dir: string;

  const review = (extra: string[]): Promise<CliRun> =>
    ekaci([
      'review',
      '--repo',
      repo,
      '--base',
      'HEAD~1',
      '--head',
      'HEAD',
      '--config',
      join(FIXTURE, 'coordinator.toml'),
      '--data-dir',
      dataDir,
      ...extra,
    ]);

  beforeAll(async () => {
    dir = tempDir('ekaci-review-fixture-');
    repo = join(dir, 'repo');
    dataDir = join(dir, 'data');
    const commits = execFileSync('bash', [join(ROOT, 'examples', 'make-repo.sh'), FIXTURE, repo, nonce()], {
      encoding: 'utf8',
    });
    [base, head] = commits.trim().split('\n') as [string, string];
    first = await review(['--json', join(dir, 'review.json'), '--markdown', join(dir, 'review.md')]);
  });

  const normalise = (text: string): unknown =>
    JSON.parse(
      text
        .replace(/\/nix\/store\/[0-9a-z]{32}-/g, '/nix/store/HASH-')
        .replaceAll(base, 'BASE')
        .replaceAll(head, 'HEAD'),
    );

  it('exits 1, because the change makes builds and an evaluation newly fail', () => {
    expect(first.stderr).not.toMatch(/ekaci:/);
    expect(first.code).toBe(1);
  });

  it('reports every attribute exactly as expected.json says', () => {
    const expected = JSON.parse(readFileSync(join(FIXTURE, 'expected.json'), 'utf8')) as unknown;
    expect(normalise(readFileSync(join(dir, 'review.json'), 'utf8'))).toEqual(expected);
  });

  it('prints the markdown summary, newest trouble first, and writes the same text to --markdown', () => {
    const markdown = readFileSync(join(dir, 'review.md'), 'utf8');
    expect(markdown).toBe(first.stdout);
    const lines = markdown.split('\n');
    expect(lines[0]).toBe('❌ 3 newly failing, 1 new evaluation error · ⚠️ 2 size warnings');
    const headings = lines.filter((l) => l.startsWith('### '));
    expect(headings).toEqual([
      '### Newly failing (3)',
      '### Evaluation errors (2)',
      '### Size warnings (2)',
      '### Newly succeeding (1)',
      '### Still failing (1)',
      '### Not built (1)',
      '### Added (1)',
      '### Removed (1)',
      '### Package changes',
      '### Runtime dependency changes (1)',
    ]);
    expect(markdown).toContain('| `hangs` | `x86_64-linux` | succeeded → timed-out |');
    expect(markdown).toContain('| `uses-breaks` | `x86_64-linux` | succeeded → dependency-failed |');
    expect(markdown).toMatch(/\*\*Root cause\*\* `\/nix\/store\/[0-9a-z]{32}-breaks-1\.0\.drv` breaks `uses-breaks`/);
    expect(markdown).toContain('this change broke it');
    expect(markdown).toContain('| `needs-kvm` | `x86_64-linux` | succeeded → unbuildable |');
    expect(markdown).toContain("'this change broke the evaluation of evals'");
    expect(markdown).toContain('| `lib` | 1.0 | 2.0 | `app`, `lib` |');
    expect(markdown).toContain('| `lib` | `lib` | 1.0 → 2.0 |');
    expect(markdown).toContain('Not listed: 2 still succeeding, 2 unchanged.');
  });

  it('shows live progress on stderr: evaluation, then builds with failures as they happen', () => {
    expect(first.stderr).toMatch(/evaluating base HEAD~1…\n {2}base [0-9a-f]{12}: 12 attributes, 1 evaluation errors/);
    expect(first.stderr).toMatch(/building 9 head and 9 base attributes…/);
    expect(first.stderr).toMatch(/ {2}timed-out {9}hangs-1\.1\.drv/);
    expect(first.stderr).toMatch(/builds: 0 queued, 0 running, \d+ done, 7 failed/);
  });

  describe('afterwards', () => {
    it('builds nothing on the base side the second time, and says the same', async () => {
      const again = await review(['--json', join(dir, 'again.json')]);
      expect(again.code).toBe(1);
      expect(again.stderr).toMatch(/building 9 head and 0 base attributes…/);
      expect(normalise(readFileSync(join(dir, 'again.json'), 'utf8'))).toEqual(
        normalise(readFileSync(join(dir, 'review.json'), 'utf8')),
      );
    });

    describe('the coordinator serves the same review from its database', () => {
      let coordinator: Coordinator;
      let api: string;
      // A local repository's data is private: reading it takes an API token.
      const token = 'ekaci_api-token-for-the-review-fixture-test';
      const fetch = (url: string): Promise<Response> =>
        globalThis.fetch(url, { headers: { authorization: `Bearer ${token}` } });
      beforeAll(async () => {
        coordinator = await startCoordinator(dataDir, { api_tokens: [{ name: 'reader', token }] });
        api = `http://127.0.0.1:${coordinator.httpPort}/api/v1/reviews`;
      });
      afterAll(() => coordinator.stopNow());

      it('as JSON and as the markdown summary, for full and abbreviated commit ids', async () => {
        const query = `repo=${encodeURIComponent(repo)}&base=${base}&head=${head.slice(0, 10)}`;
        const json = await fetch(`${api}?${query}`);
        expect(json.status).toBe(200);
        expect(normalise(await json.text())).toEqual(normalise(readFileSync(join(dir, 'review.json'), 'utf8')));
        const markdown = await fetch(`${api}?${query}&format=markdown`);
        expect(markdown.headers.get('content-type')).toMatch(/^text\/markdown/);
        expect(await markdown.text()).toBe(first.stdout);
      });

      it('refuses a caller without a credential', async () => {
        const anonymous = await globalThis.fetch(`${api}?repo=${encodeURIComponent(repo)}&base=${base}&head=${head}`);
        expect(anonymous.status).toBe(401);
      });

      it('answers 400 without repo, base or head, and 404 for commits it never evaluated', async () => {
        const missing = await fetch(`${api}?repo=${encodeURIComponent(repo)}&base=${base}`);
        expect(missing.status).toBe(400);
        expect(((await missing.json()) as ApiError).error).toMatchObject({
          code: 'EKACI_ERR_REQUEST',
          message: expect.stringMatching(/repo, base and head are required/) as unknown,
        });
        const unknown = await fetch(`${api}?repo=${encodeURIComponent(repo)}&base=${base}&head=${'0'.repeat(40)}`);
        expect(unknown.status).toBe(404);
        expect(((await unknown.json()) as ApiError).error).toMatchObject({
          code: 'EKACI_ERR_NOT_FOUND',
          message: expect.stringContaining('0'.repeat(40)) as unknown,
        });
        const format = await fetch(`${api}?repo=r&base=${base}&head=${head}&format=html`);
        expect(format.status).toBe(400);
      });
    });
  });
});
