import type { Logger } from '../../common/logging.js';
import { lastLines, runNix } from '../../common/nix/cli.js';

// Builds wait at most this long for the warm-up; past it they start anyway and report any cache trouble themselves.
const WARMUP_MAX_WAIT_MS = 10_000;

/**
 * Opens the coordinator's cache once before any build uses it. Nix (2.8 at least) registers a cache URL in its
 * per-user SQLite disk cache on first contact with `insert or replace`; two builds making first contact at the
 * same time can invalidate each other's row and fail with "constraint failed". One contact first avoids the race.
 * Never rejects: a cache that cannot be reached shows up in the builds' own outcomes.
 */
export async function warmUpCache(cacheUrl: string, netrcPath: string, logger: Logger): Promise<void> {
  const args = ['store', 'ping', '--extra-experimental-features', 'nix-command', '--store', cacheUrl];
  const ping = runNix('nix', [...args, '--option', 'substituters', '', '--option', 'netrc-file', netrcPath])
    .then((r) => {
      if (r.code !== 0) logger.warn({ cacheUrl, stderr: lastLines(r.stderr, 3) }, 'cannot reach the cache yet');
    })
    .catch((err: unknown) => logger.warn({ err, cacheUrl }, 'cannot run nix store ping'));
  let timer: NodeJS.Timeout | undefined;
  const cap = new Promise<void>((resolve) => (timer = setTimeout(resolve, WARMUP_MAX_WAIT_MS)));
  await Promise.race([ping, cap]);
  clearTimeout(timer);
}
