/**
 * The coordinator's own Nix store as a source for its binary cache. An agent that shares this store (the embedded
 * agent; an agent on the coordinator's host using its nix-daemon) leaves its outputs there instead of uploading them,
 * and the coordinator copies them into the cache itself: no NAR goes through HTTP, and nothing an agent says is taken
 * on trust, since only what the store holds as valid is copied. The store proves itself to agents with a marker: a
 * text path of random content, added at start, that no other store has.
 */
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { CacheError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { HOST_DAEMON_SOCKET, NixDaemonConnection, daemonAnswers } from '../../common/nix/daemon-client.js';
import { serializeNarInfo, uncompressedNarInfo } from '../../common/nix/narinfo.js';
import { storePathHash } from '../../common/nix/store-path.js';
import type { BinaryCache } from './binary-cache.js';
import { narInfoName } from './cache-layout.js';

export class StorePublisher {
  /** Publications run one at a time: they share the daemon connection. */
  private queue: Promise<void> = Promise.resolve();

  private constructor(
    private conn: NixDaemonConnection,
    /** The marker's store path (`Welcome.store_marker`). */
    readonly marker: string,
    private readonly markerContent: Buffer,
    private readonly socket: string,
    private readonly cache: BinaryCache,
  ) {}

  /**
   * Connects to the store — the host's daemon where one answers, else a `nix-daemon --stdio` of the coordinator's own
   * — and adds the marker, which stays alive (a temporary root) as long as the connection. Undefined, with a warning,
   * when the coordinator cannot reach a store: agents then upload their outputs, as agents elsewhere do.
   */
  static async open(
    cache: BinaryCache,
    logger: Logger,
    socket = HOST_DAEMON_SOCKET,
  ): Promise<StorePublisher | undefined> {
    let conn: NixDaemonConnection | undefined;
    try {
      const content = Buffer.from(`eka-ci coordinator store marker ${randomBytes(16).toString('hex')}\n`);
      conn = await connect(socket);
      const marker = await addMarker(conn, content);
      return new StorePublisher(conn, marker, content, socket, cache);
    } catch (err) {
      conn?.kill();
      logger.warn(
        { err: err instanceof Error ? err.message : String(err) },
        "cannot reach the coordinator's Nix store: agents sharing it upload their outputs as other agents do",
      );
      return undefined;
    }
  }

  /**
   * Copies `paths`, with whatever of their closures the cache lacks, from the store into the cache: uncompressed
   * NARs checked against their names and the store's NarHash, and narinfos signed by the cache (the same checks as
   * an agent's upload). Throws a CacheError naming a path the store does not hold as valid.
   */
  publish(paths: readonly string[]): Promise<void> {
    const run = this.queue.then(async () => {
      await this.reconnectIfGone();
      const held = await this.cache.hasPaths([...paths]);
      const visiting = new Set<string>();
      for (const p of paths) if (!held.has(p)) await this.publishPath(p, visiting);
    });
    this.queue = run.catch(() => undefined);
    return run;
  }

  async close(): Promise<void> {
    await this.queue;
    await this.conn.close();
  }

  /**
   * A connection the daemon closed (it restarted) is opened again, and the marker added again: the same content is
   * the same path, made a temporary root of the new connection. The publication that met the closed one failed, and
   * its build is retried.
   */
  private async reconnectIfGone(): Promise<void> {
    if (this.conn.status !== 'closed') return;
    const conn = await connect(this.socket);
    try {
      if ((await addMarker(conn, this.markerContent)) !== this.marker) throw new CacheError('the store marker moved');
    } catch (err) {
      conn.kill();
      throw err;
    }
    this.conn = conn;
  }

  private async publishPath(path: string, visiting: Set<string>): Promise<void> {
    if (visiting.has(path)) return;
    visiting.add(path);
    const info = await this.conn.queryPathInfo(path);
    if (!info) throw new CacheError(`${path} is not valid in the coordinator's Nix store`);
    const references = info.references.filter((r) => r !== path);
    const held = await this.cache.hasPaths(references);
    for (const r of references) if (!held.has(r)) await this.publishPath(r, visiting);
    const narInfo = uncompressedNarInfo(path, info);
    await this.cache.writeNar(narInfo.url, Readable.from(this.conn.narFromPath(path)), info.narSize);
    await this.cache.writeNarInfo(narInfoName(storePathHash(path)), serializeNarInfo(narInfo));
  }
}

/** The host's daemon where one answers, else a `nix-daemon --stdio` of the coordinator's own. */
async function connect(socket: string): Promise<NixDaemonConnection> {
  return (await daemonAnswers(socket))
    ? NixDaemonConnection.connect(socket)
    : NixDaemonConnection.open({ nixOptions: { store: 'local', substituters: '' } });
}

function addMarker(conn: NixDaemonConnection, content: Buffer): Promise<string> {
  return conn.addToStore('ekaci-store-marker', 'text:sha256', [], [content]);
}
