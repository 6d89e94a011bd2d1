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

describe('GC roots of evaluated derivations', () => {
  it('keep the .drv files through nix-store --gc runs during and after evaluation, which collect an unrooted one (private mount-namespace store)', () => {
    const dir = tempDir('ekaci-gcroots-');
    const tag = nonce();
    const emptyNix = join(dir, 'nix');
    mkdirSync(emptyNix);
    const drv = (name: string) =>
      `derivation { name = "${name}-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }`;
    const file = join(dir, 'jobs.nix');
    writeFileSync(file, `{ a = ${drv('a')}; b = ${drv('b')}; c = ${drv('c')}; }`);
    const script = join(dir, 'inside.mts');
    // Runs inside the namespace, where /nix is an empty directory: the shared store is never collected.
    writeFileSync(
      script,
      `import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { evaluateBuiltIn } from ${JSON.stringify(EVALUATOR)};
import { EvalEnvironment } from ${JSON.stringify(ENVIRONMENT)};
import { DEFAULT_EVALUATION_OPTIONS, NO_EXTRA_POLICY } from ${JSON.stringify(OPTIONS)};
import { silentLogger } from ${JSON.stringify(LOGGING)};
const nix = ['--option', 'substituters', ''];
const rooted = [];
const env = await EvalEnvironment.open(DEFAULT_EVALUATION_OPTIONS, silentLogger());
await env.prepare();
const launcher = env.launcher({ roots: [${JSON.stringify(dir)}], policy: NO_EXTRA_POLICY });
for await (const r of evaluateBuiltIn({ file: ${JSON.stringify(file)}, attrPath: [], gcRootsDir: ${JSON.stringify(join(dir, 'roots'))}, workers: 2, launcher })) {
  // A collection while the evaluation is still running must neither break it nor take what it rooted.
  if (rooted.length === 0) execFileSync('nix-store', [...nix, '--gc'], { stdio: 'ignore' });
  rooted.push(r.drvPath);
}
const control = execFileSync('nix-instantiate', [...nix, '--expr', ${JSON.stringify(drv('control'))}], { encoding: 'utf8' }).trim();
const before = [...rooted, control].map((p) => existsSync(p));
execFileSync('nix-store', [...nix, '--gc'], { stdio: 'ignore' });
env.close();
console.log(JSON.stringify({ rooted, control, before, after: rooted.map((p) => existsSync(p)), controlAfter: existsSync(control) }));
`,
    );
    const r = spawnSync(
      'unshare',
      ['-m', 'sh', '-c', `mount --bind "$1" /nix && exec node --import tsx "$2"`, 'sh', emptyNix, script],
      { cwd: REPO, encoding: 'utf8', timeout: 120_000 },
    );
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as {
      rooted: string[];
      control: string;
      before: boolean[];
      after: boolean[];
      controlAfter: boolean;
    };
    expect(out.rooted).toHaveLength(3);
    expect(out.before).toEqual([true, true, true, true]);
    expect(out.after).toEqual([true, true, true]);
    expect(out.controlAfter, 'an unrooted .drv is collected, so the collector did run').toBe(false);
  });
});

describe('releasing the GC roots of a commit', () => {
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
