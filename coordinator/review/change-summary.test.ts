import { describe, expect, it } from 'vitest';
import {
  type ChangeSummary,
  type ChangeSummaryJob,
  type EvaluatedAttr,
  type EvaluatedMeta,
  changeSummary,
  changeSummarySteps,
  groupChanges,
  isEmptySummary,
  parseDrvName,
} from './change-summary.js';

const SYSTEM = 'x86_64-linux';
const hash = (name: string): string =>
  name
    .padEnd(32, '0')
    .slice(0, 32)
    .replace(/[^a-z0-9]/g, '0');

/** An attribute that evaluated to a derivation named `name` (by default `<pname>-<version>`). */
function pkg(
  attr: string,
  meta: EvaluatedMeta = {},
  { name, ...extra }: Partial<EvaluatedAttr> & { name?: string } = {},
): EvaluatedAttr {
  const drvName = name ?? `${meta.pname ?? attr}-${meta.version ?? '1.0'}`;
  return { attr, drvPath: `/nix/store/${hash(attr)}-${drvName}.drv`, system: SYSTEM, meta, ...extra };
}

function failed(attr: string): EvaluatedAttr {
  return { attr, error: `error: ${attr} is broken` } as EvaluatedAttr;
}

const one = (base: EvaluatedAttr[], head: EvaluatedAttr[]): ChangeSummary =>
  changeSummary([{ name: 'pkgs', base, head }]);

const at = (attr: string) => ({ job: 'pkgs', attr, system: SYSTEM });

describe('changeSummary', () => {
  it('reports a version bump with its pname, and a rename, but not a package whose version stayed', () => {
    const s = one(
      [
        pkg('hello', { pname: 'hello', version: '2.12' }),
        pkg('same', { pname: 'same', version: '1' }),
        pkg('exa', { pname: 'exa', version: '0.10' }),
      ],
      [
        pkg('hello', { pname: 'hello', version: '2.13' }),
        pkg('same', { pname: 'same', version: '1' }),
        pkg('exa', { pname: 'eza', version: '0.10' }),
      ],
    );

    expect(s.versions).toEqual([
      { ...at('exa'), base: { pname: 'exa', version: '0.10' }, head: { pname: 'eza', version: '0.10' } },
      { ...at('hello'), base: { pname: 'hello', version: '2.12' }, head: { pname: 'hello', version: '2.13' } },
    ]);
    expect(isEmptySummary({ ...s, versions: [] })).toBe(true);
  });

  it('takes pname and version from the derivation name where the derivation has neither, as parseDrvName does', () => {
    const s = one([pkg('lib', {}, { name: 'lib-1.0' })], [pkg('lib', {}, { name: 'lib-2.0' })]);

    expect(s.versions).toEqual([
      { ...at('lib'), base: { pname: 'lib', version: '1.0' }, head: { pname: 'lib', version: '2.0' } },
    ]);
    expect(parseDrvName('uses-breaks-1.0')).toEqual({ pname: 'uses-breaks', version: '1.0' });
    expect(parseDrvName('foo-unstable-2024-01-02')).toEqual({ pname: 'foo-unstable', version: '2024-01-02' });
    expect(parseDrvName('python3.12-requests-2.31.0')).toEqual({ pname: 'python3.12-requests', version: '2.31.0' });
    expect(parseDrvName('hello')).toEqual({ pname: 'hello', version: null });
  });

  it('compares versions when only one side knows the pname', () => {
    const s = one([pkg('tool', { version: '1' }, { name: 'tool' })], [pkg('tool', { pname: 'tool', version: '2' })]);

    expect(s.versions).toEqual([
      { ...at('tool'), base: { pname: 'tool', version: '1' }, head: { pname: 'tool', version: '2' } },
    ]);
  });

  it('counts as new or removed only attributes with a derivation on their one side', () => {
    const s = one(
      [pkg('gone', { pname: 'gone', version: '3' }), failed('never-evaluated'), pkg('now-fails')],
      [pkg('fresh', { pname: 'fresh', version: '0.1' }), failed('new-but-failing'), failed('now-fails')],
    );

    expect(s.added).toEqual([{ ...at('fresh'), pname: 'fresh', version: '0.1' }]);
    expect(s.removed).toEqual([{ ...at('gone'), pname: 'gone', version: '3' }]);
    // An attribute that stopped evaluating has no meta to compare: its error is the review's to show.
    expect({ ...s, added: [], removed: [] }).toEqual(one([], []));
  });

  it('reports a license change, comparing licenses as sets', () => {
    const s = one(
      [
        pkg('relicensed', { license: 'mit' }),
        pkg('reordered', { license: ['mit', 'asl20'] }),
        pkg('as-list', { license: 'mit' }),
        pkg('unlicensed', {}),
        pkg('dual', { license: ['gpl2Only'] }),
      ],
      [
        pkg('relicensed', { license: 'asl20' }),
        pkg('reordered', { license: ['asl20', 'mit', 'mit'] }),
        pkg('as-list', { license: ['mit'] }),
        pkg('unlicensed', { license: 'bsd3' }),
        pkg('dual', { license: ['gpl2Only', 'mit'] }),
      ],
    );

    expect(s.licenses).toEqual([
      { ...at('dual'), base: ['gpl2Only'], head: ['gpl2Only', 'mit'] },
      { ...at('relicensed'), base: ['mit'], head: ['asl20'] },
      { ...at('unlicensed'), base: [], head: ['bsd3'] },
    ]);
  });

  it('reports maintainers and platforms that came and went', () => {
    const s = one(
      [
        pkg('team', { maintainers: ['alice', 'bob'], platforms: ['x86_64-linux', 'aarch64-linux'] }),
        pkg('quiet', { maintainers: ['carol'], platforms: ['x86_64-linux'] }),
      ],
      [
        pkg('team', { maintainers: ['bob', 'dave'], platforms: ['aarch64-linux', 'x86_64-linux', 'riscv64-linux'] }),
        pkg('quiet', { maintainers: ['carol'], platforms: ['x86_64-linux'] }),
      ],
    );

    expect(s.maintainers).toEqual([{ ...at('team'), added: ['dave'], removed: ['alice'] }]);
    expect(s.platforms).toEqual([{ ...at('team'), added: ['riscv64-linux'], removed: [] }]);
  });

  it('reports meta.broken turned on or off, absent counting as false', () => {
    const s = one(
      [pkg('breaks', {}), pkg('mended', { broken: true }), pkg('unmarked', { broken: false })],
      [pkg('breaks', { broken: true }), pkg('mended', {}), pkg('unmarked', {})],
    );

    expect(s.broken).toEqual([
      { ...at('breaks'), base: false, head: true },
      { ...at('mended'), base: true, head: false },
    ]);
  });

  it('reports a meta field that failed on one side as failed, never as removed, and nothing when it fails on both', () => {
    const s = one(
      [
        pkg('who', { maintainers: ['alice'], license: 'mit' }),
        pkg('fixed-meta', {}, { metaErrors: { platforms: 'error: lib.platforms.nope missing' } }),
        pkg('always', {}, { metaErrors: { license: 'error: always broken' } }),
      ],
      [
        pkg('who', { license: 'mit' }, { metaErrors: { maintainers: 'error: undefined variable alice' } }),
        pkg('fixed-meta', { platforms: ['x86_64-linux'] }),
        pkg('always', { license: 'mit' }, { metaErrors: { license: 'error: still broken' } }),
      ],
    );

    expect(s.maintainers).toEqual([]);
    expect(s.platforms).toEqual([]);
    expect(s.licenses).toEqual([]);
    expect(s.metaErrors).toEqual([
      { ...at('fixed-meta'), field: 'platforms', side: 'base', error: 'error: lib.platforms.nope missing' },
      { ...at('who'), field: 'maintainers', side: 'head', error: 'error: undefined variable alice' },
    ]);
  });

  it('reports a whole meta set that failed (nix-eval-jobs) once, and still compares versions by the drv name', () => {
    const s = one(
      [pkg('whole', { pname: 'whole', version: '1', license: 'mit', maintainers: ['alice'], broken: false })],
      [{ ...pkg('whole', {}, { name: 'whole-2' }), meta: undefined, metaErrors: { meta: 'error: meta threw' } }],
    );

    expect(s.metaErrors).toEqual([{ ...at('whole'), field: 'meta', side: 'head', error: 'error: meta threw' }]);
    expect(s.licenses).toEqual([]);
    expect(s.maintainers).toEqual([]);
    expect(s.versions).toEqual([
      { ...at('whole'), base: { pname: 'whole', version: '1' }, head: { pname: 'whole', version: '2' } },
    ]);
  });

  it('does not compare a version that failed to evaluate, and says it failed', () => {
    const s = one(
      [pkg('v', { pname: 'v', version: '1' })],
      [pkg('v', { pname: 'v' }, { name: 'v', metaErrors: { version: 'error: version threw' } })],
    );

    expect(s.versions).toEqual([]);
    expect(s.metaErrors).toEqual([{ ...at('v'), field: 'version', side: 'head', error: 'error: version threw' }]);
  });

  it('keys attributes by job: the same attribute in two jobs is two packages', () => {
    const s = changeSummary([
      { name: 'b-job', base: [pkg('x', { version: '1' })], head: [pkg('x', { version: '2' })] },
      { name: 'a-job', base: [], head: [pkg('x', { version: '2' })] },
    ]);

    expect(s.versions.map((v) => v.job)).toEqual(['b-job']);
    expect(s.added.map((v) => v.job)).toEqual(['a-job']);
  });

  it('says the same whatever order the evaluations list their attributes in', () => {
    const base = Array.from({ length: 50 }, (_, i) => pkg(`p${i}`, { version: '1', maintainers: [`m${i % 3}`] }));
    const head = Array.from({ length: 50 }, (_, i) =>
      pkg(`p${i + 10}`, { version: i % 2 === 0 ? '2' : '1', maintainers: [`m${i % 4}`] }),
    );
    const shuffled = <T>(xs: T[]): T[] =>
      xs
        .map((x, i) => [x, (i * 7919) % xs.length] as const)
        .sort((a, b) => a[1] - b[1])
        .map(([x]) => x);

    const s = one(base, head);

    expect(one(shuffled(base), shuffled([...head].reverse()))).toEqual(s);
    const names = s.versions.map((v) => v.attr);
    expect(names).toEqual([...names].sort());
    expect(s.added).toHaveLength(10);
    expect(s.removed).toHaveLength(10);
  });

  it('does work linear in the attributes: four times the attributes, four times the reads', () => {
    const reads = (n: number): number => {
      let count = 0;
      const counted = <T extends object>(o: T): T =>
        new Proxy(o, {
          get(target, key, receiver) {
            count++;
            const v = Reflect.get(target, key, receiver) as unknown;
            return typeof v === 'object' && v !== null ? counted(v) : v;
          },
        });
      const side = (version: string, shift: number): EvaluatedAttr[] =>
        Array.from({ length: n }, (_, i) =>
          counted(
            pkg(`pkg-${i + shift}`, {
              pname: `pkg-${i + shift}`,
              version: i % 10 === 0 ? version : '1',
              license: i % 7 === 0 ? [version] : 'mit',
              maintainers: ['alice', `m-${i % 5}`],
              platforms: i % 3 === 0 ? [SYSTEM, `${version}-linux`] : [SYSTEM, 'aarch64-linux'],
              broken: i % 11 === 0 && version === '2',
            }),
          ),
        );
      const jobs: ChangeSummaryJob[] = [{ name: 'pkgs', base: side('1', 0), head: side('2', n / 100) }];
      count = 0;
      const s = changeSummary(jobs);
      expect(s.versions.length).toBeGreaterThan(n / 20);
      return count;
    };

    const small = reads(2_000);
    const large = reads(8_000);

    expect(large / small).toBeGreaterThan(3.8);
    expect(large / small).toBeLessThan(4.3);
  });

  it('yields while it works, so a caller on the event loop can let it turn', () => {
    const base = Array.from({ length: 5_000 }, (_, i) => pkg(`p${i}`));
    const steps = changeSummarySteps([{ name: 'pkgs', base, head: base }]);
    let yields = 0;
    let step = steps.next();
    for (; !step.done; step = steps.next()) yields++;
    expect(yields).toBe(5);
    expect(isEmptySummary(step.value)).toBe(true);
  });
});

describe('groupChanges', () => {
  it('groups entries by what changed, most widespread first', () => {
    const s = one(
      ['a', 'b', 'c', 'd'].map((x) => pkg(x, { platforms: [SYSTEM] })),
      ['a', 'b', 'c', 'd'].map((x) => pkg(x, { platforms: x === 'd' ? [] : [SYSTEM, 'riscv64-linux'] })),
    );

    const groups = groupChanges(s.platforms, (p) => JSON.stringify([p.added, p.removed]));

    expect(groups.map((g) => [g.change.added, g.change.removed, g.attrs.map((a) => a.attr)])).toEqual([
      [['riscv64-linux'], [], ['a', 'b', 'c']],
      [[], [SYSTEM], ['d']],
    ]);
  });
});
