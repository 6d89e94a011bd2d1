/**
 * Jittered exponential backoff: the n-th delay is uniform in [base/2, min(cap, base·2^n)], so a fleet of agents
 * that lost the coordinator at the same moment spreads its reconnects instead of arriving together.
 */
export class Backoff {
  private attempt = 0;

  constructor(
    private readonly baseMs: number,
    private readonly capMs: number,
    private readonly random: () => number = Math.random,
  ) {}

  next(): number {
    const ceiling = Math.min(this.capMs, this.baseMs * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    return Math.round(this.baseMs / 2 + (ceiling - this.baseMs / 2) * this.random());
  }

  reset(): void {
    this.attempt = 0;
  }
}

/** `ms` ± `fraction`·`ms`, for periodic loops (heartbeats, sweeps) that must not fall into step across hosts. */
export function jitter(ms: number, fraction = 0.2, random: () => number = Math.random): number {
  return Math.max(1, Math.round(ms * (1 - fraction + 2 * fraction * random())));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
