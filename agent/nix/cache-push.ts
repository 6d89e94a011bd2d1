import type { Logger } from '../../common/logging.js';
import type { NixDaemonConnection } from '../../common/nix/daemon-client.js';
import type { NarCompression } from '../../common/nix/nar.js';
import { pushByCommand, withRetries } from '../../common/nix/store-push.js';
import type { CachePush, CachePushResult } from '../../common/proto/ekaci/agent/v1/agent.js';
import { pushToS3 } from './s3-push.js';

/**
 * Pushes a lease's outputs (with their closures) to the operator's binary caches the coordinator named in
 * `Assign.pushes`, after the build succeeded and the outputs are in the coordinator's cache: `s3` through URLs the
 * coordinator presigns for the lease (the agent holds no credential of the bucket), the others by their tool with
 * the credentials for that command only (see store-push.ts). Each push is tried `attempts` times with backoff; its
 * result is reported, never thrown: a cache that is down does not fail the build.
 */
export interface PushContext {
  conn: NixDaemonConnection;
  leaseId: string;
  /** The agent's token, for the coordinator's presigning routes (s3 pushes) and nothing else. */
  token: string;
  spoolDir: string;
  logger: Logger;
  /** The build was cancelled: stop retrying. */
  stopped: () => boolean;
}

export async function pushToCaches(
  pushes: readonly CachePush[],
  outputs: readonly string[],
  ctx: PushContext,
): Promise<CachePushResult[]> {
  const results: CachePushResult[] = [];
  for (const push of pushes) {
    const attempt = async (): Promise<number> => {
      if (push.type !== 's3') return pushByCommand(push, outputs, { spoolDir: ctx.spoolDir });
      const r = await pushToS3({
        conn: ctx.conn,
        coordinatorUrl: push.destination,
        token: ctx.token,
        leaseId: ctx.leaseId,
        cacheId: push.cacheId,
        outputs: [...outputs],
        compression: push.compression as NarCompression,
        spoolDir: ctx.spoolDir,
        stopped: ctx.stopped,
      });
      return r.pushed;
    };
    results.push(await withRetries(push, attempt, { logger: ctx.logger, stopped: ctx.stopped }));
  }
  return results;
}
