import type { Db } from '../db/database.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { AttrDiff, RebuildDiff } from './rebuild-diff.js';

export interface StoredJobDiff extends RebuildDiff {
  name: string;
}

/**
 * Rebuild diffs kept per repository, commit pair and job. Only what the change touches is stored — attributes
 * added, removed or changed, and those that fail to evaluate: a plain unchanged attribute is what both
 * evaluations say alike, and is restored from them on load (at nixpkgs' size, storing them cost some 25 MB a pair).
 */
export class DiffStore {
  constructor(private readonly db: Db) {}

  save(repo: string, base: string, head: string, jobs: readonly StoredJobDiff[]): void {
    const put = this.db.prepare(
      'INSERT OR REPLACE INTO rebuild_diffs (repo, base_commit, head_commit, job, diff_json, created_at) VALUES (?, ?, ?, ?, ?, ?)',
    );
    this.db.transaction(() => {
      for (const j of jobs) {
        const touched = j.attrs.filter((a) => a.change !== 'unchanged' || a.evalError !== undefined);
        put.run(repo, base, head, j.name, JSON.stringify({ ...j, attrs: touched, compact: true }), Date.now());
      }
    })();
  }

  /** Whether this pair was diffed and stored. */
  has(repo: string, base: string, head: string): boolean {
    return (
      this.db
        .prepare('SELECT 1 FROM rebuild_diffs WHERE repo = ? AND base_commit = ? AND head_commit = ? LIMIT 1')
        .get(repo, base, head) !== undefined
    );
  }

  /** The stored diff of every job of the two evaluations, or undefined when this pair was never diffed. */
  load(repo: string, base: CommitEvaluation, head: CommitEvaluation): StoredJobDiff[] | undefined {
    const rows = this.db
      .prepare(
        'SELECT diff_json FROM rebuild_diffs WHERE repo = ? AND base_commit = ? AND head_commit = ? ORDER BY job',
      )
      .all(repo, base.commit, head.commit) as Array<{ diff_json: string }>;
    if (rows.length === 0) return undefined;
    return rows.map((r) => {
      const stored = JSON.parse(r.diff_json) as StoredJobDiff & { compact?: true };
      const { compact, ...diff } = stored;
      return compact ? withUnchanged(diff, base, head) : diff;
    });
  }
}

/** A stored diff with the unchanged attributes of its job put back, in the order the diff gives (by name). */
function withUnchanged(diff: StoredJobDiff, base: CommitEvaluation, head: CommitEvaluation): StoredJobDiff {
  const attrsOf = (e: CommitEvaluation) =>
    new Map((e.jobs.find((j) => j.name === diff.name)?.attrs ?? []).map((a) => [a.attr, a]));
  const [b, h] = [attrsOf(base), attrsOf(head)];
  const touched = new Map(diff.attrs.map((a) => [a.attr, a]));
  const attrs: AttrDiff[] = [];
  for (const name of [...new Set([...b.keys(), ...h.keys(), ...touched.keys()])].sort()) {
    const kept = touched.get(name);
    if (kept) {
      attrs.push(kept);
      continue;
    }
    const [was, is] = [b.get(name), h.get(name)];
    if (!was || !is) continue; // an evaluation stored since differs from the one diffed: nothing to restore
    attrs.push({
      attr: name,
      system: is.system ?? was.system ?? null,
      change: 'unchanged',
      baseDrv: was.drvPath ?? null,
      headDrv: is.drvPath ?? null,
      blastRadius: 0,
    });
  }
  return { ...diff, attrs };
}
