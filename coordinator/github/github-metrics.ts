import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { GitHubMetrics } from './app-client.js';
import type { DeliveryObservation } from './delivery-queue.js';

/** Where the GitHub side reports what Prometheus shows; a no-op until the coordinator registers its metrics. */
export class GitHubMetricsSink implements GitHubMetrics {
  private api: { calls: Counter<'operation' | 'status'>; remaining: Gauge } | undefined;
  private webhooks: { wait: Histogram<'event'>; handler: Histogram<'event' | 'outcome'> } | undefined;

  register(registry: Registry): void {
    this.api = {
      calls: new Counter({
        name: 'ekaci_github_api_calls_total',
        help: 'GitHub API requests, by operation and response status',
        labelNames: ['operation', 'status'],
        registers: [registry],
      }),
      remaining: new Gauge({
        name: 'ekaci_github_rate_limit_remaining',
        help: 'The x-ratelimit-remaining GitHub last reported',
        registers: [registry],
      }),
    };
    this.webhooks = {
      wait: new Histogram({
        name: 'ekaci_github_webhook_wait_seconds',
        help: 'Time from a webhook delivery being received to its handling starting',
        labelNames: ['event'],
        buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30],
        registers: [registry],
      }),
      handler: new Histogram({
        name: 'ekaci_github_webhook_handler_seconds',
        help: 'Time spent handling a webhook delivery, by outcome',
        labelNames: ['event', 'outcome'],
        buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30],
        registers: [registry],
      }),
    };
  }

  calls(operation: string, status: number): void {
    this.api?.calls.inc({ operation, status: String(status) });
  }

  rateLimitRemaining(n: number): void {
    this.api?.remaining.set(n);
  }

  observe(o: DeliveryObservation): void {
    if (o.kind === 'started') this.webhooks?.wait.observe({ event: o.event }, o.waitedMs / 1000);
    else this.webhooks?.handler.observe({ event: o.event, outcome: o.outcome }, o.ms / 1000);
  }
}
