import type { Db } from '../db/database.js';
import type { EvalResult } from './eval-result.js';
import type { CommitEvaluation, JobEvaluation } from './repo-evaluation.js';

interface Row {
  job: string;
  allow_eval_failures: number;
  max_increase_percent: number | null;
  attrs_json: string;
  seconds: number;
}

/** Evaluations kept per repository, commit and job, so reviews can be recomputed from the database. */
export class EvaluationStore {
  constructor(private readonly db: Db) {}

  save(repo: string, evaluation: CommitEvaluation): void {
    const put = this.db.prepare(
      `INSERT OR REPLACE INTO commit_evaluations
         (repo, commit_sha, job, allow_eval_failures, max_increase_percent, attrs_json, seconds, created_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
    );
    this.db.transaction(() => {
      if (evaluation.configDigest !== undefined) {
        this.db
          .prepare('INSERT OR REPLACE INTO commit_configs (repo, commit_sha, config_hash) VALUES (?, ?, ?)')
          .run(repo, evaluation.commit, evaluation.configDigest);
      }
      for (const j of evaluation.jobs) {
        put.run(
          repo,
          evaluation.commit,
          j.name,
          j.allowEvalFailures ? 1 : 0,
          j.maxIncreasePercent ?? null,
          JSON.stringify(j.attrs),
          j.seconds,
          Date.now(),
        );
      }
    })();
  }

  /** The stored evaluation of a commit (every job it has), or undefined when the commit was never evaluated. */
  load(repo: string, commit: string): CommitEvaluation | undefined {
    const rows = this.db
      .prepare(
        `SELECT job, allow_eval_failures, max_increase_percent, attrs_json, seconds
           FROM commit_evaluations WHERE repo = ? AND commit_sha = ? ORDER BY job`,
      )
      .all(repo, commit) as Row[];
    if (rows.length === 0) return undefined;
    const jobs: JobEvaluation[] = rows.map((r) => ({
      name: r.job,
      allowEvalFailures: r.allow_eval_failures === 1,
      maxIncreasePercent: r.max_increase_percent ?? undefined,
      attrs: JSON.parse(r.attrs_json) as EvalResult[],
      seconds: r.seconds,
    }));
    const config = this.db
      .prepare('SELECT config_hash FROM commit_configs WHERE repo = ? AND commit_sha = ?')
      .get(repo, commit) as { config_hash: string } | undefined;
    return config ? { commit, jobs, configDigest: config.config_hash } : { commit, jobs };
  }

  /** The full commit id of an evaluated commit named by a unique prefix of at least 7 hex digits. */
  resolveCommit(repo: string, prefix: string): string | undefined {
    if (!/^[0-9a-f]{7,64}$/i.test(prefix)) return undefined;
    const rows = this.db
      .prepare(
        'SELECT DISTINCT commit_sha FROM commit_evaluations WHERE repo = ? AND commit_sha >= ? AND commit_sha < ? LIMIT 2',
      )
      .all(repo, prefix.toLowerCase(), `${prefix.toLowerCase()}\uffff`) as Array<{ commit_sha: string }>;
    return rows.length === 1 ? rows[0]!.commit_sha : undefined;
  }
}
