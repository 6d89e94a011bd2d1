/**
 * The binary cache over HTTP, speaking what Nix 2.8's `http://` store speaks: GET/HEAD of `nix-cache-info`,
 * `<hash>.narinfo`, `nar/<filehash>.nar[.ext]` and `log/<drv>`; and, for uploads by `nix copy --to http://…`
 * (HEAD of the NAR, PUT of the NAR, then PUT of the narinfo) and `nix store copy-log`, PUT of the same names.
 * Nix 2.8 PUTs nothing else unless `ca-derivations` is enabled (`realisations/…`), which eka-ci does not use.
 *
 * Who may do what is AccessControl's decision (coordinator/access): reads follow `[web] public` and the visibility of
 * what is read (an output or log of a derivation only private repositories asked for needs a credential); an upload
 * needs an agent token (HTTP Basic password — what Nix sends from its netrc file — or Bearer) and names, in the
 * `X-Ekaci-Lease` header, a lease that agent holds now. A narinfo may only be for an output of that lease's
 * derivation, a log only for that derivation. NAR file names are the hash of their content and unguessable without
 * the narinfo that points to them, so they follow the coordinator-wide rule only.
 *
 * An agent may also send a path in one request (protocol 1.6): a PUT of `<hash>.narinfo` whose `X-Ekaci-Narinfo-Bytes`
 * header says the body is that many bytes of narinfo followed by the NAR its `URL` names. Both are checked exactly as
 * if they had come in two requests, and who may publish the path is asked before the NAR is stored. Half of a busy
 * fleet's cache requests go away (bench/fleet).
 *
 * An API token that may submit builds may upload content-addressed paths only — `.drv` files and sources, whose store
 * paths prove their content (see content-addressed.ts) — with no lease: `ekaci build --coordinator` uploads the
 * closure of what it asks to build this way (cli/drv-upload.ts: `.drv` files as `nix copy` would send them, sources
 * by `nix copy`).
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { Readable } from 'node:stream';
import Router, { type RouterContext } from '@koa/router';
import { CacheError } from '../../common/errors.js';
import { STORE_DIR } from '../../common/nix/store-path.js';
import { readAll } from '../../common/read-all.js';
import type { AccessControl, Principal, Visibility } from '../access/access-control.js';
import { type NarInfo, parseNarInfo } from '../../common/nix/narinfo.js';
import { type BinaryCache, narFitsInMemory } from './binary-cache.js';
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

/** An open lease as the cache sees it: who holds it and what it may upload. */
export interface UploadLease {
  agentId: string;
  drvPath: string;
  /** The derivation's output paths: the only store paths the lease may publish. */
  outputPaths: readonly string[];
  /** A fixed-output derivation's lease: `checkUpload` checks its output against the hash the derivation declares. */
  fixedOutput: boolean;
}

export interface CacheRouterOptions {
  access: AccessControl;
  /** The lease with this id if it is open now, else undefined. */
  lease(leaseId: string): UploadLease | undefined;
  /** Whether a store path (an output) or a derivation's log belongs to private data. */
  visibility(storePath: string): Visibility;
  /** Checks a narinfo before it is stored (a fixed-output derivation's hash); throws CacheError to refuse it. */
  checkUpload?(lease: UploadLease, storePath: string, narinfoUrl: string, compression: string): Promise<void>;
  /** Checks a narinfo an API token uploads: content-addressed, and true to its content; throws CacheError. */
  checkContentAddressed(info: NarInfo): Promise<void>;
  /** Shrunk in tests; production uses the defaults. */
  limits?: Partial<UploadLimits>;
}

/** The header naming the lease an upload belongs to. */
export const LEASE_HEADER = 'X-Ekaci-Lease';
/** On a narinfo upload: the body is this many bytes of narinfo, then the NAR it names (one request for both). */
export const NARINFO_BYTES_HEADER = 'X-Ekaci-Narinfo-Bytes';

/** A router for everything under the cache's prefix (mount it at `/cache`). */
export function cacheRouter(cache: BinaryCache, options: CacheRouterOptions): Router {
  const limits = { ...DEFAULT_UPLOAD_LIMITS, ...options.limits };
  const router = new Router();
  // A narinfo is as private as the output it describes, a log as its derivation; the cache's own description
  // and content-named NARs are public data.
  const visibilityOf = (kind: CacheFileKind, path: string): Visibility => {
    if (kind === 'narinfo') {
      const hash = path.slice(0, -'.narinfo'.length);
      return options.visibility(`${STORE_DIR}/${hash}`);
    }
    if (kind === 'log') return options.visibility(`${STORE_DIR}/${path.slice('log/'.length)}`);
    return 'public';
  };

  router.get('/{*path}', async (ctx) => {
    const kind = classify(ctx);
    if (kind === undefined) return;
    const principal = options.access.principal(ctx.get('Authorization') || undefined);
    if (!options.access.mayReadCache(principal, visibilityOf(kind, String(ctx.params.path)))) {
      refuseRead(ctx, principal);
      return;
    }
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
    const principal = options.access.principal(ctx.get('Authorization') || undefined);
    const client = options.access.mayUploadContentAddressed(principal);
    if (principal.kind !== 'agent' && !client) {
      ctx.set('WWW-Authenticate', 'Basic realm="eka-ci binary cache"');
      reject(
        ctx,
        401,
        'upload needs a valid agent token, or an API token for derivations (HTTP Basic password or Bearer)',
      );
      return;
    }
    const kind = classify(ctx);
    if (kind === undefined) return;
    const path = String(ctx.params.path);
    const leaseId = ctx.get(LEASE_HEADER);
    const lease = leaseId === '' || client ? undefined : options.lease(leaseId);
    if (client && kind === 'log') {
      reject(ctx, 403, 'build logs come from the agents that hold the lease');
      return;
    }
    if (!client && !options.access.holdsLease(principal, lease)) {
      reject(
        ctx,
        403,
        `agent ${principal.kind === 'agent' ? principal.name : '?'} holds no open lease ${JSON.stringify(leaseId)}: nothing to upload for`,
      );
      return;
    }
    if (kind === 'log' && path !== `log/${lease!.drvPath.slice(STORE_DIR.length + 1)}`) {
      reject(ctx, 403, `lease ${leaseId} is for ${lease!.drvPath}; it may not upload ${path}`);
      return;
    }
    const encoding = ctx.get('Content-Encoding');
    if (encoding !== '' && encoding !== 'identity') {
      reject(ctx, 415, `Content-Encoding ${encoding} is not accepted; upload without narinfo-/log-compression`);
      return;
    }
    if (kind === 'cache-info') {
      reject(ctx, 403, 'nix-cache-info belongs to the coordinator');
      return;
    }
    // Who may publish the path a narinfo describes: asked before anything of it is stored.
    const mayPublish = (info: NarInfo): void => {
      if (client) {
        if (info.ca === undefined) {
          throw new UploadRefused(
            `${info.storePath} is not content-addressed: an API token may upload only .drv files and sources, ` +
              'whose store paths prove their content',
          );
        }
      } else if (!lease!.outputPaths.includes(info.storePath)) {
        throw new UploadRefused(`lease ${leaseId} builds ${lease!.drvPath}, which has no output ${info.storePath}`);
      }
    };
    const check = async (info: NarInfo): Promise<void> => {
      mayPublish(info);
      if (client) return options.checkContentAddressed(info);
      await options.checkUpload?.(lease!, info.storePath, info.url, info.compression);
    };
    const combined = kind === 'narinfo' ? ctx.get(NARINFO_BYTES_HEADER) : '';
    const limit = new ByteLimit(limits[kind]);
    const narLimit = new ByteLimit(limits.nar);
    const declared = declaredLength(ctx.get('Content-Length'));
    let narinfoBytes = 0;
    if (combined !== '') {
      const n = declaredLength(combined);
      if (n === undefined || (declared !== undefined && n > declared)) {
        reject(
          ctx,
          400,
          `${NARINFO_BYTES_HEADER} must be a byte count within the body, got ${JSON.stringify(combined)}`,
        );
        return;
      }
      narinfoBytes = n;
    }
    // The part whose announced size is over its limit, if any: the narinfo of a one-request upload, or its NAR.
    const over =
      narinfoBytes > limit.max || (combined === '' && (declared ?? 0) > limit.max)
        ? kind
        : combined !== '' && (declared ?? 0) - narinfoBytes > narLimit.max
          ? 'nar'
          : undefined;
    if (over !== undefined) {
      reject(ctx, 413, tooLargeMessage(over, limits));
      return;
    }
    try {
      if (kind === 'nar') await cache.writeNar(path, limit.wrap(ctx.req), declared);
      else if (kind === 'log') await cache.writeLog(path, limit.wrap(ctx.req));
      else if (combined === '') await cache.writeNarInfo(path, await readText(limit.wrap(ctx.req)), check);
      else {
        // The narinfo, checked for who may publish it before its NAR is stored.
        const narInfoOf = (head: Buffer): NarInfo => {
          const info = parseNarInfo(head.toString('utf8'));
          mayPublish(info);
          if (classifyCachePath(info.url) !== 'nar') {
            throw new CacheError(`URL ${info.url} of ${info.storePath} is not a NAR in this cache`);
          }
          return info;
        };
        const narBytes = declared === undefined ? undefined : declared - narinfoBytes;
        let info: NarInfo;
        if (narFitsInMemory(narBytes)) {
          // A small body (a busy fleet's uploads nearly all are) is read at once, the HTTP parser holding it to its
          // Content-Length, checked above: the stream layers of the other way cost the event loop more than the
          // upload's file writes (bench/fleet).
          const body = await readAll(ctx.req);
          if (body.length !== declared) throw cutShort(body.length, narinfoBytes);
          info = narInfoOf(body.subarray(0, narinfoBytes));
          await cache.writeNarBytes(info.url, body.subarray(narinfoBytes));
        } else {
          const { head, rest } = await splitBody(ctx.req, narinfoBytes);
          info = narInfoOf(head);
          await cache.writeNar(info.url, narLimit.wrap(rest), narBytes);
        }
        await cache.writeNarInfo(path, info, check);
      }
    } catch (err) {
      if (limit.exceeded || narLimit.exceeded) reject(ctx, 413, tooLargeMessage(limit.exceeded ? kind : 'nar', limits));
      else if (err instanceof UploadRefused) reject(ctx, 403, err.message);
      else if (err instanceof CacheError) reject(ctx, 400, err.message);
      else throw err;
      return;
    }
    ctx.status = 204;
  });

  return router;
}

/** A narinfo for a path the lease may not publish: 403, not 400 (the upload is well-formed, just not theirs). */
class UploadRefused extends CacheError {}

function refuseRead(ctx: RouterContext, principal: Principal): void {
  if (principal.kind === 'anonymous') {
    ctx.set('WWW-Authenticate', 'Basic realm="eka-ci binary cache"');
    reject(ctx, 401, 'reading this needs a credential (an agent or API token)');
  } else reject(ctx, 403, 'not allowed');
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

function tooLargeMessage(kind: keyof UploadLimits, limits: UploadLimits): string {
  return `${kind} uploads are limited to ${limits[kind]} bytes`;
}

/**
 * The first `bytes` bytes of a request body, and the rest of it as a stream. A body that ends before `bytes` is a
 * CacheError (the upload was cut short or lied about its parts).
 */
async function splitBody(body: AsyncIterable<Buffer>, bytes: number): Promise<{ head: Buffer; rest: Readable }> {
  const chunks = body[Symbol.asyncIterator]();
  const parts: Buffer[] = [];
  let have = 0;
  while (have < bytes) {
    const next = await chunks.next();
    if (next.done) throw cutShort(have, bytes);
    parts.push(next.value);
    have += next.value.length;
  }
  const all = Buffer.concat(parts);
  const leftover = all.subarray(bytes);
  const rest = Readable.from(
    (async function* () {
      if (leftover.length > 0) yield leftover;
      for (let next = await chunks.next(); !next.done; next = await chunks.next()) yield next.value;
    })(),
    { objectMode: false },
  );
  return { head: all.subarray(0, bytes), rest };
}

function cutShort(have: number, narinfoBytes: number): CacheError {
  return new CacheError(
    have < narinfoBytes
      ? `the body ended after ${have} bytes, before the ${narinfoBytes} bytes of its narinfo`
      : `the body ended after ${have} bytes, before its Content-Length`,
  );
}

async function readText(body: AsyncIterable<Buffer>): Promise<string> {
  return (await readAll(body)).toString('utf8');
}

/** The body size a request declares, when it declares one that makes sense. */
function declaredLength(header: string): number | undefined {
  const n = header === '' ? NaN : Number(header);
  return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
}
