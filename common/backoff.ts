/**
 * Jittered exponential backoff: the n-th delay is uniform in [base/2, min(cap, base·2^n)], so a fleet of agents
 * that lost the coordinator at the same moment spreads its reconnects instead of arriving together.
 */
export class Backoff {
  private attempt = 0;

  /** `limit`, when it gives a number, caps the delays below `capMs` for as long as it does. */
  constructor(
    private readonly baseMs: number,
    private readonly capMs: number,
    private readonly random: () => number = Math.random,
    private readonly limit: () => number | undefined = () => undefined,
  ) {}

  next(): number {
    const cap = Math.min(this.capMs, this.limit() ?? Infinity);
    const ceiling = Math.min(cap, this.baseMs * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    // [base/2, ceiling] as documented; below base, a limit keeps half its range for jitter.
    const floor = Math.min(this.baseMs, ceiling) / 2;
    return Math.round(floor + (ceiling - floor) * this.random());
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
