/**
 * An S3-compatible server for tests: s3rver (which stores objects faithfully but checks no signature at all) behind a
 * front that checks AWS Signature Version 4 as S3 does — presigned query signatures and Authorization headers,
 * computed here from the published algorithm rather than by the SDK that signs them — and refuses what S3 refuses,
 * in S3's words: a wrong signature (SignatureDoesNotMatch), an expired URL or any unsigned write (AccessDenied), an
 * unknown key (InvalidAccessKeyId). Anonymous GET and HEAD pass, as on a public-read bucket, so Nix substitutes from
 * it over plain HTTP (`http://127.0.0.1:PORT/<bucket>`).
 *
 * s3rver runs in the test's own process: a test must never block the event loop while Nix talks to it (no spawnSync).
 */
import { createHash, createHmac, randomUUID, timingSafeEqual } from 'node:crypto';
import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import S3rver from 's3rver';
import { closeServer, listenOnLoopback } from './loopback.js';

export interface S3Key {
  accessKeyId: string;
  secretAccessKey: string;
}

export interface S3Request {
  method: string;
  /** The path without the query, e.g. `/cache/nar/….nar.zst`. */
  path: string;
  status: number;
  /** S3's error code when the front refused the request. */
  code?: string;
}

export interface S3StandIn {
  /** `http://127.0.0.1:PORT`: the endpoint for the SDK (path-style addressing). */
  endpoint: string;
  region: string;
  bucket: string;
  /** `http://127.0.0.1:PORT/<bucket>`: a Nix substituter URL for the bucket's root. */
  bucketUrl: string;
  /** The one key pair the server accepts. */
  key: S3Key;
  /** Every request that reached the front, in order. */
  requests: S3Request[];
  /** Moves the server's clock (what presigned URLs expire against), as waiting that long would. */
  advanceClock(ms: number): void;
  close(): Promise<void>;
}

const REGION = 'us-east-1';
/** S3 refuses header-signed requests whose X-Amz-Date is further than this from its clock. */
const MAX_SKEW_MS = 15 * 60_000;
/** S3's limit on X-Amz-Expires: seven days. */
const MAX_EXPIRES_S = 604_800;
/** Bodies whose SHA-256 is signed are buffered to check it; the SDK signs small bodies (narinfos) this way. */
const MAX_SIGNED_BODY = 16 * 1024 ** 2;

export async function startS3StandIn(bucket = 'cache'): Promise<S3StandIn> {
  const dir = await mkdtemp(join(tmpdir(), 'ekaci-s3-'));
  const s3rver = new S3rver({
    address: '127.0.0.1',
    port: 0,
    silent: true,
    directory: dir,
    configureBuckets: [{ name: bucket }],
  });
  const { port: backendPort } = await s3rver.run();
  const key: S3Key = { accessKeyId: 'AKIAEKACITEST', secretAccessKey: randomUUID() };
  const requests: S3Request[] = [];
  let clockOffset = 0;

  const server: Server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0]!;
    const refuse = (status: number, code: string, message: string): void => {
      requests.push({ method: req.method ?? '', path, status, code });
      req.resume();
      // s3rver failing half-way through its answer: all that is left is to cut the connection.
      if (res.headersSent) res.destroy();
      else sendError(res, req.method === 'HEAD', status, code, message);
    };
    let verdict: Verdict;
    try {
      verdict = verify(req, key, Date.now() + clockOffset);
    } catch (err) {
      refuse(400, 'AuthorizationQueryParametersError', (err as Error).message);
      return;
    }
    if (verdict.kind === 'refused') return refuse(verdict.status, verdict.code, verdict.message);
    if (verdict.kind === 'anonymous' && req.method !== 'GET' && req.method !== 'HEAD') {
      return refuse(403, 'AccessDenied', 'Access Denied');
    }
    void forward(req, res, backendPort, verdict.payloadHash).then(
      (status) => requests.push({ method: req.method ?? '', path, status }),
      (err: Error) => refuse(400, err.name, err.message),
    );
  });
  const endpoint = await listenOnLoopback(server);
  return {
    endpoint,
    region: REGION,
    bucket,
    bucketUrl: `${endpoint}/${bucket}`,
    key,
    requests,
    advanceClock: (ms) => (clockOffset += ms),
    close: async () => {
      await closeServer(server);
      await s3rver.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

type Verdict =
  | { kind: 'anonymous'; payloadHash?: undefined }
  | { kind: 'signed'; payloadHash: string }
  | { kind: 'refused'; status: number; code: string; message: string };

const refused = (status: number, code: string, message: string): Verdict => ({
  kind: 'refused',
  status,
  code,
  message,
});

/** Checks the request's SigV4 signature, from the query (presigned) or the Authorization header. */
function verify(req: IncomingMessage, key: S3Key, now: number): Verdict {
  const query = parseQuery(req.url ?? '/');
  const header = req.headers.authorization;
  const presigned = query.some(([k]) => k === 'X-Amz-Algorithm');
  if (header === undefined && !presigned) return { kind: 'anonymous' };
  if (header !== undefined && presigned) {
    return refused(400, 'InvalidArgument', 'Only one auth mechanism allowed');
  }
  let credential: string, signedHeaders: string, signature: string, amzDate: string, payloadHash: string;
  let canonicalQuery: Array<[string, string]>;
  if (presigned) {
    const get = (name: string): string => query.find(([k]) => k === name)?.[1] ?? '';
    if (get('X-Amz-Algorithm') !== 'AWS4-HMAC-SHA256')
      return refused(400, 'AuthorizationQueryParametersError', 'X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"');
    credential = get('X-Amz-Credential');
    signedHeaders = get('X-Amz-SignedHeaders');
    signature = get('X-Amz-Signature');
    amzDate = get('X-Amz-Date');
    payloadHash = get('X-Amz-Content-Sha256') || 'UNSIGNED-PAYLOAD';
    const expires = Number(get('X-Amz-Expires'));
    if (!Number.isInteger(expires) || expires < 1 || expires > MAX_EXPIRES_S) {
      return refused(400, 'AuthorizationQueryParametersError', 'X-Amz-Expires must be between 1 and 604800 seconds');
    }
    const signedAt = parseAmzDate(amzDate);
    if (signedAt === undefined) return refused(403, 'AccessDenied', 'X-Amz-Date must be in the ISO8601 Long Format');
    if (now > signedAt + expires * 1000) return refused(403, 'AccessDenied', 'Request has expired');
    canonicalQuery = query.filter(([k]) => k !== 'X-Amz-Signature');
  } else {
    const m = /^AWS4-HMAC-SHA256 Credential=([^,]+),\s*SignedHeaders=([^,]+),\s*Signature=([0-9a-f]+)$/.exec(header!);
    if (!m) return refused(400, 'AuthorizationHeaderMalformed', 'The authorization header is malformed');
    [, credential, signedHeaders, signature] = m as unknown as [string, string, string, string];
    amzDate = headerValue(req, 'x-amz-date');
    payloadHash = headerValue(req, 'x-amz-content-sha256');
    if (payloadHash === '')
      return refused(400, 'InvalidRequest', 'Missing required header for this request: x-amz-content-sha256');
    const signedAt = parseAmzDate(amzDate);
    if (signedAt === undefined)
      return refused(403, 'AccessDenied', 'AWS authentication requires a valid Date or x-amz-date header');
    if (Math.abs(now - signedAt) > MAX_SKEW_MS) {
      return refused(
        403,
        'RequestTimeTooSkewed',
        'The difference between the request time and the current time is too large.',
      );
    }
    canonicalQuery = query;
  }
  const [akid, day, region, service, terminator] = credential.split('/');
  if (akid !== key.accessKeyId) {
    return refused(403, 'InvalidAccessKeyId', 'The AWS Access Key Id you provided does not exist in our records.');
  }
  if (day !== amzDate.slice(0, 8) || region !== REGION || service !== 's3' || terminator !== 'aws4_request') {
    return refused(
      400,
      'AuthorizationHeaderMalformed',
      `the credential scope ${credential.slice(akid.length)} is not valid here`,
    );
  }
  const headerNames = signedHeaders.split(';');
  if (!headerNames.includes('host')) return refused(400, 'AuthorizationQueryParametersError', 'host must be signed');
  const canonicalRequest = [
    req.method ?? '',
    canonicalPath(req.url ?? '/'),
    canonicalQuery
      .map(([k, v]) => [rfc3986(k), rfc3986(v)] as const)
      .sort(([a, x], [b, y]) => (a < b ? -1 : a > b ? 1 : x < y ? -1 : x > y ? 1 : 0))
      .map(([k, v]) => `${k}=${v}`)
      .join('&'),
    headerNames.map((h) => `${h}:${headerValue(req, h).trim().replace(/\s+/g, ' ')}\n`).join(''),
    signedHeaders,
    payloadHash,
  ].join('\n');
  const stringToSign = [
    'AWS4-HMAC-SHA256',
    amzDate,
    `${day}/${region}/${service}/aws4_request`,
    sha256Hex(canonicalRequest),
  ].join('\n');
  let signingKey = hmac(`AWS4${key.secretAccessKey}`, day);
  for (const part of [region, service, 'aws4_request']) signingKey = hmac(signingKey, part);
  const expected = Buffer.from(hmac(signingKey, stringToSign).toString('hex'));
  const given = Buffer.from(signature);
  if (expected.length !== given.length || !timingSafeEqual(expected, given)) {
    return refused(
      403,
      'SignatureDoesNotMatch',
      'The request signature we calculated does not match the signature you provided. Check your key and signing method.',
    );
  }
  return { kind: 'signed', payloadHash };
}

/** Passes the request on to s3rver without its signature (checked here), and s3rver's answer back. */
function forward(req: IncomingMessage, res: ServerResponse, port: number, payloadHash?: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const [path, rawQuery = ''] = (req.url ?? '/').split('?') as [string, string?];
    const query = rawQuery
      .split('&')
      .filter((p) => p !== '' && !/^x-amz-/i.test(p))
      .join('&');
    const headers = { ...req.headers, host: `127.0.0.1:${port}` };
    delete headers.authorization;
    const upstream = request(
      { host: '127.0.0.1', port, method: req.method, path: query === '' ? path : `${path}?${query}`, headers },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
        answer.on('end', () => resolve(answer.statusCode ?? 502));
      },
    );
    upstream.on('error', reject);
    if (payloadHash === undefined || !/^[0-9a-f]{64}$/.test(payloadHash)) {
      if (payloadHash?.startsWith('STREAMING-')) {
        upstream.destroy();
        reject(
          Object.assign(new Error(`${payloadHash} is not supported by this stand-in`), { name: 'NotImplemented' }),
        );
        return;
      }
      req.pipe(upstream);
      return;
    }
    // The signature covers the body's SHA-256: check it before anything is stored.
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size <= MAX_SIGNED_BODY) chunks.push(c);
    });
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      if (size > MAX_SIGNED_BODY || sha256Hex(body) !== payloadHash) {
        upstream.destroy();
        reject(
          Object.assign(new Error('The provided x-amz-content-sha256 header does not match what was computed.'), {
            name: 'XAmzContentSHA256Mismatch',
          }),
        );
        return;
      }
      upstream.end(body);
    });
  });
}

function sendError(res: ServerResponse, head: boolean, status: number, code: string, message: string): void {
  const body =
    '<?xml version="1.0" encoding="UTF-8"?>\n' +
    `<Error><Code>${code}</Code><Message>${escapeXml(message)}</Message><RequestId>${randomUUID()}</RequestId></Error>`;
  res.writeHead(status, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
  res.end(head ? undefined : body);
}

/** The query as sent, decoded, in order (`URLSearchParams` would read `+` as a space, which S3 does not). */
function parseQuery(url: string): Array<[string, string]> {
  const q = url.indexOf('?');
  if (q < 0) return [];
  return url
    .slice(q + 1)
    .split('&')
    .filter((p) => p !== '')
    .map((p) => {
      const eq = p.indexOf('=');
      const k = eq < 0 ? p : p.slice(0, eq);
      const v = eq < 0 ? '' : p.slice(eq + 1);
      return [decodeURIComponent(k), decodeURIComponent(v)];
    });
}

/** S3's canonical URI: each segment URI-encoded once, nothing normalised. */
function canonicalPath(url: string): string {
  return url
    .split('?')[0]!
    .split('/')
    .map((s) => rfc3986(decodeURIComponent(s)))
    .join('/');
}

function rfc3986(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

function headerValue(req: IncomingMessage, name: string): string {
  const v = req.headers[name];
  return Array.isArray(v) ? v.join(',') : (v ?? '');
}

function parseAmzDate(s: string): number | undefined {
  const m = /^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/.exec(s);
  return m ? Date.UTC(+m[1]!, +m[2]! - 1, +m[3]!, +m[4]!, +m[5]!, +m[6]!) : undefined;
}

function sha256Hex(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

function hmac(key: string | Buffer, data: string): Buffer {
  return createHmac('sha256', key).update(data).digest();
}

function escapeXml(s: string): string {
  return s.replace(/[<>&"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
