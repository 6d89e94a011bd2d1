import { describe, expect, it } from 'vitest';
import { GitUrlError } from './errors.js';
import { redact } from './git-process.js';
import { parseRepoUrl } from './repo-url.js';
import { parseRevision } from './revision.js';

describe('parseRepoUrl', () => {
  it('gives every spelling of one local repository the same mirror and fetches it by absolute path', () => {
    const spellings = ['/srv/git/nixpkgs', '/srv/git/nixpkgs/', 'file:///srv/git/nixpkgs', '/srv/git/./nixpkgs'];

    const locations = spellings.map(parseRepoUrl);

    expect(new Set(locations.map((l) => l.mirrorName)).size).toBe(1);
    expect(locations[0]).toEqual({
      fetchUrl: '/srv/git/nixpkgs',
      display: '/srv/git/nixpkgs',
      mirrorName: expect.stringMatching(/^srv-git-nixpkgs-[0-9a-f]{16}\.git$/) as unknown,
      hidden: [],
    });
  });

  it('normalises the scheme, host, default port and trailing slash of http(s) URLs', () => {
    const a = parseRepoUrl('HTTPS://GitHub.com:443/NixOS/nixpkgs/');
    const b = parseRepoUrl('https://github.com/NixOS/nixpkgs');

    expect(a).toEqual(b);
    expect(b.fetchUrl).toBe('https://github.com/NixOS/nixpkgs');
    expect(b.mirrorName).toMatch(/^github\.com-NixOS-nixpkgs-[0-9a-f]{16}\.git$/);
  });

  it('keeps different repositories apart even when their readable slugs are equal', () => {
    expect(parseRepoUrl('https://example.com/a-b').mirrorName).not.toBe(
      parseRepoUrl('https://example.com/a/b').mirrorName,
    );
  });

  it('refuses credentials inside a URL and masks them in the message', () => {
    const attempt = () => parseRepoUrl('https://x-access-token:ghs_secret@github.com/owner/repo');

    expect(attempt).toThrow(GitUrlError);
    expect(attempt).toThrow('https://***@github.com/owner/repo contains credentials');
  });

  it('hides query strings, which may carry tokens, from what it prints', () => {
    expect(parseRepoUrl('https://example.com/repo?token=abc')).toMatchObject({
      fetchUrl: 'https://example.com/repo?token=abc',
      display: 'https://example.com/repo?…',
      hidden: ['?token=abc'],
    });
  });

  it('refuses transports other than local paths, file:// and http(s)://', () => {
    for (const url of ['ssh://git@github.com/owner/repo', 'git@github.com:owner/repo.git', 'git://example.com/r']) {
      expect(() => parseRepoUrl(url)).toThrow('use a local path, a file:// URL or an http(s):// URL');
    }
  });
});

describe('parseRevision', () => {
  it('keeps each kind of revision in its own local ref subtree', () => {
    const sha = 'AB'.repeat(20);

    expect(parseRevision(sha)).toMatchObject({ kind: 'commit', sha: sha.toLowerCase() });
    expect(parseRevision('refs/pull/1/head')).toMatchObject({ kind: 'ref', localRef: 'refs/ekaci/refs/pull/1/head' });
    expect(parseRevision('main')).toMatchObject({ kind: 'ref', localRef: 'refs/ekaci/short/main' });
  });

  it('explains why a string is not a ref name', () => {
    expect(parseRevision('-main')).toBe("it starts with '-'");
    expect(parseRevision('refs/heads/x.lock')).toBe("a component ends with '.lock'");
    expect(parseRevision('main@{1}')).toBe("it contains '@{'");
    expect(parseRevision('a\tb')).toMatch(/control character/);
  });
});

describe('redact', () => {
  it('removes the password and the Basic header made from it', () => {
    const auth = { username: 'u', password: 'p4ss' };
    const header = Buffer.from('u:p4ss').toString('base64');

    expect(redact(`Authorization: Basic ${header} and p4ss`, auth)).toBe('Authorization: Basic *** and ***');
  });
});
