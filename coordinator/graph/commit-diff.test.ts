import { execFileSync } from 'node:child_process';
import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { addDerivationStore } from '../../common/nix/derivation.js';
import { nonce, tempDir } from '../../test/support/nix-project.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import { diffCommits, readAheadClosure } from './commit-diff.js';

// A store of its own, as the coordinator's evaluation store is: the diff reads .drv files from it.
const root = tempDir('ekaci-commit-diff-');
afterAll(addDerivationStore(root));

/** `lib` at `version` and `app` built on it, instantiated into the store: drv paths by attribute. */
function instantiate(tag: string, version: string): Record<string, string> {
  const expr = `let lib = derivation { name = "lib-${tag}-${version}"; system = "x86_64-linux"; builder = "/bin/sh"; };
    in { inherit lib; app = derivation { name = "app-${tag}"; system = "x86_64-linux"; builder = "/bin/sh"; inherit lib; }; }`;
  const out = execFileSync(
    'nix-instantiate',
    ['--option', 'substituters', '', '--store', `local?root=${root}`, '--expr', expr, '-A', 'lib', '-A', 'app'],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] },
  );
  const [lib, app] = out.trim().split('\n');
  return { lib: lib!, app: app! };
}

function commit(sha: string, drvs: Record<string, string>): CommitEvaluation {
  const attrs = Object.entries(drvs).map(([attr, drvPath]) => ({ attr, drvPath, system: 'x86_64-linux', outputs: {} }));
  return {
    commit: sha,
    jobs: [{ name: 'j', allowEvalFailures: false, maxIncreasePercent: undefined, attrs, seconds: 0 }],
  };
}

describe('diffCommits', () => {
  it('reads a .drv file once per process: the diff of a later commit reads only the derivations it changed', async () => {
    const tag = nonce();
    const [v1, v2, v3] = [instantiate(tag, '1'), instantiate(tag, '2'), instantiate(tag, '3')];
    const first = await diffCommits(commit('a', v1), commit('b', v2));
    const summary = (d: typeof first) => d[0]!.attrs.map((a) => [a.attr, a.change, a.blastRadius]);
    expect(summary(first)).toEqual([
      ['app', 'changed', 0],
      ['lib', 'changed', 1],
    ]);
    // The files read are not read again: garbled now, they would fail a read (their text no longer matches their path).
    for (const p of [...Object.values(v1), ...Object.values(v2)]) {
      chmodSync(join(root, p), 0o644);
      writeFileSync(join(root, p), 'Derive(garbled)');
    }
    expect(summary(await diffCommits(commit('a', v1), commit('b', v2)))).toEqual(summary(first));
    // A new commit's derivations are read from their files…
    expect(summary(await diffCommits(commit('b', v2), commit('c', v3)))).toEqual(summary(first));
    // …which are checked: a garbled one never read before is an error.
    const v4 = instantiate(tag, '4');
    chmodSync(join(root, v4.lib!), 0o644);
    writeFileSync(join(root, v4.lib!), 'Derive(garbled)');
    await expect(diffCommits(commit('c', v3), commit('d', v4))).rejects.toThrow(/lib-/);
  });

  it("reads a base's closure ahead, so that the diff reads only the head's; an unreadable file is left to the diff", async () => {
    const tag = nonce();
    const [base, head] = [instantiate(tag, '1'), instantiate(tag, '2')];
    await readAheadClosure(commit('a', base));
    for (const p of Object.values(base)) {
      chmodSync(join(root, p), 0o644);
      writeFileSync(join(root, p), 'Derive(garbled)');
    }
    const diff = await diffCommits(commit('a', base), commit('b', head));
    expect(diff[0]!.attrs.map((a) => [a.attr, a.change])).toEqual([
      ['app', 'changed'],
      ['lib', 'changed'],
    ]);
    // Read ahead, a garbled file is no error; the diff that needs it says so.
    const next = instantiate(tag, '3');
    chmodSync(join(root, next.lib!), 0o644);
    writeFileSync(join(root, next.lib!), 'Derive(garbled)');
    await expect(readAheadClosure(commit('c', next))).resolves.toBeUndefined();
    await expect(diffCommits(commit('b', head), commit('c', next))).rejects.toThrow(/lib-/);
  });
});
