import { Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { Db } from './db/database.js';

/** Prometheus metrics, computed when scraped from the state the coordinator holds anyway. */
export function createMetrics(sources: { db: Db; agentCount: () => number; pending: () => number }): Registry {
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
  return registry;
}
