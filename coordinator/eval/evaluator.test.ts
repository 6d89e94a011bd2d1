import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { EvaluationError } from '../../common/errors.js';
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
  for await (const r of evaluateBuiltIn({ file, attrPath: [], gcRootsDir: join(dir, 'roots'), workers: 2, ...extra })) {
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
    expect(readdirSync(join(dir, 'roots')).sort()).toEqual(good.map((n) => results.get(n)!.drvPath!.slice(11)).sort());
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
      platforms: [results.get('full')!.system],
      broken: false,
    });
    expect(results.get('stringLicense')?.meta).toEqual({ license: 'GPL-3.0-or-later' });
    expect(results.get('bare')?.meta).toEqual({});
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
});
