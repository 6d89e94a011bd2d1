/**
 * What an agent asks the coordinator while it pushes a lease's outputs to an S3 cache (agent/nix/s3-push.ts), under
 * `/agent/leases/:lease/caches/:cache/`:
 *
 * - `POST missing` `{paths}` → `{missing}`: which of these paths the bucket lacks;
 * - `POST nar` `{storePath, compression, fileHash, fileSize}` → `{url, headers}`, a presigned PUT for exactly that
 *   NAR, or `{present: true}` when the bucket already holds a NAR of that name and size (nothing to upload);
 * - `POST narinfo` (same body) → 204 once the narinfo is written.
 *
 * Only the agent holding the lease now may ask (its token, `AccessControl.holdsLease`), only for a cache the lease
 * may push to, and only about paths in the closure of the lease's outputs. The agent says how it compressed the NAR
 * (FileHash, FileSize, Compression); what the narinfo vouches for — NarHash, NarSize, References, Deriver, CA — is
 * taken from the coordinator's own cache, never from the agent. A NAR whose bytes do not match is refused by Nix
 * when it substitutes it, since NarHash is checked against the decompressed NAR.
 */
import { NAR_COMPRESSIONS } from '../../common/nix/nar.js';
import Router, { type RouterContext } from '@koa/router';
import { z } from 'zod';
import { CacheError } from '../../common/errors.js';
import type { NarInfo } from '../../common/nix/narinfo.js';
import { NIX_BASE32_ALPHABET, isStorePath } from '../../common/nix/store-path.js';
import type { AccessControl } from '../access/access-control.js';
import type { AuditLog } from '../audit-log.js';
import type { BinaryCache } from '../cache/binary-cache.js';
import { MAX_NAR_UPLOAD_BYTES } from '../cache/http-routes.js';
import { readJsonBody } from '../http/respond.js';
import type { RequestState } from '../http/server.js';
import { S3RequestFailed, type S3BinaryCache } from './s3-cache.js';

/** What a lease may push to one S3 cache. */
export interface S3PushGrant {
  cache: S3BinaryCache;
  /** The paths this lease may push: the closure of its outputs (see leaseClosure). */
  closure: ReadonlySet<string>;
}

export interface S3PushRouteOptions {
  access: AccessControl;
  audit: AuditLog;
  /** The lease with this id if it is open now, else undefined. */
  lease(leaseId: string): { agentId: string } | undefined;
  /** What lease `leaseId` may push to cache `cacheId`, or undefined when it may not push there. */
  cacheFor(leaseId: string, cacheId: string): S3PushGrant | undefined | Promise<S3PushGrant | undefined>;
  /** The coordinator's built-in cache: the narinfos it holds are the trusted description of each path. */
  builtIn: Pick<BinaryCache, 'narInfo'>;
}

/**
 * Paths one `missing` request may ask about. Each costs the coordinator a HeadObject unless known; the agent sends a
 * large closure in several requests.
 */
export const MAX_MISSING_PATHS = 2_000;

/** 2,000 store paths of ≈100 bytes, JSON-quoted, with room to spare. */
const MAX_BODY_BYTES = 512 * 1024;

const storePath = z.string().refine(isStorePath, 'not a store path');
const missingBody = z.object({ paths: z.array(storePath).max(MAX_MISSING_PATHS) }).strict();
const narBody = z
  .object({
    storePath,
    compression: z.enum(NAR_COMPRESSIONS),
    fileHash: z.string().regex(new RegExp(`^sha256:[${NIX_BASE32_ALPHABET}]{52}$`), 'not sha256:<nix base32>'),
    fileSize: z.number().int().positive().max(MAX_NAR_UPLOAD_BYTES),
  })
  .strict();

/** The path (under the coordinator's HTTP root) of an S3 push route, e.g. `s3PushPath(lease, cache, 'nar')`. */
export function s3PushPath(leaseId: string, cacheId: string, step: 'missing' | 'nar' | 'narinfo'): string {
  return `/agent/leases/${encodeURIComponent(leaseId)}/caches/${encodeURIComponent(cacheId)}/${step}`;
}

/** The routes above, to be mounted at `/agent` (behind the access middleware that sets `ctx.state.principal`). */
export function s3PushRouter(options: S3PushRouteOptions): Router<RequestState> {
  const router = new Router<RequestState>();

  /** The lease's grant for this cache, or undefined after answering 401/403/404. */
  const authorize = async (ctx: RouterContext<RequestState>): Promise<S3PushGrant | undefined> => {
    const principal = ctx.state.principal;
    const leaseId = String(ctx.params.lease);
    const cacheId = String(ctx.params.cache);
    const agent = principal.kind === 'agent' ? principal.name : undefined;
    if (agent === undefined) {
      deny(ctx, principal.kind === 'anonymous' ? 401 : 403, 'pushing to a cache is for the agent holding the lease');
      return undefined;
    }
    const lease = options.lease(leaseId);
    if (lease === undefined) {
      ctx.status = 404;
      ctx.body = { error: { code: 'EKACI_ERR_NOT_FOUND', message: `no open lease ${JSON.stringify(leaseId)}` } };
      return undefined;
    }
    if (!options.access.holdsLease(principal, lease)) {
      options.audit.record(`agent:${agent}`, 'agent.cache-push-refused', { leaseId, cacheId, reason: 'not holder' });
      deny(ctx, 403, `agent ${agent} does not hold lease ${JSON.stringify(leaseId)}`);
      return undefined;
    }
    const grant = await options.cacheFor(leaseId, cacheId);
    if (grant === undefined) {
      options.audit.record(`agent:${agent}`, 'agent.cache-push-refused', { leaseId, cacheId, reason: 'no grant' });
      deny(ctx, 403, `lease ${leaseId} may not push to cache ${JSON.stringify(cacheId)}`);
      return undefined;
    }
    return grant;
  };

  /** False (after answering 403) when a path is outside what the lease may push. */
  const inClosure = (ctx: RouterContext<RequestState>, grant: S3PushGrant, paths: readonly string[]): boolean => {
    const outside = paths.filter((p) => !grant.closure.has(p));
    if (outside.length === 0) return true;
    const agent = ctx.state.principal.kind === 'agent' ? ctx.state.principal.name : '?';
    options.audit.record(`agent:${agent}`, 'agent.cache-push-refused', {
      leaseId: String(ctx.params.lease),
      cacheId: grant.cache.id,
      reason: 'outside closure',
      paths: outside.slice(0, 10),
    });
    deny(
      ctx,
      403,
      `lease ${String(ctx.params.lease)} may push only the closure of its outputs, not ${outside.slice(0, 3).join(' ')}` +
        (outside.length > 3 ? ` (and ${outside.length - 3} more)` : ''),
    );
    return false;
  };

  router.post('/leases/:lease/caches/:cache/missing', async (ctx) => {
    const grant = await authorize(ctx);
    if (!grant) return;
    const body = await parse(ctx, missingBody);
    if (!body || !inClosure(ctx, grant, body.paths)) return;
    await answer(ctx, async () => {
      await grant.cache.ensureCacheInfo();
      ctx.body = { missing: await grant.cache.missing(body.paths) };
    });
  });

  router.post('/leases/:lease/caches/:cache/nar', async (ctx) => {
    const grant = await authorize(ctx);
    if (!grant) return;
    const body = await parse(ctx, narBody);
    if (!body || !inClosure(ctx, grant, [body.storePath])) return;
    await answer(ctx, async () => {
      const info = await agentNarInfo(options.builtIn, grant.cache, body);
      const size = await grant.cache.narSize(info.url);
      if (size === info.fileSize) ctx.body = { present: true };
      else ctx.body = await grant.cache.presignNarPut(info.url, info.fileSize!);
    });
  });

  router.post('/leases/:lease/caches/:cache/narinfo', async (ctx) => {
    const grant = await authorize(ctx);
    if (!grant) return;
    const body = await parse(ctx, narBody);
    if (!body || !inClosure(ctx, grant, [body.storePath])) return;
    await answer(ctx, async () => {
      await grant.cache.putNarinfo(await agentNarInfo(options.builtIn, grant.cache, body));
      ctx.status = 204;
    });
  });

  return router;
}

/**
 * The closure of `outputs` as the built-in cache describes it: the outputs and everything their narinfos refer to,
 * transitively. Paths the built-in cache does not hold are left out (and so are their references): without a trusted
 * narinfo there is nothing to publish them with.
 */
export async function leaseClosure(
  builtIn: Pick<BinaryCache, 'narInfo'>,
  outputs: readonly string[],
): Promise<Set<string>> {
  const closure = new Set<string>();
  const seen = new Set<string>();
  const todo = [...outputs];
  while (todo.length > 0) {
    const path = todo.pop()!;
    if (seen.has(path)) continue;
    seen.add(path);
    const info = await builtIn.narInfo(path);
    if (!info) continue;
    closure.add(path);
    for (const r of info.references) if (!seen.has(r)) todo.push(r);
  }
  return closure;
}

/**
 * The narinfo to publish: what the path is (NarHash, NarSize, References, Deriver, CA, the coordinator's signatures)
 * from the built-in cache, and how the agent stored it (Compression, FileHash, FileSize, URL).
 */
async function agentNarInfo(
  builtIn: Pick<BinaryCache, 'narInfo'>,
  cache: S3BinaryCache,
  body: z.infer<typeof narBody>,
): Promise<NarInfo> {
  if (body.compression !== cache.compression) {
    throw new CacheError(`cache ${cache.id} stores ${cache.compression} NARs; compress with ${cache.compression}`);
  }
  const fileHash = body.fileHash;
  const trusted = await builtIn.narInfo(body.storePath);
  if (!trusted) throw new CacheError(`${body.storePath} is not in the coordinator's cache; upload it there first`);
  // An uncompressed NAR is its own file: its hash and size are known already, and a mismatch is a lie.
  if (body.compression === 'none' && (fileHash !== trusted.narHash || body.fileSize !== trusted.narSize)) {
    throw new CacheError(`fileHash/fileSize of the uncompressed NAR of ${body.storePath} are not its NarHash/NarSize`);
  }
  const info: NarInfo = {
    storePath: trusted.storePath,
    url: cache.narUrl(fileHash),
    compression: body.compression,
    fileHash,
    fileSize: body.fileSize,
    narHash: trusted.narHash,
    narSize: trusted.narSize,
    references: trusted.references,
    sigs: trusted.sigs,
  };
  if (trusted.deriver !== undefined) info.deriver = trusted.deriver;
  if (trusted.ca !== undefined) info.ca = trusted.ca;
  return info;
}

/** The validated JSON body, or undefined after answering 400/413/415. */
async function parse<T>(ctx: RouterContext<RequestState>, schema: z.ZodType<T>): Promise<T | undefined> {
  const raw = await readJsonBody(ctx, MAX_BODY_BYTES);
  if (raw === undefined) return undefined;
  const r = schema.safeParse(raw);
  if (r.success) return r.data;
  const issue = r.error.issues[0];
  deny(ctx, 400, `invalid body: ${issue ? `${issue.path.join('.') || '(root)'}: ${issue.message}` : 'rejected'}`);
  return undefined;
}

/**
 * Runs the step. S3 failing is a 502; any other CacheError (the request does not fit what the caches hold: a path
 * the coordinator's cache lacks, a NAR not uploaded) is a 409 naming what is wrong.
 */
async function answer(ctx: RouterContext<RequestState>, step: () => Promise<void>): Promise<void> {
  try {
    await step();
  } catch (err) {
    if (!(err instanceof CacheError)) throw err;
    ctx.status = err instanceof S3RequestFailed ? 502 : 409;
    ctx.body = { error: { code: err.code, message: err.message } };
  }
}

function deny(ctx: RouterContext<RequestState>, status: number, message: string): void {
  ctx.status = status;
  ctx.body = { error: { code: status === 400 ? 'EKACI_ERR_REQUEST' : 'EKACI_ERR_AUTH', message } };
}
