import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError } from '../../common/errors.js';
import type { NarInfo } from '../../common/nix/narinfo.js';
import { startS3StandIn, type S3StandIn } from '../../test/stand-ins/s3-server.js';
import { generateSigningKey } from '../cache/signing-key.js';
import { S3BinaryCache, parseS3Destination, type S3BinaryCacheOptions } from './s3-cache.js';

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';

const P = (c: string, name = 'p') => `/nix/store/${c.repeat(32)}-${name}`;
const H = (c: string) => `sha256:${c.repeat(52)}`;

describe('s3:// destinations', () => {
  it('reads the destinations upstream eka-ci documents, with the meanings Nix gives them', () => {
    expect(parseS3Destination('s3://my-bucket/nix-cache?region=us-west-2')).toEqual({
      bucket: 'my-bucket',
      prefix: 'nix-cache',
      region: 'us-west-2',
      forcePathStyle: false,
    });
    expect(parseS3Destination('s3://internal-cache/nix?region=us-west-2&endpoint=https://minio.internal')).toEqual({
      bucket: 'internal-cache',
      prefix: 'nix',
      region: 'us-west-2',
      endpoint: 'https://minio.internal',
      forcePathStyle: true,
    });
    expect(parseS3Destination('s3://b-1/a/b/?profile=dev')).toMatchObject({ prefix: 'a/b', profile: 'dev' });
    expect(parseS3Destination('s3://bucket')).toMatchObject({ prefix: '', region: 'us-east-1' });
  });

  it('reads Nix’s own S3 store parameters', () => {
    expect(
      parseS3Destination(
        's3://cache.example?endpoint=minio:9000&scheme=http&compression=zstd&priority=30&want-mass-query=false&secret-key=/etc/k',
      ),
    ).toEqual({
      bucket: 'cache.example',
      prefix: '',
      region: 'us-east-1',
      endpoint: 'http://minio:9000',
      forcePathStyle: true,
      compression: 'zstd',
      priority: 30,
      wantMassQuery: false,
      secretKeyFile: '/etc/k',
    });
  });

  it('refuses what it would not honour, naming the key and the parameter', () => {
    const bad: Array<[string, RegExp]> = [
      ['https://cache.example.org', /caches\[0\]\.destination: expected an s3:\/\/ URL/],
      ['s3://b-1?multipart-upload=true', /parameter "multipart-upload" is not supported here/],
      ['s3://b-1?compression=br', /compression "br" is not one of xz, zstd, none/],
      ['s3://b-1?scheme=http', /scheme is only meaningful with endpoint/],
      ['s3://b-1?endpoint=https://h/path', /without a path/],
      ['s3://b-1?endpoint=https://h&scheme=http', /contradicts scheme=http/],
      ['s3://b-1/a/../b', /must not contain/],
      ['s3://AKIA:secret@b-1', /must not carry credentials/],
      ['s3://x', /is not an S3 bucket name/],
      ['s3://b-1?region=a&region=b', /given twice/],
    ];
    for (const [destination, message] of bad) {
      expect(() => parseS3Destination(destination, 'caches[0].destination'), destination).toThrow(ConfigError);
      expect(() => parseS3Destination(destination, 'caches[0].destination'), destination).toThrow(message);
    }
    expect(() => parseS3Destination('s3://AKIA:secret@b-1')).not.toThrow(/secret/);
  });
});

describe('S3BinaryCache', () => {
  let s3: S3StandIn;
  const caches: S3BinaryCache[] = [];
  const key = generateSigningKey('unit-s3-1');

  const open = (options: Partial<S3BinaryCacheOptions> = {}): S3BinaryCache => {
    const cache = new S3BinaryCache({
      id: 'unit',
      bucket: s3.bucket,
      prefix: '',
      region: s3.region,
      endpoint: s3.endpoint,
      forcePathStyle: true,
      compression: 'zstd',
      signingKey: key.secretKey,
      credentials: () => Promise.resolve({ ...s3.key }),
      ...options,
    });
    caches.push(cache);
    return cache;
  };
  const get = async (path: string) => {
    const r = await fetch(`${s3.bucketUrl}/${path}`);
    return { status: r.status, type: r.headers.get('content-type'), text: await r.text() };
  };
  /** Uploads `bytes` as a NAR the way an agent does: through a presigned URL. */
  const uploadNar = async (cache: S3BinaryCache, url: string, bytes: Buffer) => {
    const put = await cache.presignNarPut(url, bytes.length);
    const r = await fetch(put.url, { method: 'PUT', headers: put.headers, body: new Uint8Array(bytes) });
    expect(r.status).toBe(200);
  };
  const info = (cache: S3BinaryCache, storePath: string, fileHash: string, references: string[] = []): NarInfo => ({
    storePath,
    url: cache.narUrl(fileHash),
    compression: 'zstd',
    fileHash,
    fileSize: 10,
    narHash: H('0'),
    narSize: 120,
    references,
    sigs: [],
  });

  beforeAll(async () => {
    s3 = await startS3StandIn();
  });
  afterAll(async () => {
    for (const c of caches) c.close();
    await s3?.close();
  });

  it('writes nix-cache-info once, as Nix does, and keeps one that is there', async () => {
    await open({ prefix: 'fresh', priority: 41 }).ensureCacheInfo();
    const writer = open({ prefix: 'kept', priority: 10 });
    await writer.ensureCacheInfo();
    await open({ prefix: 'kept', priority: 99, wantMassQuery: false }).ensureCacheInfo();

    expect(await get('fresh/nix-cache-info')).toEqual({
      status: 200,
      type: 'text/x-nix-cache-info',
      text: 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n',
    });
    expect((await get('kept/nix-cache-info')).text).toBe('StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n');
  });

  it('names NARs after their file hash with Nix’s extension for the compression', () => {
    expect(open().narUrl(H('a'))).toBe(`nar/${'a'.repeat(52)}.nar.zst`);
    expect(open({ compression: 'xz' }).narUrl(H('a'))).toBe(`nar/${'a'.repeat(52)}.nar.xz`);
    expect(open({ compression: 'none' }).narUrl('b'.repeat(52))).toBe(`nar/${'b'.repeat(52)}.nar`);
    expect(() => open().narUrl('sha256:../../x')).toThrow(/not a NAR file hash/);
    expect(() => open({ prefix: '/abs' })).toThrow(/stray "\/"/);
  });

  it('presigns only NAR keys of its own compression', async () => {
    const cache = open();
    await expect(cache.presignNarPut(`nar/${'a'.repeat(52)}.nar.xz`, 10)).rejects.toThrow(/is not a zstd NAR/);
    await expect(cache.presignNarPut('nix-cache-info', 10)).rejects.toThrow(/is not a zstd NAR/);
    await expect(cache.presignNarPut(cache.narUrl(H('a')), 0)).rejects.toThrow(/cannot be uploaded/);
  });

  it('writes a narinfo last: after its NAR, with the announced size, and after its references', async () => {
    const cache = open({ prefix: 'order' });
    const dep = info(cache, P('d', 'dep'), H('d'));
    const top = info(cache, P('k', 'top'), H('k'), [dep.storePath, P('k', 'top')]);

    await expect(cache.putNarinfo(top)).rejects.toThrow(/is not in S3 cache unit/);
    await uploadNar(cache, top.url, Buffer.alloc(11));
    await expect(cache.putNarinfo(top)).rejects.toThrow(/has 11 bytes in S3 cache unit, not the announced 10/);
    await expect(cache.putNarinfo({ ...top, fileSize: 11 })).rejects.toThrow(
      new RegExp(
        `references of ${top.storePath} are not in S3 cache unit yet \\(push them first\\): ${dep.storePath}$`,
      ),
    );
    expect(await cache.missing([top.storePath, dep.storePath])).toEqual([top.storePath, dep.storePath]);
    await uploadNar(cache, dep.url, Buffer.alloc(10));
    await cache.putNarinfo(dep);
    await cache.putNarinfo({ ...top, fileSize: 11 });

    expect(await cache.missing([top.storePath, dep.storePath, P('x')])).toEqual([P('x')]);
    const text = (await get(`order/${'k'.repeat(32)}.narinfo`)).text;
    expect(text).toContain(`References: ${'d'.repeat(32)}-dep ${'k'.repeat(32)}-top\n`);
    expect(text).toMatch(/\nSig: unit-s3-1:[A-Za-z0-9+/]+=*\n/);
  });

  it('a second narinfo of a path (another compressor’s NAR) leaves the first one’s NAR in place', async () => {
    const cache = open({ prefix: 'again' });
    const first = info(cache, P('f'), H('f'));
    await uploadNar(cache, first.url, Buffer.alloc(10));
    await cache.putNarinfo(first);
    const second = info(cache, P('f'), H('g'));
    await uploadNar(cache, second.url, Buffer.alloc(10));

    await cache.putNarinfo(second);

    expect((await get(`again/${'f'.repeat(32)}.narinfo`)).text).toContain(`URL: ${second.url}\n`);
    expect((await get(`again/${first.url}`)).status).toBe(200);
  });

  it('signs with the cache key next to the signatures the path already had, or leaves it unsigned', async () => {
    const signed = open({ prefix: 'sigs' });
    const unsigned = open({ prefix: 'sigs', signingKey: undefined });
    const a = { ...info(signed, P('a'), H('a')), sigs: ['coordinator-1:c2ln'] };
    const b = info(unsigned, P('b'), H('b'));
    await uploadNar(signed, a.url, Buffer.alloc(10));
    await uploadNar(signed, b.url, Buffer.alloc(10));

    expect((await signed.putNarinfo(a)).sigs.map((s) => s.split(':')[0])).toEqual(['coordinator-1', 'unit-s3-1']);
    expect((await unsigned.putNarinfo(b)).sigs).toEqual([]);
    expect(signed.publicKey).toBe(key.publicKey);
    expect(unsigned.publicKey).toBeUndefined();
  });

  it('stores build logs where `nix log` looks for them', async () => {
    const drv = `/nix/store/${'l'.repeat(32)}-hello.drv`;
    await open({ prefix: 'logs' }).putLog(drv, 'building hello\n');

    expect(await get(`logs/log/${'l'.repeat(32)}-hello.drv`)).toEqual({
      status: 200,
      type: 'text/plain; charset=utf-8',
      text: 'building hello\n',
    });
    await expect(open().putLog(P('n'), 'x')).rejects.toThrow(/is not a derivation path/);
  });

  it('reports S3’s refusals with the cache, the key and S3’s code, never the secret', async () => {
    const wrong = open({
      prefix: 'wrong',
      credentials: () => Promise.resolve({ accessKeyId: s3.key.accessKeyId, secretAccessKey: 'not-the-secret-at-all' }),
    });

    const error = await wrong.missing([P('w')]).then(
      () => undefined,
      (e: Error) => e,
    );

    expect(error?.message).toMatch(
      new RegExp(`^S3 cache unit: HEAD s3://cache/wrong/${'w'.repeat(32)}\\.narinfo failed: .*HTTP 403`),
    );
    expect(error?.message).toMatch(/s3:ListBucket/);
    expect(error?.message).not.toContain('not-the-secret-at-all');
    expect(error?.message).not.toContain(s3.key.secretAccessKey);
  });
});
