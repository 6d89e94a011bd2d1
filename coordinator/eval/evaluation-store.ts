import type { CheckPlan } from './check-shells.js';
import { createHash } from 'node:crypto';
import { turn } from '../../common/turn.js';
import type { Db } from '../db/database.js';
import type { EvalResult } from './eval-result.js';
import type { CommitEvaluation, JobEvaluation } from './repo-evaluation.js';

interface JobRow {
  id: number;
  job: string;
  allow_eval_failures: number;
  max_increase_percent: number | null;
  size_base_branch: string | null;
  caches_json: string | null;
  seconds: number;
}

// Attributes written per transaction: a nixpkgs-sized evaluation (100,000 attributes) is stored in slices, with the
// event loop free between them for agents and webhooks.
const SAVE_SLICE = 5_000;

/** A row of an evaluation as read: the name, the value's JSON, and the platforms list stored apart (if any). */
interface StoredAttr {
  attr: string;
  json: string;
  listId: number | null;
  list: string | null;
}

/** What an evaluated attribute is, without its name: stored once however many commits and attributes share it. */
type AttrValue = Omit<EvalResult, 'attr'>;

/** A job's evaluation of a commit in figures. */
export interface EvaluationSummary {
  job: string;
  attrs: number;
  /** Attributes that failed to evaluate. */
  errors: number;
  allowEvalFailures: boolean;
  seconds: number;
  evaluatedAt: number;
}

/** An attribute as one evaluation saw it. */
export interface AttrInCommit {
  commit: string;
  job: string;
  evaluatedAt: number;
  drvPath: string | null;
  system: string | null;
  error: string | null;
}

/**
 * Evaluations kept per repository, commit and job, so reviews can be recomputed from the database.
 *
 * Stored as rows, not one document per commit: an attribute of an evaluation is a row (`evaluation_attrs`: its
 * position, its name's id, its value's id); names (`eval_attr_names`) and values (`eval_values`: drv path, outputs,
 * meta, errors as JSON, keyed by a digest of that JSON) are each stored once. Between two commits of a package set
 * almost every attribute evaluates to the same value, so a commit costs a few bytes per attribute plus what changed.
 *
 * An evaluation becomes visible (`load`) only once all its attributes are stored (`complete = 1`); a save cut short
 * by a crash leaves an incomplete one, which the next save of that commit and `retain` remove.
 */
export class EvaluationStore {
  private readonly s;

  constructor(private readonly db: Db) {
    this.s = {
      insertAttr: db.prepare(
        'INSERT INTO evaluation_attrs (evaluation_id, position, name_id, value_id) VALUES (?, ?, ?, ?)',
      ),
      nameId: db.prepare('SELECT id FROM eval_attr_names WHERE name = ?'),
      insertName: db.prepare('INSERT INTO eval_attr_names (name) VALUES (?)'),
      valueId: db.prepare('SELECT id FROM eval_values WHERE digest = ?'),
      insertValue: db.prepare('INSERT INTO eval_values (digest, json, platforms_id) VALUES (?, ?, ?)'),
      listId: db.prepare('SELECT id FROM eval_lists WHERE digest = ?'),
      insertList: db.prepare('INSERT INTO eval_lists (digest, json) VALUES (?, ?)'),
    };
  }

  /** Stores a commit's evaluation, replacing an earlier one of the same commit and jobs. */
  async save(repo: string, evaluation: CommitEvaluation): Promise<void> {
    for (const job of evaluation.jobs) {
      const id = this.db.transaction(() => {
        this.deleteJob(repo, evaluation.commit, job.name);
        return Number(
          this.db
            .prepare(
              `INSERT INTO evaluations
                 (repo, commit_sha, job, allow_eval_failures, max_increase_percent, seconds, created_at, complete,
                  caches_json, size_base_branch)
               VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)`,
            )
            .run(
              repo,
              evaluation.commit,
              job.name,
              job.allowEvalFailures ? 1 : 0,
              job.maxIncreasePercent ?? null,
              job.seconds,
              Date.now(),
              job.caches?.length ? JSON.stringify(job.caches) : null,
              job.sizeBaseBranch ?? null,
            ).lastInsertRowid,
        );
      })();
      for (let start = 0; start < job.attrs.length; start += SAVE_SLICE) {
        if (start > 0) await turn();
        this.db.transaction(() => this.putAttrs(id, start, job.attrs.slice(start, start + SAVE_SLICE)))();
      }
      this.db.prepare('UPDATE evaluations SET complete = 1 WHERE id = ?').run(id);
    }
    if (evaluation.configDigest !== undefined) {
      this.db
        .prepare(
          'INSERT OR REPLACE INTO commit_configs (repo, commit_sha, config_hash, checks_json) VALUES (?, ?, ?, ?)',
        )
        .run(
          repo,
          evaluation.commit,
          evaluation.configDigest,
          evaluation.checks ? JSON.stringify(evaluation.checks) : null,
        );
    }
  }

  /** The stored evaluation of a commit (every job it has), or undefined when the commit was never evaluated. */
  load(repo: string, commit: string): CommitEvaluation | undefined {
    const rows = this.db
      .prepare(
        `SELECT id, job, allow_eval_failures, max_increase_percent, size_base_branch, seconds, caches_json FROM evaluations
          WHERE repo = ? AND commit_sha = ? AND complete = 1 ORDER BY job`,
      )
      .all(repo, commit) as JobRow[];
    if (rows.length === 0) return undefined;
    const attrsOf = this.db.prepare(
      `SELECT n.name AS attr, v.json AS json, v.platforms_id AS listId, l.json AS list FROM evaluation_attrs a
         JOIN eval_attr_names n ON n.id = a.name_id JOIN eval_values v ON v.id = a.value_id
         LEFT JOIN eval_lists l ON l.id = v.platforms_id
        WHERE a.evaluation_id = ? ORDER BY a.position`,
    );
    const lists = new Map<number, string[]>();
    const attr = (a: StoredAttr): EvalResult => {
      const value: EvalResult = { attr: a.attr, ...(JSON.parse(a.json) as AttrValue) };
      if (a.listId !== null && a.list !== null && value.meta) {
        let platforms = lists.get(a.listId);
        if (!platforms) lists.set(a.listId, (platforms = JSON.parse(a.list) as string[]));
        value.meta = { ...value.meta, platforms };
      }
      return value;
    };
    const jobs: JobEvaluation[] = rows.map((r) => ({
      name: r.job,
      allowEvalFailures: r.allow_eval_failures === 1,
      maxIncreasePercent: r.max_increase_percent ?? undefined,
      ...(r.size_base_branch !== null ? { sizeBaseBranch: r.size_base_branch } : {}),
      attrs: (attrsOf.all(r.id) as StoredAttr[]).map(attr),
      seconds: r.seconds,
      ...(r.caches_json ? { caches: JSON.parse(r.caches_json) as string[] } : {}),
    }));
    const config = this.db
      .prepare('SELECT config_hash, checks_json FROM commit_configs WHERE repo = ? AND commit_sha = ?')
      .get(repo, commit) as { config_hash: string; checks_json: string | null } | undefined;
    if (!config) return { commit, jobs };
    const checks = config.checks_json === null ? {} : { checks: JSON.parse(config.checks_json) as CheckPlan[] };
    return { commit, jobs, configDigest: config.config_hash, ...checks };
  }

  /** Each job's evaluation of a commit in figures (attributes, errors, time), without reading the attributes. */
  summaries(repo: string, commit: string): EvaluationSummary[] {
    const rows = this.db
      .prepare(
        `SELECT e.job, e.allow_eval_failures, e.seconds, e.created_at, COUNT(a.position) AS attrs,
                COALESCE(SUM(json_extract(v.json, '$.error') IS NOT NULL), 0) AS errors
           FROM evaluations e LEFT JOIN evaluation_attrs a ON a.evaluation_id = e.id
           LEFT JOIN eval_values v ON v.id = a.value_id
          WHERE e.repo = ? AND e.commit_sha = ? AND e.complete = 1 GROUP BY e.id ORDER BY e.job`,
      )
      .all(repo, commit) as Array<{
      job: string;
      allow_eval_failures: number;
      seconds: number;
      created_at: number;
      attrs: number;
      errors: number;
    }>;
    return rows.map((r) => ({
      job: r.job,
      attrs: r.attrs,
      errors: r.errors,
      allowEvalFailures: r.allow_eval_failures === 1,
      seconds: r.seconds,
      evaluatedAt: r.created_at,
    }));
  }

  /** An attribute in each evaluation of a repository that has it, oldest first: its derivation, or its error. */
  attrHistory(repo: string, attr: string, job?: string): AttrInCommit[] {
    const rows = this.db
      .prepare(
        `SELECT e.commit_sha, e.job, e.created_at, v.json FROM eval_attr_names n
           JOIN evaluation_attrs a ON a.name_id = n.id JOIN evaluations e ON e.id = a.evaluation_id
           JOIN eval_values v ON v.id = a.value_id
          WHERE n.name = ? AND e.repo = ? AND e.complete = 1 AND (? IS NULL OR e.job = ?)
          ORDER BY e.created_at, e.id`,
      )
      .all(attr, repo, job ?? null, job ?? null) as Array<{
      commit_sha: string;
      job: string;
      created_at: number;
      json: string;
    }>;
    return rows.map((r) => {
      const value = JSON.parse(r.json) as AttrValue;
      return {
        commit: r.commit_sha,
        job: r.job,
        evaluatedAt: r.created_at,
        drvPath: value.drvPath ?? null,
        system: value.system ?? null,
        error: value.error ?? null,
      };
    });
  }

  /** Repositories with evaluations, with when each was last evaluated. */
  repositories(): Array<{ repo: string; lastEvaluatedAt: number }> {
    return (
      this.db
        .prepare('SELECT repo, MAX(created_at) AS at FROM evaluations WHERE complete = 1 GROUP BY repo ORDER BY repo')
        .all() as Array<{ repo: string; at: number }>
    ).map((r) => ({ repo: r.repo, lastEvaluatedAt: r.at }));
  }

  /** Whether every job of `evaluation` is stored for its commit (without reading them). */
  has(repo: string, evaluation: CommitEvaluation): boolean {
    const stored = this.db
      .prepare('SELECT job FROM evaluations WHERE repo = ? AND commit_sha = ? AND complete = 1')
      .all(repo, evaluation.commit) as Array<{ job: string }>;
    const jobs = new Set(stored.map((r) => r.job));
    return evaluation.jobs.every((j) => jobs.has(j.name));
  }

  /** The full commit id of an evaluated commit named by a unique prefix of at least 7 hex digits. */
  resolveCommit(repo: string, prefix: string): string | undefined {
    if (!/^[0-9a-f]{7,64}$/i.test(prefix)) return undefined;
    const rows = this.db
      .prepare(
        `SELECT DISTINCT commit_sha FROM evaluations
          WHERE repo = ? AND commit_sha >= ? AND commit_sha < ? AND complete = 1 LIMIT 2`,
      )
      .all(repo, prefix.toLowerCase(), `${prefix.toLowerCase()}\uffff`) as Array<{ commit_sha: string }>;
    return rows.length === 1 ? rows[0]!.commit_sha : undefined;
  }

  /**
   * The retention policy: of a repository's evaluated commits, keeps the `latest` most recently evaluated ones and
   * those in `keep` (open pull requests' heads and bases); deletes the others, with the names and values no kept
   * evaluation uses. Returns the commits deleted.
   */
  retain(repo: string, latest: number, keep: ReadonlySet<string>): string[] {
    const commits = this.db
      .prepare(
        `SELECT commit_sha FROM evaluations WHERE repo = ?
          GROUP BY commit_sha ORDER BY MAX(created_at) DESC, MAX(id) DESC`,
      )
      .all(repo) as Array<{ commit_sha: string }>;
    const doomed = commits.slice(latest).filter((c) => !keep.has(c.commit_sha));
    if (doomed.length === 0) return [];
    this.db.transaction(() => {
      for (const { commit_sha } of doomed) {
        for (const job of this.db
          .prepare('SELECT job FROM evaluations WHERE repo = ? AND commit_sha = ?')
          .all(repo, commit_sha) as Array<{ job: string }>) {
          this.deleteJob(repo, commit_sha, job.job);
        }
        this.db.prepare('DELETE FROM commit_configs WHERE repo = ? AND commit_sha = ?').run(repo, commit_sha);
      }
      this.db.exec(`DELETE FROM eval_values WHERE id NOT IN (SELECT value_id FROM evaluation_attrs)`);
      this.db.exec(`DELETE FROM eval_attr_names WHERE id NOT IN (SELECT name_id FROM evaluation_attrs)`);
      this.db.exec(
        `DELETE FROM eval_lists WHERE id NOT IN (SELECT platforms_id FROM eval_values WHERE platforms_id IS NOT NULL)`,
      );
    })();
    return doomed.map((c) => c.commit_sha);
  }

  /** Whether any repository has an evaluation of `commit` (a fork's and its base's share commits). */
  isEvaluated(commit: string): boolean {
    return this.db.prepare('SELECT 1 FROM evaluations WHERE commit_sha = ? LIMIT 1').get(commit) !== undefined;
  }

  private deleteJob(repo: string, commit: string, job: string): void {
    const old = this.db
      .prepare('SELECT id FROM evaluations WHERE repo = ? AND commit_sha = ? AND job = ?')
      .get(repo, commit, job) as { id: number } | undefined;
    if (!old) return;
    this.db.prepare('DELETE FROM evaluation_attrs WHERE evaluation_id = ?').run(old.id);
    this.db.prepare('DELETE FROM evaluations WHERE id = ?').run(old.id);
  }

  private putAttrs(evaluationId: number, first: number, attrs: readonly EvalResult[]): void {
    attrs.forEach((a, i) => {
      const { attr, ...value } = a;
      this.s.insertAttr.run(evaluationId, first + i, this.nameId(attr), this.valueId(value));
    });
  }

  private nameId(name: string): number {
    const found = this.s.nameId.get(name) as { id: number } | undefined;
    return found?.id ?? Number(this.s.insertName.run(name).lastInsertRowid);
  }

  /**
   * The id of a stored value. A `meta.platforms` list is stored apart (`eval_lists`), and a value's digest is that of
   * its JSON without the list, followed by the list's digest: a list array is serialised and hashed once however many
   * values share it (the evaluator and `load` give equal lists one array), where hashing each value's whole JSON,
   * mostly its list, was most of storing a nixpkgs-sized evaluation. A value with a list stored before this digest is
   * stored again once, and `retain` drops the old row when no evaluation uses it.
   */
  private valueId(value: AttrValue): number {
    const platforms = value.meta?.platforms;
    if (platforms === undefined) {
      const json = JSON.stringify(value);
      const digest = digestOf(json);
      const found = this.s.valueId.get(digest) as { id: number } | undefined;
      return found?.id ?? Number(this.s.insertValue.run(digest, json, null).lastInsertRowid);
    }
    const { platforms: _apart, ...meta } = value.meta!;
    const json = JSON.stringify({ ...value, meta });
    const list = this.listOf(platforms);
    const digest = digestOf(json, list.digest);
    const found = this.s.valueId.get(digest) as { id: number } | undefined;
    if (found) return found.id;
    const stored = this.s.listId.get(list.digest) as { id: number } | undefined;
    const listId = stored?.id ?? Number(this.s.insertList.run(list.digest, list.json).lastInsertRowid);
    return Number(this.s.insertValue.run(digest, json, listId).lastInsertRowid);
  }

  /** A platforms list's JSON and digest, made once per array. */
  private listOf(platforms: readonly string[]): { json: string; digest: Buffer } {
    let list = this.lists.get(platforms);
    if (!list) {
      const json = JSON.stringify(platforms);
      list = { json, digest: digestOf(json) };
      this.lists.set(platforms, list);
    }
    return list;
  }

  private readonly lists = new WeakMap<readonly string[], { json: string; digest: Buffer }>();
}

function digestOf(json: string, then?: Buffer): Buffer {
  const hash = createHash('sha256').update(json);
  if (then) hash.update(then);
  return hash.digest().subarray(0, 16);
}
