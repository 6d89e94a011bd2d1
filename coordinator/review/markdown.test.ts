import { describe, expect, it } from 'vitest';
import { type ChangeSummary, emptyChangeSummary } from './change-summary.js';
import { GITHUB_SUMMARY_MAX_CHARS, codeBlock, renderMarkdown } from './markdown.js';
import type { AttrReview, BuildOutcomeName, Outcome, OutputSizes, Review } from './model.js';

const ok = (build: BuildOutcomeName) => ({ drv: '/nix/store/aaa-x.drv', eval: 'ok' as const, build });

function attr(name: string, outcome: Outcome, extra: Partial<AttrReview> = {}): AttrReview {
  const [base, head]: BuildOutcomeName[] = {
    'newly-failing': ['succeeded', 'failed'],
    'still-failing': ['failed', 'failed'],
    'newly-succeeding': ['failed', 'succeeded'],
    'still-succeeding': ['succeeded', 'succeeded'],
  }[outcome] as BuildOutcomeName[];
  return {
    job: 'nixpkgs',
    attr: name,
    system: 'x86_64-linux',
    change: 'changed',
    outcome,
    base: ok(base ?? 'succeeded'),
    head: ok(head ?? 'succeeded'),
    ...extra,
  };
}

function review(attrs: AttrReview[]): Review {
  return { base: { rev: 'a'.repeat(40) }, head: { rev: 'b'.repeat(40) }, attrs, summary: {} };
}

const logLines = (n: number, width = 20) =>
  Array.from({ length: n }, (_, i) => `line ${i} `.padEnd(width, 'x')).join('\n');

/** One attribute for every section of the review. */
function everySection(): Review {
  return review([
    attr('hello', 'newly-failing', {
      head: { ...ok('dependency-failed') },
      rootCauses: [{ drv: '/nix/store/bbb-openssl-3.0.drv', logTail: logLines(40) + '\nerror: tests failed\n' }],
    }),
    attr('broken-eval', 'newly-failing', {
      head: {
        drv: null,
        eval: 'error',
        error: "error:\n  … while evaluating\n\n  error: attribute 'a|b' missing",
        build: 'not-built',
      },
    }),
    attr('chromium', 'still-succeeding', {
      sizes: [
        {
          output: 'out',
          base: { narSize: 100, closureSize: 100 * 1024 * 1024 },
          head: { narSize: 150, closureSize: 150 * 1024 * 1024 },
          narSizeDelta: 50,
          closureSizeDelta: 50 * 1024 * 1024,
          closureSizePercent: 50,
          warning: true,
        },
      ],
      dependencies: [{ name: 'glibc', base: ['2.39'], head: ['2.40'], kind: 'changed' }],
    }),
    attr('fixed', 'newly-succeeding'),
    attr('flaky', 'still-failing'),
    { job: 'nixpkgs', attr: 'newpkg', system: 'x86_64-linux', change: 'added', head: ok('succeeded') },
    { job: 'nixpkgs', attr: 'oldpkg', system: 'x86_64-linux', change: 'removed', base: ok('succeeded') },
    attr('curl', 'still-succeeding'),
    { job: 'nixpkgs', attr: 'same', system: 'x86_64-linux', change: 'unchanged' },
  ]);
}

const headings = (md: string) => md.split('\n').filter((l) => l.startsWith('### '));

describe('renderMarkdown', () => {
  it('starts with a one-line verdict counting what is newly failing', () => {
    expect(renderMarkdown(everySection()).split('\n')[0]).toBe(
      '❌ 2 newly failing, 1 new evaluation error · ⚠️ 1 size warning',
    );
    expect(renderMarkdown(review([attr('curl', 'still-succeeding')])).split('\n')[0]).toBe('✅ nothing newly failing');
  });

  it('orders sections by what a reviewer needs first and only counts what still succeeds', () => {
    const md = renderMarkdown(everySection());

    expect(headings(md)).toEqual([
      '### Newly failing (2)',
      '### Evaluation errors (1)',
      '### Size warnings (1)',
      '### Newly succeeding (1)',
      '### Still failing (1)',
      '### Added (1)',
      '### Removed (1)',
      '### Runtime dependency changes (1)',
    ]);
    expect(md).toContain('Not listed: 2 still succeeding, 1 unchanged.');
    expect(md).not.toContain('`curl`');
  });

  it('lists a newly failing attribute with its system, base → head result and a details link', () => {
    const md = renderMarkdown(everySection(), { detailsUrl: (a) => `https://ci.example/attr/${a.attr}` });

    expect(md).toContain('| attribute | system | base → head | details |');
    expect(md).toContain(
      '| `hello` | `x86_64-linux` | succeeded → dependency-failed | [details](https://ci.example/attr/hello) |',
    );
  });

  it('names the root cause of a dependency failure and shows its last 30 log lines inside <details>', () => {
    const md = renderMarkdown(everySection());

    expect(md).toContain('**Root cause** `/nix/store/bbb-openssl-3.0.drv` breaks `hello`');
    const details = /<details><summary>(.*)<\/summary>\n\n```\n([\s\S]*?)\n```\n\n<\/details>/.exec(md);
    expect(details?.[1]).toBe('Last 30 log lines of <code>/nix/store/bbb-openssl-3.0.drv</code>');
    const shown = details?.[2]?.split('\n') ?? [];
    expect(shown).toHaveLength(30);
    expect(shown.at(-1)).toBe('error: tests failed');
    expect(shown[0]).toMatch(/^line 11 /);
  });

  it('fences a log containing backtick runs with a longer fence, so the log cannot close it', () => {
    const r = review([
      attr('docs', 'newly-failing', {
        rootCauses: [{ drv: '/nix/store/ccc-docs.drv', logTail: 'see ```nix\nfoo\n```\nand ````` five\n' }],
      }),
    ]);

    const md = renderMarkdown(r);

    expect(md).toContain('\n\n``````\nsee ```nix\nfoo\n```\nand ````` five\n``````\n\n</details>');
  });

  it('makes a code block no line of its text can close, without colour codes or control characters', () => {
    expect(codeBlock('error: x')).toBe('```\nerror: x\n```');
    expect(codeBlock('a\n```\n## heading\n  ````\nb')).toBe('`````\na\n```\n## heading\n  ````\nb\n`````');
    expect(codeBlock('\u001b[31merror:\u001b[0m bad\u0007\r\nnext')).toBe('```\nerror: bad\nnext\n```');
  });

  it('escapes a pipe in an evaluation error and shows the final error message, not the trace', () => {
    const md = renderMarkdown(everySection());

    const row = md.split('\n').find((l) => l.startsWith('| `broken-eval`') && l.includes('error:'));
    expect(row).toBe("| `broken-eval` | `x86_64-linux` | ok → error | error: attribute 'a\\|b' missing |");
    // Exactly five unescaped pipes: four columns.
    expect(row?.match(/(?<!\\)\|/g)).toHaveLength(5);
  });

  it('escapes pipes, backticks and newlines in table cells', () => {
    const r = review([
      attr('weird`name|x', 'newly-failing', {
        head: { drv: null, eval: 'error', error: 'error: `a` | *b*\nsecond', build: 'not-built' },
      }),
    ]);

    const md = renderMarkdown(r);

    expect(md).toContain('| ``weird`name\\|x`` |');
    expect(md).toContain('| error: \\`a\\` \\| \\*b\\*<br>second |');
  });

  it('shows size warnings with base and head closure sizes, delta and percent', () => {
    expect(renderMarkdown(everySection())).toContain(
      '| `chromium` | `out` | 100.0 MiB | 150.0 MiB | +50.0 MiB | +50.0 % |',
    );
  });

  it("says what a size was compared with when the job's size_check.base_branch chose it", () => {
    const withBaseline = (baseline: OutputSizes['baseline']): string => {
      const r = everySection();
      const chromium = r.attrs.find((a) => a.attr === 'chromium')!;
      chromium.sizes = chromium.sizes!.map((s) => ({ ...s, baseline }));
      return renderMarkdown(r);
    };
    const sha = 'a'.repeat(40);
    expect(withBaseline({ kind: 'branch', branch: 'main', commit: sha })).toContain(
      `| \`chromium\` | \`out\` | 100.0 MiB (main @ ${'a'.repeat(12)}) | 150.0 MiB |`,
    );
    expect(withBaseline({ kind: 'pull-request-base', branch: 'main', commit: sha })).toContain(
      `100.0 MiB (the pull request's base ${'a'.repeat(12)}: main has no recorded build of it) |`,
    );
  });

  it('shows runtime dependency changes once per change with the attributes they affect', () => {
    const r = review(
      ['a', 'b', 'c', 'd', 'e'].map((name) =>
        attr(name, 'still-succeeding', {
          dependencies: [{ name: 'openssl', base: ['3.0.1'], head: ['3.0.2'], kind: 'changed' }],
        }),
      ),
    );

    expect(renderMarkdown(r)).toContain('| `openssl` | 3.0.1 | 3.0.2 | `a`, `b`, `c` and 2 more |');
  });

  it('fits a review of 20,000 attributes with long logs into a check-run summary and names what it left out', () => {
    const attrs: AttrReview[] = [];
    for (let i = 0; i < 40; i++) {
      attrs.push(
        attr(`failing-${i}`, 'newly-failing', {
          head: ok('dependency-failed'),
          rootCauses: [{ drv: `/nix/store/${i}-root.drv`, logTail: logLines(5_000, 120) }],
        }),
      );
    }
    for (let i = 0; i < 2_000; i++) attrs.push(attr(`still-failing-${i}`, 'still-failing'));
    for (let i = 0; i < 1_000; i++) attrs.push(attr(`succeeding-now-${i}`, 'newly-succeeding'));
    for (let i = 0; i < 16_960; i++) {
      attrs.push(
        attr(`pkg-${i}`, 'still-succeeding', {
          dependencies: [{ name: `dep-${i % 3_000}`, base: ['1.0'], head: ['1.1'], kind: 'changed' }],
        }),
      );
    }

    const md = renderMarkdown(review(attrs));

    expect(md.length).toBeLessThanOrEqual(GITHUB_SUMMARY_MAX_CHARS);
    expect(md.split('\n')[0]).toBe('❌ 40 newly failing');
    const failingRows = md.split('\n').filter((l) => l.startsWith('| `failing-'));
    expect(failingRows).toHaveLength(40);
    for (let i = 0; i < 40; i++) expect(md).toContain(`**Root cause** \`/nix/store/${i}-root.drv\``);
    expect(md).toMatch(/… log excerpts of \d+ root causes left out to fit\./);
    expect(md).toContain('… 3,000 dependency changes left out to fit.');
    expect(md).toContain('Not listed: 16,960 still succeeding.');
    expect(md).toContain('_Shortened to fit 65,535 characters; what was left out is noted above._');
    expect(headings(md)).toEqual([
      '### Newly failing (40)',
      '### Newly succeeding (1,000)',
      '### Still failing (2,000)',
      '### Runtime dependency changes (3,000)',
    ]);
  });

  it('truncates the rows of a table too long to fit, never cutting it mid-row, and says how many are missing', () => {
    const attrs = Array.from({ length: 500 }, (_, i) => attr(`failing-${i}`, 'newly-failing'));

    const md = renderMarkdown(review(attrs), { maxChars: 5_000 });

    expect(md.length).toBeLessThanOrEqual(5_000);
    const rows = md.split('\n').filter((l) => l.startsWith('| `failing-'));
    expect(rows.length).toBeGreaterThan(10);
    for (const row of rows) expect(row).toMatch(/^\| `failing-\d+` \| `x86_64-linux` \| succeeded → failed \|$/);
    expect(md).toContain(`\n\n… ${500 - rows.length} more not shown.`);
  });

  it('still starts with the verdict and stays within a tiny limit', () => {
    const attrs = Array.from({ length: 2_000 }, (_, i) =>
      attr(`failing-${i}`, 'newly-failing', {
        rootCauses: [{ drv: `/nix/store/${i}-root.drv`, logTail: logLines(100) }],
      }),
    );

    for (const maxChars of [2_000, 200, 10]) {
      const md = renderMarkdown(review(attrs), { maxChars });

      expect(md.length).toBeLessThanOrEqual(maxChars);
      expect(md.startsWith('❌ 2,000 newly failing'.slice(0, maxChars - 1))).toBe(true);
    }
  });

  describe('package changes', () => {
    const at = (attr: string) => ({ job: 'nixpkgs', attr, system: 'x86_64-linux' });
    const noChanges = emptyChangeSummary;
    const everyKind = (): ChangeSummary => ({
      versions: [
        { ...at('hello'), base: { pname: 'hello', version: '2.12' }, head: { pname: 'hello', version: '2.13' } },
        { ...at('exa'), base: { pname: 'exa', version: '0.10' }, head: { pname: 'eza', version: '0.18' } },
      ],
      added: [{ ...at('fresh'), pname: 'fresh', version: '0.1' }],
      removed: [{ ...at('gone'), pname: 'gone', version: null }],
      licenses: [
        { ...at('curl'), base: ['mit'], head: ['curl'] },
        { ...at('wget'), base: ['mit'], head: ['curl'] },
      ],
      maintainers: [{ ...at('curl'), added: ['alice'], removed: [] }],
      platforms: ['a', 'b', 'c', 'd', 'e'].map((x) => ({ ...at(x), added: ['riscv64-linux'], removed: [] })),
      broken: [
        { ...at('flaky'), base: false, head: true },
        { ...at('mended'), base: true, head: false },
      ],
      metaErrors: [
        {
          ...at('who'),
          field: 'maintainers',
          side: 'head',
          error: 'error: … while evaluating\nerror: undefined variable',
        },
      ],
    });
    const withChanges = (changes: ChangeSummary, attrs: AttrReview[] = everySection().attrs): Review => ({
      ...review(attrs),
      changes,
    });

    it('follows the build tables with a counts line and a table for each kind of change', () => {
      const md = renderMarkdown(withChanges(everyKind()));

      expect(headings(md)).toEqual([
        '### Newly failing (2)',
        '### Evaluation errors (1)',
        '### Size warnings (1)',
        '### Newly succeeding (1)',
        '### Still failing (1)',
        '### Added (1)',
        '### Removed (1)',
        '### Package changes',
        '### Runtime dependency changes (1)',
      ]);
      const section = md.slice(md.indexOf('### Package changes'), md.indexOf('### Runtime dependency changes'));
      expect(section.split('\n').filter((l) => l.startsWith('#### '))).toEqual([
        '#### Version changes (2)',
        '#### Broken (2)',
        '#### License changes (2)',
        '#### Meta fields failing to evaluate (1)',
        '#### New packages (1)',
        '#### Removed packages (1)',
        '#### Platform changes (5)',
        '#### Maintainer changes (1)',
      ]);
      expect(section).toContain(
        '\n\n2 version changes, 1 new package, 1 removed package, 1 newly broken, 1 no longer broken, ' +
          '2 license changes, 5 platform changes, 1 maintainer change, 1 meta field newly failing to evaluate.\n\n',
      );
      expect(section).toContain('| `hello` | `hello` | 2.12 → 2.13 |');
      expect(section).toContain('| `exa` | `exa` → `eza` | 0.10 → 0.18 |');
      expect(section).toContain('| `flaky` | not broken → broken |');
      expect(section).toContain('| `mended` | broken → not broken |');
      expect(section).toContain('| `who` | `maintainers` | ok → error | error: undefined variable |');
      expect(section).toContain('| `fresh` | `fresh` | 0.1 |');
      expect(section).toContain('| `gone` | `gone` | — |');
      // Changes many attributes share are one row each.
      expect(section).toContain('| mit | curl | `curl`, `wget` |');
      expect(section).toContain('| riscv64-linux | — | `a`, `b`, `c` and 2 more |');
      expect(section).toContain('| alice | — | `curl` |');
    });

    it('leaves the section out when nothing changed, and shows only the tables of kinds that did', () => {
      expect(renderMarkdown(everySection())).not.toContain('Package changes');
      const md = renderMarkdown(withChanges({ ...noChanges(), licenses: everyKind().licenses }));

      expect(md).toContain('### Package changes\n\n2 license changes.\n\n#### License changes (2)\n\n| base | head |');
      expect(md).not.toContain('#### Version changes');
    });

    it('names the job beside the attribute when the change spans several jobs', () => {
      const changes = { ...noChanges(), added: [{ ...at('fresh'), job: 'other', pname: 'fresh', version: '1' }] };

      expect(renderMarkdown(withChanges(changes, [attr('curl', 'still-succeeding')]))).toContain(
        '| `fresh` (other) | `fresh` | 1 |',
      );
    });

    it('is trimmed before the build results: its tables collapse to counts, the counts line stays', () => {
      const many = 3_000;
      const changes: ChangeSummary = {
        ...everyKind(),
        versions: Array.from({ length: many }, (_, i) => ({
          ...at(`pkg-${i}`),
          base: { pname: `pkg-${i}`, version: '1.0' },
          head: { pname: `pkg-${i}`, version: '1.1' },
        })),
        platforms: Array.from({ length: many }, (_, i) => ({ ...at(`pkg-${i}`), added: [`sys-${i}`], removed: [] })),
      };
      const failing = Array.from({ length: 60 }, (_, i) => attr(`failing-${i}`, 'newly-failing'));

      const md = renderMarkdown(withChanges(changes, failing), { maxChars: 8_000 });

      expect(md.length).toBeLessThanOrEqual(8_000);
      expect(md.split('\n').filter((l) => l.startsWith('| `failing-'))).toHaveLength(60);
      expect(md).toContain('### Package changes\n\n3,000 version changes, 1 new package, 1 removed package,');
      expect(md).toContain('#### Platform changes (3,000)\n\n… 3,000 platform changes left out to fit.');
      expect(md).toContain('_Shortened to fit 8,000 characters; what was left out is noted above._');
      const versionRows = md.split('\n').filter((l) => /^\| `pkg-\d+` \| `pkg-\d+` \| 1\.0 → 1\.1 \|$/.test(l));
      expect(versionRows.length).toBeGreaterThan(0);
      expect(md).toContain(`\n\n… ${fmtCount(many - versionRows.length)} more not shown.`);

      // With no room at all, the section is its heading, counts and one line per table.
      const platformsOnly = { ...noChanges(), platforms: changes.platforms };
      const tiny = renderMarkdown(withChanges(platformsOnly, failing), { maxChars: 2_000 });
      expect(tiny.length).toBeLessThanOrEqual(2_000);
      expect(tiny).toContain(
        '\n\n### Package changes\n\n3,000 platform changes.\n\n#### Platform changes (3,000)\n\n' +
          '… 3,000 platform changes left out to fit.\n\n',
      );

      for (const maxChars of [300, 10]) {
        expect(renderMarkdown(withChanges(changes, failing), { maxChars }).length).toBeLessThanOrEqual(maxChars);
      }

      // At GitHub's limit the whole of it fits.
      const full = renderMarkdown(withChanges({ ...everyKind(), versions: changes.versions.slice(0, 200) }, failing));
      expect(full).not.toContain('left out');
      expect(full.split('\n').filter((l) => / 1\.0 → 1\.1 \|$/.test(l))).toHaveLength(200);
    });
  });
});

const fmtCount = (n: number): string => n.toLocaleString('en-US');
