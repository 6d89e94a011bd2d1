/**
 * `s3://bucket/prefix?region=…&endpoint=…` destinations, the store URIs `nix copy --to s3://…` takes and upstream
 * eka-ci writes as `cache_type = "nix-copy"`. eka-ci writes such buckets itself (Debian's Nix has no S3 support), so
 * it reads the same parameters with the meanings Nix gives them, and refuses any parameter it would not honour
 * rather than ignoring it.
 */
import { ConfigError } from '../../common/errors.js';
import { NAR_COMPRESSIONS, type NarCompression } from '../../common/nix/nar.js';

export interface S3Destination {
  bucket: string;
  /** Key prefix without leading or trailing slashes: `''` or `a/b`. */
  prefix: string;
  /** Nix's default when the URI names none. */
  region: string;
  /** `scheme://host[:port]` of an S3-compatible service; undefined for AWS itself. */
  endpoint?: string;
  /** Nix addresses buckets path-style exactly when an endpoint is given (virtual-hosted style on AWS). */
  forcePathStyle: boolean;
  /** `~/.aws` profile whose credentials Nix would use; eka-ci's credentials come from the cache's `credentials`. */
  profile?: string;
  compression?: NarCompression;
  /** The `secret-key=` file Nix would sign with; eka-ci signs with the cache's `signing_key` instead. */
  secretKeyFile?: string;
  /** `Priority:` written to nix-cache-info when the bucket is new. */
  priority?: number;
  /** `WantMassQuery:` written to nix-cache-info when the bucket is new. */
  wantMassQuery?: boolean;
}

/** The region Nix's S3 store uses when the URI names none. */
export const DEFAULT_S3_REGION = 'us-east-1';

const PARAMETERS = [
  'region',
  'endpoint',
  'scheme',
  'profile',
  'compression',
  'secret-key',
  'priority',
  'want-mass-query',
] as const;

/** S3 bucket names (the rules AWS enforces for new buckets, relaxed to what S3-compatible services accept). */
const BUCKET_RE = /^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$/;

/** Parses `destination` (`what` names it in errors, e.g. `caches[2].destination`); throws ConfigError. */
export function parseS3Destination(destination: string, what = 'destination'): S3Destination {
  const fail = (detail: string): never => {
    throw new ConfigError(`${what}: ${detail}`);
  };
  let url: URL;
  try {
    url = new URL(destination);
  } catch {
    return fail(`${JSON.stringify(redactQuery(destination))} is not a URL`);
  }
  if (url.protocol !== 's3:') fail(`expected an s3:// URL, got ${url.protocol}//…`);
  if (url.username !== '' || url.password !== '') {
    fail('an s3:// URL must not carry credentials; set the cache’s `credentials` instead');
  }
  const bucket = url.hostname;
  if (!BUCKET_RE.test(bucket)) fail(`${JSON.stringify(bucket)} is not an S3 bucket name`);
  // Read from the text as written: the URL parser would quietly resolve `a/../b` to `b`.
  const rawPath = destination.replace(/^s3:\/\/[^/?#]*/i, '').split(/[?#]/)[0] ?? '';
  const prefix = safeDecode(rawPath).replace(/^\/+|\/+$/g, '');
  if (prefix.split('/').some((s) => s === '.' || s === '..' || (s === '' && prefix !== ''))) {
    fail(`key prefix ${JSON.stringify(prefix)} must not contain empty, "." or ".." segments`);
  }
  const params = new Map<string, string>();
  for (const [key, value] of url.searchParams) {
    if (!(PARAMETERS as readonly string[]).includes(key)) {
      fail(`parameter ${JSON.stringify(key)} is not supported here (supported: ${PARAMETERS.join(', ')})`);
    }
    if (params.has(key)) fail(`parameter ${key} is given twice`);
    params.set(key, value);
  }
  const result: S3Destination = {
    bucket,
    prefix,
    region: params.get('region') || DEFAULT_S3_REGION,
    forcePathStyle: false,
  };
  const endpoint = params.get('endpoint');
  const scheme = params.get('scheme');
  if (scheme !== undefined && scheme !== 'http' && scheme !== 'https') fail(`scheme must be http or https`);
  if (endpoint !== undefined && endpoint !== '') {
    const full = endpoint.includes('://') ? endpoint : `${scheme ?? 'https'}://${endpoint}`;
    let parsed: URL;
    try {
      parsed = new URL(full);
    } catch {
      return fail(`endpoint ${JSON.stringify(endpoint)} is not a host or URL`);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') fail('endpoint must be http:// or https://');
    if (scheme !== undefined && parsed.protocol !== `${scheme}:`)
      fail(`endpoint ${endpoint} contradicts scheme=${scheme}`);
    if (parsed.pathname !== '/' || parsed.search !== '') fail('endpoint must be scheme://host[:port] without a path');
    result.endpoint = `${parsed.protocol}//${parsed.host}`;
    result.forcePathStyle = true;
  } else if (scheme !== undefined) {
    fail('scheme is only meaningful with endpoint');
  }
  const profile = params.get('profile');
  if (profile) result.profile = profile;
  const compression = params.get('compression');
  if (compression !== undefined) {
    if ((NAR_COMPRESSIONS as readonly string[]).includes(compression))
      result.compression = compression as NarCompression;
    else fail(`compression ${JSON.stringify(compression)} is not one of xz, zstd, none`);
  }
  const secretKey = params.get('secret-key');
  if (secretKey) result.secretKeyFile = secretKey;
  const priority = params.get('priority');
  if (priority !== undefined) {
    if (!/^\d{1,6}$/.test(priority)) fail(`priority ${JSON.stringify(priority)} is not a whole number`);
    result.priority = Number(priority);
  }
  const mass = params.get('want-mass-query');
  if (mass !== undefined) {
    if (mass !== 'true' && mass !== 'false') fail('want-mass-query must be true or false');
    result.wantMassQuery = mass === 'true';
  }
  return result;
}

function safeDecode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

/** A destination that failed to parse is quoted without its query, which might hold something private. */
function redactQuery(destination: string): string {
  const q = destination.indexOf('?');
  return q < 0 ? destination : `${destination.slice(0, q)}?…`;
}
