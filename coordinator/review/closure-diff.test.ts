import { describe, expect, it } from 'vitest';
import { diffClosures, runtimeClosure, splitDrvName, splitStorePathName } from './closure-diff.js';

/** A store path whose hash is derived from `seed`, so the same name can be "rebuilt" with a different hash. */
function storePath(name: string, seed = 'a'): string {
  return `/nix/store/${seed.repeat(32).slice(0, 32)}-${name}`;
}

describe('splitDrvName', () => {
  it.each([
    ['hello-2.12.1', 'hello', '2.12.1'],
    ['perl5.38.2-URI-5.21', 'perl5.38.2-URI', '5.21'],
    ['gcc-wrapper-13.2.0', 'gcc-wrapper', '13.2.0'],
    ['python3.11-requests-2.31.0', 'python3.11-requests', '2.31.0'],
    ['zlib-1.3.1', 'zlib', '1.3.1'],
    ['python3-3.11.8', 'python3', '3.11.8'],
    ['glibc-2.38-27', 'glibc', '2.38-27'],
    ['source', 'source', ''],
    ['stdenv-linux', 'stdenv-linux', ''],
    ['trailing-', 'trailing-', ''],
  ])('splits %s into %s and version %s', (drvName, name, version) => {
    expect(splitDrvName(drvName)).toEqual({ name, version });
  });
});

describe('splitStorePathName', () => {
  it.each([
    ['hello-2.12.1', 'hello', '2.12.1'],
    ['openssl-3.0.13-bin', 'openssl', '3.0.13'],
    ['nix-2.18.1-man', 'nix', '2.18.1'],
    ['libxml2-2.12.5-dev', 'libxml2', '2.12.5'],
    ['glibc-2.38-27-bin', 'glibc', '2.38-27'],
    ['util-linux-minimal-2.39.3-lib', 'util-linux-minimal', '2.39.3'],
    ['perl5.38.2-URI-5.21', 'perl5.38.2-URI', '5.21'],
    ['source', 'source', ''],
    ['gobject-introspection-wrapped-lib', 'gobject-introspection-wrapped-lib', ''],
    ['foo-unstable-2024-01-01', 'foo-unstable', '2024-01-01'],
  ])('reads %s as package %s at version %s', (pathName, name, version) => {
    expect(splitStorePathName(pathName)).toEqual({ name, version });
  });
});

describe('diffClosures', () => {
  it('is empty for identical closures', () => {
    const closure = [storePath('hello-2.12.1'), storePath('glibc-2.38-27')];
    expect(diffClosures(closure, closure)).toEqual([]);
  });

  it('ignores a dependency rebuilt at the same version', () => {
    expect(diffClosures([storePath('zlib-1.3.1', 'a')], [storePath('zlib-1.3.1', 'b')])).toEqual([]);
  });

  it('reports a dependency only head has as added and one only base has as removed', () => {
    const base = [storePath('hello-2.12.1'), storePath('libidn2-2.3.7')];
    const head = [storePath('hello-2.12.1'), storePath('source', 'b')];
    expect(diffClosures(base, head)).toEqual([
      { name: 'libidn2', base: ['2.3.7'], head: [], kind: 'removed' },
      { name: 'source', base: [], head: [''], kind: 'added' },
    ]);
  });

  it('reports a version change, folding outputs of one package together', () => {
    const base = [storePath('openssl-3.0.13'), storePath('openssl-3.0.13-bin'), storePath('openssl-3.0.13-dev')];
    const head = [storePath('openssl-3.0.14', 'b'), storePath('openssl-3.0.14-bin', 'b')];
    expect(diffClosures(base, head)).toEqual([
      { name: 'openssl', base: ['3.0.13'], head: ['3.0.14'], kind: 'changed' },
    ]);
  });

  it('reports a package whose set of versions changed, listing every version on each side in version order', () => {
    const base = [storePath('python3-3.9.18'), storePath('python3-3.11.8')];
    const head = [storePath('python3-3.11.8'), storePath('python3-3.10.2', 'b'), storePath('python3-3.9.18')];
    expect(diffClosures(base, head)).toEqual([
      { name: 'python3', base: ['3.9.18', '3.11.8'], head: ['3.9.18', '3.10.2', '3.11.8'], kind: 'changed' },
    ]);
  });

  it('sorts changes by package name', () => {
    const base = [storePath('zlib-1.3'), storePath('bash-5.2p26')];
    const head = [storePath('zlib-1.3.1'), storePath('bash-5.2p32'), storePath('curl-8.6.0')];
    expect(diffClosures(base, head).map((c) => c.name)).toEqual(['bash', 'curl', 'zlib']);
  });

  it('refuses something that is not a store path', () => {
    expect(() => diffClosures(['/usr/lib/libc.so'], [])).toThrow(RangeError);
  });
});

describe('runtimeClosure', () => {
  //   app → lib → libc
  //   app → tool → lib    (a diamond)
  //   libc → libc         (Nix records self-references)
  //   cycle-a ↔ cycle-b   (cannot happen in a store, must not hang)
  const graph: Record<string, string[]> = {
    app: ['lib', 'tool'],
    tool: ['lib'],
    lib: ['libc'],
    libc: ['libc'],
    'cycle-a': ['cycle-b'],
    'cycle-b': ['cycle-a'],
    unrelated: ['libc'],
  };
  const references = (path: string): string[] => graph[path] ?? [];

  it('follows references transitively and lists each path once, sorted', async () => {
    await expect(runtimeClosure(['app'], references)).resolves.toEqual(['app', 'lib', 'libc', 'tool']);
  });

  it('includes the starting paths themselves, even without references', async () => {
    await expect(runtimeClosure(['leaf', 'libc'], references)).resolves.toEqual(['leaf', 'libc']);
  });

  it('terminates on a reference cycle', async () => {
    await expect(runtimeClosure(['cycle-a'], references)).resolves.toEqual(['cycle-a', 'cycle-b']);
  });

  it('accepts an asynchronous lookup and asks about each path once', async () => {
    const asked: string[] = [];
    const closure = await runtimeClosure(['app', 'tool'], async (path) => {
      asked.push(path);
      await new Promise((resolve) => setImmediate(resolve));
      return references(path);
    });
    expect(closure).toEqual(['app', 'lib', 'libc', 'tool']);
    expect(asked.sort()).toEqual(['app', 'lib', 'libc', 'tool']);
  });

  it('is empty for no paths', async () => {
    await expect(runtimeClosure([], references)).resolves.toEqual([]);
  });

  it('handles a closure far deeper than the call stack', async () => {
    const depth = 100_000;
    const chain = (path: string): string[] => {
      const i = Number(path);
      return i < depth ? [String(i + 1)] : [];
    };
    await expect(runtimeClosure(['0'], chain)).resolves.toHaveLength(depth + 1);
  });
});
