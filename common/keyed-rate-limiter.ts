/**
 * A token bucket per key (a source address, a user): `burst` requests at once, refilled at `perSecond`. At most
 * `maxKeys` buckets are kept; full ones are forgotten first.
 */
export class KeyedRateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    private readonly maxKeys: number,
    private readonly burst: number,
    private readonly perSecond: number,
  ) {}

  /** 0 when `source` may send now (spending a token), else the milliseconds until it may. */
  take(source: string, now = performance.now()): number {
    let bucket = this.buckets.get(source);
    if (bucket) {
      bucket.tokens = this.level(bucket, now);
      bucket.at = now;
    } else {
      if (this.buckets.size >= this.maxKeys) this.forget(now);
      bucket = { tokens: this.burst, at: now };
      this.buckets.set(source, bucket);
    }
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil(((1 - bucket.tokens) / this.perSecond) * 1000));
  }

  private level(bucket: { tokens: number; at: number }, now: number): number {
    return Math.min(this.burst, bucket.tokens + ((now - bucket.at) / 1000) * this.perSecond);
  }

  /** Forgets full buckets (a new one would be the same), then, if still crowded, the longest-known tenth. */
  private forget(now: number): void {
    for (const [source, bucket] of this.buckets) if (this.level(bucket, now) >= this.burst) this.buckets.delete(source);
    const keep = Math.floor(this.maxKeys * 0.9);
    for (const source of this.buckets.keys()) {
      if (this.buckets.size <= keep) break;
      this.buckets.delete(source);
    }
  }
}
