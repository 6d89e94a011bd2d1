import { lookup } from 'node:dns/promises';
import { BlockList, isIP } from 'node:net';
import { z } from 'zod';
import { NAR_COMPRESSIONS, type NarCompression } from '../../common/nix/nar.js';
import { CacheError, ConfigError } from '../../common/errors.js';
import { type CredentialContext, Credentials, credentialsSchema } from '../credentials/credentials.js';
import { type AppPermissions, compilePermissions, isAllowed, permissionsSchema } from '../github/permissions.js';
import { signingKeyFromSecret } from '../cache/signing-key.js';
import { readSecret } from '../secrets.js';
import { type S3Destination, parseS3Destination } from './s3-destination.js';

/**
 * The operator's binary caches (`[[caches]]`): where a job's outputs are pushed besides the built-in cache. A
 * repository names caches by id (`jobs.<name>.caches`) and never sees more than the id: the destination, the
 * credentials and who may push are server configuration.
 *
 * - `s3`: eka-ci writes the bucket itself, in the layout `nix copy --to s3://…` makes. The agent holding a lease's
 *   outputs uploads the NARs through presigned URLs minted for that lease; the coordinator writes the narinfos.
 * - `http`: a Nix HTTP binary cache that accepts PUT. The coordinator pushes from its built-in cache.
 * - `nix-copy`: any store URI Nix can copy to (`ssh-ng://`, `file://`, …), by `nix copy` on the agent; an `s3://`
 *   destination is an `s3` cache (Nix on Debian has no S3 support, and this way no credential leaves the server).
 * - `attic`, `cachix`: their command-line tools on the agent, with the credentials for that command only.
 */

export const CACHE_TYPES = ['s3', 'http', 'nix-copy', 'attic', 'cachix'] as const;
export type CacheType = (typeof CACHE_TYPES)[number];

// Three tries in all: a cache that fails three times with backoff between is down, not flaky.
const DEFAULT_PUSH_ATTEMPTS = 3;
// An attempt that takes an hour is stuck: the biggest nixpkgs closures upload in minutes to a cache nearby.
const DEFAULT_PUSH_TIMEOUT_S = 3_600;

export const cachesSchema = z
  .array(
    z
      .object({
        id: z.string().regex(/^[A-Za-z0-9._-]+$/, 'letters, digits, ".", "_" and "-" only'),
        cache_type: z.enum(CACHE_TYPES),
        destination: z.string().min(1),
        credentials: credentialsSchema.optional(),
        permissions: permissionsSchema,
        /** Narinfos pushed there are signed with this key (`name:base64`), given like every other secret. */
        signing_key: z.string().min(1).optional(),
        signing_key_file: z.string().min(1).optional(),
        signing_key_credential: z.string().min(1).optional(),
        /** Default zstd (an `s3://` destination's `compression=` parameter counts too). */
        compression: z.enum(NAR_COMPRESSIONS).optional(),
        /** S3-compatible services: the endpoint URL, the region, path-style addressing (MinIO, s3rver, Ceph). */
        endpoint: z.string().url().optional(),
        region: z.string().min(1).optional(),
        force_path_style: z.boolean().optional(),
        push_attempts: z.number().int().min(1).max(20).default(DEFAULT_PUSH_ATTEMPTS),
        push_timeout_seconds: z.number().int().min(1).max(86_400).default(DEFAULT_PUSH_TIMEOUT_S),
      })
      .strict(),
  )
  .default([])
  .refine((caches) => new Set(caches.map((c) => c.id)).size === caches.length, { message: 'two caches share an id' });

export interface CacheOptions {
  id: string;
  type: CacheType;
  /** As configured, for messages (an `s3://` URL, an HTTP URL, a store URI, a cachix name). */
  destination: string;
  /** Set for `s3` caches. */
  s3: S3Destination | undefined;
  credentials: Credentials;
  permissions: AppPermissions;
  /** `name:base64` secret key, or undefined: pushed narinfos are unsigned (Nix then needs require-sigs off). */
  signingKey: string | undefined;
  compression: NarCompression;
  pushAttempts: number;
  pushTimeoutSeconds: number;
}

/** Compiles `[[caches]]`: every check that needs no network is done here, so a typo stops the start. */
export function compileCaches(
  raw: z.infer<typeof cachesSchema>,
  ctx: CredentialContext,
  options: { allowPrivateHosts: boolean },
): CacheOptions[] {
  return raw.map((c) => {
    const where = `caches.${c.id}`;
    const fail = (problem: string): never => {
      throw new ConfigError(`${ctx.source}: ${where}: ${problem}`);
    };
    let type: CacheType = c.cache_type;
    let s3: S3Destination | undefined;
    if (c.destination.startsWith('s3://')) {
      if (type !== 's3' && type !== 'nix-copy') fail(`an s3:// destination is for cache_type "s3"`);
      type = 's3';
      s3 = parseS3Destination(c.destination, `${ctx.source}: ${where}.destination`);
      // The table's keys say the same as the URL's parameters, and win.
      if (c.region !== undefined) s3.region = c.region;
      if (c.endpoint !== undefined) s3 = { ...s3, endpoint: c.endpoint.replace(/\/+$/, ''), forcePathStyle: true };
      if (c.force_path_style !== undefined) s3.forcePathStyle = c.force_path_style;
    } else if (type === 's3') {
      fail(`cache_type "s3" needs destination = "s3://BUCKET[/PREFIX]"`);
    }
    if (type === 'http' && !/^https?:\/\/[^/]/.test(c.destination)) fail('an http cache needs an http(s) URL');
    if (type === 'nix-copy' && !/^[a-z][a-z0-9+.-]*:\/\//.test(c.destination)) {
      fail('a nix-copy destination is a store URI such as ssh-ng://host or file:///path');
    }
    if (type === 'attic' && !/^https?:\/\/[^/]+\/.+/.test(c.destination)) {
      fail('an attic destination is the server URL followed by the cache name: https://attic.example.org/CACHE');
    }
    if (type === 'cachix' && !/^[a-z0-9-]+$/.test(c.destination)) fail('a cachix destination is the cache name');
    if (!options.allowPrivateHosts) {
      const host = cacheHost(type, c.destination, s3);
      if (host !== undefined && isPrivateHostName(host)) {
        fail(`${host} is a loopback, private or link-local host (allow with [security] allow_private_cache_hosts)`);
      }
    }
    const secret = readSecret(
      where,
      'signing_key',
      { value: c.signing_key, file: c.signing_key_file, credential: c.signing_key_credential },
      ctx,
    );
    if (secret !== undefined) {
      try {
        signingKeyFromSecret(secret, 'the signing key');
      } catch (err) {
        if (!(err instanceof CacheError)) throw err;
        fail(`signing_key: ${err.message}`);
      }
    }
    const credentials = Credentials.compile(`${where}.credentials`, c.credentials ?? { none: {} }, ctx);
    const cache: CacheOptions = {
      id: c.id,
      type,
      destination: c.destination,
      s3,
      credentials,
      permissions: compilePermissions(c.permissions),
      signingKey: secret,
      compression: c.compression ?? s3?.compression ?? 'zstd',
      pushAttempts: c.push_attempts,
      pushTimeoutSeconds: c.push_timeout_seconds,
    };
    Object.defineProperty(cache, 'toJSON', {
      value: () => ({ ...cache, signingKey: secret ? '[redacted]' : undefined, credentials: credentials.description }),
      enumerable: false,
    });
    return cache;
  });
}

/** The host a cache's pushes go to, when eka-ci can tell (cachix: always cachix.org). */
export function cacheHost(type: CacheType, destination: string, s3: S3Destination | undefined): string | undefined {
  let url: string | undefined;
  if (type === 's3') url = s3?.endpoint;
  else if (type === 'http' || type === 'attic') url = destination;
  else if (type === 'nix-copy' && !destination.startsWith('file://')) {
    // ssh-ng://user@host, ssh://host, http(s)://host, daemon, local…
    url = destination.replace(/^(ssh|ssh-ng):\/\//, 'ssh://');
  }
  if (url === undefined) return undefined;
  try {
    const host = new URL(url).hostname.replace(/^\[|\]$/g, '');
    return host === '' ? undefined : host;
  } catch {
    return undefined;
  }
}

const PRIVATE = new BlockList();
for (const [net, bits] of [
  ['0.0.0.0', 8],
  ['10.0.0.0', 8],
  ['100.64.0.0', 10],
  ['127.0.0.0', 8],
  ['169.254.0.0', 16],
  ['172.16.0.0', 12],
  ['192.168.0.0', 16],
] as const) {
  PRIVATE.addSubnet(net, bits, 'ipv4');
}
for (const [net, bits] of [
  ['::1', 128],
  ['::', 128],
  ['fc00::', 7],
  ['fe80::', 10],
] as const) {
  PRIVATE.addSubnet(net, bits, 'ipv6');
}

/** An address on loopback, a private network or link-local (cloud metadata lives there). */
export function isPrivateAddress(address: string): boolean {
  const family = isIP(address);
  if (family === 0) return false;
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return PRIVATE.check(mapped[1]!, 'ipv4');
  return PRIVATE.check(address, family === 4 ? 'ipv4' : 'ipv6');
}

function isPrivateHostName(host: string): boolean {
  return isPrivateAddress(host) || host === 'localhost' || host.endsWith('.localhost');
}

/**
 * Resolves each cache's host and refuses those that are private by their addresses, not just by name: a public
 * name that resolves to 127.0.0.1 or to the metadata service is the same risk. Run at start and before pushes.
 */
export async function checkCacheHosts(caches: readonly CacheOptions[], allowPrivateHosts: boolean): Promise<void> {
  if (allowPrivateHosts) return;
  for (const c of caches) {
    const host = cacheHost(c.type, c.destination, c.s3);
    if (host === undefined || isIP(host) !== 0) continue;
    let addresses: Array<{ address: string }>;
    try {
      addresses = await lookup(host, { all: true });
    } catch (err) {
      throw new CacheError(
        `caches.${c.id}: cannot resolve ${host}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`,
      );
    }
    const bad = addresses.find((a) => isPrivateAddress(a.address));
    if (bad) {
      throw new CacheError(
        `caches.${c.id}: ${host} resolves to ${bad.address}, a loopback, private or link-local address ` +
          '(allow with [security] allow_private_cache_hosts)',
      );
    }
  }
}

/** Why `repo` at `branch` may not push to `cache`, or undefined when it may. */
export function pushRefusal(
  cache: CacheOptions | undefined,
  cacheId: string,
  context: { repo: string; branch: string | undefined; untrusted: boolean; untrustedPushRepos: readonly string[] },
): string | undefined {
  if (!cache) return `cache "${cacheId}" is not configured on this server`;
  if (!isAllowed(cache.permissions, context.repo, undefined)) {
    return `cache "${cacheId}" does not allow repository ${context.repo}`;
  }
  if (context.branch === undefined || !isAllowed(cache.permissions, context.repo, context.branch)) {
    return `cache "${cacheId}" does not allow branch ${context.branch ?? '(unknown)'} of ${context.repo}`;
  }
  if (context.untrusted && !context.untrustedPushRepos.includes(context.repo)) {
    return `a pull request from a fork or an outside contributor does not push to cache "${cacheId}"`;
  }
  return undefined;
}
