import type { Logger } from '../../common/logging.js';
import { NixDaemonConnection } from '../../common/nix/daemon-client.js';

/**
 * Long-lived `nix-daemon --stdio` connections to the agent's store, one per build slot at most. A build takes a
 * connection for its whole life and gives it back; a connection that was killed (a cancelled build) or broke is
 * dropped, and the next build opens a fresh one. Start-up of Nix is paid once per slot, not once per build.
 */
// A daemon holds a temporary GC root for every path it built or substituted until it exits; recycling it after
// this many builds lets a garbage collection on a long-running agent reclaim what was uploaded long ago.
const BUILDS_PER_CONNECTION = 500;

export class StorePool {
  private readonly idle: NixDaemonConnection[] = [];
  private readonly all = new Set<NixDaemonConnection>();
  private readonly uses = new WeakMap<NixDaemonConnection, number>();

  /**
   * `nixOptions` are read when a connection opens. Store settings such as `system-features` are fixed when the
   * daemon opens its store, so they go on its command line rather than into per-build options.
   */
  constructor(
    private readonly logger: Logger,
    private readonly nixOptions: () => Record<string, string> = () => ({}),
    private readonly env: NodeJS.ProcessEnv = process.env,
  ) {}

  async acquire(): Promise<NixDaemonConnection> {
    for (let c = this.idle.pop(); c; c = this.idle.pop()) {
      if (c.status === 'ready') return c;
      this.all.delete(c);
    }
    const c = await NixDaemonConnection.open({ env: this.env, nixOptions: this.nixOptions() });
    this.all.add(c);
    this.logger.debug({ pid: c.pid, open: this.all.size }, 'opened a nix-daemon connection');
    return c;
  }

  release(c: NixDaemonConnection): void {
    const uses = (this.uses.get(c) ?? 0) + 1;
    this.uses.set(c, uses);
    if (c.status === 'ready' && uses < BUILDS_PER_CONNECTION) {
      this.idle.push(c);
      return;
    }
    this.all.delete(c);
    if (c.status === 'ready') void c.close().catch(() => c.kill());
  }

  /** Closes idle connections and kills busy ones (their builds end with the agent). */
  async closeAll(): Promise<void> {
    const conns = [...this.all];
    this.all.clear();
    this.idle.length = 0;
    await Promise.all(
      conns.map(async (c) => {
        if (c.status === 'ready') await c.close().catch(() => c.kill());
        else c.kill();
      }),
    );
  }
}
