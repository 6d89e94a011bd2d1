import { describe, expect, it } from 'vitest';
import { compileOptions } from './eval-result.js';
import { nixEvalJobsArgs, parseNixEvalJobsLine } from './nix-eval-jobs.js';

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
