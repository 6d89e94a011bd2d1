/**
 * A Nix binary cache in an S3 bucket, written by eka-ci itself in exactly the layout `nix copy --to s3://…` makes
 * (`nix-cache-info`, `<hash>.narinfo`, `nar/<filehash>.nar.<ext>`, `log/<drv>`), so that any Nix substitutes from
 * it — over `s3://` or, for a public bucket, plain `https://`.
 *
 * The coordinator holds the credentials; agents never do. An agent uploads a NAR through a presigned PUT URL minted
 * for its exact key and size (presignNarPut), and the coordinator writes the narinfo afterwards (putNarinfo), from
 * the path information it trusts, once the NAR is in the bucket with the announced size: a narinfo never points at
 * a NAR that is not there.
 */
import { NAR_FILE_SUFFIX, type NarCompression } from '../../common/nix/nar.js';
import { HeadObjectCommand, PutObjectCommand, S3Client, type S3ClientConfig } from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import { LRUCache } from 'lru-cache';
import { CacheError } from '../../common/errors.js';
import { fingerprint, serializeNarInfo, type NarInfo } from '../../common/nix/narinfo.js';
import { STORE_DIR, isDrvPath, isStorePath, storePathHash } from '../../common/nix/store-path.js';
import { CONTENT_TYPES, classifyCachePath, narInfoName } from '../cache/cache-layout.js';
import { signFingerprint, signingKeyFromSecret } from '../cache/signing-key.js';

export { parseS3Destination, type S3Destination } from './s3-destination.js';

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
  expiration?: Date;
}

export interface S3BinaryCacheOptions {
  /** The cache's `id` in the server configuration; errors name it. */
  id: string;
  bucket: string;
  /** Key prefix: `''` or `a/b` (no leading or trailing slash). */
  prefix: string;
  region: string;
  /** `scheme://host[:port]` of an S3-compatible service; undefined for AWS. */
  endpoint?: string;
  forcePathStyle: boolean;
  compression: NarCompression;
  /** The `name:base64` Nix secret key narinfos are signed with; undefined keeps only the coordinator's signatures. */
  signingKey: string | undefined;
  /** Asked again whenever the SDK finds the last answer expired (see CREDENTIALS_UNDATED_MS). */
  credentials: () => Promise<S3Credentials>;
  /** `Priority:` of a new bucket's nix-cache-info; Nix's default (50) when undefined. */
  priority?: number;
  /** `WantMassQuery:` of a new bucket's nix-cache-info (default true). */
  wantMassQuery?: boolean;
}

/**
 * How long a presigned NAR URL is valid. The agent asks for it right before it starts the upload, and S3 checks the
 * expiry when the request starts, not when it ends: a long upload is fine. Five minutes cover clock skew and retries.
 */
export const NAR_PUT_URL_TTL_S = 300;

/**
 * Credentials without an expiry (a key pair from a file or Vault) are asked for again after this long, so a rotated
 * key is picked up. The SDK refreshes credentials that expire within five minutes, so this must exceed that.
 */
const CREDENTIALS_UNDATED_MS = 10 * 60_000;

/** HeadObject requests at once when asking which paths a bucket lacks: S3 answers each in ≈10–50 ms. */
const HEAD_CONCURRENCY = 16;

/** Store paths known to be in the bucket (narinfos are never deleted by eka-ci). ≈100 bytes each. */
const PRESENT_MEMORY = 200_000;

/** File extension Nix gives a compressed NAR (`BinaryCacheStore::addToStoreCommon`). */

/** A presigned upload: the URL, and the headers the request must carry exactly (they are part of the signature). */
export interface PresignedPut {
  url: string;
  headers: Record<string, string>;
}

/** S3 refused or failed a request (credentials, permissions, the service unreachable): not the caller's fault. */
export class S3RequestFailed extends CacheError {}

export class S3BinaryCache {
  readonly id: string;
  readonly compression: NarCompression;
  /** `name:base64` public key of `signingKey`, for users' `trusted-public-keys`; undefined when unsigned. */
  readonly publicKey: string | undefined;
  private readonly client: S3Client;
  private readonly present = new LRUCache<string, true>({ max: PRESENT_MEMORY });
  private cacheInfo: Promise<void> | undefined;

  constructor(private readonly options: S3BinaryCacheOptions) {
    this.id = options.id;
    this.compression = options.compression;
    if (options.prefix !== '' && !/^[^/](.*[^/])?$/.test(options.prefix)) {
      throw new CacheError(`S3 cache ${options.id}: key prefix ${JSON.stringify(options.prefix)} has a stray "/"`);
    }
    this.publicKey =
      options.signingKey === undefined
        ? undefined
        : signingKeyFromSecret(options.signingKey, `signing_key of cache ${options.id}`).publicKey;
    const config: S3ClientConfig = {
      region: options.region,
      forcePathStyle: options.forcePathStyle,
      // With the SDK's default (WHEN_SUPPORTED) presigned PUT URLs carry the CRC32 of an empty body, which S3 then
      // holds the real body to and refuses (BadDigest). Nothing here needs a checksum S3 does not require.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      credentials: async () => {
        const c = await options.credentials();
        return { ...c, expiration: c.expiration ?? new Date(Date.now() + CREDENTIALS_UNDATED_MS) };
      },
    };
    if (options.endpoint !== undefined) config.endpoint = options.endpoint;
    this.client = new S3Client(config);
  }

  /** The `nar/<fileHash>.nar<ext>` a NAR with this file hash (`sha256:<base32>` or bare base32) is stored under. */
  narUrl(fileHash: string): string {
    const url = `nar/${fileHash.replace(/^sha256:/, '')}.nar${NAR_FILE_SUFFIX[this.compression]}`;
    if (classifyCachePath(url) !== 'nar') throw new CacheError(`${JSON.stringify(fileHash)} is not a NAR file hash`);
    return url;
  }

  /** Writes `nix-cache-info` if the bucket has none (as Nix does on first use); once per process. */
  ensureCacheInfo(): Promise<void> {
    this.cacheInfo ??= (async () => {
      if ((await this.head('nix-cache-info')) !== undefined) return;
      const lines = [`StoreDir: ${STORE_DIR}`];
      if (this.options.wantMassQuery ?? true) lines.push('WantMassQuery: 1');
      if (this.options.priority !== undefined) lines.push(`Priority: ${this.options.priority}`);
      await this.put('nix-cache-info', `${lines.join('\n')}\n`, CONTENT_TYPES['cache-info']);
    })().catch((err: unknown) => {
      this.cacheInfo = undefined;
      throw err;
    });
    return this.cacheInfo;
  }

  /** The paths among `storePaths` whose narinfo the bucket lacks, in the order given. */
  async missing(storePaths: readonly string[]): Promise<string[]> {
    for (const p of storePaths) {
      if (!isStorePath(p)) throw new CacheError(`${JSON.stringify(p)} is not a store path`);
    }
    const unknown = [...new Set(storePaths)].filter((p) => !this.present.has(p));
    await mapBounded(unknown, HEAD_CONCURRENCY, async (p) => {
      if ((await this.head(narInfoName(storePathHash(p)))) !== undefined) this.present.set(p, true);
    });
    return storePaths.filter((p) => !this.present.has(p));
  }

  /** The size of the NAR object at `narUrl`, or undefined when the bucket does not hold it. */
  async narSize(narUrl: string): Promise<number | undefined> {
    return this.head(this.checkedNarUrl(narUrl));
  }

  /**
   * A URL that lets its holder PUT exactly `contentLength` bytes at `narUrl` for NAR_PUT_URL_TTL_S seconds, and
   * nothing else: the key, the method, the length and the content type are all signed.
   */
  async presignNarPut(narUrl: string, contentLength: number): Promise<PresignedPut> {
    const key = this.key(this.checkedNarUrl(narUrl));
    if (!Number.isSafeInteger(contentLength) || contentLength <= 0) {
      throw new CacheError(`a NAR of ${contentLength} bytes cannot be uploaded`);
    }
    // ContentLength puts the length among the signed headers, which pins the size; the presigner leaves
    // content-type out of the signature unless it is named signable.
    const command = new PutObjectCommand({
      Bucket: this.options.bucket,
      Key: key,
      ContentType: CONTENT_TYPES.nar,
      ContentLength: contentLength,
    });
    const url = await this.call('presign PUT', key, () =>
      getSignedUrl(this.client, command, {
        expiresIn: NAR_PUT_URL_TTL_S,
        signableHeaders: new Set(['content-type', 'content-length']),
      }),
    );
    return { url, headers: { 'content-type': CONTENT_TYPES.nar, 'content-length': String(contentLength) } };
  }

  /**
   * Writes the narinfo of `info.storePath`, signed with the cache's key (its other signatures kept), after checking
   * that its NAR is in the bucket with `FileSize` bytes and that its references are: the narinfo is what makes a
   * path visible to substituters, so it comes last. Returns the narinfo as written.
   */
  async putNarinfo(info: NarInfo): Promise<NarInfo> {
    if (info.compression !== this.compression) {
      throw new CacheError(
        `S3 cache ${this.id} stores ${this.compression} NARs, not ${info.compression} (${info.storePath})`,
      );
    }
    const size = await this.narSize(info.url);
    if (size === undefined) throw new CacheError(`${info.url} of ${info.storePath} is not in S3 cache ${this.id}`);
    if (size !== info.fileSize) {
      throw new CacheError(
        `${info.url} of ${info.storePath} has ${size} bytes in S3 cache ${this.id}, not the announced ${info.fileSize}`,
      );
    }
    const absent = await this.missing(info.references.filter((r) => r !== info.storePath));
    if (absent.length > 0) {
      throw new CacheError(
        `references of ${info.storePath} are not in S3 cache ${this.id} yet (push them first): ${absent.join(' ')}`,
      );
    }
    // No check for a narinfo already there (Nix's own upload makes one): a second narinfo of a path differs from the
    // first at most in URL, FileHash and FileSize — what it vouches for comes from the coordinator's cache — and the
    // NAR the first names stays, so a substituter holding either one finds its NAR.
    const name = narInfoName(storePathHash(info.storePath));
    let sigs = info.sigs;
    if (this.options.signingKey !== undefined) {
      const sig = signFingerprint(this.options.signingKey, fingerprint(info));
      const keyName = sig.slice(0, sig.indexOf(':') + 1);
      sigs = [...sigs.filter((s) => !s.startsWith(keyName)), sig];
    }
    const signed: NarInfo = { ...info, sigs };
    await this.put(name, serializeNarInfo(signed), CONTENT_TYPES.narinfo);
    this.present.set(info.storePath, true);
    return signed;
  }

  /** Stores the build log of `drvPath` at `log/<drv basename>`, where `nix log --store` looks. */
  async putLog(drvPath: string, text: string): Promise<void> {
    if (!isDrvPath(drvPath)) throw new CacheError(`${JSON.stringify(drvPath)} is not a derivation path`);
    await this.put(`log/${drvPath.slice(STORE_DIR.length + 1)}`, text, CONTENT_TYPES.log);
  }

  /** Ends the SDK client's connections. */
  close(): void {
    this.client.destroy();
  }

  private checkedNarUrl(narUrl: string): string {
    if (classifyCachePath(narUrl) !== 'nar' || !narUrl.endsWith(`.nar${NAR_FILE_SUFFIX[this.compression]}`)) {
      throw new CacheError(`${JSON.stringify(narUrl)} is not a ${this.compression} NAR of S3 cache ${this.id}`);
    }
    return narUrl;
  }

  private key(relative: string): string {
    return this.options.prefix === '' ? relative : `${this.options.prefix}/${relative}`;
  }

  /** ContentLength of the object, or undefined when there is none. */
  private async head(relative: string): Promise<number | undefined> {
    const key = this.key(relative);
    try {
      const r = await this.client.send(new HeadObjectCommand({ Bucket: this.options.bucket, Key: key }));
      return r.ContentLength ?? 0;
    } catch (err) {
      const status = statusOf(err);
      if (status === 404) return undefined;
      const failure = this.failure('HEAD', key, err);
      // S3 hides which keys exist from callers that may not list the bucket: a missing key is then a 403.
      if (status === 403)
        failure.message += ' (S3 answers 403 for a missing key unless the credentials may s3:ListBucket)';
      throw failure;
    }
  }

  private async put(relative: string, body: string, contentType: string): Promise<void> {
    const key = this.key(relative);
    await this.call('PUT', key, () =>
      this.client.send(
        new PutObjectCommand({ Bucket: this.options.bucket, Key: key, Body: body, ContentType: contentType }),
      ),
    );
  }

  private async call<T>(what: string, key: string, request: () => Promise<T>): Promise<T> {
    try {
      return await request();
    } catch (err) {
      throw this.failure(what, key, err);
    }
  }

  /** The SDK's error named by its S3 code and HTTP status: never the request, which carries signatures. */
  private failure(what: string, key: string, err: unknown): S3RequestFailed {
    const e = err as { name?: string; message?: string; $metadata?: { httpStatusCode?: number } };
    const status = e.$metadata?.httpStatusCode;
    const detail = `${e.name ?? 'Error'}${status !== undefined ? ` (HTTP ${status})` : ''}: ${e.message ?? String(err)}`;
    return new S3RequestFailed(`S3 cache ${this.id}: ${what} s3://${this.options.bucket}/${key} failed: ${detail}`);
  }
}

function statusOf(err: unknown): number | undefined {
  return (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
}

/** Runs `task` over `items`, at most `limit` at once; after a failure starts no more and rethrows the first. */
async function mapBounded<T>(items: readonly T[], limit: number, task: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      try {
        await task(items[next++]!);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.min(limit, items.length) }, worker));
  const failure = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failure) throw failure.reason;
}
