import { EventEmitter } from 'node:events';
import type { Statement } from 'better-sqlite3';
import type { Logger } from '../../common/logging.js';
import type { CachePush, CachePushResult } from '../../common/proto/ekaci/agent/v1/agent.js';
import type { Db } from '../db/database.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import { OPEN_RUN_STATES, type RunRoot, type RunRow } from '../github/run-store.js';
import { LRUCache } from 'lru-cache';
import { awsCredentialProvider } from '../credentials/credentials.js';
import type { BinaryCache } from '../cache/binary-cache.js';
import { type CacheOptions, checkCacheHosts, pushRefusal } from './cache-config.js';
import { S3BinaryCache } from './s3-cache.js';
import { pushByCommand, withRetries } from '../../common/nix/store-push.js';
import { pushFromBuiltIn } from './s3-from-builtin.js';
import { type S3PushGrant, leaseClosure } from './s3-push-routes.js';
import { codeSpan, escapeText } from '../review/markdown.js';

// Credentials are re-read this often in the background (each source decides whether anything changed: a file's
// stat, a lease's expiry), so that an assignment, which cannot wait, carries values at most this old.
const CREDENTIAL_REFRESH_MS = 60_000;

/** A push of one run root to one cache, as a run's summary reports it. */
export interface RunPush {
  attr: string;
  drvPath: string;
  cacheId: string;
  /** refused: the server's permissions said no; pending: not built yet, or built before the push was asked for. */
  state: 'pushed' | 'failed' | 'refused' | 'pending';
  /** Why refused, or the last error of a failed push. */
  message: string | null;
  attempts: number;
  paths: number;
}

export interface PushPolicy {
  caches: readonly CacheOptions[];
  /** `[security] untrusted_cache_push_repos`. */
  untrustedPushRepos: readonly string[];
  allowPrivateHosts: boolean;
}

/**
 * Which derivations go to which of the operator's caches, and how their pushes went. A run's jobs name caches
 * (`jobs.<name>.caches`, read from the base for a pull request: the head cannot grant itself a cache); each head
 * root of the run is then allowed to go to each named cache, or refused with the reason (an unknown id, a repository
 * or branch the cache does not allow, a fork's pull request). Allowed pushes travel with the root's build to the
 * agent (`Assign.pushes`), which pushes after the build and reports in `Finished.pushes`; a push never fails a build.
 *
 * Events: `result` (cacheId, 'pushed' | 'failed' | 'refused', attempts) for metrics.
 */
export class CachePushService extends EventEmitter {
  private readonly byId: Map<string, CacheOptions>;
  /** The newest values of each cache's credentials (an assignment is built synchronously). */
  private readonly secrets = new Map<string, ReadonlyMap<string, string>>();
  private refresher: NodeJS.Timeout | undefined;
  /** The bucket of each `s3` cache, written by the coordinator (narinfos) and through presigned URLs (NARs). */
  private readonly buckets = new Map<string, S3BinaryCache>();
  /** The coordinator's own cache, where outputs built before a run asked for a push are pushed from. */
  private builtIn:
    | {
        cache: Pick<BinaryCache, 'dir' | 'narInfo'>;
        spoolDir: string;
        logOf: (drvPath: string) => Buffer | undefined;
      }
    | undefined;
  private pendingPushes: Statement | undefined;
  /** The closure a lease may push, computed once per lease from the built-in cache's narinfos. */
  private readonly closures = new LRUCache<string, Promise<Set<string>>>({ max: 1_000 });

  constructor(
    private readonly db: Db,
    private readonly policy: PushPolicy,
    private readonly logger: Logger,
    private readonly now: () => number = Date.now,
  ) {
    super();
    this.byId = new Map(policy.caches.map((c) => [c.id, c]));
  }

  /**
   * Resolves every cache's credentials and hosts once (a wrong Vault token or a cache on a private address stops
   * the start with the cache's name), then keeps the credentials fresh in the background.
   */
  async start(): Promise<void> {
    await checkCacheHosts(this.policy.caches, this.policy.allowPrivateHosts);
    await this.refresh(true);
    for (const c of this.policy.caches) {
      if (c.type !== 's3' || !c.s3) continue;
      this.buckets.set(
        c.id,
        new S3BinaryCache({
          id: c.id,
          bucket: c.s3.bucket,
          prefix: c.s3.prefix,
          region: c.s3.region,
          ...(c.s3.endpoint !== undefined ? { endpoint: c.s3.endpoint } : {}),
          forcePathStyle: c.s3.forcePathStyle,
          compression: c.compression,
          signingKey: c.signingKey,
          credentials: awsCredentialProvider(c.credentials),
          ...(c.s3.priority !== undefined ? { priority: c.s3.priority } : {}),
          ...(c.s3.wantMassQuery !== undefined ? { wantMassQuery: c.s3.wantMassQuery } : {}),
        }),
      );
    }
    if (this.byId.size === 0) return;
    this.refresher = setInterval(() => void this.refresh(false), CREDENTIAL_REFRESH_MS);
    this.refresher.unref();
  }

  /**
   * The built-in cache (open once the coordinator starts), a private directory for pushes made from it, and the
   * build log of a derivation's last attempt (an s3 cache gets it at `log/<drv>`, as `nix store copy-log` does).
   */
  attachBuiltIn(
    cache: Pick<BinaryCache, 'dir' | 'narInfo'>,
    spoolDir: string,
    logOf: (drvPath: string) => Buffer | undefined = () => undefined,
  ): void {
    this.builtIn = { cache, spoolDir, logOf };
  }

  stop(): void {
    if (this.refresher) clearInterval(this.refresher);
    this.refresher = undefined;
    for (const c of this.policy.caches) c.credentials.close();
    for (const bucket of this.buckets.values()) bucket.close();
  }

  private async refresh(failHard: boolean): Promise<void> {
    for (const c of this.policy.caches) {
      try {
        this.secrets.set(c.id, await c.credentials.values());
      } catch (err) {
        if (failHard) throw err;
        // The previous values stay in use; the push that needs new ones fails and says so.
        this.logger.warn({ cache: c.id, err: (err as Error).message }, 'cannot refresh cache credentials');
      }
    }
  }

  /**
   * Records which of a run's head roots go to which caches. Job caches come from the base's configuration when the
   * run has a base (a pull request, a merge group) and from the pushed commit otherwise.
   */
  planRun(
    run: Pick<RunRow, 'id' | 'repo' | 'branch' | 'untrusted'>,
    roots: readonly RunRoot[],
    head: CommitEvaluation,
    base: CommitEvaluation | undefined,
  ): void {
    const policy = base ?? head;
    const cachesOfJob = new Map(policy.jobs.map((j) => [j.name, j.caches ?? []]));
    const put = this.db.prepare(
      `INSERT OR REPLACE INTO run_cache_pushes (run_id, drv_path, cache_id, attr, refused) VALUES (?, ?, ?, ?, ?)`,
    );
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM run_cache_pushes WHERE run_id = ?').run(run.id);
      for (const root of roots) {
        if (root.side !== 'head') continue;
        // The longest job name that prefixes the attribute: job names may contain dots themselves.
        const job = head.jobs
          .filter((j) => root.attr.startsWith(`${j.name}.`))
          .reduce<string | undefined>(
            (best, j) => (best === undefined || j.name.length > best.length ? j.name : best),
            undefined,
          );
        for (const cacheId of (job !== undefined ? cachesOfJob.get(job) : undefined) ?? []) {
          const refused = pushRefusal(this.byId.get(cacheId), cacheId, {
            repo: run.repo,
            branch: run.branch ?? undefined,
            untrusted: run.untrusted === 1,
            untrustedPushRepos: this.policy.untrustedPushRepos,
          });
          put.run(run.id, root.drvPath, cacheId, root.attr, refused ?? null);
          if (refused !== undefined) {
            this.logger.info({ runId: run.id, attr: root.attr, cache: cacheId, why: refused }, 'cache push refused');
            this.emit('result', cacheId, 'refused', 0);
          }
        }
      }
    })();
  }

  /**
   * Caches an agent building `drvPath` pushes its outputs to: allowed by an open run, not pushed already. `s3Base`:
   * the coordinator's URL under which the lease's presigning routes are (`/agent/leases/…/caches/…`).
   */
  pushesFor(drvPath: string, s3Base: string): CachePush[] {
    if (this.byId.size === 0) return [];
    // Asked for every assignment: prepared once.
    this.pendingPushes ??= this.db.prepare(
      `SELECT DISTINCT p.cache_id AS id FROM run_cache_pushes p JOIN github_runs r ON r.id = p.run_id
        WHERE p.drv_path = ? AND p.refused IS NULL AND r.state IN (${[...OPEN_RUN_STATES].map((x) => `'${x}'`).join(', ')})
          AND NOT EXISTS (SELECT 1 FROM cache_pushes c
                           WHERE c.drv_path = p.drv_path AND c.cache_id = p.cache_id AND c.state = 'pushed')
        ORDER BY p.cache_id`,
    );
    const ids = this.pendingPushes.all(drvPath) as Array<{ id: string }>;
    const out: CachePush[] = [];
    for (const { id } of ids) {
      const cache = this.byId.get(id);
      if (!cache) continue;
      const secrets = this.secrets.get(id) ?? new Map<string, string>();
      // s3: the agent gets presigned URLs per path, never a credential.
      const agentGetsSecrets = cache.type !== 's3';
      out.push({
        cacheId: id,
        type: cache.type,
        destination: cache.type === 's3' ? s3Base : cache.destination,
        compression: cache.compression,
        env: agentGetsSecrets ? Object.fromEntries(secrets) : {},
        secretKey: agentGetsSecrets ? (cache.signingKey ?? '') : '',
        attempts: cache.pushAttempts,
        timeoutSeconds: cache.pushTimeoutSeconds,
      });
    }
    return out;
  }

  /**
   * What the holder of a lease on `drvPath` may push to s3 cache `cacheId`: its outputs' closure, as the built-in
   * cache knows it, when an open run allows that push and it has not been made. Undefined otherwise.
   */
  async s3Grant(
    leaseId: string,
    cacheId: string,
    lease: { drvPath: string; outputs: readonly string[] },
    builtIn: Pick<BinaryCache, 'narInfo'>,
  ): Promise<S3PushGrant | undefined> {
    const cache = this.buckets.get(cacheId);
    if (!cache || !this.pushesFor(lease.drvPath, '').some((p) => p.cacheId === cacheId)) return undefined;
    let closure = this.closures.get(leaseId);
    if (!closure) {
      closure = leaseClosure(builtIn, lease.outputs);
      this.closures.set(leaseId, closure);
      closure.catch(() => this.closures.delete(leaseId));
    }
    return { cache, closure: await closure };
  }

  /**
   * Pushes, from the built-in cache, what a run allowed but no agent pushed: roots that were built before any run
   * asked for the push (a fork's pull request built them, then the merge's push run wants them in the caches), whose
   * outputs therefore come with no lease. `built(drvPath)` is the derivation's output paths when it succeeded. attic
   * and cachix pushes need their tools, which live on agents: those stay "not pushed".
   */
  async pushLeftovers(runId: number, built: (drvPath: string) => readonly string[] | undefined): Promise<void> {
    const from = this.builtIn;
    if (!from) return;
    const { cache: builtIn, spoolDir } = from;
    const rows = this.db
      .prepare(
        `SELECT DISTINCT p.drv_path, p.cache_id FROM run_cache_pushes p
          WHERE p.run_id = ? AND p.refused IS NULL
            AND NOT EXISTS (SELECT 1 FROM cache_pushes c WHERE c.drv_path = p.drv_path AND c.cache_id = p.cache_id)`,
      )
      .all(runId) as Array<{ drv_path: string; cache_id: string }>;
    for (const { drv_path: drvPath, cache_id: cacheId } of rows) {
      const cache = this.byId.get(cacheId);
      const outputs = built(drvPath);
      if (!cache || !outputs || outputs.length === 0 || cache.type === 'attic' || cache.type === 'cachix') continue;
      const push = this.pushesFor(drvPath, '').find((p) => p.cacheId === cacheId);
      if (!push) continue;
      const bucket = this.buckets.get(cacheId);
      const result = await withRetries(
        push,
        () =>
          bucket
            ? pushFromBuiltIn(bucket, builtIn, outputs, spoolDir)
            : pushByCommand(push, outputs, { spoolDir, from: `file://${builtIn.dir}` }),
        { logger: this.logger },
      );
      this.record(drvPath, [result]);
    }
  }

  /** Records how an agent's pushes of `drvPath` went. */
  record(drvPath: string, results: readonly CachePushResult[]): void {
    const put = this.db.prepare(
      `INSERT OR REPLACE INTO cache_pushes (drv_path, cache_id, state, attempts, paths, error, updated_at)
       VALUES (?, ?, ?, ?, ?, ?, ?)`,
    );
    const now = this.now();
    this.db.transaction(() => {
      for (const r of results) {
        if (!this.byId.has(r.cacheId)) continue;
        put.run(drvPath, r.cacheId, r.ok ? 'pushed' : 'failed', r.attempts, r.paths, r.ok ? null : r.error, now);
      }
    })();
    for (const r of results) {
      if (!this.byId.has(r.cacheId)) continue;
      if (r.ok) this.putLog(r.cacheId, drvPath);
      this.emit('result', r.cacheId, r.ok ? 'pushed' : 'failed', r.attempts);
      const fields = { drvPath, cache: r.cacheId, attempts: r.attempts, paths: r.paths };
      if (r.ok) this.logger.info(fields, 'pushed to cache');
      else this.logger.warn({ ...fields, err: r.error }, 'cache push failed');
    }
  }

  /** Writes the build log of `drvPath` to s3 cache `cacheId` in the background; a failure is logged only. */
  private putLog(cacheId: string, drvPath: string): void {
    const bucket = this.buckets.get(cacheId);
    const log = bucket && this.builtIn?.logOf(drvPath);
    if (!bucket || log === undefined) return;
    bucket.putLog(drvPath, log.toString('utf8')).catch((err: Error) => {
      this.logger.warn({ cache: cacheId, drvPath, err: err.message }, 'cannot write the build log to the cache');
    });
  }

  /** Every push a run asked for, with its outcome so far. */
  runPushes(runId: number): RunPush[] {
    const rows = this.db
      .prepare(
        `SELECT p.attr, p.drv_path, p.cache_id, p.refused, c.state, c.error, c.attempts, c.paths
           FROM run_cache_pushes p LEFT JOIN cache_pushes c ON c.drv_path = p.drv_path AND c.cache_id = p.cache_id
          WHERE p.run_id = ? ORDER BY p.attr, p.cache_id`,
      )
      .all(runId) as Array<{
      attr: string;
      drv_path: string;
      cache_id: string;
      refused: string | null;
      state: 'pushed' | 'failed' | null;
      error: string | null;
      attempts: number | null;
      paths: number | null;
    }>;
    return rows.map((r) => ({
      attr: r.attr,
      drvPath: r.drv_path,
      cacheId: r.cache_id,
      state: r.refused !== null ? 'refused' : (r.state ?? 'pending'),
      message: r.refused ?? r.error,
      attempts: r.attempts ?? 0,
      paths: r.paths ?? 0,
    }));
  }
}

/**
 * The lines a run's summary gets about caches: one per cache with what was pushed, and one per refused or failed
 * push saying why. Empty when the run pushes nowhere.
 */
export function pushSummaryLines(pushes: readonly RunPush[]): string[] {
  if (pushes.length === 0) return [];
  const lines: string[] = [];
  const byCache = new Map<string, RunPush[]>();
  for (const p of pushes) byCache.set(p.cacheId, [...(byCache.get(p.cacheId) ?? []), p]);
  for (const [cacheId, list] of byCache) {
    const count = (s: RunPush['state']): number => list.filter((p) => p.state === s).length;
    const parts = [
      `${count('pushed')} pushed`,
      ...(count('failed') ? [`${count('failed')} failed`] : []),
      ...(count('refused') ? [`${count('refused')} refused`] : []),
      ...(count('pending') ? [`${count('pending')} not pushed`] : []),
    ];
    lines.push(`- cache ${codeSpan(cacheId)}: ${parts.join(', ')}`);
    // Attribute names are the repository's to choose (backticks, newlines): quoted so they stay on their line.
    for (const p of list) {
      if (p.state === 'refused')
        lines.push(`  - ${codeSpan(p.attr)} refused: ${escapeText(firstLine(p.message ?? ''))}`);
      if (p.state === 'failed') {
        const why = escapeText(firstLine(p.message ?? 'unknown error'));
        lines.push(`  - ${codeSpan(p.attr)} failed after ${p.attempts} attempts: ${why}`);
      }
    }
  }
  return lines;
}

function firstLine(text: string): string {
  const line = text.split('\n').find((l) => l.trim() !== '') ?? text;
  return line.length > 300 ? `${line.slice(0, 300)}…` : line;
}
