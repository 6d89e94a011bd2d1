import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { loadDerivationClosure } from '../../common/nix/derivation.js';
import { narChunks } from '../../common/nix/nar.js';
import { nonce, tempDir } from '../../test/support/nix-project.js';
import { BinaryCache } from '../cache/binary-cache.js';
import { generateSigningKey } from '../cache/signing-key.js';
import { EvalEnvironment } from './eval-environment.js';
import { releaseCommitRoots } from './gc-roots.js';
import { DEFAULT_EVALUATION_OPTIONS, NO_EXTRA_POLICY } from './eval-options.js';
import { evaluateBuiltIn } from './evaluator.js';

const NIX = ['--option', 'substituters', ''];
const dir = tempDir('ekaci-eval-store-');
const storeDir = join(dir, 'eval-store');
const env = await EvalEnvironment.open(DEFAULT_EVALUATION_OPTIONS, silentLogger(), { evalStoreDir: storeDir });
await env.prepare(NO_EXTRA_POLICY);
afterAll(() => env.close());

const valid = (p: string): boolean => spawnSync('nix-store', [...NIX, '--check-validity', p]).status === 0;

/** Evaluates `expr` (a set of derivations) in a checkout of its own holding `files`; answers drv paths by attribute. */
async function evaluate(
  expr: string,
  files: Record<string, string> = {},
  gcRootsDir?: string,
): Promise<Map<string, string>> {
  const checkout = tempDir('ekaci-eval-store-checkout-');
  for (const [name, text] of Object.entries(files)) {
    mkdirSync(join(checkout, name, '..'), { recursive: true });
    writeFileSync(join(checkout, name), text);
  }
  writeFileSync(join(checkout, 'default.nix'), expr);
  const out = new Map<string, string>();
  const launcher = env.launcher({ roots: [checkout], policy: NO_EXTRA_POLICY });
  const results = evaluateBuiltIn({
    file: join(checkout, 'default.nix'),
    attrPath: [],
    gcRootsDir: gcRootsDir ?? join(checkout, '.roots'),
    workers: 1,
    launcher,
  });
  for await (const r of results) {
    expect(r.error, r.attr).toBeUndefined();
    out.set(r.attr, r.drvPath!);
  }
  return out;
}

describe('the evaluation store', () => {
  it('takes what a sandboxed evaluation writes, and a build imports it into the Nix store checked, sources and all', async () => {
    const tag = nonce();
    const drvs = await evaluate(
      `let
        note = builtins.toFile "note-${tag}" "hello ${tag}";
        dep = derivation { name = "dep-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ ./builder.sh ]; inherit note; };
      in {
        app = derivation {
          name = "app-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; src = ./pkg;
          args = [ "-c" "read x < \${dep}; echo \\"$x\\" > $out" ];
        };
      }`,
      // Sources of their own (the tag in them): the Nix store cannot have them from an earlier run.
      {
        'builder.sh': `# ${tag}\nread x < "$note"; echo "$x" > "$out"\n`,
        'pkg/a.txt': `${tag}\n`,
        'pkg/sub/b.txt': 'b\n',
        // Larger than a frame and than a socket's buffer: sent in pieces as the daemon reads.
        'pkg/big.txt': `${tag}\n`.repeat(300_000),
      },
    );
    const app = drvs.get('app')!;
    // Evaluation wrote the evaluation store only: the Nix store has none of it yet.
    expect(existsSync(join(storeDir, app))).toBe(true);
    expect(valid(app)).toBe(false);
    // The coordinator reads the closure from the evaluation store.
    const closure = await loadDerivationClosure([app]);
    expect([...closure.keys()].map((p) => p.replace(/^.*?-/, '')).sort()).toEqual([`app-${tag}.drv`, `dep-${tag}.drv`]);

    const roots = join(dir, 'gcroots', tag);
    const report = await env.importDerivations([app], roots);
    // Two derivations and three sources: the builder script, the note and the package's directory.
    expect(report).toEqual({ added: 5, present: 0 });
    const dep = [...closure.keys()].find((p) => p.endsWith(`dep-${tag}.drv`))!;
    const sources = [...closure.get(app)!.inputSrcs, ...closure.get(dep)!.inputSrcs];
    expect(sources).toHaveLength(3);
    for (const p of [app, dep, ...sources]) expect(valid(p), p).toBe(true);
    expect(readFileSync(app, 'utf8')).toBe(readFileSync(join(storeDir, app), 'utf8'));
    // Rooted in the Nix store under the commit's roots, as an evaluation through the daemon would have rooted it.
    const gcRoots = execFileSync('nix-store', [...NIX, '--gc', '--print-roots'], {
      encoding: 'utf8',
      maxBuffer: 1 << 30,
    });
    expect(gcRoots).toContain(`${join(roots, app.slice('/nix/store/'.length))} -> ${app}`);
    // What was imported builds.
    const out = execFileSync('nix-store', [...NIX, '--realise', app], { encoding: 'utf8' }).trim();
    expect(readFileSync(out, 'utf8')).toBe(`hello ${tag}\n`);
    // A second import finds everything there.
    expect(await env.importDerivations([app])).toEqual({ added: 0, present: 1 });
  });

  it('gives the binary cache its .drv files while the Nix store imports them, checked; sources once imported', async () => {
    const tag = nonce();
    const drvs = await evaluate(
      `let dep = derivation { name = "dep-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ ./dep.sh ]; };
       in { app = derivation { name = "app-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; inherit dep;
              args = [ "-c" "cat $dep > $out" ]; }; }`,
      { 'dep.sh': `# ${tag}\necho dep > "$out"\n` },
    );
    const app = drvs.get('app')!;
    const cache = new BinaryCache({
      dir: tempDir('ekaci-eval-store-cache-'),
      secretKey: generateSigningKey('eval-store-test-1').secretKey,
      logger: silentLogger(),
    });
    const nars = (): string[] => readdirSync(join(cache.dir, 'nar'));
    const storeReady = (async () => {
      // Both .drv files reach the cache from the evaluation store: the Nix store has neither yet.
      await vi.waitFor(() => expect(nars()).toHaveLength(2), { timeout: 60_000 });
      expect(valid(app)).toBe(false);
      await env.importDerivations([app]);
    })();
    await cache.pushFromLocalStore([app], { derivation: true, storeReady });
    const closure = await loadDerivationClosure([app]);
    const dep = [...closure.keys()].find((p) => p !== app)!;
    const script = closure.get(dep)!.inputSrcs[0]!;
    for (const p of [app, dep, script]) expect(await cache.narInfo(p), p).toBeDefined();
    expect((await cache.narInfo(app))!.references).toEqual([dep]);

    // A .drv changed in the evaluation store after Nix wrote it never reaches the cache.
    const other = (
      await evaluate(
        `{ x = derivation { name = "x-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo x > $out" ]; }; }`,
      )
    ).get('x')!;
    const file = join(storeDir, other);
    chmodSync(file, 0o644);
    writeFileSync(file, readFileSync(file, 'utf8').replace('echo x', 'echo y'));
    await expect(cache.pushFromLocalStore([other], { derivation: true })).rejects.toThrow(/does not hash to its path/);
    expect(await cache.narInfo(other)).toBeUndefined();
  });

  it('has the NAR of a directory tree byte for byte as Nix makes it', () => {
    const tree = tempDir('ekaci-nar-tree-');
    mkdirSync(join(tree, 'bin'));
    writeFileSync(join(tree, 'bin', 'run'), '#!/bin/sh\n');
    chmodSync(join(tree, 'bin', 'run'), 0o755);
    writeFileSync(join(tree, 'B'), 'upper\n');
    writeFileSync(join(tree, 'a'), '');
    symlinkSync('bin/run', join(tree, 'link'));
    const nix = execFileSync('nix-store', ['--dump', tree]);
    expect(Buffer.concat([...narChunks(tree)]).equals(nix)).toBe(true);
  });

  it('refuses a .drv whose text no longer matches its path, and a source whose content does not', async () => {
    const tag = nonce();
    const drvs = await evaluate(
      `{ a = derivation { name = "a-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo a > $out" ]; };
         b = derivation { name = "b-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ ./b.sh ]; }; }`,
      { 'b.sh': `# ${tag}\necho b > "$out"\n` },
    );
    // Whatever wrote the evaluation store (it runs repository code) changed a .drv after Nix wrote it…
    const a = drvs.get('a')!;
    const aFile = join(storeDir, a);
    chmodSync(aFile, 0o644);
    writeFileSync(aFile, readFileSync(aFile, 'utf8').replace('echo a', 'echo x'));
    await expect(loadDerivationClosure([a])).rejects.toThrow(/its text does not match its path/);
    await expect(env.importDerivations([a])).rejects.toThrow(/its text does not match its path/);
    expect(valid(a)).toBe(false);
    // … and a source: the daemon names the content it was given, which is not the path claimed.
    const b = drvs.get('b')!;
    const script = (await loadDerivationClosure([b])).get(b)!.inputSrcs[0]!;
    const scriptFile = join(storeDir, script);
    chmodSync(scriptFile, 0o644);
    writeFileSync(scriptFile, 'echo pwned > "$out"\n');
    await expect(env.importDerivations([b])).rejects.toThrow(/does not match its content/);
    expect(valid(script)).toBe(false);
    expect(valid(b)).toBe(false);
  });

  it("is collected: what a kept commit's evaluation made stays, what only a released commit had goes", async () => {
    const tag = nonce();
    const rootsDir = join(dir, 'gcroots');
    const drvOf = (name: string) =>
      `{ ${name} = derivation { name = "${name}-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; }; }`;
    const kept = (await evaluate(drvOf('kept'), {}, join(rootsDir, `kept-${tag}`))).get('kept')!;
    const released = (await evaluate(drvOf('released'), {}, join(rootsDir, `released-${tag}`))).get('released')!;
    // Written into the store by something that roots nothing: what the collector takes when it runs.
    const stray = execFileSync(
      'nix-instantiate',
      [...NIX, '--store', `local?root=${storeDir}`, '--expr', drvOf('stray'), '-A', 'stray'],
      { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] },
    ).trim();
    const held = (p: string) => existsSync(join(storeDir, p));
    expect([kept, released, stray].map(held)).toEqual([true, true, true]);
    await env.collectEvalStore();
    expect([kept, released, stray].map(held)).toEqual([true, true, false]);
    await releaseCommitRoots(rootsDir, [`released-${tag}`]);
    await env.collectEvalStore();
    expect([kept, released].map(held)).toEqual([true, false]);
  });

  it('starts no private daemon for the evaluations it takes, and one for an evaluation that may import', async (ctx) => {
    // With a daemon on the host, nothing of the coordinator's own would start either way.
    if (env.daemonKind !== 'private') ctx.skip();
    // Every evaluation above wrote the evaluation store: none needed a daemon.
    expect(env.privateDaemonRunning).toBe(false);
    await env.prepare({ allowImportFromDerivation: true });
    expect(env.privateDaemonRunning).toBe(true);
  });
});
