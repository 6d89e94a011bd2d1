/**
 * The binary cache over HTTP, speaking what Nix 2.8's `http://` store speaks: GET/HEAD of `nix-cache-info`,
 * `<hash>.narinfo`, `nar/<filehash>.nar[.ext]` and `log/<drv>`; and, for uploads by `nix copy --to http://…`
 * (HEAD of the NAR, PUT of the NAR, then PUT of the narinfo) and `nix store copy-log`, PUT of the same names.
 * Nix 2.8 PUTs nothing else unless `ca-derivations` is enabled (`realisations/…`), which eka-ci does not use.
 *
 * Reads are public, like any substituter. Uploads need credentials: Nix sends them from its netrc file as HTTP
 * Basic auth (user ignored, token as password); `Authorization: Bearer TOKEN` works as well.
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { Readable } from 'node:stream';
import Router, { type RouterContext } from '@koa/router';
import { CacheError } from '../../common/errors.js';
import type { BinaryCache } from './binary-cache.js';
import { CONTENT_TYPES, classifyCachePath, type CacheFileKind } from './cache-layout.js';

export interface UploadLimits {
  /** Bytes of one NAR file. */
  nar: number;
  /** Bytes of one narinfo. */
  narinfo: number;
  /** Bytes of one build log. */
  log: number;
}

/**
 * Larger than any single output nixpkgs produces (the biggest NARs are a few GiB), yet it stops a runaway or
 * hostile agent from filling the coordinator's disk with one request.
 */
export const MAX_NAR_UPLOAD_BYTES = 16 * 1024 ** 3;
/** A narinfo is a few hundred bytes; 1 MiB still fits ≈10,000 references, far beyond any real closure. */
export const MAX_NARINFO_UPLOAD_BYTES = 1024 ** 2;
/** Logs also stream to the coordinator over gRPC; this copy is a convenience, and 64 MiB is past anyone's reading. */
export const MAX_LOG_UPLOAD_BYTES = 64 * 1024 ** 2;

export const DEFAULT_UPLOAD_LIMITS: UploadLimits = {
  nar: MAX_NAR_UPLOAD_BYTES,
  narinfo: MAX_NARINFO_UPLOAD_BYTES,
  log: MAX_LOG_UPLOAD_BYTES,
};

export interface CacheRouterOptions {
  /** Decides from the raw `Authorization` header whether a request may upload; see `tokenAuthenticator`. */
  authenticateUpload(authorizationHeader: string | undefined): boolean | Promise<boolean>;
  /** Shrunk in tests; production uses the defaults. */
  limits?: Partial<UploadLimits>;
}

/** A router for everything under the cache's prefix (mount it at `/cache`). */
export function cacheRouter(cache: BinaryCache, options: CacheRouterOptions): Router {
  const limits = { ...DEFAULT_UPLOAD_LIMITS, ...options.limits };
  const router = new Router();

  router.get('/{*path}', async (ctx) => {
    const kind = classify(ctx);
    if (kind === undefined) return;
    const file = cache.filePath(String(ctx.params.path));
    const size = await stat(file).then(
      (s) => (s.isFile() ? s.size : undefined),
      () => undefined,
    );
    if (size === undefined) {
      ctx.status = 404;
      return;
    }
    ctx.status = 200;
    // Set verbatim: ctx.type would append a charset to text/x-nix-narinfo, which is not what Nix's caches send.
    ctx.set('Content-Type', CONTENT_TYPES[kind]);
    // HEAD is how Nix asks whether a NAR is already there; opening the file for it would only leak a descriptor.
    if (ctx.method === 'GET') ctx.body = createReadStream(file);
    ctx.length = size;
  });

  router.put('/{*path}', async (ctx) => {
    if (!(await options.authenticateUpload(ctx.get('Authorization') || undefined))) {
      ctx.set('WWW-Authenticate', 'Basic realm="eka-ci binary cache"');
      reject(ctx, 401, 'upload needs a valid agent token (HTTP Basic password or Bearer)');
      return;
    }
    const kind = classify(ctx);
    if (kind === undefined) return;
    const path = String(ctx.params.path);
    const encoding = ctx.get('Content-Encoding');
    if (encoding !== '' && encoding !== 'identity') {
      reject(ctx, 415, `Content-Encoding ${encoding} is not accepted; upload without narinfo-/log-compression`);
      return;
    }
    if (kind === 'cache-info') {
      reject(ctx, 403, 'nix-cache-info belongs to the coordinator');
      return;
    }
    const limit = new ByteLimit(limits[kind]);
    if (Number(ctx.get('Content-Length') || 0) > limit.max) {
      reject(ctx, 413, `${kind} uploads are limited to ${limit.max} bytes`);
      return;
    }
    const body = limit.wrap(ctx.req);
    try {
      if (kind === 'nar') await cache.writeNar(path, body);
      else if (kind === 'log') await cache.writeLog(path, body);
      else await cache.writeNarInfo(path, await readText(body));
    } catch (err) {
      if (limit.exceeded) reject(ctx, 413, `${kind} uploads are limited to ${limit.max} bytes`);
      else if (err instanceof CacheError) reject(ctx, 400, err.message);
      else throw err;
      return;
    }
    ctx.status = 204;
  });

  return router;
}

/** The upload token in an `Authorization` header: a Basic password (any user name) or a Bearer token. */
export function uploadToken(authorizationHeader: string | undefined): string | undefined {
  const match = /^(Basic|Bearer) +(\S+)$/i.exec(authorizationHeader?.trim() ?? '');
  if (!match?.[1] || !match[2]) return undefined;
  if (match[1].toLowerCase() === 'bearer') return match[2];
  const decoded = Buffer.from(match[2], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  const password = colon < 0 ? '' : decoded.slice(colon + 1);
  return password === '' ? undefined : password;
}

/** An `authenticateUpload` that accepts a request whose token (see `uploadToken`) passes `isValidToken`. */
export function tokenAuthenticator(
  isValidToken: (token: string) => boolean | Promise<boolean>,
): (authorizationHeader: string | undefined) => Promise<boolean> {
  return async (header) => {
    const token = uploadToken(header);
    return token !== undefined && (await isValidToken(token));
  };
}

/** The kind of cache file the request names, or undefined after answering 400/404 for anything else. */
function classify(ctx: RouterContext): CacheFileKind | undefined {
  const path = ctx.params.path;
  const kind = path === undefined ? undefined : classifyCachePath(String(path));
  if (kind === 'unsafe') {
    reject(ctx, 400, 'path leaves the cache directory');
    return undefined;
  }
  if (kind === undefined) reject(ctx, ctx.method === 'PUT' ? 400 : 404, 'not a binary cache file');
  return kind;
}

function reject(ctx: RouterContext, status: number, message: string): void {
  ctx.status = status;
  ctx.type = 'text/plain; charset=utf-8';
  ctx.body = `${message}\n`;
  // The rest of a refused upload is never read; closing the connection spares the client sending it.
  if (ctx.method === 'PUT') ctx.set('Connection', 'close');
}

class ByteLimit {
  exceeded = false;
  constructor(readonly max: number) {}

  wrap(source: AsyncIterable<Buffer>): Readable {
    const { max } = this;
    const exceeded = (): CacheError => {
      this.exceeded = true;
      return new CacheError(`upload exceeds ${max} bytes`);
    };
    return Readable.from(
      (async function* () {
        let bytes = 0;
        for await (const chunk of source) {
          bytes += chunk.length;
          if (bytes > max) throw exceeded();
          yield chunk;
        }
      })(),
      { objectMode: false },
    );
  }
}

async function readText(body: AsyncIterable<Buffer>): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of body) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}
