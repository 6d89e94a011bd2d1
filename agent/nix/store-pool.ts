import type { Logger } from '../../common/logging.js';
import { NixDaemonConnection } from '../../common/nix/daemon-client.js';

/**
 * How the agent reaches its store: `host-daemon`, the socket of the host's nix-daemon (multi-user hosts: NixOS,
 * macOS, the upstream installer); `own-daemon`, a `nix-daemon --stdio` the agent starts on a single-user store it
 * owns.
 */
export type StoreAccess = { kind: 'host-daemon'; socket: string } | { kind: 'own-daemon' };

/**
 * Long-lived connections to the agent's store, one per build slot at most: to the host's nix-daemon socket on a
 * multi-user host, or to a `nix-daemon --stdio` of the agent's own on a single-user store (see StoreAccess). A
 * build takes a connection for its whole life and gives it back; a connection that was killed (a cancelled build)
 * or broke is dropped, and the next build opens a fresh one. Start-up of Nix is paid once per slot, not per build.
 */
// A daemon holds a temporary GC root for every path it built or substituted until it exits; recycling it after
// this many builds lets a garbage collection on a long-running agent reclaim what was uploaded long ago.
const BUILDS_PER_CONNECTION = 500;

export class StorePool {
  private readonly idle: NixDaemonConnection[] = [];
  private readonly all = new Set<NixDaemonConnection>();
  private readonly uses = new WeakMap<NixDaemonConnection, number>();
  /**
   * Set once the store's daemon refused wopBuildDerivation (an untrusted user of the host's daemon): builds then
   * substitute their `.drv` closures rather than ask again.
   */
  basicDerivationsRefused = false;

  /**
   * `nixOptions` are read when an own daemon starts. Store settings such as `system-features` are fixed when the
   * daemon opens its store, so they go on its command line rather than into per-build options. The host's daemon
   * has its own configuration, which these do not change.
   */
  constructor(
    private readonly logger: Logger,
    private readonly nixOptions: () => Record<string, string> = () => ({}),
    private readonly env: NodeJS.ProcessEnv = process.env,
    private storeAccess: StoreAccess = { kind: 'own-daemon' },
  ) {}

  get access(): StoreAccess {
    return this.storeAccess;
  }

  /** Chooses how to reach the store; only before the first connection (the agent decides at start-up). */
  use(access: StoreAccess): void {
    if (this.all.size > 0) throw new Error('StorePool.use after connections were opened');
    this.storeAccess = access;
  }

  async acquire(): Promise<NixDaemonConnection> {
    for (let c = this.idle.pop(); c; c = this.idle.pop()) {
      if (c.status === 'ready') return c;
      this.all.delete(c);
    }
    const c =
      this.storeAccess.kind === 'host-daemon'
        ? await NixDaemonConnection.connect(this.storeAccess.socket)
        : await NixDaemonConnection.open({ env: this.env, nixOptions: this.nixOptions() });
    this.all.add(c);
    this.logger.debug({ pid: c.pid, open: this.all.size }, 'opened a nix-daemon connection');
    return c;
  }

  /**
   * Takes a connection back. One that is not ready is killed: still busy, it is out of step (an upload whose HTTP
   * request failed leaves its NAR stream half read), and forgotten it would keep a daemon — and the agent process
   * with it — alive for ever.
   */
  release(c: NixDaemonConnection): void {
    const uses = (this.uses.get(c) ?? 0) + 1;
    this.uses.set(c, uses);
    if (c.status === 'ready' && uses < BUILDS_PER_CONNECTION) {
      this.idle.push(c);
      return;
    }
    this.all.delete(c);
    if (c.status === 'ready') void c.close().catch(() => c.kill());
    else c.kill();
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
