/**
 * `.narinfo` files, the per-path metadata of a Nix binary cache, read and written the way Nix 2.8 does
 * (`NarInfo::NarInfo` / `NarInfo::to_string` in libstore). Fields are `Key: value` lines; unknown keys are
 * ignored, as Nix ignores them.
 */
import { CacheError } from '../errors.js';
import { NIX_BASE32_ALPHABET, STORE_DIR, isStorePath } from './store-path.js';

export interface NarInfo {
  storePath: string;
  /** Relative to the cache root, e.g. `nar/<fileHash>.nar.zst`. */
  url: string;
  compression: string;
  /** `sha256:<nix base32>` of the file at `url`. */
  fileHash?: string;
  fileSize?: number;
  /** `sha256:<nix base32>` of the uncompressed NAR, always normalised to base32 as signatures need. */
  narHash: string;
  narSize: number;
  /** Full store paths, sorted as Nix sorts them (its `StorePathSet` is ordered). */
  references: string[];
  deriver?: string;
  system?: string;
  sigs: string[];
  ca?: string;
}

/** Nix assumes bzip2 for a narinfo without a Compression line (the format predates the field). */
const DEFAULT_COMPRESSION = 'bzip2';

const SHA256_BYTES = 32;
const SHA256_BASE32_LENGTH = 52;

/** Parses narinfo text; throws CacheError naming the first field that is missing or malformed. */
export function parseNarInfo(text: string): NarInfo {
  const fields = new Map<string, string>();
  const sigs: string[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const sep = line.indexOf(': ');
    if (sep <= 0) throw corrupt(`line ${JSON.stringify(line)} is not "Key: value"`);
    const key = line.slice(0, sep);
    const value = line.slice(sep + 2);
    if (key === 'Sig') sigs.push(value);
    else fields.set(key, value);
  }
  const storePath = required(fields, 'StorePath');
  if (!isStorePath(storePath)) throw corrupt(`StorePath ${JSON.stringify(storePath)} is not a store path`);
  const url = required(fields, 'URL');
  const narSize = size(required(fields, 'NarSize'), 'NarSize');
  // Nix itself refuses NarSize 0: no NAR serialisation is empty.
  if (narSize === 0) throw corrupt('NarSize must be positive');
  const info: NarInfo = {
    storePath,
    url,
    compression: fields.get('Compression') ?? DEFAULT_COMPRESSION,
    narHash: normaliseSha256(required(fields, 'NarHash'), 'NarHash'),
    narSize,
    references: words(fields.get('References'))
      .map((r) => baseNameToPath(r, 'References'))
      .sort(),
    sigs,
  };
  const fileHash = fields.get('FileHash');
  if (fileHash !== undefined) info.fileHash = normaliseSha256(fileHash, 'FileHash');
  const fileSize = fields.get('FileSize');
  if (fileSize !== undefined) info.fileSize = size(fileSize, 'FileSize');
  const deriver = fields.get('Deriver');
  if (deriver !== undefined && deriver !== '' && deriver !== 'unknown-deriver') {
    info.deriver = baseNameToPath(deriver, 'Deriver');
  }
  const system = fields.get('System');
  if (system !== undefined) info.system = system;
  const ca = fields.get('CA');
  if (ca !== undefined) info.ca = ca;
  return info;
}

/** Writes narinfo text in Nix's field order, so files we write are byte-identical to what `nix copy` writes. */
export function serializeNarInfo(info: NarInfo): string {
  const lines = [`StorePath: ${info.storePath}`, `URL: ${info.url}`, `Compression: ${info.compression}`];
  if (info.fileHash !== undefined) lines.push(`FileHash: ${info.fileHash}`);
  if (info.fileSize !== undefined) lines.push(`FileSize: ${info.fileSize}`);
  lines.push(`NarHash: ${info.narHash}`, `NarSize: ${info.narSize}`);
  lines.push(`References: ${info.references.map(baseName).join(' ')}`);
  if (info.deriver !== undefined) lines.push(`Deriver: ${baseName(info.deriver)}`);
  if (info.system !== undefined) lines.push(`System: ${info.system}`);
  for (const sig of info.sigs) lines.push(`Sig: ${sig}`);
  if (info.ca !== undefined) lines.push(`CA: ${info.ca}`);
  return lines.join('\n') + '\n';
}

/**
 * The unsigned narinfo of a store path stored as an uncompressed NAR (`nar/<NarHash>.nar`), from what its store says
 * of it: the daemon's path info, whose `narHash` is lowercase hex.
 */
export function uncompressedNarInfo(
  storePath: string,
  info: { narHash: string; narSize: number; references: readonly string[]; deriver: string; ca: string },
): NarInfo {
  const narHash = `sha256:${nixBase32(Buffer.from(info.narHash, 'hex'))}`;
  return {
    storePath,
    url: `nar/${narHash.slice('sha256:'.length)}.nar`,
    compression: 'none',
    fileHash: narHash,
    fileSize: info.narSize,
    narHash,
    narSize: info.narSize,
    references: [...info.references].sort(),
    deriver: info.deriver === '' ? undefined : info.deriver,
    sigs: [],
    ca: info.ca === '' ? undefined : info.ca,
  };
}

/** What a binary-cache signature signs (`ValidPathInfo::fingerprint`); references are full paths, sorted. */
export function fingerprint(info: Pick<NarInfo, 'storePath' | 'narHash' | 'narSize' | 'references'>): string {
  const refs = [...info.references].sort().join(',');
  return `1;${info.storePath};${normaliseSha256(info.narHash, 'NarHash')};${info.narSize};${refs}`;
}

/** The base32 alphabet as character codes, for `nixBase32`. */
const NIX_BASE32_CODES = Buffer.from(NIX_BASE32_ALPHABET, 'latin1');

/**
 * Nix's base32 (`printHash32`): little-endian bit order over the whole digest, most significant digit first. The
 * digits are written into a buffer and decoded once: a string grown a character at a time is a chain of one
 * object per character (≈1.3 KiB for a SHA-256), which a narinfo kept in memory would carry along.
 */
export function nixBase32(bytes: Uint8Array): string {
  const len = Math.ceil((bytes.length * 8) / 5);
  const out = Buffer.allocUnsafe(len);
  for (let n = len - 1; n >= 0; n--) {
    const b = n * 5;
    const i = Math.floor(b / 8);
    const j = b % 8;
    const c = ((bytes[i] ?? 0) >> j) | ((bytes[i + 1] ?? 0) << (8 - j));
    out[len - 1 - n] = NIX_BASE32_CODES[c & 0x1f]!;
  }
  return out.toString('latin1');
}

/** The bytes of a Nix base32 string (`parseHash32`), `bytes` long; throws on a character outside the alphabet. */
export function fromNixBase32(text: string, bytes: number): Buffer {
  if (text.length !== Math.ceil((bytes * 8) / 5)) throw corrupt(`"${text}" is not ${bytes} bytes in base32`);
  const out = Buffer.alloc(bytes);
  for (let n = 0; n < text.length; n++) {
    const digit = NIX_BASE32_ALPHABET.indexOf(text[text.length - n - 1]!);
    if (digit < 0) throw corrupt(`"${text}" is not base32`);
    const b = n * 5;
    const i = b >> 3;
    const j = b & 7;
    out[i] = (out[i]! | (digit << j)) & 0xff;
    const carry = digit >> (8 - j);
    if (i + 1 < bytes) out[i + 1] = out[i + 1]! | carry;
    else if (carry !== 0) throw corrupt(`"${text}" is longer than ${bytes} bytes`);
  }
  return out;
}

/**
 * `sha256:<base32>` for a SHA-256 written in any encoding Nix accepts (base16, base32, base64, SRI). Signatures
 * cover the base32 form, so a narinfo written with another encoding must be normalised before it is signed.
 */
export function normaliseSha256(value: string, field: string): string {
  let digest: Buffer | undefined;
  if (value.startsWith('sha256-')) digest = Buffer.from(value.slice('sha256-'.length), 'base64');
  else if (value.startsWith('sha256:')) {
    const enc = value.slice('sha256:'.length);
    if (enc.length === SHA256_BASE32_LENGTH && [...enc].every((ch) => NIX_BASE32_ALPHABET.includes(ch))) {
      return value;
    }
    if (/^[0-9a-f]{64}$/.test(enc)) digest = Buffer.from(enc, 'hex');
    else if (/^[A-Za-z0-9+/]{43}=$/.test(enc)) digest = Buffer.from(enc, 'base64');
  }
  if (digest?.length !== SHA256_BYTES) throw corrupt(`${field} ${JSON.stringify(value)} is not a SHA-256 hash`);
  return `sha256:${nixBase32(digest)}`;
}

function baseNameToPath(name: string, field: string): string {
  const path = `${STORE_DIR}/${name}`;
  if (name.includes('/') || !isStorePath(path))
    throw corrupt(`${field} entry ${JSON.stringify(name)} is not a store path`);
  return path;
}

function baseName(storePath: string): string {
  return storePath.slice(STORE_DIR.length + 1);
}

function required(fields: Map<string, string>, key: string): string {
  const value = fields.get(key);
  if (value === undefined || value === '') throw corrupt(`${key} is missing`);
  return value;
}

function size(value: string, field: string): number {
  if (!/^\d{1,15}$/.test(value)) throw corrupt(`${field} ${JSON.stringify(value)} is not a byte count`);
  return Number(value);
}

function words(value: string | undefined): string[] {
  return value === undefined ? [] : value.split(' ').filter((w) => w !== '');
}

function corrupt(detail: string): CacheError {
  return new CacheError(`invalid narinfo: ${detail}`);
}
