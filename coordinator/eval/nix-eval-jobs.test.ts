import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EvaluationError } from '../../common/errors.js';
import { nonce, tempDir } from '../../test/support/nix-project.js';
import { diffEvaluations } from '../graph/rebuild-diff.js';
import type { NixLauncher } from './eval-environment.js';
import { type EvalResult, compileOptions } from './eval-result.js';
import { evaluateWithNixEvalJobs, nixEvalJobsArgs, parseNixEvalJobsLine } from './nix-eval-jobs.js';

// Recorded from nix-eval-jobs 2.x (`--meta`) over nixpkgs' `hello`, shortened to the fields eka-ci reads.
const SAMPLE =
  '{"attr":"hello","attrPath":["hello"],"drvPath":"/nix/store/x7dq1sb6rl3w3sy2lvc0vgwbzx1qxdq8-hello-2.12.1.drv",' +
  '"inputDrvs":{},"isCached":false,"meta":{"available":true,"broken":false,"description":"A program that produces a familiar, friendly greeting",' +
  '"license":{"deprecated":false,"free":true,"fullName":"GNU General Public License v3.0 or later","shortName":"gpl3Plus","spdxId":"GPL-3.0-or-later"},' +
  '"maintainers":[{"email":"edolstra+nixpkgs@gmail.com","github":"eelco","githubId":1148549,"name":"Eelco Dolstra"}],' +
  '"name":"hello-2.12.1","platforms":["x86_64-linux","aarch64-linux"]},"name":"hello-2.12.1",' +
  '"outputs":{"out":"/nix/store/qsfvb4xv0i8p5m0dsvxpm5f3f6x0fbsv-hello-2.12.1"},"system":"x86_64-linux"}';

// The recorded derivation is not in this machine's store.
const inStore = (): boolean => true;

describe('nix-eval-jobs adapter', () => {
  it("reports a line whose drvPath is not a store derivation as that attribute's error", () => {
    const forged = SAMPLE.replace('/nix/store/x7dq1sb6rl3w3sy2lvc0vgwbzx1qxdq8-hello-2.12.1.drv', '');
    expect(parseNixEvalJobsLine(forged, undefined, inStore).error).toContain('is not a .drv store path');
    expect(parseNixEvalJobsLine(SAMPLE).error).toContain('does not exist in the store');
  });

  it('turns a recorded result line into an EvalResult with the meta subset', () => {
    expect(parseNixEvalJobsLine(SAMPLE, undefined, inStore)).toEqual({
      attr: 'hello',
      drvPath: '/nix/store/x7dq1sb6rl3w3sy2lvc0vgwbzx1qxdq8-hello-2.12.1.drv',
      system: 'x86_64-linux',
      outputs: { out: '/nix/store/qsfvb4xv0i8p5m0dsvxpm5f3f6x0fbsv-hello-2.12.1' },
      meta: {
        pname: 'hello',
        version: '2.12.1',
        license: 'GPL-3.0-or-later',
        maintainers: ['eelco'],
        githubMaintainers: ['eelco'],
        platforms: ['x86_64-linux', 'aarch64-linux'],
        broken: false,
      },
    });
  });

  it('marks a result for a system outside meta.platforms or the requested systems as skipped', () => {
    expect(
      parseNixEvalJobsLine(SAMPLE.replace('"x86_64-linux","aarch64-linux"', '"riscv64-linux"'), undefined, inStore)
        .skipped,
    ).toBe('unsupported-platform');
    expect(parseNixEvalJobsLine(SAMPLE, ['aarch64-darwin'], inStore).skipped).toBe('unsupported-platform');
    expect(parseNixEvalJobsLine(SAMPLE, ['x86_64-linux'], inStore).skipped).toBeUndefined();
  });

  it('passes an error line through with its attribute', () => {
    const line =
      '{"attr":"broken","attrPath":["broken"],"error":"error: evaluation aborted with the following error message: \'no\'"}';
    expect(parseNixEvalJobsLine(line)).toEqual({
      attr: 'broken',
      error: "error: evaluation aborted with the following error message: 'no'",
    });
  });

  it('asks for workers, memory limit, GC roots and meta, selecting the attribute path in the expression', () => {
    const launcher = { command: () => ({ file: '', args: [], env: {} }), attrTimeoutMs: 1, maxMemoryMiB: 1 };
    const args = nixEvalJobsArgs(
      compileOptions({
        file: '/src/ci.nix',
        attrPath: ['a', 'b'],
        workers: 3,
        maxMemoryMiB: 1000,
        gcRootsDir: '/r',
        launcher,
      }),
    );
    expect(args).toEqual(
      expect.arrayContaining(['--workers', '3', '--max-memory-size', '1000', '--gc-roots-dir', '/r']),
    );
    expect(args).toContain('--meta');
    expect(args.at(-1)).toContain('import "/src/ci.nix"');
    expect(args.at(-1)).toMatch(/top\."a"\."b"$/);
  });
});

const STANDIN = join(import.meta.dirname, '..', '..', 'test', 'support', 'nix-eval-jobs-standin.ts');

/** Runs the nix-eval-jobs stand-in (real Nix underneath) in place of nix-eval-jobs, with `env` added. */
function standIn(env: Record<string, string> = {}): NixLauncher {
  const inherited = Object.fromEntries(Object.entries(process.env).filter((e): e is [string, string] => !!e[1]));
  return {
    command: (_program, args) => ({
      file: process.execPath,
      args: ['--import', 'tsx', STANDIN, ...args],
      env: { ...inherited, ...env },
    }),
    attrTimeoutMs: 60_000,
    maxMemoryMiB: 1024,
  };
}

/** A package set at `dir/default.nix`: `mk "name"` is a trivial derivation, `mk "name" // { deps = [ … ]; }` one with inputs. */
function packageSet(dir: string, tag: string, body: string): string {
  const file = join(dir, 'default.nix');
  writeFileSync(
    file,
    `let mk = name: deps: derivation {
  name = "\${name}-${tag}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo \${name} $deps > $out" ]; inherit deps;
}; in rec {
${body}
}
`,
  );
  return file;
}

async function evaluateAll(file: string, dir: string, launcher = standIn()): Promise<Map<string, EvalResult>> {
  const results = new Map<string, EvalResult>();
  const options = compileOptions({ file, attrPath: [], gcRootsDir: join(dir, 'roots'), workers: 1, launcher });
  for await (const r of evaluateWithNixEvalJobs(options)) results.set(r.attr, r);
  return results;
}

describe('nix-eval-jobs runs', () => {
  it('keeps the derivation of an attribute whose meta field throws or aborts, recording the error beside it', async () => {
    const dir = tempDir('ekaci-eval-jobs-');
    const tag = nonce();
    const file = packageSet(
      dir,
      tag,
      `fine = mk "fine" [ ];
  badMaintainers = mk "bm" [ ] // { meta.maintainers = throw "no maintainers here"; };
  abortingDescription = mk "ad" [ ] // { meta.description = abort "description aborts"; };
  thrower = throw "thrown on purpose";`,
    );
    const results = await evaluateAll(file, dir);
    expect([...results.keys()].sort()).toEqual(['abortingDescription', 'badMaintainers', 'fine', 'thrower']);
    for (const [attr, name, message] of [
      ['badMaintainers', 'bm', 'no maintainers here'],
      ['abortingDescription', 'ad', 'description aborts'],
    ] as const) {
      const r = results.get(attr)!;
      expect(r.error, attr).toBeUndefined();
      expect(r.drvPath, attr).toMatch(new RegExp(`-${name}-${tag}\\.drv$`));
      expect(r.outputs?.out, attr).toMatch(new RegExp(`-${name}-${tag}$`));
      expect(r.metaErrors?.meta, attr).toContain(message);
    }
    expect(results.get('fine')).toMatchObject({ meta: {}, drvPath: expect.stringMatching(/-fine-/) as unknown });
    expect(results.get('fine')?.metaErrors).toBeUndefined();
    expect(results.get('thrower')).toEqual({
      attr: 'thrower',
      error: expect.stringContaining('thrown on purpose') as unknown,
    });
  });

  it('sees a dependency bump under a meta.maintainers that throws on both sides: changed, to be rebuilt', async () => {
    const dir = tempDir('ekaci-eval-jobs-');
    const tag = nonce();
    // Both commits at one path, as checkouts are compared: the error reads the same on both sides.
    const set = (version: string): string =>
      packageSet(
        dir,
        tag,
        `dep = mk "dep-${version}" [ ];
  app = mk "app" [ dep ] // { meta.maintainers = throw "no maintainers here"; };`,
      );
    const base = [...(await evaluateAll(set('1'), dir)).values()];
    const head = [...(await evaluateAll(set('2'), dir)).values()];
    const graph = { inputsOf: () => [], systemOf: () => 'x86_64-linux' };
    const app = diffEvaluations(base, head, graph).attrs.find((a) => a.attr === 'app');
    expect(app?.change).toBe('changed');
    expect(app?.headDrv).toMatch(/-app-/);
  });

  it.each([
    ['exits non-zero', 'exit-after:1', /exit 1/],
    ['is killed', 'kill-after:1', /killed by SIGKILL/],
    ['stops mid-line', 'cut-after:1', /ended mid-line/],
  ])(
    'fails the whole evaluation when nix-eval-jobs %s half-way, never reporting fewer attributes',
    async (_, fault, why) => {
      const dir = tempDir('ekaci-eval-jobs-');
      const file = packageSet(dir, nonce(), ['a', 'b', 'c'].map((n) => `${n} = mk "${n}" [ ];`).join('\n  '));
      const seen: string[] = [];
      const run = async (): Promise<void> => {
        const options = compileOptions({
          file,
          attrPath: [],
          gcRootsDir: join(dir, 'roots'),
          launcher: standIn({ EKACI_STANDIN_FAULT: fault }),
        });
        for await (const r of evaluateWithNixEvalJobs(options)) seen.push(r.attr);
      };
      const failure = await run().then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(failure).toBeInstanceOf(EvaluationError);
      expect((failure as Error).message).toMatch(why);
      expect((failure as Error).message).toMatch(/after 1 attributes/);
      expect(seen).toEqual(['a']);
    },
  );
});
