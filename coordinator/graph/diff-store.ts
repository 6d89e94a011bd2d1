import type { Db } from '../db/database.js';
import type { RebuildDiff } from './rebuild-diff.js';

export interface StoredJobDiff extends RebuildDiff {
  name: string;
}

/** Rebuild diffs kept per repository, commit pair and job. */
export class DiffStore {
  constructor(private readonly db: Db) {}

  save(repo: string, base: string, head: string, jobs: readonly StoredJobDiff[]): void {
    const put = this.db.prepare(
      'INSERT OR REPLACE INTO rebuild_diffs (repo, base_commit, head_commit, job, diff_json, created_at) VALUES (?, ?, ?, ?, ?, ?)',
    );
    this.db.transaction(() => {
      for (const j of jobs) put.run(repo, base, head, j.name, JSON.stringify(j), Date.now());
    })();
  }

  /** The stored diff of every job, or undefined when this pair was never diffed. */
  load(repo: string, base: string, head: string): StoredJobDiff[] | undefined {
    const rows = this.db
      .prepare(
        'SELECT diff_json FROM rebuild_diffs WHERE repo = ? AND base_commit = ? AND head_commit = ? ORDER BY job',
      )
      .all(repo, base, head) as Array<{ diff_json: string }>;
    return rows.length > 0 ? rows.map((r) => JSON.parse(r.diff_json) as StoredJobDiff) : undefined;
  }
}
