/**
 * bench/review: the end-to-end time of `ekaci review --no-build` (bin/ekaci.js as a child process, fresh
 * --data-dir) on a generated git repository of N attributes — L "libraries", each used by C−1 "apps" — whose
 * head commit changes one library, so exactly C attributes change. The baseline, measured in the same run, is
 * two bare `nix-instantiate` runs of every attribute, one per commit, each on its own `git worktree`. Prints
 * both times, the ratio, the peak RSS of the ekaci process and when each of its progress lines appeared;
 * writes the figures to .bench/review.json. Fails when the review does not say exactly C attributes changed.
 *
 *   [BENCH_ATTRS=5000 BENCH_CHANGED=50 BENCH_ROUNDS=1] npm run bench:review
 *
 * BENCH_SHAPE=nixpkgs (`npm run bench:review-scale`: 100,000 attributes, 5,000 changed) generates a set shaped like
 * nixpkgs instead: package sets nested under `recurseForDerivations`, one per group of BENCH_CHANGED packages, each
 * group 30 dependency layers deep with heavy fan-in on its core package (the head bumps group 0's core, so exactly
 * that group rebuilds); 4 % more attributes that throw or abort; `meta` on every package (a long `platforms` list,
 * licenses, maintainers), with `meta.maintainers` throwing on 2 % of them. The baseline instantiates the same good
 * attributes (bare `nix-instantiate` stops at the first throw). Also reported: the database's growth per evaluated
 * commit and the ekaci process's event-loop delay p99.
 *
 * A second baseline (BENCH_DAEMON_BASELINE=0 leaves it out) instantiates a third repository of the same shape through
 * a nix-daemon: what any user but root pays on a multi-user host, and how ekaci's sandboxed evaluator wrote its `.drv`
 * files before it had an evaluation store of its own (and still does for a repository that imports from
 * derivations).
 *
 * Measures dist/ (what bin/ekaci.js runs): build first; a warning says when a source file is newer.
 */
import { type SpawnSyncReturns, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Review } from '../coordinator/review/model.js';
import Database from 'better-sqlite3';
import { envInt, staleDist } from './bench-env.js';
import { silentLogger } from '../common/logging.js';
import { PrivateNixDaemon } from '../coordinator/eval/private-daemon.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const ekaciBin = join(root, 'bin', 'ekaci.js');
const NO_SUBSTITUTERS = ['--option', 'substituters', ''];
const dir = mkdtempSync(join(tmpdir(), 'ekaci-bench-review-'));
const nonce = (): string => randomBytes(5).toString('hex');

const attrs = envInt('BENCH_ATTRS', 5000, fail);
const changed = envInt('BENCH_CHANGED', 50, fail);
if (changed < 1 || attrs % changed !== 0)
  fail(`BENCH_ATTRS (${attrs}) must be a multiple of BENCH_CHANGED (${changed}), which must be ≥ 1`);
// One changed library plus its apps is exactly `changed` attributes.
const libraries = attrs / changed;
const appsPerLibrary = changed - 1;
const roundCount = envInt('BENCH_ROUNDS', 1, fail);
const shape = process.env.BENCH_SHAPE ?? 'libraries';
if (shape !== 'libraries' && shape !== 'nixpkgs') fail(`BENCH_SHAPE must be libraries or nixpkgs, got "${shape}"`);
const LAYERS = 30;
// Per group of the nixpkgs shape: attributes that throw or abort (BENCH_BAD_PERCENT, 4 % more than the good ones).
const badPercent = Number(process.env.BENCH_BAD_PERCENT ?? '4');
const badPerGroup = Math.ceil((changed * badPercent) / 100);
const badAttrs = shape === 'nixpkgs' ? libraries * badPerGroup : 0;

// bin/ekaci.js runs dist/, not the sources: a stale build would be measured without anyone noticing.
const distStale = staleDist(root, fail);
if (distStale) process.stderr.write(`warning: dist/ is older than ${distStale}; run npm run build first\n`);

// Untimed warm-up: the first nix, git and node start-ups read their binaries from disk.
run('nix-instantiate', [...NO_SUBSTITUTERS, '--eval', '-E', 'builtins.currentSystem']);
run('git', ['--version']);
run('node', [ekaciBin, '--help']);

/*
 * Order and nonces. Each side gets its own repository with its own nonce, so each writes the same N + C new
 * .drv files: had both used one repository, whichever ran second would find every .drv already valid in the
 * store and skip writing it (the head commit shows how much that is worth: its nix-instantiate, with all but C
 * .drv files already written, takes a tenth of the base's). With separate nonces, order matters only through
 * warm caches (page cache, Nix's database), which the warm-up above mostly evens out; ekaci runs first so that
 * whatever warm-up is left favours the baseline — the ratio errs against ekaci, never for it. With
 * BENCH_ROUNDS > 1 the order alternates and the median ratio is reported: on a busy machine single runs
 * swing widely (2× to 5× at the defaults, on 2 CPUs shared with other work).
 */
// A third repository per round, instantiated through a nix-daemon: what a bare nix-instantiate costs any user but
// root on a multi-user host (ekaci's evaluator writes its own evaluation store directly instead).
const daemon = process.env.BENCH_DAEMON_BASELINE === '0' ? undefined : await PrivateNixDaemon.start(silentLogger());
const rounds: Round[] = [];
for (let i = 0; i < roundCount; i++) {
  const roundDir = join(dir, `round-${i + 1}`);
  process.stderr.write(`round ${i + 1}/${roundCount}: two repositories of ${attrs} attributes in ${roundDir}…\n`);
  const ekaciRepo = makeRepo(join(roundDir, 'ekaci-repo'), nonce(), true);
  const baselineRepo = makeRepo(join(roundDir, 'baseline-repo'), nonce(), false);
  const ekaciFirst = i % 2 === 0;
  let ekaci: EkaciRun | undefined;
  if (ekaciFirst) ekaci = await measureEkaci(ekaciRepo, roundDir);
  const baseline = measureBaseline(baselineRepo, roundDir);
  const daemonBaseline = daemon
    ? measureBaseline(makeRepo(join(roundDir, 'daemon-repo'), nonce(), false), roundDir, daemon.socketPath)
    : undefined;
  ekaci ??= await measureEkaci(ekaciRepo, roundDir);
  rounds.push({
    ekaciFirst,
    ekaci,
    baseline,
    ratio: ekaci.seconds / baseline.seconds,
    ...(daemonBaseline ? { daemonBaseline, daemonRatio: ekaci.seconds / daemonBaseline.seconds } : {}),
  });
}

// The round of the median ratio (the lower middle one for an even count) is the one shown in full.
const byRatio = [...rounds].sort((a, b) => a.ratio - b.ratio);
const median = byRatio[Math.floor((byRatio.length - 1) / 2)]!;
const medianRatio = byRatio.length % 2 === 1 ? median.ratio : (median.ratio + byRatio[byRatio.length / 2]!.ratio) / 2;
const peakRssKiB = maxOf(rounds.map((r) => r.ekaci.peakRssKiB));
const treePeakRssKiB = maxOf(rounds.map((r) => r.ekaci.treePeakRssKiB));

const mib = (kib: number | undefined): string => (kib === undefined ? 'n/a' : `${(kib / 1024).toFixed(0)} MiB`);
const mibOf = (bytes: number): string => `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
const { ekaci, baseline } = median;
const rows: [string, string][] = [
  [
    'attributes',
    shape === 'nixpkgs'
      ? `${attrs} good in ${libraries} nested sets of ${changed} (${LAYERS} layers each) + ${badAttrs} that throw, ` +
        `${changed} changed`
      : `${attrs} (${libraries} libraries × ${appsPerLibrary} apps + the libraries), ${changed} changed`,
  ],
  ['CPUs', String(availableParallelism())],
  ...(rounds.length > 1
    ? rounds.map((r, i): [string, string] => [
        `round ${i + 1}`,
        `baseline ${r.baseline.seconds.toFixed(2)} s, ekaci ${r.ekaci.seconds.toFixed(2)} s, ` +
          `${r.ratio.toFixed(2)}× (${r.ekaciFirst ? 'ekaci' : 'baseline'} first)${r === median ? ', shown below' : ''}`,
      ])
    : []),
  ['nix-instantiate base', `${baseline.baseSeconds.toFixed(2)} s`],
  ['nix-instantiate head', `${baseline.headSeconds.toFixed(2)} s`],
  [
    'baseline (both)',
    `${baseline.seconds.toFixed(2)} s (+ ${baseline.worktreeSeconds.toFixed(2)} s of worktrees, not counted)`,
  ],
  ['ekaci review --no-build', `${ekaci.seconds.toFixed(2)} s`],
  // When each of ekaci's progress lines appeared: where its time goes.
  ...ekaci.timeline.map((l): [string, string] => [`  at ${l.at.toFixed(2)} s`, l.line.trim().slice(0, 100)]),
  [`  at ${ekaci.seconds.toFixed(2)} s`, 'exit'],
  ['ratio ekaci/baseline', `${medianRatio.toFixed(2)}×${rounds.length > 1 ? ` (median of ${rounds.length})` : ''}`],
  ...(median.daemonBaseline && median.daemonRatio !== undefined
    ? ([
        [
          'nix-instantiate via daemon',
          `base ${median.daemonBaseline.baseSeconds.toFixed(2)} s, head ${median.daemonBaseline.headSeconds.toFixed(2)} s, ` +
            `both ${median.daemonBaseline.seconds.toFixed(2)} s`,
        ],
        ['ratio ekaci/daemon baseline', `${median.daemonRatio.toFixed(2)}× (the round shown)`],
      ] as [string, string][])
    : []),
  ['ekaci peak RSS', mib(peakRssKiB)],
  [
    'ekaci event-loop delay p99',
    `${median.ekaci.loopDelayP99Ms?.toFixed(0) ?? 'n/a'} ms (max ${median.ekaci.loopDelayMaxMs?.toFixed(0) ?? 'n/a'} ms)`,
  ],
  [
    'database per evaluated commit',
    `${mibOf(median.ekaci.commitBytes.head)} for the head, a further commit; ${mibOf(median.ekaci.commitBytes.before)} ` +
      `for the first (compacted; the files: ${mibOf(median.ekaci.databaseBytes)})`,
  ],
  ['largest tables', median.ekaci.tables.map((t) => `${t.name} ${mibOf(t.bytes)}`).join(', ')],
  ['largest in its tree', `${mib(treePeakRssKiB)} (ekaci or one of its nix processes, /usr/bin/time -v)`],
];
const width = Math.max(...rows.map(([k]) => k.length));
for (const [k, v] of rows) console.log(`${k.padEnd(width)}  ${v}`);
if (distStale) console.log(`(dist/ was older than ${distStale}: the figures may not be those of the sources)`);

const results = {
  bench: 'review',
  date: new Date().toISOString(),
  commit: run('git', ['-C', root, 'rev-parse', 'HEAD']).stdout.trim(),
  distStale: distStale ?? null,
  nix: run('nix-instantiate', ['--version']).stdout.trim(),
  node: process.version,
  cpus: availableParallelism(),
  shape,
  attrs,
  badAttrs,
  changed,
  libraries,
  appsPerLibrary,
  ratio: medianRatio,
  daemonRatio: median.daemonRatio ?? null,
  peakRssKiB: peakRssKiB ?? null,
  treePeakRssKiB: treePeakRssKiB ?? null,
  rounds: rounds.map((r) => ({
    ekaciFirst: r.ekaciFirst,
    ratio: r.ratio,
    baseline: r.baseline,
    daemonBaseline: r.daemonBaseline ?? null,
    ekaci: {
      seconds: r.ekaci.seconds,
      timeline: r.ekaci.timeline,
      peakRssKiB: r.ekaci.peakRssKiB ?? null,
      treePeakRssKiB: r.ekaci.treePeakRssKiB ?? null,
      loopDelayP99Ms: r.ekaci.loopDelayP99Ms ?? null,
      loopDelayMaxMs: r.ekaci.loopDelayMaxMs ?? null,
      databaseBytes: r.ekaci.databaseBytes,
      commitBytes: r.ekaci.commitBytes,
      tables: r.ekaci.tables,
    },
  })),
};
mkdirSync(join(root, '.bench'), { recursive: true });
writeFileSync(join(root, '.bench', 'review.json'), `${JSON.stringify(results, null, 2)}\n`);
daemon?.stop();
if (!process.env.BENCH_KEEP) rmSync(dir, { recursive: true, force: true });

interface Repo {
  dir: string;
  base: string;
  head: string;
}

interface BaselineRun {
  baseSeconds: number;
  headSeconds: number;
  /** Both nix-instantiate runs: the baseline. */
  seconds: number;
  /** Creating the two worktrees, not part of the baseline. */
  worktreeSeconds: number;
}

interface Round {
  ekaciFirst: boolean;
  ekaci: EkaciRun;
  baseline: BaselineRun;
  ratio: number;
  /** The baseline through a nix-daemon (BENCH_DAEMON_BASELINE, on by default). */
  daemonBaseline?: BaselineRun;
  daemonRatio?: number;
}

/**
 * One worktree per commit (timed apart), then a bare nix-instantiate of every attribute on each; with `store`, through
 * that nix-daemon socket, as any user but root instantiates on a multi-user host.
 */
function measureBaseline(repo: Repo, roundDir: string, store?: string): BaselineRun {
  const how = store ? 'through a nix-daemon' : 'direct store';
  process.stderr.write(`  baseline: nix-instantiate of both commits (${how})…\n`);
  const t0 = performance.now();
  const worktrees = (['base', 'head'] as const).map((side) => {
    const wt = join(roundDir, `baseline-${store ? 'daemon-' : ''}${side}`);
    run('git', ['-C', repo.dir, 'worktree', 'add', '--quiet', '--detach', wt, repo[side]]);
    return wt;
  });
  const worktreeSeconds = (performance.now() - t0) / 1000;
  const [base, head] = worktrees.map((wt) => {
    const t = performance.now();
    const r = run('nix-instantiate', [
      ...NO_SUBSTITUTERS,
      ...(store ? ['--store', `unix://${store}`] : []),
      join(wt, 'default.nix'),
    ]);
    const seconds = (performance.now() - t) / 1000;
    const drvs = r.stdout.split('\n').filter(Boolean).sort();
    if (drvs.length !== attrs) fail(`nix-instantiate gave ${drvs.length} derivations, expected ${attrs}`);
    return { seconds, drvs };
  }) as [{ seconds: number; drvs: string[] }, { seconds: number; drvs: string[] }];
  // The same change as ekaci's: derivations only one side has.
  const headSet = new Set(head.drvs);
  const differ = base.drvs.filter((d) => !headSet.has(d)).length;
  if (differ !== changed) fail(`the baseline sees ${differ} changed derivations, not ${changed}`);
  return {
    baseSeconds: base.seconds,
    headSeconds: head.seconds,
    seconds: base.seconds + head.seconds,
    worktreeSeconds,
  };
}

function maxOf(values: (number | undefined)[]): number | undefined {
  const known = values.filter((v): v is number => v !== undefined);
  return known.length > 0 ? Math.max(...known) : undefined;
}

/** A git repository with a base commit and a head commit that changes library 0 (`withBad`: and the failures). */
function makeRepo(repoDir: string, tag: string, withBad: boolean): Repo {
  mkdirSync(join(repoDir, '.eka-ci'), { recursive: true });
  const git = (...args: string[]): string =>
    run('git', [
      '-C',
      repoDir,
      '-c',
      'user.name=bench',
      '-c',
      'user.email=bench@localhost',
      '-c',
      'commit.gpgsign=false',
      ...args,
    ]).stdout.trim();
  git('init', '--quiet', '--initial-branch=main');
  writeFileSync(
    join(repoDir, '.eka-ci', 'config.json'),
    `${JSON.stringify({ jobs: { pkgs: { file: 'default.nix' } } })}\n`,
  );
  const generate = shape === 'nixpkgs' ? nixpkgsShaped : packageSet;
  writeFileSync(join(repoDir, 'default.nix'), generate(tag, 1, withBad));
  git('add', '.');
  git('commit', '--quiet', '-m', 'base');
  const base = git('rev-parse', 'HEAD');
  writeFileSync(join(repoDir, 'default.nix'), generate(tag, 2, withBad));
  git('commit', '--quiet', '-am', 'head: library 0, version 2');
  return { dir: repoDir, base, head: git('rev-parse', 'HEAD') };
}

/** `libraries` libraries (lib<l>) and their apps (app<l>_<a>, each depending on its library). */
function packageSet(tag: string, lib0Version: number, _withBad: boolean): string {
  const lines: string[] = [];
  for (let l = 0; l < libraries; l++) {
    lines.push(`  lib${l} = mk "lib${l}" "${l === 0 ? lib0Version : 1}" [ ];`);
    for (let a = 0; a < appsPerLibrary; a++) lines.push(`  app${l}_${a} = mk "app${l}_${a}" "1" [ lib${l} ];`);
  }
  return `let
  mk = name: version: deps: derivation {
    name = "\${name}-${tag}-\${version}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo $deps > $out" ];
    inherit deps;
  };
in rec {
${lines.join('\n')}
}
`;
}

/**
 * The nixpkgs shape: `set<g>` (recurseForDerivations) per group, holding `core` and `p<i>`; p<i> sits in layer
 * i mod 30 and depends on core (layer 0) or on three packages of the layer below (heavy fan-in on core and on the
 * low layers); `bad<j>` throw or abort. Only group 0's core has version `coreVersion`.
 */
function nixpkgsShaped(tag: string, coreVersion: number, withBad: boolean): string {
  const perLayer = Math.ceil((changed - 1) / LAYERS);
  const sets: string[] = [];
  for (let g = 0; g < libraries; g++) {
    const lines = [`    core = mk "core${g}" "${g === 0 ? coreVersion : 1}" [ ] 0;`];
    for (let i = 0; i < changed - 1; i++) {
      const layer = Math.floor(i / perLayer);
      const below = (k: number): number => (layer - 1) * perLayer + ((i * 7 + k * 13) % perLayer);
      const deps = layer === 0 ? 'core' : [0, 1, 2].map((k) => `p${below(k)}`).join(' ');
      lines.push(`    p${i} = mk "g${g}p${i}" "1" [ ${deps} ] ${i};`);
    }
    if (withBad) {
      for (let j = 0; j < badPerGroup; j++) {
        lines.push(
          j % 2 === 0 ? `    bad${j} = throw "g${g} bad${j}: marked broken";` : `    bad${j} = abort "g${g} bad${j}";`,
        );
      }
    }
    sets.push(`  set${g} = rec {\n    recurseForDerivations = true;\n${lines.join('\n')}\n  };`);
  }
  return `let
  platforms = [ ${Array.from({ length: 40 }, (_, k) => `"arch${k}-linux"`).join(' ')} builtins.currentSystem ];
  mk = name: version: deps: n: (derivation {
    name = "\${name}-${tag}-\${version}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo $deps > $out" ];
    inherit deps;
  }) // {
    meta = {
      description = "package \${name}";
      license = if n / 3 * 3 == n then { spdxId = "MIT"; } else { spdxId = "GPL-3.0-or-later"; };
      maintainers = if n / 50 * 50 == n && n > 0 then throw "\${name}: maintainer list broken" else [ { github = "m\${toString n}"; } ];
      inherit platforms;
    };
  };
in {
${sets.join('\n')}
}
`;
}

interface EkaciRun {
  seconds: number;
  /** Each stderr line (ekaci's progress) and when it appeared, in seconds from the start of the process. */
  timeline: { at: number; line: string }[];
  stderr: string;
  peakRssKiB: number | undefined;
  treePeakRssKiB: number | undefined;
  loopDelayP99Ms: number | undefined;
  loopDelayMaxMs: number | undefined;
  /** The data directory's database files after the review of two commits. */
  databaseBytes: number;
  /** What the head commit (evaluated second) added to the database, and its size before: see `commitBytes`. */
  commitBytes: { head: number; before: number };
  /** The largest tables and indexes in it. */
  tables: Array<{ name: string; bytes: number }>;
}

/** `ekaci review --no-build` of the repository's two commits, checked to be the review of the change made. */
async function measureEkaci(repo: Repo, roundDir: string): Promise<EkaciRun> {
  process.stderr.write('  ekaci review --no-build…\n');
  const jsonFile = join(roundDir, 'review.json');
  const rssFile = join(roundDir, 'ekaci-rss');
  const timeFile = join(roundDir, 'ekaci-time');
  // The ekaci process's own peak RSS, written as it exits (the variable is not passed on to its children).
  // And its event-loop delay, sampled every 10 ms.
  const hook =
    'data:text/javascript,import { appendFileSync } from "node:fs"; import { monitorEventLoopDelay } from "node:perf_hooks"; ' +
    'const f = process.env.EKACI_BENCH_RSS_FILE; delete process.env.EKACI_BENCH_RSS_FILE; ' +
    'const h = monitorEventLoopDelay({ resolution: 10 }); h.enable(); ' +
    'if (f) process.on("exit", () => appendFileSync(f, `${process.resourceUsage().maxRSS} ${h.percentile(99) / 1e6} ${h.max / 1e6}\\n`));';
  // BENCH_PROFILE=DIR: a CPU profile of the ekaci process in DIR (for Chrome's DevTools), to see where time goes.
  const profile = process.env.BENCH_PROFILE ? ['--cpu-prof', '--cpu-prof-dir', process.env.BENCH_PROFILE] : [];
  const ekaciArgs = [
    ...profile,
    '--import',
    hook,
    ekaciBin,
    'review',
    '--repo',
    repo.dir,
    '--base',
    repo.base,
    '--head',
    repo.head,
    '--no-build',
    '--json',
    jsonFile,
    '--data-dir',
    join(roundDir, 'ekaci-data'),
  ];
  const withTime = existsSync('/usr/bin/time');
  const [cmd, args] = withTime
    ? ['/usr/bin/time', ['-v', '-o', timeFile, process.execPath, ...ekaciArgs]]
    : [process.execPath, ekaciArgs];
  const lines: EkaciRun['timeline'] = [];
  let stderr = '';
  const t = performance.now();
  const child = spawn(cmd, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, EKACI_BENCH_RSS_FILE: rssFile },
  });
  let partial = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => {
    const at = (performance.now() - t) / 1000;
    stderr += chunk;
    const parts = (partial + chunk).split('\n');
    partial = parts.pop() ?? '';
    for (const line of parts) lines.push({ at, line });
  });
  const code = await new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (c) => resolve(c));
  });
  const seconds = (performance.now() - t) / 1000;
  if (code !== 0) fail(`ekaci review exited ${code}:\n${stderr.slice(-4000)}`);
  const review = JSON.parse(readFileSync(jsonFile, 'utf8')) as Review;
  verifyReview(review);

  const own = existsSync(rssFile)
    ? readFileSync(rssFile, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => l.split(' ').map(Number) as [number, number, number])
    : [];
  const dataDir = join(roundDir, 'ekaci-data');
  const databaseBytes = readdirSync(dataDir)
    .filter((f) => f.startsWith('ekaci.sqlite'))
    .reduce((sum, f) => sum + statSync(join(dataDir, f)).size, 0);
  // Where the bytes are: tables and indexes by size (SQLite's dbstat).
  const db = new Database(join(dataDir, 'ekaci.sqlite'), { readonly: true });
  const tables = db
    .prepare('SELECT name, SUM(pgsize) AS bytes FROM dbstat GROUP BY name ORDER BY bytes DESC LIMIT 6')
    .all() as Array<{ name: string; bytes: number }>;
  db.close();
  const perCommit = commitBytes(join(dataDir, 'ekaci.sqlite'), review.head.rev, roundDir);
  const tree = withTime ? /Maximum resident set size \(kbytes\): (\d+)/.exec(readFileSync(timeFile, 'utf8')) : null;
  return {
    seconds,
    timeline: lines,
    stderr,
    peakRssKiB: own.length > 0 ? Math.max(...own.map((o) => o[0])) : undefined,
    loopDelayP99Ms: own.length > 0 ? Math.max(...own.map((o) => o[1])) : undefined,
    loopDelayMaxMs: own.length > 0 ? Math.max(...own.map((o) => o[2])) : undefined,
    databaseBytes,
    commitBytes: perCommit,
    tables,
    treePeakRssKiB: tree ? Number(tree[1]) : undefined,
  };
}

/**
 * What one commit's evaluation adds to a database that holds the commit before it: the database compacted (VACUUM
 * INTO a copy) with everything, less the same copy without that commit (its evaluation's rows, the values, names and
 * lists only it used, its configuration and the rebuild diffs that end at it). The first commit of a repository
 * stores every attribute; a further one, what it changed and a row per attribute.
 */
function commitBytes(database: string, sha: string, scratch: string): { head: number; before: number } {
  const whole = join(scratch, `whole-${nonce()}.sqlite`);
  const without = join(scratch, `without-${nonce()}.sqlite`);
  const db = new Database(database, { readonly: true });
  db.prepare('VACUUM INTO ?').run(whole);
  db.close();
  const copy = new Database(whole);
  // The commit's own rows, then what only they used.
  for (const statement of [
    'DELETE FROM evaluation_attrs WHERE evaluation_id IN (SELECT id FROM evaluations WHERE commit_sha = ?)',
    'DELETE FROM evaluations WHERE commit_sha = ?',
    'DELETE FROM commit_configs WHERE commit_sha = ?',
    'DELETE FROM rebuild_diffs WHERE head_commit = ?',
  ])
    copy.prepare(statement).run(sha);
  copy.exec(`
    DELETE FROM eval_values WHERE id NOT IN (SELECT value_id FROM evaluation_attrs);
    DELETE FROM eval_lists WHERE id NOT IN (SELECT platforms_id FROM eval_values WHERE platforms_id IS NOT NULL);
    DELETE FROM eval_attr_names WHERE id NOT IN (SELECT name_id FROM evaluation_attrs);
  `);
  copy.prepare('VACUUM INTO ?').run(without);
  copy.close();
  const before = statSync(without).size;
  const head = statSync(whole).size - before;
  rmSync(whole);
  rmSync(without);
  return { head, before };
}

/** The review must be that of the change made: exactly `changed` attributes, library 0 and its apps. */
function verifyReview(r: Review): void {
  const counts = new Map<string, number>();
  for (const a of r.attrs) counts.set(a.change, (counts.get(a.change) ?? 0) + 1);
  const expected = new Set(
    shape === 'nixpkgs'
      ? ['set0.core', ...Array.from({ length: changed - 1 }, (_, i) => `set0.p${i}`)]
      : ['lib0', ...Array.from({ length: appsPerLibrary }, (_, a) => `app0_${a}`)],
  );
  const changedAttrs = r.attrs.filter((a) => a.change === 'changed').map((a) => a.attr);
  const problems: string[] = [];
  if (r.attrs.length !== attrs + badAttrs) {
    problems.push(`${r.attrs.length} attributes reviewed, expected ${attrs + badAttrs}`);
  }
  if (changedAttrs.length !== changed) problems.push(`${changedAttrs.length} changed, expected ${changed}`);
  const unexpected = changedAttrs.filter((a) => !expected.has(a));
  if (unexpected.length > 0) problems.push(`unexpectedly changed: ${unexpected.slice(0, 10).join(', ')}`);
  for (const c of ['added', 'removed']) if (counts.get(c)) problems.push(`${counts.get(c)} ${c}`);
  const evalErrors = r.attrs.filter((a) => a.base?.eval === 'error' || a.head?.eval === 'error');
  if (evalErrors.length !== badAttrs) {
    problems.push(
      `${evalErrors.length} evaluation errors, expected ${badAttrs}: e.g. ${evalErrors[0]?.attr ?? 'none'}`,
    );
  }
  if (problems.length > 0) {
    fail(`the review is not that of the change (${[...counts].map(([c, n]) => `${c}: ${n}`).join(', ')}):
  ${problems.join('\n  ')}`);
  }
}

function run(cmd: string, args: string[]): SpawnSyncReturns<string> {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 30, stdio: ['ignore', 'pipe', 'pipe'] });
  if (r.status !== 0) fail(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}):\n${r.stderr.slice(-4000)}`);
  return r;
}

function fail(message: string): never {
  process.stderr.write(`bench/review FAILED: ${message}\n(files kept in ${dir})\n`);
  process.exit(1);
}
