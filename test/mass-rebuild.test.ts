import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import type { Review } from '../coordinator/review/model.js';
import { FakeGitHub, completedChecks, deliver, startGitHubCoordinator } from './support/github-app.js';
import { checkedFetch } from './support/api-contract.js';
import { launchBrowser, openPage, screenshot } from './support/browser.js';
import { ekaci, git } from './support/cli.js';
import { tempDir } from './support/nix-project.js';

/**
 * Builds held back, end to end: a pull request whose rebuilds exceed its base's `max_rebuild_count`, and one that
 * touches only files its base's `skip_build_paths` match, run by the GitHub App against the stand-in and by `ekaci
 * review`, with real git and real Nix. The review still evaluates them and says plainly what was not built.
 */

const PACKAGES = ['pkgA', 'pkgB', 'pkgC', 'pkgD', 'pkgE'];

/**
 * Five packages on one shared, unexported input: bumping it changes all five attributes, six derivations. A check's
 * shell (`shells.dev`, no attribute of the job) needs it too.
 */
function massSet(common: string): string {
  return `let
  inherit (import ./lib.nix) mk;
  common = mk { name = "common"; version = "${common}"; script = "echo common ${common} > $out"; };
  pkg = name: mk { inherit name; version = "1"; script = "echo \${name} $deps > $out"; deps = [ common ]; };
in {
${PACKAGES.map((p) => `  ${p} = pkg "${p}";`).join('\n')}
  shells.dev = mk { name = "dev-shell"; version = "1"; script = "echo > $out"; deps = [ common ]; };
}
`;
}

/** Snapshot directories for examples/make-repo.sh: `1-base` and `2-head`, each file given by its path. */
function snapshots(base: Record<string, string>, head: Record<string, string>): string {
  const dir = tempDir('ekaci-mass-snapshots-');
  for (const [name, files] of [
    ['1-base', base],
    ['2-head', head],
  ] as const) {
    for (const [path, text] of Object.entries(files)) {
      mkdirSync(dirname(join(dir, name, path)), { recursive: true });
      writeFileSync(join(dir, name, path), text);
    }
  }
  return dir;
}

const config = (job: object, checks?: object): string =>
  JSON.stringify({ jobs: { pkgs: { file: 'default.nix', ...job } }, ...(checks ? { checks } : {}) });

describe('builds held back by the base’s rules', () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem;

  beforeAll(async () => {
    github = await FakeGitHub.start();
    system = await startGitHubCoordinator(github, join(tempDir('ekaci-mass-'), 'data'));
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
  });

  const massChange = (checks?: object): string => {
    const cfg = config({ max_rebuild_count: 3 }, checks);
    return snapshots(
      { '.eka-ci/config.json': cfg, 'default.nix': massSet('1') },
      { '.eka-ci/config.json': cfg, 'default.nix': massSet('2') },
    );
  };

  /** Opens the pull request, waits for its check runs, and returns them with each attribute's drvs and builds. */
  async function run(repoName: string, number: number, snapshotDir: string, commitMessage: string, checkRuns = 3) {
    const pr = github.pullRequest(repoName, snapshotDir, { number, commitMessage });
    expect((await deliver(system, 'pull_request', pr.payload('opened'))).status).toBe(202);
    const checks = await completedChecks(github, repoName, pr.head, checkRuns);
    const { evaluations, store } = system.coordinator;
    const attrs = (sha: string) => evaluations.load(repoName, sha)!.jobs[0]!.attrs;
    const builtOf = (sha: string) =>
      Object.fromEntries(attrs(sha).map((a) => [a.attr, store.derivation(a.drvPath!)?.state ?? 'never']));
    const localSystem = attrs(pr.head)[0]!.system!;
    return { checks, head: builtOf(pr.head), base: builtOf(pr.base), localSystem, pr };
  }

  it('builds nothing of a change over max_rebuild_count, and says so in neutral checks with the counts', async () => {
    // "common" is no attribute: the title names nothing to build. Of the repository's checks, the one whose shell
    // needs the bumped input is held back too; the one without a shell runs.
    const repoChecks = { dev: { command: 'true', shell: 'shells.dev' }, plain: { command: 'echo plain ran' } };
    const change = massChange(repoChecks);
    const { checks, head, base, localSystem, pr } = await run('acme/mass', 1, change, 'common: 1 -> 2', 4);
    const title = `Mass rebuild: 6 rebuilds on ${localSystem} exceed max_rebuild_count 3; built nothing`;
    expect(checks['eka-ci / evaluation']).toMatchObject({ conclusion: 'success' });
    const build = checks[`eka-ci / build (${localSystem})`]!;
    expect(build).toMatchObject({ conclusion: 'neutral', output: { title } });
    expect(build.output.summary).toContain(
      `- job \`pkgs\`: 6 rebuilds on \`${localSystem}\` exceed max_rebuild_count 3 (the base's jobs.pkgs.max_rebuild_count)`,
    );
    const summary = checks['eka-ci / summary']!;
    expect(summary).toMatchObject({ conclusion: 'neutral', output: { title } });
    expect(summary.output.summary).toContain(`Rebuilds per system: \`${localSystem}\` 6.`);
    // The review is still there, every changed attribute in it, not built.
    expect(summary.output.summary).toMatch(/Not built/);
    expect(Object.values(head)).toEqual(PACKAGES.map(() => 'never'));
    expect(Object.values(base)).toEqual(PACKAGES.map(() => 'never'));
    expect(checks['eka-ci / checks']).toMatchObject({
      conclusion: 'neutral',
      output: { title: '1 check passed, 1 held back' },
    });
    expect(checks['eka-ci / checks']!.output.summary).toContain(`\`dev\` on \`${localSystem}\``);
    const { checks: checkJobs, evaluations, store } = system.coordinator;
    expect(checkJobs.checksOf('acme/mass', pr.head).map((c) => [c.name, c.state])).toEqual([['plain', 'succeeded']]);
    // Its shell, and the bumped input under it, never reached the builders.
    const shell = evaluations.load('acme/mass', pr.head)!.checks![0]!.systems[0]!.shellDrv!;
    expect(shell).toMatch(/-dev-shell-1\.drv$/);
    expect(store.derivation(shell)).toBeUndefined();
    expect(github.api.invalid).toEqual([]);
    // The API's review of the pull request says it too, in JSON and in markdown, first.
    const reviewUrl = `http://127.0.0.1:${system.coordinator.httpPort}/api/v1/reviews?repo=acme/mass&base=${pr.base}&head=${pr.head}`;
    const review = (await checkedFetch(reviewUrl)).json<Review>();
    expect(review.heldBack?.title).toBe(title);
    expect(review.heldBack?.lines).toContain(`Rebuilds per system: \`${localSystem}\` 6.`);
    expect(review.heldBack?.limits).toEqual([
      {
        limit: { kind: 'max-rebuild-count', job: 'pkgs', system: localSystem, rebuilds: 6, limit: 3, from: 'job' },
        built: [],
      },
    ]);
    expect(review.heldBack?.checks).toEqual([{ name: 'dev', system: localSystem }]);
    expect(
      (await checkedFetch(`${reviewUrl}&format=markdown`)).text.startsWith(`${title}\n\n**Builds held back.**`),
    ).toBe(true);
    // And the review page the summary's Details link opens.
    const browser = await launchBrowser();
    try {
      const errors: string[] = [];
      const page = await openPage(browser, summary.detailsUrl!, errors);
      await page.locator('.held-back strong', { hasText: title }).waitFor();
      await screenshot(page, 'review-held-back.png');
      expect(errors).toEqual([]);
    } finally {
      await browser.close();
    }
  });

  it('still builds an attribute a commit title names, OfBorg-style, and only that one', async () => {
    const { checks, head, base, localSystem } = await run('acme/mass-titled', 2, massChange(), 'pkgA: 1 -> 2');
    const title =
      `Mass rebuild: 6 rebuilds on ${localSystem} exceed max_rebuild_count 3; ` +
      'built only the 1 attribute named by commands/commit titles';
    expect(checks[`eka-ci / build (${localSystem})`]).toMatchObject({ conclusion: 'neutral', output: { title } });
    const summary = checks['eka-ci / summary']!;
    expect(summary).toMatchObject({ conclusion: 'neutral', output: { title } });
    expect(summary.output.summary).toContain(
      'Built only the attributes named by commands or commit titles (1): `pkgs.pkgA`',
    );
    expect(head.pkgA).toBe('succeeded');
    expect(base.pkgA).toBe('succeeded');
    expect([head.pkgB, head.pkgC, head.pkgD, head.pkgE, base.pkgB]).toEqual([
      'never',
      'never',
      'never',
      'never',
      'never',
    ]);
  });

  it('builds nothing of a change that touches only files its skip_build_paths match', async () => {
    const cfg = config({ skip_build_paths: ['doc/**', '*.md'] });
    // The manual is built from the documentation: without the rule, a documentation change rebuilds it.
    const set = `let inherit (import ./lib.nix) mk; in {
  manual = mk { name = "manual"; version = "1"; script = "echo \${builtins.hashString "sha256" (builtins.readFile ./doc/guide.md)} > $out"; };
  hello = mk { name = "hello"; version = "1"; script = "echo hello > $out"; };
}
`;
    const dir = snapshots(
      { '.eka-ci/config.json': cfg, 'default.nix': set, 'doc/guide.md': 'Read me.\n', 'README.md': 'hi\n' },
      { '.eka-ci/config.json': cfg, 'default.nix': set, 'doc/guide.md': 'Read me twice.\n', 'README.md': 'hello\n' },
    );
    const { checks, head, localSystem } = await run('acme/docs', 3, dir, 'doc: say it twice');
    const title =
      'Only files matching skip_build_paths changed: 2 files (doc/** matched 1, *.md matched 1); built nothing';
    expect(checks['eka-ci / evaluation']).toMatchObject({ conclusion: 'success' });
    expect(checks[`eka-ci / build (${localSystem})`]).toMatchObject({ conclusion: 'neutral', output: { title } });
    const summary = checks['eka-ci / summary']!;
    expect(summary).toMatchObject({ conclusion: 'neutral', output: { title } });
    expect(summary.output.summary).toContain(
      '- job `pkgs`: all 2 changed files match its skip_build_paths: `doc/**` (1), `*.md` (1)',
    );
    // The documentation change did change the manual's derivation: only the rule kept it from building.
    expect(summary.output.summary).toMatch(/`manual`/);
    expect(head).toEqual({ hello: 'never', manual: 'never' });
  });
});

describe('ekaci review of a mass rebuild', () => {
  it('prints what was held back above the review, builds only what a commit title names, and exits 0', async () => {
    const repo = tempDir('ekaci-mass-repo-');
    git(repo, 'init', '-q', '-b', 'main');
    const root = join(import.meta.dirname, '..');
    writeFileSync(join(repo, 'lib.nix'), readFileSync(join(root, 'examples', 'lib.nix')));
    writeFileSync(join(repo, 'nonce.nix'), `"${repo}"\n`);
    mkdirSync(join(repo, '.eka-ci'));
    // No limit of the job's own: the server's [rebuild] max_rebuild_count applies.
    writeFileSync(join(repo, '.eka-ci', 'config.json'), config({}));
    writeFileSync(join(repo, 'default.nix'), massSet('1'));
    git(repo, 'add', '-A');
    git(repo, 'commit', '-qm', 'base');
    const base = git(repo, 'rev-parse', 'HEAD');
    writeFileSync(join(repo, 'default.nix'), massSet('2'));
    git(repo, 'commit', '-qam', 'pkgA: 1 -> 2');
    const head = git(repo, 'rev-parse', 'HEAD');

    const dir = tempDir('ekaci-mass-review-');
    const serverConfig = join(dir, 'coordinator.toml');
    writeFileSync(serverConfig, '[rebuild]\nmax_rebuild_count = 3\n');
    const json = join(dir, 'review.json');
    const md = join(dir, 'review.md');
    const r = await ekaci([
      'review',
      '--repo',
      repo,
      '--base',
      base,
      '--head',
      head,
      '--data-dir',
      join(dir, 'data'),
      '--config',
      serverConfig,
      '--json',
      json,
      '--markdown',
      md,
    ]);
    expect(r.stderr).toContain('Mass rebuild: 6 rebuilds on');
    expect(r.code).toBe(0);
    const review = JSON.parse(readFileSync(json, 'utf8')) as Review;
    const localSystem = review.attrs[0]!.system!;
    expect(review.heldBack?.limits).toEqual([
      {
        limit: { kind: 'max-rebuild-count', job: 'pkgs', system: localSystem, rebuilds: 6, limit: 3, from: 'server' },
        built: [{ attr: 'pkgs.pkgA', system: localSystem }],
      },
    ]);
    const [first, , ...rest] = r.stdout.split('\n');
    expect(first).toBe(
      `Mass rebuild: 6 rebuilds on ${localSystem} exceed max_rebuild_count 3; ` +
        'built only the 1 attribute named by commands/commit titles',
    );
    expect(rest).toContain(
      `- job \`pkgs\`: 6 rebuilds on \`${localSystem}\` exceed max_rebuild_count 3 (the server's [rebuild] max_rebuild_count)`,
    );
    expect(readFileSync(md, 'utf8')).toBe(r.stdout);
    const by = Object.fromEntries(review.attrs.map((a) => [a.attr, a]));
    expect(by.pkgA).toMatchObject({ change: 'changed', outcome: 'still-succeeding', head: { build: 'succeeded' } });
    for (const p of PACKAGES.slice(1)) {
      expect(by[p]).toMatchObject({ change: 'changed', head: { build: 'not-built' } });
      expect(by[p]!.outcome).toBeUndefined();
    }
    expect(review.summary['newly-failing']).toBe(0);
  });
});
