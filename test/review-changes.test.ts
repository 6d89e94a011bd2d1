import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Coordinator } from '../coordinator/coordinator.js';
import type { Review } from '../coordinator/review/model.js';
import { checkedFetch } from './support/api-contract.js';
import { type CliRun, ekaci } from './support/cli.js';
import { startCoordinator } from './support/coordinator-harness.js';
import { nonce, tempDir } from './support/nix-project.js';

const ROOT = join(import.meta.dirname, '..');
const FIXTURE = join(ROOT, 'test', 'fixtures', 'change-summary');
const SYSTEM = JSON.parse(
  execFileSync('nix-instantiate', ['--eval', '--expr', 'builtins.currentSystem', '--json'], { encoding: 'utf8' }),
) as string;

/**
 * The change summary of a real change (test/fixtures/change-summary, two commits evaluated by real Nix): a version
 * bump, a license changed in meta alone (the same drv, so the rebuild diff calls it unchanged), a maintainer gained, a
 * package removed and one added, one marked broken, a platform added, and maintainers that stop evaluating. The same
 * summary in `ekaci review`'s JSON and markdown, and in the coordinator's API, checked against its OpenAPI document.
 */
describe('the change summary of a review', () => {
  let dir: string;
  let repo: string;
  let base: string;
  let head: string;
  let run: CliRun;
  let review: Review;
  const at = (attr: string) => ({ job: 'pkgs', attr, system: SYSTEM });

  beforeAll(async () => {
    dir = tempDir('ekaci-review-changes-');
    repo = join(dir, 'repo');
    const commits = execFileSync('bash', [join(ROOT, 'examples', 'make-repo.sh'), FIXTURE, repo, nonce()], {
      encoding: 'utf8',
    });
    [base, head] = commits.trim().split('\n') as [string, string];
    run = await ekaci([
      ...['review', '--repo', repo, '--base', base, '--head', head, '--no-build'],
      ...['--data-dir', join(dir, 'data'), '--json', join(dir, 'review.json')],
    ]);
    review = JSON.parse(readFileSync(join(dir, 'review.json'), 'utf8')) as Review;
  });

  it('lists every kind of change in the JSON, a meta-only change included', () => {
    expect(run.stderr).not.toMatch(/ekaci:/);
    expect(run.code).toBe(0);
    // The license changed in meta alone: the drv is the same, so the rebuild diff has nothing to say about it.
    const relicensed = review.attrs.find((a) => a.attr === 'relicensed');
    expect(relicensed === undefined || relicensed.change === 'unchanged').toBe(true);

    expect(review.changes).toEqual({
      versions: [
        { ...at('bumped'), base: { pname: 'bumped', version: '1.0' }, head: { pname: 'bumped', version: '1.1' } },
      ],
      added: [{ ...at('fresh'), pname: 'fresh', version: '0.1' }],
      removed: [{ ...at('gone'), pname: 'gone', version: '0.9' }],
      licenses: [{ ...at('relicensed'), base: ['mit'], head: ['asl20'] }],
      maintainers: [{ ...at('adopted'), added: ['bob'], removed: [] }],
      platforms: [{ ...at('ported'), added: ['aarch64-darwin'], removed: [] }],
      broken: [{ ...at('breaks'), base: false, head: true }],
      metaErrors: [
        {
          ...at('mystery'),
          field: 'maintainers',
          side: 'head',
          error: expect.stringContaining('who maintains mystery?') as unknown,
        },
      ],
    });
  });

  it('shows them in the markdown after the build results', () => {
    const md = run.stdout;
    expect(md.split('\n').filter((l) => l.startsWith('### '))).toEqual([
      '### Not built (1)',
      '### Added (1)',
      '### Removed (1)',
      '### Package changes',
    ]);
    const section = md.slice(md.indexOf('### Package changes'));
    expect(section).toContain(
      '1 version change, 1 new package, 1 removed package, 1 newly broken, 1 license change, 1 platform change, ' +
        '1 maintainer change, 1 meta field newly failing to evaluate.',
    );
    expect(section).toContain('| `bumped` | `bumped` | 1.0 → 1.1 |');
    expect(section).toContain('| `breaks` | not broken → broken |');
    expect(section).toContain('| mit | asl20 | `relicensed` |');
    expect(section).toMatch(/\| `mystery` \| `maintainers` \| ok → error \| error: who maintains mystery\? \|/);
    expect(section).toContain('| `fresh` | `fresh` | 0.1 |');
    expect(section).toContain('| `gone` | `gone` | 0.9 |');
    expect(section).toContain('| aarch64-darwin | — | `ported` |');
    expect(section).toContain('| bob | — | `adopted` |');
  });

  describe('served by the coordinator', () => {
    let coordinator: Coordinator;
    const token = 'ekaci_api-token-for-the-change-summary-test';
    beforeAll(async () => {
      coordinator = await startCoordinator(join(dir, 'data'), { api_tokens: [{ name: 'reader', token }] });
    });
    afterAll(() => coordinator?.stopNow());

    it('as the same JSON, which keeps the OpenAPI contract, and the same markdown', async () => {
      const url = `http://127.0.0.1:${coordinator.httpPort}/api/v1/reviews?repo=${encodeURIComponent(repo)}&base=${base}&head=${head}`;
      const headers = { authorization: `Bearer ${token}` };
      const json = await checkedFetch(url, { headers });
      expect(json.status).toBe(200);
      expect(json.json<Review>().changes).toEqual(review.changes);
      const markdown = await checkedFetch(`${url}&format=markdown`, { headers });
      expect(markdown.text).toBe(run.stdout);
    });
  });
});
