import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { nonce, tempDir } from '../../test/support/nix-project.js';

const EVALUATOR = fileURLToPath(new URL('./evaluator.ts', import.meta.url));
const ENVIRONMENT = fileURLToPath(new URL('./eval-environment.ts', import.meta.url));
const OPTIONS = fileURLToPath(new URL('./eval-options.ts', import.meta.url));
const LOGGING = fileURLToPath(new URL('../../common/logging.ts', import.meta.url));
const REPO = fileURLToPath(new URL('../..', import.meta.url));

/** What a run in `collectedRun` saw. */
interface CollectedRun {
  rooted: string[];
  control: string;
  before: boolean[];
  after: boolean[];
  controlAfter: boolean;
  workersStarted: number;
}

/**
 * Evaluates `attrs` (a Nix set body; `drv name` makes a derivation) in a private mount namespace whose /nix is an
 * empty directory, so that the shared store is never collected: `nix-store --gc` runs once during the evaluation and
 * once after it, beside an unrooted control derivation. With `killFirstWorkerAfterMs`, the first worker is killed
 * that long after it starts.
 */
function collectedRun(
  attrs: (drv: (name: string, extra?: string) => string) => string,
  o: { workers: number; killFirstWorkerAfterMs?: number },
): CollectedRun {
  const dir = tempDir('ekaci-gcroots-');
  const tag = nonce();
  const emptyNix = join(dir, 'nix');
  mkdirSync(emptyNix);
  const drv = (name: string, extra = '') =>
    `derivation { name = "${name}-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; ${extra} }`;
  const file = join(dir, 'jobs.nix');
  writeFileSync(file, `{ ${attrs(drv)} }`);
  const script = join(dir, 'inside.mts');
  writeFileSync(
    script,
    `import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { evaluateBuiltIn, onWorkerStartedForTests } from ${JSON.stringify(EVALUATOR)};
import { EvalEnvironment } from ${JSON.stringify(ENVIRONMENT)};
import { DEFAULT_EVALUATION_OPTIONS, NO_EXTRA_POLICY } from ${JSON.stringify(OPTIONS)};
import { silentLogger } from ${JSON.stringify(LOGGING)};
const nix = ['--option', 'substituters', ''];
const rooted = [];
let workersStarted = 0;
onWorkerStartedForTests((w) => {
  if (++workersStarted === 1 && ${o.killFirstWorkerAfterMs ?? -1} >= 0) setTimeout(() => w.kill(), ${o.killFirstWorkerAfterMs ?? 0});
});
const env = await EvalEnvironment.open(DEFAULT_EVALUATION_OPTIONS, silentLogger());
await env.prepare();
const launcher = env.launcher({ roots: [${JSON.stringify(dir)}], policy: NO_EXTRA_POLICY });
for await (const r of evaluateBuiltIn({ file: ${JSON.stringify(file)}, attrPath: [], gcRootsDir: ${JSON.stringify(join(dir, 'roots'))}, workers: ${o.workers}, launcher })) {
  // A collection while the evaluation is still running must neither break it nor take what it rooted.
  if (rooted.length === 0) execFileSync('nix-store', [...nix, '--gc'], { stdio: 'ignore' });
  rooted.push(r.drvPath);
}
const control = execFileSync('nix-instantiate', [...nix, '--expr', ${JSON.stringify(drv('control'))}], { encoding: 'utf8' }).trim();
const before = [...rooted, control].map((p) => existsSync(p));
execFileSync('nix-store', [...nix, '--gc'], { stdio: 'ignore' });
env.close();
console.log(JSON.stringify({ rooted, control, before, after: rooted.map((p) => existsSync(p)), controlAfter: existsSync(control), workersStarted }));
`,
  );
  const r = spawnSync(
    'unshare',
    ['-m', 'sh', '-c', `mount --bind "$1" /nix && exec node --import tsx "$2"`, 'sh', emptyNix, script],
    { cwd: REPO, encoding: 'utf8', timeout: 120_000 },
  );
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as CollectedRun;
}

describe('GC roots of evaluated derivations', () => {
  it('keep the .drv files through nix-store --gc runs during and after evaluation, which collect an unrooted one (private mount-namespace store)', () => {
    const out = collectedRun((drv) => `a = ${drv('a')}; b = ${drv('b')}; c = ${drv('c')};`, { workers: 2 });
    expect(out.rooted).toHaveLength(3);
    expect(out.before).toEqual([true, true, true, true]);
    expect(out.after).toEqual([true, true, true]);
    expect(out.controlAfter, 'an unrooted .drv is collected, so the collector did run').toBe(false);
  });

  it('keep what a worker killed mid-run made before its derivations were rooted', () => {
    // One chunk of cheap attributes answers at once; the next chunk's cost a few milliseconds each, so the kill lands
    // in it, after the first chunk's derivations were made and before their batch was rooted.
    const out = collectedRun(
      (drv) =>
        [
          ...Array.from({ length: 64 }, (_, i) => `a${i} = ${drv(`a${i}`)};`),
          ...Array.from(
            { length: 40 },
            (_, i) => `b${i} = ${drv(`b${i}`, `w = builtins.length (builtins.genList (x: x * ${i}) 200000);`)};`,
          ),
        ].join(' '),
      { workers: 1, killFirstWorkerAfterMs: 150 },
    );
    expect(out.workersStarted).toBeGreaterThanOrEqual(2);
    expect(out.rooted).toHaveLength(104);
    expect(out.after.every(Boolean), 'every evaluated .drv survives the collector').toBe(true);
    expect(out.controlAfter).toBe(false);
  });
  it('removes its links and their registrations in gcroots/auto, and leaves other commits rooted', async () => {
    const { GcRoots, releaseCommitRoots } = await import('./gc-roots.js');
    const dir = tempDir('ekaci-gcroots-release-');
    const before = process.env.NIX_STATE_DIR;
    process.env.NIX_STATE_DIR = join(dir, 'state');
    try {
      const rootsDir = join(dir, 'gcroots');
      const [gone, kept] = ['a'.repeat(40), 'b'.repeat(40)];
      await new GcRoots(join(rootsDir, gone)).add(`/nix/store/${'1'.repeat(32)}-one.drv`);
      await new GcRoots(join(rootsDir, gone)).add(`/nix/store/${'2'.repeat(32)}-two.drv`);
      await new GcRoots(join(rootsDir, kept)).add(`/nix/store/${'3'.repeat(32)}-three.drv`);
      const auto = join(dir, 'state', 'gcroots', 'auto');
      expect(readdirSync(auto)).toHaveLength(3);

      await releaseCommitRoots(rootsDir, [gone, 'c'.repeat(40)]);
      expect(existsSync(join(rootsDir, gone))).toBe(false);
      expect(readdirSync(join(rootsDir, kept))).toEqual([`${'3'.repeat(32)}-three.drv`]);
      const left = readdirSync(auto).map((n) => readlinkSync(join(auto, n)));
      expect(left).toEqual([join(rootsDir, kept, `${'3'.repeat(32)}-three.drv`)]);
    } finally {
      if (before === undefined) delete process.env.NIX_STATE_DIR;
      else process.env.NIX_STATE_DIR = before;
    }
  });
});
