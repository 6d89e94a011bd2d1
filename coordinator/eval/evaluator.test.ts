import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { EvaluationError } from '../../common/errors.js';
import { testLauncher } from '../../test/support/eval-environment.js';
import { nonce, tempDir } from '../../test/support/nix-project.js';
import type { EvalWorker } from './eval-worker.js';
import { type EvalResult, type EvaluatorOptions, evaluateBuiltIn, onWorkerStartedForTests } from './evaluator.js';

/** A Nix file whose body can call `mk "name"` (a trivial derivation) and `mkWith "name" { extra attrs }`. */
function nixFile(body: string, { fn = false } = {}): { file: string; dir: string; tag: string } {
  const dir = tempDir('ekaci-eval-');
  const tag = nonce();
  const file = join(dir, 'jobs.nix');
  writeFileSync(
    file,
    `${fn ? '{ ... }: ' : ''}let
  mkWith = name: extra: derivation ({
    name = "\${name}-${tag}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out" ];
  } // extra);
  mk = name: mkWith name {};
in
${body}
`,
  );
  return { file, dir, tag };
}

async function run(file: string, dir: string, extra: Partial<EvaluatorOptions> = {}): Promise<Map<string, EvalResult>> {
  const results = new Map<string, EvalResult>();
  const launcher = await testLauncher([dir]);
  const options = { file, attrPath: [], gcRootsDir: join(dir, 'roots'), workers: 2, launcher, ...extra };
  for await (const r of evaluateBuiltIn(options)) {
    expect(results.has(r.attr), `${r.attr} reported twice`).toBe(false);
    results.set(r.attr, r);
  }
  return results;
}

afterEach(() => onWorkerStartedForTests(undefined));

describe('built-in evaluator', () => {
  it('evaluates every derivation and isolates a throw, a failed assert and an abort with their messages', async () => {
    const good = Array.from({ length: 20 }, (_, i) => `p${i}`);
    const { file, dir, tag } = nixFile(`{
      ${good.map((n) => `${n} = mk "${n}";`).join('\n      ')}
      thrower = throw "thrown on purpose";
      asserter = assert 1 == 2; mk "never";
      aborter = abort "aborted on purpose";
    }`);
    const results = await run(file, dir);
    expect([...results.keys()].sort()).toEqual([...good, 'thrower', 'asserter', 'aborter'].sort());
    expect(results.get('thrower')?.error).toContain('thrown on purpose');
    expect(results.get('asserter')?.error).toContain("assertion '(1 == 2)' failed");
    expect(results.get('aborter')?.error).toContain('aborted on purpose');
    for (const name of good) {
      const r = results.get(name)!;
      expect(r.error).toBeUndefined();
      expect(r.drvPath).toMatch(new RegExp(`^/nix/store/[a-z0-9]{32}-${name}-${tag}\\.drv$`));
      expect(existsSync(r.drvPath!), 'the .drv is written to the store').toBe(true);
      expect(r.system).toMatch(/-linux$|-darwin$/);
      expect(Object.keys(r.outputs!)).toEqual(['out']);
      expect(r.outputs!.out).toMatch(new RegExp(`-${name}-${tag}$`));
    }
    // Rooted through store files that reference the .drv files (one per chunk), or a .drv itself: what the collector
    // keeps is what the roots reference, and that is every derivation found.
    const rooted = readdirSync(join(dir, 'roots')).flatMap((name) => {
      if (name.endsWith('.drv')) return [name];
      expect(name).toMatch(/^[a-z0-9]{32}-ekaci-eval-roots$/);
      const refs = spawnSync('nix-store', ['--query', '--references', `/nix/store/${name}`], { encoding: 'utf8' });
      expect(refs.status, refs.stderr).toBe(0);
      return refs.stdout
        .trim()
        .split('\n')
        .map((p) => p.slice(11));
    });
    expect(rooted.sort()).toEqual(good.map((n) => results.get(n)!.drvPath!.slice(11)).sort());
  });

  it('recurses into sets marked recurseForDerivations, with dotted paths, and ignores other values', async () => {
    const { file, dir } = nixFile(`{
      top = mk "top";
      nested = { recurseForDerivations = true; inner = { recurseForDerivations = true; pkg = mk "pkg"; bad = abort "deep"; }; };
      plain = { hidden = mk "hidden"; };
      str = "not a derivation";
      num = 42;
    }`);
    const results = await run(file, dir);
    expect([...results.keys()].sort()).toEqual(['nested.inner.bad', 'nested.inner.pkg', 'top']);
    expect(results.get('nested.inner.pkg')?.drvPath).toMatch(/-pkg-[0-9a-f]+\.drv$/);
    expect(results.get('nested.inner.bad')?.error).toContain('deep');
  });

  it('evaluates only the selected attribute path, relative names, and a selected derivation alone', async () => {
    const { file, dir } = nixFile(`{ a = mk "a"; sel = { x = mk "x"; y = { z = mk "z"; }; }; }`);
    const results = await run(file, dir, { attrPath: ['sel'] });
    expect([...results.keys()]).toEqual(['x']);
    const single = await run(file, dir, { attrPath: ['sel', 'y', 'z'] });
    expect([...single.keys()]).toEqual(['sel.y.z']);
    await expect(run(file, dir, { attrPath: ['missing'] })).rejects.toThrow(EvaluationError);
  });

  it('reports pname, version, license, maintainers, platforms and broken from meta', async () => {
    const { file, dir } = nixFile(`{
      full = mkWith "full" { pname = "full"; version = "1.2"; } // {
        meta = {
          license = { spdxId = "MIT"; shortName = "mit"; };
          maintainers = [ { github = "alice"; name = "Alice"; } { name = "Bob"; } ];
          platforms = [ builtins.currentSystem ];
          broken = false;
        };
      };
      stringLicense = mk "s" // { meta.license = "GPL-3.0-or-later"; };
      bare = mk "bare";
    }`);
    const results = await run(file, dir);
    expect(results.get('full')?.meta).toEqual({
      pname: 'full',
      version: '1.2',
      license: 'MIT',
      maintainers: ['alice', 'Bob'],
      githubMaintainers: ['alice'],
      platforms: [results.get('full')!.system],
      broken: false,
    });
    expect(results.get('stringLicense')?.meta).toEqual({ license: 'GPL-3.0-or-later' });
    expect(results.get('bare')?.meta).toEqual({});
  });

  it('gives attributes with equal meta.platforms one list, and unequal ones their own', async () => {
    const linux = '[ "x86_64-linux" "aarch64-linux" builtins.currentSystem ]';
    const { file, dir } = nixFile(`{
      ${['a', 'b', 'c'].map((n) => `${n} = mk "${n}" // { meta.platforms = ${linux}; };`).join('\n      ')}
      d = mk "d" // { meta.platforms = [ "x86_64-linux" builtins.currentSystem ]; };
    }`);
    const results = await run(file, dir, { workers: 2 });
    const list = (a: string) => results.get(a)!.meta!.platforms!;
    expect(list('a')).toEqual(['x86_64-linux', 'aarch64-linux', results.get('a')!.system]);
    expect(list('b')).toBe(list('a'));
    expect(list('c')).toBe(list('a'));
    expect(list('d')).not.toBe(list('a'));
    expect(list('d')).toEqual(['x86_64-linux', results.get('d')!.system]);
  });

  it('skips a derivation whose meta.platforms excludes its system, still giving its drvPath', async () => {
    const { file, dir } = nixFile(`{
      elsewhere = mk "elsewhere" // { meta.platforms = [ "mips64-plan9" ]; };
      here = mk "here" // { meta.platforms = [ builtins.currentSystem ]; };
    }`);
    const results = await run(file, dir);
    expect(results.get('elsewhere')?.skipped).toBe('unsupported-platform');
    expect(results.get('elsewhere')?.drvPath).toMatch(/-elsewhere-[0-9a-f]+\.drv$/);
    expect(results.get('elsewhere')?.error).toBeUndefined();
    expect(results.get('here')?.skipped).toBeUndefined();
    const restricted = await run(file, dir, { systems: ['mips64-plan9'] });
    expect(restricted.get('here')?.skipped).toBe('unsupported-platform');
  });

  it('calls a file that is a function with {}', async () => {
    const { file, dir } = nixFile(`{ a = mk "a"; b = mk "b"; }`, { fn: true });
    const results = await run(file, dir);
    expect([...results.keys()].sort()).toEqual(['a', 'b']);
  });

  it('reports a file that does not evaluate as an EvaluationError naming the file', async () => {
    const dir = tempDir('ekaci-eval-');
    const file = join(dir, 'broken.nix');
    writeFileSync(file, '{ a = ; }');
    await expect(run(file, dir)).rejects.toThrow(/broken\.nix.*\n?.*syntax error|syntax error/);
  });

  it('replaces a worker killed mid-run and still evaluates every attribute', async () => {
    // Each attribute costs a few milliseconds, so the kill lands while chunks are in flight.
    const names = Array.from({ length: 40 }, (_, i) => `slow${i}`);
    const { file, dir } = nixFile(`let work = n: builtins.length (builtins.genList (x: x * n) 200000); in {
      ${names.map((n, i) => `${n} = mkWith "${n}" { w = work ${i}; };`).join('\n      ')}
    }`);
    const started: EvalWorker[] = [];
    onWorkerStartedForTests((w) => {
      started.push(w);
      if (started.length === 1) setTimeout(() => w.kill(), 150);
    });
    const results = await run(file, dir, { workers: 1 });
    expect(started.length).toBeGreaterThanOrEqual(2);
    expect([...results.values()].filter((r) => r.error !== undefined)).toEqual([]);
    expect([...results.keys()].sort()).toEqual([...names].sort());
  });

  it('restarts a worker whose resident memory grows past maxMemoryMiB', async () => {
    const { file, dir } = nixFile(`{ ${Array.from({ length: 6 }, (_, i) => `m${i} = mk "m${i}";`).join(' ')} }`);
    const started: EvalWorker[] = [];
    onWorkerStartedForTests((w) => started.push(w));
    // Any repl uses more than 1 MiB, so each request ends with a restart.
    const results = await run(file, dir, { workers: 1, maxMemoryMiB: 1 });
    expect(results.size).toBe(6);
    expect([...results.values()].every((r) => r.drvPath !== undefined)).toBe(true);
    expect(started.length).toBeGreaterThanOrEqual(2);
  });

  it('keeps the derivation of an attribute whose meta fields throw or abort, recording each field error', async () => {
    const { file, dir, tag } = nixFile(`{
      badMaintainers = mk "bm" // { meta = { maintainers = throw "no maintainers here"; license = "MIT"; }; };
      abortingLicense = mk "al" // { meta = { license = abort "license aborts"; broken = false; }; };
      badMeta = mk "bmeta" // { meta = throw "meta itself throws"; };
      fine = mk "fine";
    }`);
    const results = await run(file, dir);
    for (const [attr, name] of [
      ['badMaintainers', 'bm'],
      ['abortingLicense', 'al'],
      ['badMeta', 'bmeta'],
    ] as const) {
      const r = results.get(attr)!;
      expect(r.error, attr).toBeUndefined();
      expect(r.drvPath, attr).toMatch(new RegExp(`-${name}-${tag}\\.drv$`));
    }
    expect(results.get('badMaintainers')?.metaErrors?.maintainers).toContain('no maintainers here');
    expect(results.get('badMaintainers')?.meta?.license).toBe('MIT');
    // The handles made from the maintainers fail with them, recorded with the same message.
    expect(results.get('badMaintainers')?.metaErrors?.githubMaintainers).toBe(
      results.get('badMaintainers')?.metaErrors?.maintainers,
    );
    expect(results.get('abortingLicense')?.metaErrors?.license).toContain('license aborts');
    expect(results.get('abortingLicense')?.meta?.broken).toBe(false);
    expect(results.get('badMeta')?.metaErrors?.maintainers).toContain('meta itself throws');
    expect(results.get('fine')?.metaErrors).toBeUndefined();
  });

  it('never takes a trace printed by package code for a result, even one imitating the protocol', async () => {
    const fake = JSON.stringify({
      p: ['victim'],
      r: { drvPath: '/nix/store/00000000000000000000000000000000-evil.drv', system: 'x', outputs: {} },
    });
    const { file, dir, tag } = nixFile(`{
      forger = builtins.trace ${JSON.stringify(`__ekaciResult_ ${fake}`)} (builtins.trace ${JSON.stringify(`__ekaciResult ${fake}`)} (builtins.trace "__ekaciResult_0123456789abcdef0123456789abcdef ${fake.replace(/"/g, '\\"')}" (mk "forger")));
      victim = mk "victim";
      sentinel = builtins.trace "trace: __ekaci_x_1" (mk "sentinel");
    }`);
    const results = await run(file, dir);
    expect(results.get('victim')?.drvPath).toMatch(new RegExp(`-victim-${tag}\\.drv$`));
    expect(results.get('forger')?.drvPath).toMatch(new RegExp(`-forger-${tag}\\.drv$`));
    expect(results.get('sentinel')?.drvPath).toMatch(new RegExp(`-sentinel-${tag}\\.drv$`));
    expect(results.size).toBe(3);
  });

  it('reports a value that only pretends to be a derivation as that attribute’s error', async () => {
    const { file, dir } = nixFile(`{
      empty = { type = "derivation"; drvPath = ""; system = "x86_64-linux"; outputs = [ "out" ]; out = { outPath = ""; }; };
      missing = { type = "derivation"; drvPath = "/nix/store/00000000000000000000000000000000-missing.drv"; system = "x"; outputs = [ "out" ]; out.outPath = "/nix/store/00000000000000000000000000000000-missing"; };
      notAPath = mk "real" // { drvPath = "/etc/passwd"; };
      good = mk "good";
    }`);
    const results = await run(file, dir);
    expect(results.get('empty')?.error).toContain('is not a .drv store path');
    expect(results.get('missing')?.error).toContain('does not exist in the store');
    expect(results.get('notAPath')?.error).toContain('/etc/passwd');
    expect(results.get('good')?.drvPath).toBeDefined();
  });

  it('stops an attribute that evaluates past the per-attribute time limit, and evaluates the rest', async () => {
    // 2^60 calls at a depth of 60: no stack overflow, no memory, just no end.
    const { file, dir } = nixFile(`let f = n: if n == 0 then 1 else f (n - 1) + f (n - 1); in {
      a = mk "a"; forever = f 60; b = mk "b"; c = mk "c";
    }`);
    const launcher = { ...(await testLauncher([dir])), attrTimeoutMs: 1_500 };
    const results = await run(file, dir, { launcher, workers: 1 });
    expect(results.get('forever')?.error).toContain('did not finish evaluating within 2 s');
    for (const name of ['a', 'b', 'c']) expect(results.get(name)?.drvPath, name).toBeDefined();
  });
});
