import { realpathSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join, relative, sep } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mutateText, mutations, nest, places, replaced, resolvesOrFailsWith } from '../../test/support/fuzz.js';
import { RepoConfigError } from './errors.js';
import { jsonErrorPosition } from './json-position.js';
import { type RepoConfig, compileRepoConfig, loadRepoConfig } from './repo-config.js';
import { FLAKE_OUTPUTS } from './schema.js';
import { makeTree, temp } from './test-support.js';

const RUNS = 100;
const SOURCE = '.eka-ci/config.json';
const JSON_TOKENS = [
  '{',
  '}',
  '[',
  ']',
  '"',
  ':',
  ',',
  '\\',
  '\\u12',
  'null',
  '1e999',
  '-0',
  '\uFEFF',
  '"jobs"',
  '"file"',
];

/**
 * A hostile checkout: files and a directory to point at, and links that lead out of it, above it, round in a
 * circle, or back inside.
 */
let root: string;
beforeAll(async () => {
  root = await makeTree({
    'default.nix': '{}',
    'ci/jobs.nix': '{}',
    'pkgs/default.nix': '{}',
    'empty-dir/.keep': '',
    out: { link: '/etc' },
    up: { link: '../..' },
    loop: { link: 'loop' },
    inside: { link: 'ci/jobs.nix' },
    'ci/back': { link: '../default.nix' },
    [SOURCE]: '{}',
  });
});
afterAll(() => temp.removeAll());

const FILES = ['default.nix', '/ci/jobs.nix', 'pkgs', './pkgs/', 'inside', 'ci/back', 'ci/../default.nix'];
const SEGMENTS = [
  '..',
  '.',
  '',
  'ci',
  'pkgs',
  'out',
  'up',
  'loop',
  'inside',
  'back',
  'default.nix',
  'empty-dir',
  'passwd',
];
const path = fc.oneof(
  fc.constantFrom(...FILES, 'out/passwd', 'up', 'loop', '../x', 'missing.nix', 'default.nix/x', 'a\0b', 'empty-dir'),
  fc.array(fc.constantFrom(...SEGMENTS), { minLength: 1, maxLength: 6 }).map((s) => s.join('/')),
  fc.string({ minLength: 1 }),
  fc.nat(300).map((n) => `${'a/'.repeat(n)}x`),
);
const name = fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._-]{0,12}$/);
const opt = { requiredKeys: [] as never[] };
const common = {
  allow_eval_failures: fc.boolean(),
  caches: fc.array(fc.string({ minLength: 1, maxLength: 8 }), { maxLength: 2 }),
  size_check: fc.record(
    { max_increase_percent: fc.nat(100), base_branch: fc.constantFrom('main', 'release') },
    { requiredKeys: ['max_increase_percent'] },
  ),
  systems: fc.array(fc.constantFrom('x86_64-linux', 'aarch64-darwin'), { minLength: 1, maxLength: 2 }),
};
const job = (file: fc.Arbitrary<string>) =>
  fc.oneof(
    fc.record(
      { file, attr_path: fc.stringMatching(/^[a-z]{1,5}(\.[a-z]{1,5}){0,2}$/), ...common },
      { requiredKeys: ['file'] },
    ),
    fc.record(
      { flake: fc.record({ outputs: fc.subarray([...FLAKE_OUTPUTS], { minLength: 1 }) }), ...common },
      { requiredKeys: ['flake'] },
    ),
  );
const check = (bind: fc.Arbitrary<string>) =>
  fc.record(
    {
      command: fc.string({ minLength: 1, maxLength: 20 }),
      allow_network: fc.boolean(),
      ro_bind: fc.array(bind, { maxLength: 3 }),
      timeout_seconds: fc.integer({ min: 1, max: 3_600 }),
    },
    { requiredKeys: ['command', 'ro_bind'] },
  );
const configWith = (file: fc.Arbitrary<string>) =>
  fc.record(
    { jobs: fc.dictionary(name, job(file), { maxKeys: 3 }), checks: fc.dictionary(name, check(file), { maxKeys: 2 }) },
    opt,
  );

/** A value no one meant: wrong types, numbers at every edge, strings that look like paths, deep nesting. */
const hostile: fc.Arbitrary<unknown> = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom(-1, 0, 1e300, -1e300, '', '..', '/', '\0', '__proto__', 'constructor'),
  path,
  fc.nat(5_000).map((depth) => nest(depth, (inner) => [inner])),
  fc.nat(5_000).map((depth) => nest(depth, (inner) => ({ jobs: inner }))),
);

const inside = (p: string): boolean => p === root || p.startsWith(root + sep);
// Check binds stay relative (an agent has its own checkout): no leading slash, no `..`, and inside once joined.
const relativeInside = (p: string): boolean =>
  !p.startsWith('/') && !p.split('/').includes('..') && inside(realpathSync(join(root, p)));

/** What the rest of the coordinator relies on: each problem names the file, each path is real and inside. */
function expectSound(result: RepoConfig | undefined | Error): void {
  if (result instanceof Error) {
    for (const line of result.message.split('\n')) expect(line.startsWith(`${SOURCE}: `)).toBe(true);
    return;
  }
  for (const j of result?.jobs ?? []) if (j.kind === 'file') expect(inside(j.file)).toBe(true);
  for (const c of result?.checks ?? []) for (const p of c.roBind) expect(relativeInside(p)).toBe(true);
}

async function load(text: string): Promise<RepoConfig | undefined | Error> {
  await writeFile(join(root, SOURCE), text);
  return resolvesOrFailsWith(RepoConfigError, () => loadRepoConfig(root));
}

describe('repository configuration from any .eka-ci/config.json', () => {
  it('compiles every configuration naming files in the checkout to their real paths', async () => {
    await fc.assert(
      fc.asyncProperty(configWith(fc.constantFrom(...FILES)), async (c) => {
        const o = await load(JSON.stringify(c, null, 2));
        if (o === undefined || o instanceof Error) throw o ?? new Error('no configuration');
        expect(o.jobs.map((j) => j.name)).toEqual(Object.keys(c.jobs ?? {}));
        for (const j of o.jobs) {
          if (j.kind === 'file') expect(relative(root, j.file)).toBe(j.relativeFile);
          if (j.kind === 'file') expect(['default.nix', 'ci/jobs.nix', 'pkgs/default.nix']).toContain(j.relativeFile);
        }
        expect(o.checks.flatMap((k) => k.roBind).every(relativeInside)).toBe(true);
      }),
      { numRuns: RUNS },
    );
  });

  it('keeps every path inside the checkout, or names the file and the problem, whatever the paths say', async () => {
    await fc.assert(
      fc.asyncProperty(configWith(path), async (c) => {
        expectSound(await load(JSON.stringify(c)));
      }),
      {
        numRuns: RUNS,
        examples: [
          [
            {
              jobs: { etc: { file: 'out/passwd' }, above: { file: 'up/etc/passwd' }, circle: { file: 'loop' } },
              checks: { binds: { command: 'true', ro_bind: ['..', 'up', 'out', 'ci/../..', '/../..'] } },
            },
          ],
        ],
      },
    );
  });

  it('compiles any value anywhere or refuses it with RepoConfigError, never another exception', async () => {
    await fc.assert(
      fc.asyncProperty(configWith(fc.constantFrom(...FILES)), fc.nat(), hostile, async (c, pick, value) => {
        const all = places(c, ['unknown', '__proto__']);
        const raw = replaced(c, all[pick % all.length]!, value);
        expectSound(await resolvesOrFailsWith(RepoConfigError, () => compileRepoConfig(raw, SOURCE, root)));
      }),
      { numRuns: RUNS * 2 },
    );
  });

  it('compiles any damaged text or refuses it with RepoConfigError, placing a syntax error by line and column', async () => {
    await fc.assert(
      fc.asyncProperty(configWith(fc.constantFrom(...FILES)), mutations(JSON_TOKENS), async (c, ms) => {
        const text = mutateText(JSON.stringify(c, null, 2), ms);
        const result = await load(text);
        expectSound(result);
        if (result instanceof Error && /invalid JSON/.test(result.message)) {
          expect(result.message).toMatch(/invalid JSON at line \d+, column \d+ \(position \d+\): /);
        }
      }),
      {
        numRuns: RUNS,
        examples: [
          [{}, [{ kind: 'insert', at: 0, junk: `${'['.repeat(100_000)}` }]],
          [{}, [{ kind: 'insert', at: 0, junk: `{"jobs":${'{"a":'.repeat(100_000)}1${'}'.repeat(100_000)}}` }]],
          // Found by a run: a backslash put before the `n` of a bind path made it `default.<newline>ix`, and the
          // problem quoting it broke onto a second line without the file's name.
          [
            { checks: { a: { command: 'true', ro_bind: ['default.nix'] } } },
            [
              {
                kind: 'insert',
                at: JSON.stringify({ checks: { a: { command: 'true', ro_bind: ['default.nix'] } } }, null, 2).indexOf(
                  'nix"',
                ),
                junk: '\\',
              },
            ],
          ],
        ],
      },
    );
  });
});

describe('jsonErrorPosition on any text', () => {
  it('finds a position inside the text exactly when JSON.parse refuses it', () => {
    const text = fc.oneof(
      fc.string({ unit: 'binary' }),
      fc.jsonValue().map((v) => JSON.stringify(v, null, 1)),
      // Token soup: mostly almost-JSON, which is where a scanner and JSON.parse could disagree.
      fc
        .array(fc.constantFrom('{', '}', '[', ']', ',', ':', '"a"', '"\\u00e9"', '1', '-2.5e3', 'true', ' ', '\n'), {
          maxLength: 12,
        })
        .map((t) => t.join('')),
      fc
        .tuple(
          fc.jsonValue().map((v) => JSON.stringify(v)),
          mutations(JSON_TOKENS),
        )
        .map(([t, ms]) => mutateText(t, ms)),
    );
    fc.assert(
      fc.property(text, (t) => {
        let valid = true;
        try {
          JSON.parse(t);
        } catch {
          valid = false;
        }
        const at = jsonErrorPosition(t);
        if (valid) expect(at).toBeUndefined();
        else {
          expect(at).toBeDefined();
          expect(at!.offset).toBeLessThanOrEqual(t.length);
        }
      }),
      { numRuns: RUNS * 5 },
    );
  });
});
