import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Backoff, sleep } from '../backoff.js';
import type { Logger } from '../logging.js';
import type { CachePush, CachePushResult } from '../proto/ekaci/agent/v1/agent.js';
import { signalGroup } from '../process-tree.js';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, argBatches, lastLines } from './cli.js';

/**
 * Pushes store paths (with their closures) to one of the operator's binary caches by the cache's own tool: `nix
 * copy --to` for `nix-copy` and `http` caches, `attic push`, `cachix push`. Agents run it after a build; the
 * coordinator runs it for outputs built before a run asked for the push, copying from its built-in cache (`from`).
 *
 * Credentials live only as long as one command: its environment, and files in a private directory (mode 0700)
 * removed when the command ends. The command sees nothing else of the caller's environment (an agent's token, the
 * coordinator's secrets): a minimal one is built for it.
 */

// The first retry waits about two seconds, later ones up to a minute: long enough for a cache restarting.
const RETRY_BASE_MS = 2_000;
const RETRY_CAP_MS = 60_000;
// A command's output kept for the error message.
const OUTPUT_TAIL_LINES = 8;

/** Variables of the caller's environment a Nix command needs to find the same store and configuration. */
const NIX_ENV = ['PATH', 'NIX_REMOTE', 'NIX_CONF_DIR', 'NIX_STORE_DIR', 'NIX_STATE_DIR', 'NIX_USER_CONF_FILES', 'TZ'];

export interface StorePushOptions {
  /** Where the command's private directory goes. */
  spoolDir: string;
  /** `nix copy --from`: a store URI the paths are read from (the coordinator's built-in cache); default the local store. */
  from?: string;
}

/**
 * Tries `attempt` up to `push.attempts` times with backoff; the result says how it went, never throws. `stopped`
 * ends the retries early (a cancelled build).
 */
export async function withRetries(
  push: Pick<CachePush, 'cacheId' | 'attempts'>,
  attempt: () => Promise<number>,
  o: { logger: Logger; stopped?: () => boolean; retryBaseMs?: number },
): Promise<CachePushResult> {
  const backoff = new Backoff(o.retryBaseMs ?? RETRY_BASE_MS, RETRY_CAP_MS);
  const attempts = Math.max(1, push.attempts);
  let result: CachePushResult = { cacheId: push.cacheId, ok: false, error: '', attempts: 0, paths: 0 };
  for (let n = 1; n <= attempts; n++) {
    result = { ...result, attempts: n };
    try {
      const paths = await attempt();
      o.logger.info({ cache: push.cacheId, attempt: n, paths }, 'pushed to cache');
      return { ...result, ok: true, error: '', paths };
    } catch (err) {
      const why = err instanceof Error ? err.message : String(err);
      result = { ...result, error: why.slice(0, 2_000) };
      o.logger.warn({ cache: push.cacheId, attempt: n, of: attempts, err: why }, 'cache push failed');
      if (n === attempts || o.stopped?.()) break;
      await sleep(backoff.next());
    }
  }
  return result;
}

/** One attempt of a push by command; resolves to the number of paths handed to the tool. */
export async function pushByCommand(push: CachePush, paths: readonly string[], o: StorePushOptions): Promise<number> {
  // Everything a command gets beyond its environment lives here, and goes when the command ends.
  await mkdir(o.spoolDir, { recursive: true });
  const dir = await mkdtemp(join(o.spoolDir, 'push-'));
  try {
    const env: NodeJS.ProcessEnv = {
      HOME: dir,
      XDG_CONFIG_HOME: join(dir, 'config'),
      XDG_CACHE_HOME: join(dir, 'cache'),
    };
    for (const name of NIX_ENV) if (process.env[name] !== undefined) env[name] = process.env[name];
    Object.assign(env, push.env);
    const secret = async (name: string, content: string): Promise<string> => {
      const file = join(dir, name);
      await writeFile(file, content, { mode: 0o600 });
      return file;
    };
    switch (push.type) {
      case 'nix-copy':
      case 'http':
        return await nixCopy(push, paths, env, secret, o.from);
      case 'attic':
        return await attic(push, paths, env, dir);
      case 'cachix':
        if (push.secretKey) env.CACHIX_SIGNING_KEY = push.secretKey.slice(push.secretKey.indexOf(':') + 1);
        await runBatches('cachix', ['push', push.destination], paths, env, push.timeoutSeconds);
        return paths.length;
      default:
        throw new Error(`cache type ${JSON.stringify(push.type)} is not pushed by a command`);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function nixCopy(
  push: CachePush,
  outputs: readonly string[],
  env: NodeJS.ProcessEnv,
  secret: (name: string, content: string) => Promise<string>,
  from: string | undefined,
): Promise<number> {
  const url = new URL(push.destination);
  const binaryCache = ['file:', 'http:', 'https:'].includes(url.protocol);
  if (binaryCache) {
    if (push.compression && !url.searchParams.has('compression')) url.searchParams.set('compression', push.compression);
    if (push.secretKey) url.searchParams.set('secret-key', await secret('secret-key', push.secretKey));
  }
  const options: string[] = [];
  const user = push.env.HTTP_USERNAME;
  const password = push.env.HTTP_PASSWORD;
  if (push.env.NETRC || (user && password)) {
    const netrc = push.env.NETRC ?? `machine ${url.hostname} login ${user} password ${password}\n`;
    options.push('--option', 'netrc-file', await secret('netrc', netrc));
  }
  if (push.env.SSH_PRIVATE_KEY) {
    const key = await secret('ssh-key', `${push.env.SSH_PRIVATE_KEY.trim()}\n`);
    const known = push.env.SSH_KNOWN_HOSTS ? await secret('known-hosts', `${push.env.SSH_KNOWN_HOSTS.trim()}\n`) : '';
    env.NIX_SSHOPTS = `-i ${key} -o IdentitiesOnly=yes${known ? ` -o UserKnownHostsFile=${known}` : ''}`;
  }
  // A file:// store URI with query parameters is spelled without percent-encoding of the path by Nix.
  const to = decodeURIComponent(url.toString());
  // From the built-in cache: eka-ci's own, whose NARs were checked on arrival.
  const source = from !== undefined ? ['--from', from, '--no-check-sigs'] : [];
  const args = [...NIX_EXPERIMENTAL, 'copy', ...source, '--to', to, ...NO_SUBSTITUTERS, ...options];
  await runBatches('nix', args, outputs, env, push.timeoutSeconds);
  return outputs.length;
}

async function attic(
  push: CachePush,
  outputs: readonly string[],
  env: NodeJS.ProcessEnv,
  dir: string,
): Promise<number> {
  // https://attic.example.org/CACHE: the server is everything before the last segment.
  const url = new URL(push.destination);
  const segments = url.pathname.replace(/\/+$/, '').split('/');
  const cache = segments.pop()!;
  const endpoint = `${url.origin}${segments.join('/')}/`;
  const token = push.env.ATTIC_TOKEN ?? '';
  await mkdir(join(dir, 'config', 'attic'), { recursive: true, mode: 0o700 });
  await writeFile(
    join(dir, 'config', 'attic', 'config.toml'),
    `default-server = "ekaci"\n\n[servers.ekaci]\nendpoint = ${JSON.stringify(endpoint)}\n` +
      (token ? `token = ${JSON.stringify(token)}\n` : ''),
    { mode: 0o600 },
  );
  await runBatches('attic', ['push', `ekaci:${cache}`], outputs, env, push.timeoutSeconds);
  return outputs.length;
}

/** Runs `command args… paths…` in batches that fit a command line; throws with the end of its output on failure. */
async function runBatches(
  command: string,
  args: readonly string[],
  paths: readonly string[],
  env: NodeJS.ProcessEnv,
  timeoutSeconds: number,
): Promise<void> {
  for (const batch of argBatches(paths)) await run(command, [...args, ...batch], env, timeoutSeconds);
}

function run(command: string, args: string[], env: NodeJS.ProcessEnv, timeoutSeconds: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const output: Buffer[] = [];
    let size = 0;
    const keep = (b: Buffer): void => {
      output.push(b);
      size += b.length;
      while (size > 64 * 1024 && output.length > 1) size -= output.shift()!.length;
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    let timedOut = false;
    const timer =
      timeoutSeconds > 0
        ? setTimeout(() => {
            timedOut = true;
            if (child.pid !== undefined) signalGroup(child.pid, 'SIGKILL');
          }, timeoutSeconds * 1000)
        : undefined;
    child.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(
        new Error(err.code === 'ENOENT' ? `${command} is not installed on this agent (not on PATH)` : err.message),
      );
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) return resolve();
      const tail = lastLines(Buffer.concat(output).toString('utf8'), OUTPUT_TAIL_LINES);
      const how = timedOut ? `timed out after ${timeoutSeconds} s` : `exit ${code ?? signal}`;
      reject(
        new Error(
          `${command} ${args[0] === '--extra-experimental-features' ? 'copy' : args[0]} failed (${how}): ${tail}`,
        ),
      );
    });
  });
}
