import type { EventEmitter } from 'node:events';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { type CheckRow, checkSeconds } from './checks/check-manager.js';
import type { Db } from './db/database.js';

/** Prometheus metrics, computed when scraped from the state the coordinator holds anyway. */
export function createMetrics(sources: {
  db: Db;
  agentCount: () => number;
  pending: () => number;
  /** The check manager: its `settled` events are counted and timed. */
  checks?: EventEmitter;
  /** The cache push service: its `result` events are counted. */
  cachePushes?: EventEmitter;
  /** The hook service: its `finished` events (a HookRunRow) are counted. */
  hooks?: EventEmitter;
}): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'ekaci_coordinator_' });
  new Gauge({
    name: 'ekaci_agents_connected',
    help: 'Agents with an open stream',
    registers: [registry],
    collect() {
      this.set(sources.agentCount());
    },
  });
  new Gauge({
    name: 'ekaci_graph_unfinished_derivations',
    help: 'Derivations in the in-memory graph (not yet finished)',
    registers: [registry],
    collect() {
      this.set(sources.pending());
    },
  });
  new Gauge({
    name: 'ekaci_derivations',
    help: 'Derivations known to the coordinator, by state',
    labelNames: ['state'],
    registers: [registry],
    collect() {
      const rows = sources.db.prepare('SELECT state, COUNT(*) AS n FROM derivations GROUP BY state').all() as Array<{
        state: string;
        n: number;
      }>;
      this.reset();
      for (const r of rows) this.set({ state: r.state }, r.n);
    },
  });
  const cachePushes = new Counter({
    name: 'ekaci_cache_pushes_total',
    help: "Pushes of builds' outputs to the operator's caches, by cache and result (pushed, failed, refused)",
    labelNames: ['cache', 'result'],
    registers: [registry],
  });
  const cachePushRetries = new Counter({
    name: 'ekaci_cache_push_retries_total',
    help: 'Attempts beyond the first that cache pushes needed, by cache',
    labelNames: ['cache'],
    registers: [registry],
  });
  sources.cachePushes?.on('result', (cache: string, result: string, attempts: number) => {
    cachePushes.inc({ cache, result });
    if (attempts > 1) cachePushRetries.inc({ cache }, attempts - 1);
  });
  const hookRuns = new Counter({
    name: 'ekaci_hook_runs_total',
    help: 'Post-build hook runs that ended, by hook and result (succeeded, failed, timed-out, error, skipped, interrupted)',
    labelNames: ['hook', 'result'],
    registers: [registry],
  });
  sources.hooks?.on('finished', (row: { hook_id: string; state: string }) =>
    hookRuns.inc({ hook: row.hook_id, result: row.state }),
  );
  const checksFinished = new Counter({
    name: 'ekaci_checks_finished_total',
    help: 'Repository checks that ended, by outcome',
    labelNames: ['outcome'],
    registers: [registry],
  });
  const checkDuration = new Histogram({
    name: 'ekaci_check_duration_seconds',
    help: 'How long repository checks ran on their agents, by outcome',
    labelNames: ['outcome'],
    buckets: [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600],
    registers: [registry],
  });
  sources.checks?.on('settled', (row: CheckRow) => {
    checksFinished.inc({ outcome: row.state });
    const seconds = checkSeconds(row);
    if (seconds !== null) checkDuration.observe({ outcome: row.state }, seconds);
  });
  return registry;
}
