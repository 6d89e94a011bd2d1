import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { mutateText, mutations } from '../../test/support/fuzz.js';
import { type PrCommand, isAttrPath, parseCommands } from './commands.js';
import { attrsFromCommitTitles } from './ofborg-titles.js';

/** Comment bodies and commit titles come from anyone who can open a pull request: these parsers never fail. */

const RUNS = 300;
const attr = fc.stringMatching(/^[A-Za-z0-9_'-]{1,8}(\.[A-Za-z0-9_'-]{1,8}){0,2}$/);
const sha = fc.stringMatching(/^[0-9a-fA-F]{7,40}$/);
const space = fc.constantFrom(' ', '  ', '\t');
const bot = fc.constantFrom('@eka-ci', '@EKA-CI', '@Eka-Ci:', '@eka-ci,');

type Written = { line: string; expected: Omit<PrCommand, 'line'> };
const command: fc.Arbitrary<Written> = fc.oneof(
  // Repeats are allowed in what is written, and built once.
  fc
    .tuple(
      bot,
      space,
      fc.array(fc.constantFrom('hello', 'x.y'), { maxLength: 2 }),
      fc.array(attr, { minLength: 1, maxLength: 3 }),
    )
    .map(([b, s, again, attrs]) => ({
      line: `${b}${s}build ${[...attrs, ...again, ...attrs].join(' ')}`,
      expected: { kind: 'build' as const, attrs: [...new Set([...attrs, ...again])] },
    })),
  bot.map((b) => ({ line: `${b} rebuild`, expected: { kind: 'rebuild' as const } })),
  fc.tuple(bot, fc.constantFrom('merge', 'squash', 'rebase')).map(([b, m]) => ({
    line: `${b} merge ${m}`,
    expected: { kind: 'merge' as const, method: m },
  })),
  bot.map((b) => ({ line: `${b} merge cancel`, expected: { kind: 'merge-cancel' as const } })),
  fc
    .tuple(bot, sha)
    .map(([b, s]) => ({ line: `${b} approve ${s}`, expected: { kind: 'approve' as const, sha: s.toLowerCase() } })),
);
const prose = fc.string({ maxLength: 40 }).map((s) => s.replace(/[\r\n]/g, ' ').replace(/^\s*[@>`~]/, 'x'));
const newline = fc.constantFrom('\n', '\r\n', '\r');

/** What every parsed command must be, whatever the comment said. */
function expectWellFormed(body: string, commands: PrCommand[]): void {
  const lines = body.split(/\r\n|\r|\n/).map((l) => l.trim());
  for (const c of commands) {
    expect(lines).toContain(c.line);
    if (c.kind === 'build') {
      expect(c.attrs.length).toBeGreaterThan(0);
      expect(c.attrs.every(isAttrPath)).toBe(true);
      expect(new Set(c.attrs).size).toBe(c.attrs.length);
    }
    if (c.kind === 'approve' && c.sha !== undefined) expect(c.sha).toMatch(/^[0-9a-f]{7,40}$/);
    if (c.kind === 'invalid') expect(c.reason).not.toBe('');
  }
}

describe('parseCommands on any comment', () => {
  it('reads every command written among prose, in order', () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(command, prose), { maxLength: 6 }), newline, (parts, nl) => {
        const body = parts.map((p) => (typeof p === 'string' ? p : p.line)).join(nl);
        const written = parts.filter((p): p is Written => typeof p !== 'string');
        expect(parseCommands(body).map(({ line: _line, ...rest }) => rest)).toEqual(written.map((w) => w.expected));
      }),
      { numRuns: RUNS },
    );
  });

  it('never runs a command quoted or inside a code fence', () => {
    const fence = fc.constantFrom('```', '~~~', '````', '  ```nix');
    fc.assert(
      fc.property(fc.array(command, { minLength: 1, maxLength: 4 }), fence, newline, (cs, f, nl) => {
        const lines = cs.map((c) => c.line);
        expect(parseCommands([f, ...lines].join(nl))).toEqual([]);
        expect(parseCommands(lines.map((l) => `> ${l}`).join(nl))).toEqual([]);
      }),
      { numRuns: RUNS },
    );
  });

  it('parses any text, however damaged, into well-formed commands without throwing', () => {
    const body = fc.oneof(
      fc.string({ unit: 'binary', maxLength: 200 }),
      fc
        .tuple(fc.array(command, { maxLength: 4 }), mutations(['@eka-ci ', 'build ', '```', '>', '\n', '.', ' ']))
        .map(([cs, ms]) => mutateText(cs.map((c) => c.line).join('\n'), ms)),
    );
    fc.assert(
      fc.property(body, (b) => expectWellFormed(b, parseCommands(b))),
      { numRuns: RUNS },
    );
  });
});

describe('attrsFromCommitTitles on any titles', () => {
  it('names the packages of every OfBorg-style title', () => {
    const pkg = attr.filter((a) => !/^(treewide|docs?|ci|release-notes|maintainers|lib)(\.|$)/i.test(a));
    fc.assert(
      fc.property(fc.uniqueArray(pkg, { minLength: 1, maxLength: 3 }), prose, (names, message) => {
        expect(attrsFromCommitTitles([`${names.join(', ')}: ${message}`])).toEqual(names);
      }),
      { numRuns: RUNS },
    );
  });

  it('returns only attribute paths, whatever the titles say', () => {
    fc.assert(
      fc.property(fc.array(fc.string({ unit: 'binary', maxLength: 60 }), { maxLength: 5 }), (titles) => {
        expect(attrsFromCommitTitles(titles).every(isAttrPath)).toBe(true);
      }),
      { numRuns: RUNS },
    );
  });
});
