import { storePathName } from '../../common/nix/store-path.js';
import type { Db } from '../db/database.js';
import { splitDrvName } from '../review/closure-diff.js';

/**
 * How long builds of a package take, per `pname` and system: what a run's ETA is estimated from (eta.ts). One row
 * per (system, pname, fixed-output or not), updated when a build succeeds, so that an estimate costs a lookup in
 * memory and never a scan of the attempts of every version of a package. Fetches (fixed-output derivations) are
 * kept apart from builds: `hello-2.12.1.tar.gz` and `hello-2.12.1` share the pname `hello` and nothing else.
 */

/** How one estimate was made: from the same package on the same system, on another system, or a guess. */
export type EstimateBasis = 'same-system' | 'other-system' | 'guess';

export interface DurationEstimate {
  seconds: number;
  basis: EstimateBasis;
}

/** The derivation's facts an estimate needs. */
export interface EstimateSubject {
  drvPath: string;
  system: string;
  fixedOutput: boolean;
}

interface Series {
  samples: number;
  mean: number;
}

// The mean is taken over about the last WINDOW builds: the first WINDOW samples are averaged evenly, after that each
// new one weighs 1/WINDOW (an exponential moving average), so a package whose build got slower is estimated right
// within a few builds, and one slow outlier moves the estimate by an eighth of its excess.
const WINDOW = 8;
// A guess for a package never built anywhere, until something was recorded (then the median of what was): a
// trivial derivation builds in seconds, a small C package in about a minute.
export const DEFAULT_GUESS_SECONDS = 60;
// The median of everything recorded (the guess) is computed again at most this often: it sorts every series, and
// moves little from one build to the next.
const MEDIAN_REFRESH_MS = 60_000;

/** The package name of a derivation, as Nix splits its name: `python3.11-requests-2.31.drv` → `python3.11-requests`. */
export function pnameOf(drvPath: string): string {
  const name = storePathName(drvPath);
  return splitDrvName(name.endsWith('.drv') ? name.slice(0, -'.drv'.length) : name).name;
}

/** A build's duration in seconds from its attempt: the agent's own start and finish when it reported both. */
export function buildSeconds(
  attempt: { assignedAt: number; startedAt: number | null },
  finishedAtMs: number,
  now: number,
): number | undefined {
  const start = attempt.startedAt ?? attempt.assignedAt;
  // Start and finish by the same (agent's) clock when both are there; the coordinator's otherwise.
  const end = attempt.startedAt !== null && finishedAtMs >= attempt.startedAt ? finishedAtMs : now;
  return end >= start ? (end - start) / 1000 : undefined;
}

const keyOf = (system: string, pname: string, fixedOutput: boolean): string =>
  `${fixedOutput ? 'fod' : 'build'}\u0000${system}\u0000${pname}`;
const anyKeyOf = (pname: string, fixedOutput: boolean): string => `${fixedOutput ? 'fod' : 'build'}\u0000${pname}`;

/** The next mean of a series after a sample (see WINDOW). */
function nextMean(s: Series | undefined, seconds: number): Series {
  if (!s) return { samples: 1, mean: seconds };
  const samples = s.samples + 1;
  return { samples, mean: s.mean + (seconds - s.mean) / Math.min(samples, WINDOW) };
}

export class BuildDurations {
  private readonly s;
  /** Every series, loaded on first use and kept up to date by `record`. */
  private series: Map<string, Series> | undefined;
  /** Per package across systems: samples and the sum of samples × mean (a weighted mean). */
  private readonly anySystem = new Map<string, { samples: number; weighted: number }>();
  private median: { seconds: number; at: number; stale: boolean } | undefined;

  constructor(
    private readonly db: Db,
    private readonly now: () => number = Date.now,
  ) {
    this.s = {
      all: db.prepare('SELECT system, pname, fixed_output, samples, mean_seconds FROM build_durations'),
      upsert: db.prepare(
        `INSERT INTO build_durations (system, pname, fixed_output, samples, mean_seconds, updated_at)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (system, pname, fixed_output)
         DO UPDATE SET samples = excluded.samples, mean_seconds = excluded.mean_seconds, updated_at = excluded.updated_at`,
      ),
    };
  }

  /** Records a successful build's duration (in the caller's transaction). */
  record(d: EstimateSubject, seconds: number): void {
    const all = this.load();
    const pname = pnameOf(d.drvPath);
    const key = keyOf(d.system, pname, d.fixedOutput);
    const before = all.get(key);
    const after = nextMean(before, seconds);
    this.s.upsert.run(d.system, pname, d.fixedOutput ? 1 : 0, after.samples, after.mean, this.now());
    all.set(key, after);
    this.addAny(anyKeyOf(pname, d.fixedOutput), before, after);
    if (this.median) this.median.stale = true;
  }

  /**
   * How long a derivation will take to build: the same package's mean on the same system, else its mean over the
   * systems it was built on, else a guess (the median of every recorded series, or DEFAULT_GUESS_SECONDS).
   */
  estimate(d: EstimateSubject): DurationEstimate {
    const all = this.load();
    const pname = pnameOf(d.drvPath);
    const same = all.get(keyOf(d.system, pname, d.fixedOutput));
    if (same) return { seconds: same.mean, basis: 'same-system' };
    const any = this.anySystem.get(anyKeyOf(pname, d.fixedOutput));
    if (any && any.samples > 0) return { seconds: any.weighted / any.samples, basis: 'other-system' };
    return { seconds: this.guess(), basis: 'guess' };
  }

  /** The median of the recorded series' means, or DEFAULT_GUESS_SECONDS before anything was recorded. */
  private guess(): number {
    const now = this.now();
    const m = this.median;
    if (m && (!m.stale || now - m.at < MEDIAN_REFRESH_MS)) return m.seconds;
    const means = [...this.load().values()].map((s) => s.mean).sort((a, b) => a - b);
    const seconds = means.length === 0 ? DEFAULT_GUESS_SECONDS : means[Math.floor(means.length / 2)]!;
    this.median = { seconds, at: now, stale: false };
    return seconds;
  }

  private load(): Map<string, Series> {
    if (this.series) return this.series;
    const all = new Map<string, Series>();
    const rows = this.s.all.all() as Array<{
      system: string;
      pname: string;
      fixed_output: number;
      samples: number;
      mean_seconds: number;
    }>;
    for (const r of rows) {
      const s = { samples: r.samples, mean: r.mean_seconds };
      all.set(keyOf(r.system, r.pname, r.fixed_output === 1), s);
      this.addAny(anyKeyOf(r.pname, r.fixed_output === 1), undefined, s);
    }
    this.series = all;
    return all;
  }

  private addAny(key: string, before: Series | undefined, after: Series): void {
    const a = this.anySystem.get(key) ?? { samples: 0, weighted: 0 };
    if (before) {
      a.samples -= before.samples;
      a.weighted -= before.samples * before.mean;
    }
    a.samples += after.samples;
    a.weighted += after.samples * after.mean;
    this.anySystem.set(key, a);
  }
}

/**
 * The table's first contents, from the successful attempts recorded before it existed (a migration): a coordinator
 * that is upgraded estimates from its history at once.
 */
export function seedBuildDurations(db: Db): void {
  const rows = db
    .prepare(
      `SELECT a.drv_path, d.system, d.is_fod, a.assigned_at, a.started_at, a.finished_at
         FROM attempts a JOIN derivations d ON d.drv_path = a.drv_path
        WHERE a.state = 'succeeded' AND a.finished_at IS NOT NULL ORDER BY a.finished_at`,
    )
    .iterate() as IterableIterator<{
    drv_path: string;
    system: string;
    is_fod: number;
    assigned_at: number;
    started_at: number | null;
    finished_at: number;
  }>;
  const series = new Map<string, { system: string; pname: string; fod: number; s: Series; at: number }>();
  for (const r of rows) {
    const seconds = (r.finished_at - (r.started_at ?? r.assigned_at)) / 1000;
    if (!(seconds >= 0)) continue;
    const pname = pnameOf(r.drv_path);
    const key = keyOf(r.system, pname, r.is_fod === 1);
    const before = series.get(key);
    series.set(key, {
      system: r.system,
      pname,
      fod: r.is_fod,
      s: nextMean(before?.s, seconds),
      at: r.finished_at,
    });
  }
  const insert = db.prepare(
    'INSERT INTO build_durations (system, pname, fixed_output, samples, mean_seconds, updated_at) VALUES (?, ?, ?, ?, ?, ?)',
  );
  for (const v of series.values()) insert.run(v.system, v.pname, v.fod, v.s.samples, v.s.mean, v.at);
}
