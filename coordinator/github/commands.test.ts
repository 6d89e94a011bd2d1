import { describe, expect, it } from 'vitest';
import { type PrCommand, isAttrPath, parseCommands } from './commands.js';

/** The commands without their `line`, for comparing what was understood. */
function kinds(body: string, botName?: string): Omit<PrCommand, 'line'>[] {
  return parseCommands(body, botName).map(({ line: _line, ...rest }) => rest);
}

describe('parseCommands', () => {
  it('reads every verb with its arguments', () => {
    expect(kinds('@eka-ci build hello python3Packages.requests')).toEqual([
      { kind: 'build', attrs: ['hello', 'python3Packages.requests'] },
    ]);
    expect(kinds('@eka-ci rebuild')).toEqual([{ kind: 'rebuild' }]);
    expect(kinds('@eka-ci merge')).toEqual([{ kind: 'merge', method: 'merge' }]);
    expect(kinds('@eka-ci merge squash')).toEqual([{ kind: 'merge', method: 'squash' }]);
    expect(kinds('@eka-ci merge rebase')).toEqual([{ kind: 'merge', method: 'rebase' }]);
    expect(kinds('@eka-ci merge cancel')).toEqual([{ kind: 'merge-cancel' }]);
    expect(kinds('@eka-ci approve')).toEqual([{ kind: 'approve' }]);
    expect(parseCommands('@eka-ci approve ABCDEF1')).toEqual([
      { kind: 'approve', line: '@eka-ci approve ABCDEF1', sha: 'abcdef1' },
    ]);
  });

  it('keeps the command line as written, trimmed, so a reply can quote it', () => {
    expect(parseCommands('  @Eka-CI   build  hello  \r\n')).toEqual([
      { kind: 'build', line: '@Eka-CI   build  hello', attrs: ['hello'] },
    ]);
  });

  it('matches the mention and verbs case-insensitively but keeps attribute names as written', () => {
    expect(kinds('@EKA-CI BUILD Hello pythonPackages.Foo')).toEqual([
      { kind: 'build', attrs: ['Hello', 'pythonPackages.Foo'] },
    ]);
    expect(kinds('@eka-ci Merge SQUASH')).toEqual([{ kind: 'merge', method: 'squash' }]);
  });

  it('returns all command lines of a comment in order, skipping prose', () => {
    const body = [
      'Thanks, looks good.',
      '@eka-ci build hello',
      'and then',
      '\t@eka-ci merge squash',
      '@eka-ci approve',
    ].join('\n');
    expect(kinds(body)).toEqual([
      { kind: 'build', attrs: ['hello'] },
      { kind: 'merge', method: 'squash' },
      { kind: 'approve' },
    ]);
  });

  it('ignores a mention that does not start its line', () => {
    expect(parseCommands('thanks @eka-ci build hello')).toEqual([]);
    expect(parseCommands('cc @eka-ci')).toEqual([]);
  });

  it('does not take a longer login for the bot', () => {
    expect(parseCommands('@eka-ci-bot build hello\n@eka-cinema merge\n@eka-ci_x approve')).toEqual([]);
  });

  it('accepts a colon or comma right after the mention', () => {
    expect(kinds('@eka-ci: build hello\n@eka-ci, rebuild')).toEqual([
      { kind: 'build', attrs: ['hello'] },
      { kind: 'rebuild' },
    ]);
  });

  it('uses the configured bot name, with or without a leading @', () => {
    expect(kinds('@my.bot build hello\n@eka-ci rebuild', 'my.bot')).toEqual([{ kind: 'build', attrs: ['hello'] }]);
    expect(kinds('@my.bot approve', '@my.bot')).toEqual([{ kind: 'approve' }]);
    expect(parseCommands('@myXbot approve', 'my.bot'), 'the dot is not a wildcard').toEqual([]);
  });

  it('ignores commands inside fenced code blocks, with backticks or tildes', () => {
    const body = [
      'To build, write:',
      '```',
      '@eka-ci build hello',
      '```',
      '~~~~',
      '@eka-ci merge',
      '```',
      '@eka-ci approve',
      '~~~~',
      '@eka-ci rebuild',
    ].join('\n');
    expect(kinds(body)).toEqual([{ kind: 'rebuild' }]);
  });

  it('ends a fence only at a bare fence at least as long as the opening one', () => {
    const body = [
      '````text',
      '```',
      '@eka-ci build a',
      '```` not a close',
      '@eka-ci build b',
      '````',
      '@eka-ci build c',
    ];
    expect(kinds(body.join('\n'))).toEqual([{ kind: 'build', attrs: ['c'] }]);
  });

  it('treats the rest of the comment as code when a fence is never closed', () => {
    expect(kinds('@eka-ci build a\n```nix\n@eka-ci build b\n')).toEqual([{ kind: 'build', attrs: ['a'] }]);
  });

  it('ignores commands in quoted lines, so quoting a comment does not run it again', () => {
    const body = ['> @eka-ci merge', '>@eka-ci approve', '  > > @eka-ci build x', '', '@eka-ci build hello'].join('\n');
    expect(kinds(body)).toEqual([{ kind: 'build', attrs: ['hello'] }]);
  });

  it('removes repeated attributes from a build', () => {
    expect(kinds('@eka-ci build a b a')).toEqual([{ kind: 'build', attrs: ['a', 'b'] }]);
  });

  it('answers an unknown verb or a bare mention with the commands there are', () => {
    const [unknown, bare] = parseCommands('@eka-ci deploy hello\n@eka-ci');
    expect(unknown).toMatchObject({ kind: 'invalid', line: '@eka-ci deploy hello' });
    expect(bare).toMatchObject({ kind: 'invalid', line: '@eka-ci' });
    const reason = (c: PrCommand | undefined): string => (c?.kind === 'invalid' ? c.reason : '');
    expect(reason(unknown)).toMatch(/^unknown command `deploy`; commands are `build <attr>…`, .*`merge cancel`/);
    expect(reason(bare)).toMatch(/^no command given; commands are/);
    // The verb is the commenter's: shown as written, in a code span a backtick in it cannot end.
    expect(reason(parseCommands('@eka-ci de`**ploy**`')[0])).toMatch(/^unknown command `` de`\*\*ploy\*\*` ``; /);
  });

  it('rejects bad arguments with a reason naming them', () => {
    const reasons = parseCommands(
      [
        '@eka-ci build',
        '@eka-ci build hello foo..bar .x y. nixos/tests a;b',
        '@eka-ci build `x`',
        '@eka-ci rebuild hello',
        '@eka-ci approve now',
        '@eka-ci merge fast-forward',
        '@eka-ci merge squash now',
      ].join('\n'),
    ).map((c) => (c.kind === 'invalid' ? c.reason : c.kind));
    expect(reasons).toEqual([
      '`build` needs at least one attribute, e.g. `build hello`',
      'not attribute paths: `foo..bar`, `.x`, `y.`, `nixos/tests`, `a;b`',
      'not an attribute path: `` `x` ``',
      '`rebuild` takes no arguments: it rebuilds what failed; use `build <attr>`',
      '`approve` takes at most one argument: the commit to approve (7 to 40 hex digits)',
      'unknown merge method `fast-forward`; use merge, squash or rebase',
      '`merge` takes at most one argument: merge, squash, rebase or cancel',
    ]);
  });

  it('finds nothing in a comment without commands', () => {
    expect(parseCommands('')).toEqual([]);
    expect(parseCommands('LGTM!\n\n- [x] tested')).toEqual([]);
  });
});

describe('isAttrPath', () => {
  it('accepts dotted paths of letters, digits, _, - and quote', () => {
    for (const p of ['hello', 'python3Packages.requests', 'gnome-shell', "foo'", '_0x0', 'a.b.c', '3proxy']) {
      expect(isAttrPath(p), p).toBe(true);
    }
  });

  it('rejects empty components and any other character', () => {
    for (const p of ['', '.', 'a.', '.a', 'a..b', 'a b', 'a/b', 'a"b', 'a${b}', 'a;b', 'é']) {
      expect(isAttrPath(p), p).toBe(false);
    }
  });
});
