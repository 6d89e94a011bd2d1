import { describe, expect, it } from 'vitest';
import { NON_PACKAGE_PREFIXES, attrsFromCommitTitles } from './ofborg-titles.js';

describe('attrsFromCommitTitles', () => {
  it('reads the attribute before the colon of update and init titles', () => {
    expect(attrsFromCommitTitles(['hello: 1.0 -> 2.0'])).toEqual(['hello']);
    expect(attrsFromCommitTitles(['python3Packages.requests: 2.31.0 -> 2.32.0'])).toEqual(['python3Packages.requests']);
    expect(attrsFromCommitTitles(['hello: init at 1.0'])).toEqual(['hello']);
  });

  it('splits comma-separated names, with or without spaces', () => {
    expect(attrsFromCommitTitles(['foo, bar: fix build'])).toEqual(['foo', 'bar']);
    expect(attrsFromCommitTitles(['hello,world: drop patches'])).toEqual(['hello', 'world']);
  });

  it('deduplicates across titles, keeping first appearance order', () => {
    expect(attrsFromCommitTitles(['b: 1 -> 2', 'a, b: fix', 'c: init at 1', 'a: 2 -> 3'])).toEqual(['b', 'a', 'c']);
  });

  it('yields nothing for titles that name an area of the repository', () => {
    const titles = NON_PACKAGE_PREFIXES.map((p) => `${p}: tidy up`);
    expect(attrsFromCommitTitles(titles)).toEqual([]);
    expect(attrsFromCommitTitles(['Treewide: fix typos', 'lib.strings: add helper', 'DOC: typo'])).toEqual([]);
  });

  it('keeps the packages of a list that also names a non-package area', () => {
    expect(attrsFromCommitTitles(['hello, treewide: something odd'])).toEqual(['hello']);
  });

  it('does not mistake a package that merely starts like an area for that area', () => {
    expect(attrsFromCommitTitles(['libfoo: 1 -> 2', 'docbook: 4 -> 5', 'ci-tool: init at 1'])).toEqual([
      'libfoo',
      'docbook',
      'ci-tool',
    ]);
  });

  it('yields nothing when any name before the colon is not an attribute path', () => {
    expect(
      attrsFromCommitTitles([
        'nixos/foo: add option',
        'Revert "hello: 1.0 -> 2.0"',
        'Merge pull request #1 from a/b',
        'fix the build of hello: it needs gcc',
        'feat(ui): nothing',
        'foo, nixos/bar: both',
        'foo,: trailing comma',
        ': nothing before the colon',
      ]),
    ).toEqual([]);
  });

  it('yields nothing for a title without a colon', () => {
    expect(attrsFromCommitTitles(['Update hello to 2.0', ''])).toEqual([]);
  });

  it('reads only the first line of a whole commit message', () => {
    expect(attrsFromCommitTitles(['hello: 1 -> 2\n\nalso touches world: see below'])).toEqual(['hello']);
    expect(attrsFromCommitTitles(['Bump things\r\nhello: 1 -> 2'])).toEqual([]);
  });

  it('uses the text before the first colon only', () => {
    expect(attrsFromCommitTitles(['hello: fix: regression in 2.0'])).toEqual(['hello']);
  });
});
