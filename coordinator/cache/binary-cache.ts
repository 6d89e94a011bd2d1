/**
 * The coordinator's built-in binary cache: a directory laid out exactly like a Nix `file://` cache, so that
 * `nix copy --to file://DIR` fills it directly and the HTTP routes only have to serve and accept files.
 *
 * Every narinfo in it carries the coordinator's signature. Paths pushed from the coordinator's own store are
 * signed by Nix with the coordinator's key; narinfos uploaded by agents are checked and re-signed here, because
 * agents are not trusted to sign.
 */
import { createHash, randomUUID } from 'node:crypto';
import { createWriteStream, existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { readdir, rename, unlink } from 'node:fs/promises';
import { LRUCache } from 'lru-cache';
import { dirname, join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CacheError } from '../../common/errors.js';
import { readAll } from '../../common/read-all.js';
import { turn } from '../../common/turn.js';
import type { Logger } from '../../common/logging.js';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, argBatches, runNixChecked } from '../../common/nix/cli.js';
import { STORE_DIR, isDrvPath, isStorePath, storePathHash, storePathName } from '../../common/nix/store-path.js';
import {
  derivationReferences,
  inputsFirst,
  parseDerivation,
  readDerivationText,
  textStorePath,
  walkMissing,
} from '../../common/nix/derivation.js';
import { canVerifyCompression, narHashOfFile, regularFileNar } from '../../common/nix/nar.js';
import { classifyCachePath, narInfoName, narNameHash } from './cache-layout.js';
import { fingerprint, nixBase32, parseNarInfo, serializeNarInfo, type NarInfo } from '../../common/nix/narinfo.js';
import { FileWriter, SIGNATURE_SLOT } from './file-writer.js';
import { parsedKey, signingKeyFromSecret } from './signing-key.js';

/**
 * Compression of NARs pushed from the coordinator's store. Measured here (2 cores, Nix 2.8, `nix copy` to
 * `file://` of 200 NARs of ≈7 KiB): none 91–149 ms / 1.44 MB, zstd 96–123 ms / 91 KB, xz 483–516 ms / 104 KB;
 * one 5 MB NAR: none 34–43 ms, zstd 38–42 ms, xz ≈1.87 s. Substituting the 200 back took ≈230 ms for all three.
 * zstd costs nothing measurable over none and stores and transfers 10–40× fewer bytes; xz (Nix's default)
 * is 5–45× slower to write.
 */
export const PUSH_COMPRESSION = 'zstd';

/**
 * Priority 30 ranks the coordinator's cache ahead of cache.nixos.org (40): it is nearer to the agents and holds
 * exactly what the CI built. WantMassQuery lets Nix ask it about many paths at once.
 */
export const NIX_CACHE_INFO = `StoreDir: ${STORE_DIR}\nWantMassQuery: 1\nPriority: 30\n`;

/**
 * Above this many paths `hasPaths` lists the cache directory once instead of probing each narinfo: one
 * readdir beats hundreds of stat calls, while a few stats beat listing a cache of millions of files.
 */
const READDIR_THRESHOLD = 256;

/**
 * NARs up to this size are taken in memory, without a stream. Around the writes of uploads, the cache's file calls
 * are synchronous: it lives in the coordinator's data directory, on a local disk beside the SQLite database whose
 * writes are synchronous too. There a stat or read takes 10–25 µs, while its promise costs the event loop two to four
 * times that, for every output of every build (bench/fleet). Files are created on a thread of their own (FileWriter).
 */
const SMALL_FILE_BYTES = 256 * 1024;

/** How many narinfos a long walk reads (≈20 µs each) between turns of the event loop. */
export const NARINFO_READS_PER_TURN = 500;

/** How many files `pushDerivations` creates at once, on libuv's threads. */
const PARALLEL_WRITES = 32;

/**
 * How many narinfos the cache keeps in memory after storing them: about as many as a busy fleet uploads before it
 * reports the builds they belong to (a result is checked against them moments later).
 */
const RECENT_NARINFOS = 4_096;

/** Temporary files share the target's directory, so the final rename is atomic, and a prefix no reader matches. */
const TEMP_PREFIX = '.upload-';

export interface BinaryCacheOptions {
  dir: string;
  /** `name:base64` Nix secret key (see signing-key.ts). */
  secretKey: string;
  logger: Logger;
}

export class BinaryCache {
  readonly dir: string;
  /** `name:base64`, for agents' `trusted-public-keys`. */
  readonly publicKey: string;
  private readonly secretKey: string;
  private readonly logger: Logger;
  /** Narinfos stored lately, by store path. A stored narinfo never changes: the first one for a path stays. */
  private readonly recent = new LRUCache<string, NarInfo>({ max: RECENT_NARINFOS });
  /** Creates the files of uploads and pushes, off the event loop. */
  private readonly files: FileWriter;

  constructor(options: BinaryCacheOptions) {
    this.dir = resolve(options.dir);
    // The directory becomes part of a store URI, where these characters would start a query or fragment.
    if (/[?&#%]/.test(this.dir)) throw new CacheError(`cache directory ${this.dir} must not contain ? & # or %`);
    this.secretKey = options.secretKey;
    this.files = new FileWriter(parsedKey(options.secretKey));
    this.publicKey = signingKeyFromSecret(options.secretKey, 'binary cache secret key').publicKey;
    this.logger = options.logger;
    for (const sub of ['nar', 'log']) mkdirSync(join(this.dir, sub), { recursive: true });
    const tmp = this.tempFor('nix-cache-info');
    writeFileSync(tmp, NIX_CACHE_INFO);
    renameSync(tmp, join(this.dir, 'nix-cache-info'));
  }

  /** Which of `storePaths` the cache holds, from one in-process batch of file-system calls. */
  async hasPaths(storePaths: string[]): Promise<Set<string>> {
    const candidates = storePaths.filter(isStorePath);
    const present = new Set<string>();
    if (candidates.length >= READDIR_THRESHOLD) {
      const names = new Set(await readdir(this.dir));
      for (const p of candidates) if (names.has(narInfoName(storePathHash(p)))) present.add(p);
      return present;
    }
    for (const p of candidates) if (existsSync(join(this.dir, narInfoName(storePathHash(p))))) present.add(p);
    return present;
  }

  /** The parsed narinfo of `storePath`, or undefined when the cache does not hold it. */
  narInfo(storePath: string): Promise<NarInfo | undefined> {
    // Read synchronously (see SMALL_FILE_BYTES); a failure still arrives as a rejection.
    return new Promise((resolve) => resolve(this.readNarInfo(storePath)));
  }

  private readNarInfo(storePath: string): NarInfo | undefined {
    const recent = this.recent.get(storePath);
    if (recent) return recent;
    if (!isStorePath(storePath)) return undefined;
    let text: string;
    try {
      text = readFileSync(join(this.dir, narInfoName(storePathHash(storePath))), 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    const info = parseNarInfo(text);
    return info.storePath === storePath ? info : undefined;
  }

  /**
   * NAR size and closure size (the sum of the NAR sizes of its runtime closure) of each path the cache holds with
   * its whole closure; paths whose closure is incomplete in the cache are left out.
   */
  async sizes(storePaths: readonly string[]): Promise<Map<string, { narSize: number; closureSize: number }>> {
    const infos = new Map<string, NarInfo | undefined>();
    const info = async (p: string): Promise<NarInfo | undefined> => {
      if (!infos.has(p)) {
        // Reads are synchronous (see SMALL_FILE_BYTES): the closure of a big request turns the loop now and then.
        if (infos.size % NARINFO_READS_PER_TURN === NARINFO_READS_PER_TURN - 1) await turn();
        infos.set(p, await this.narInfo(p));
      }
      return infos.get(p);
    };
    const out = new Map<string, { narSize: number; closureSize: number }>();
    for (const root of storePaths) {
      const top = await info(root);
      if (!top) continue;
      const seen = new Set([root]);
      const todo = [root];
      let closureSize = 0;
      let complete = true;
      while (todo.length > 0) {
        const i = await info(todo.pop()!);
        if (!i) {
          complete = false;
          break;
        }
        closureSize += i.narSize;
        for (const r of i.references) {
          if (seen.has(r)) continue;
          seen.add(r);
          todo.push(r);
        }
      }
      if (complete) out.set(root, { narSize: top.narSize, closureSize });
    }
    return out;
  }

  /**
   * Copies `paths` and their closures from the coordinator's Nix store into the cache, signed, in one `nix copy`.
   * With `derivation`, `.drv` paths are copied as files (with their input `.drv`s and sources) rather than
   * resolved to their outputs — what an agent needs before it can build them. `storeReady`, with `derivation`: the
   * paths are still being put into the Nix store (imported from the evaluation store) until it resolves; `.drv` files
   * are read from the evaluation store meanwhile, and sources are copied once it has resolved.
   */
  async pushFromLocalStore(
    paths: string[],
    options: { derivation?: boolean; storeReady?: Promise<unknown> } = {},
  ): Promise<void> {
    // `nix copy` with no paths would copy the installable `.`, i.e. whatever the working directory holds.
    if (paths.length === 0) return;
    const started = Date.now();
    if (options.derivation) {
      const { written, sources } = await this.pushDerivations(paths, options.storeReady);
      this.logger.debug({ derivations: written, sources, ms: Date.now() - started }, 'wrote .drv files into the cache');
      return;
    }
    // The secret reaches Nix on stdin, so it is never written to a second file nor shown in `ps`. Nix opens
    // `secret-key=/dev/stdin` by path, which fails on the socket Node gives a child as stdin; `cat |` turns
    // that socket into a pipe.
    const to = `file://${this.dir}?secret-key=/dev/stdin&compression=${PUSH_COMPRESSION}`;
    const args = [...NIX_EXPERIMENTAL, 'copy', '--to', to];
    // In batches: one command line cannot hold a nixpkgs closure (E2BIG). Paths already in the cache from an
    // earlier batch are skipped by Nix.
    for (const batch of argBatches(paths)) {
      await runNixChecked('sh', ['-c', 'cat | exec "$@"', 'sh', 'nix', ...args, ...NO_SUBSTITUTERS, ...batch], {
        input: this.secretKey,
      });
    }
    this.logger.debug({ paths: paths.length, ms: Date.now() - started }, 'pushed paths into the binary cache');
  }

  /**
   * Writes `.drv` files and the `.drv`s and sources they need, from an evaluation store or the Nix store, into the
   * cache: what the cache lacks of their closures. Each `.drv` is read, checked against its path (its text must hash to it) and stored as an
   * uncompressed NAR; then the signed narinfos (`CA: text:sha256:…`) go in by depth, inputs before the `.drv`s naming
   * them, so the cache never lists a path without its closure; sources go through `nix copy` before them. A `.drv` is
   * a few KiB and agents read them one at a time, so it is not compressed. Measured here: 100,000 `.drv`s of a
   * layered DAG in 22 s, where `nix copy --derivation` in command-line batches took 112 s (each batch walks its
   * closure in the cache again); at 1,000–10,000 both take ≈0.3 ms per `.drv`.
   */
  private async pushDerivations(
    drvPaths: readonly string[],
    storeReady?: Promise<unknown>,
  ): Promise<{ written: number; sources: number }> {
    const missing = new Map<string, DerivationNar>();
    const sources: string[] = [];
    const writes = new Set<Promise<void>>();
    let failure: { error: unknown } | undefined;
    // The cache's listing is read once for a large closure, not once per level of it (see READDIR_THRESHOLD).
    let listing: Set<string> | undefined;
    const held = async (level: readonly string[]): Promise<ReadonlySet<string>> => {
      if (listing === undefined && level.length >= READDIR_THRESHOLD) listing = new Set(await readdir(this.dir));
      const names = listing;
      return names === undefined
        ? this.hasPaths([...level])
        : new Set(level.filter((p) => names.has(narInfoName(storePathHash(p)))));
    };
    await walkMissing(drvPaths, held, async (p) => {
      // After a failed write the walk runs out without reading anything more.
      if (failure !== undefined) return [];
      if (!isDrvPath(p)) {
        sources.push(p);
        return [];
      }
      const { text, evaluationStore } = readDerivationText(p);
      const derivation = parseDerivation(text, p);
      const references = derivationReferences(derivation);
      const textHash = createHash('sha256').update(text, 'utf8').digest();
      if (textStorePath(textHash.toString('hex'), references, storePathName(p)) !== p) {
        const where = evaluationStore === undefined ? 'the Nix store' : `the evaluation store ${evaluationStore}`;
        throw new CacheError(`${p} in ${where} does not hash to its path: not pushed to the cache`);
      }
      const nar = regularFileNar(Buffer.from(text, 'utf8'));
      const m: DerivationNar = {
        narHash: nixBase32(createHash('sha256').update(nar).digest()),
        narSize: nar.length,
        ca: `text:sha256:${nixBase32(textHash)}`,
        references,
      };
      missing.set(p, m);
      // At most PARALLEL_WRITES NARs are being written at once; the first that fails fails the push.
      const write = this.writeUncompressedNar(`nar/${m.narHash}.nar`, nar)
        .catch((error: unknown) => void (failure ??= { error }))
        .finally(() => writes.delete(write));
      writes.add(write);
      if (writes.size >= PARALLEL_WRITES) await Promise.race(writes);
      return references;
    });
    await Promise.all(writes);
    if (failure !== undefined) throw failure.error;
    await storeReady;
    await this.pushFromLocalStore(sources);
    for (const level of byDepth(missing)) {
      for (let i = 0; i < level.length; i += PARALLEL_WRITES) {
        await Promise.all(level.slice(i, i + PARALLEL_WRITES).map((p) => this.writeDerivationInfo(p, missing.get(p)!)));
      }
    }
    return { written: missing.size, sources: sources.length };
  }

  /** Stores a NAR under its own hash; one the cache holds already (the same bytes) is left as it is. */
  private async writeUncompressedNar(relativePath: string, nar: Buffer): Promise<void> {
    if (!existsSync(join(this.dir, relativePath))) await this.placeFile(relativePath, nar);
  }

  /** Writes a file through a temporary one renamed into place: a reader sees all of it or nothing. */
  private placeFile(relativePath: string, data: Buffer): Promise<void> {
    return this.files.place(this.tempFor(relativePath), join(this.dir, relativePath), data);
  }

  /** The signed narinfo of a `.drv` whose NAR is stored; the first narinfo of a path stays. */
  private async writeDerivationInfo(drvPath: string, m: DerivationNar): Promise<void> {
    const info: NarInfo = {
      storePath: drvPath,
      url: `nar/${m.narHash}.nar`,
      compression: 'none',
      fileHash: `sha256:${m.narHash}`,
      fileSize: m.narSize,
      narHash: `sha256:${m.narHash}`,
      narSize: m.narSize,
      references: m.references,
      sigs: [],
      ca: m.ca,
    };
    await this.storeSigned(narInfoName(storePathHash(drvPath)), info);
  }

  /**
   * Copies `.drv` files (with their closures: other `.drv`s and sources) from the cache into the local store: the
   * closures `ekaci build --coordinator` uploaded. They are content-addressed, so Nix checks each against its path
   * and needs no signature.
   */
  async importDerivations(drvPaths: readonly string[]): Promise<void> {
    const args = [...NIX_EXPERIMENTAL, 'copy', '--derivation', '--from', `file://${this.dir}`, ...NO_SUBSTITUTERS];
    for (const batch of argBatches([...drvPaths])) await runNixChecked('nix', [...args, ...batch]);
  }

  /** The file behind a cache path; throws for names that are not cache files (see `classifyCachePath`). */
  filePath(relativePath: string): string {
    const kind = classifyCachePath(relativePath);
    if (kind === undefined || kind === 'unsafe') throw new CacheError(`${relativePath} is not a binary cache file`);
    return join(this.dir, relativePath);
  }

  /**
   * Stores an uploaded NAR file. Its name is its own SHA-256, so the content is checked against the name: a
   * mismatching upload cannot replace a NAR that existing narinfos point at. `bytes`, the size the upload declares,
   * lets a small NAR be taken in memory; a larger or unknown one streams to disk.
   */
  async writeNar(relativePath: string, body: Readable, bytes?: number): Promise<void> {
    const claimed = claimedNarHash(relativePath);
    if (narFitsInMemory(bytes)) {
      await this.writeNarBytes(relativePath, await readAll(body));
      return;
    }
    const hash = createHash('sha256');
    const tmp = await this.writeTemp(relativePath, body, (chunk) => hash.update(chunk));
    const actual = nixBase32(hash.digest());
    if (actual !== claimed) {
      await unlink(tmp);
      throw notItsName(relativePath, actual);
    }
    await rename(tmp, join(this.dir, relativePath));
  }

  /** `writeNar` of a NAR already in memory (see `narFitsInMemory`). */
  async writeNarBytes(relativePath: string, data: Buffer): Promise<void> {
    const claimed = claimedNarHash(relativePath);
    const actual = nixBase32(createHash('sha256').update(data).digest());
    if (actual !== claimed) throw notItsName(relativePath, actual);
    await this.placeFile(relativePath, data);
  }

  /** Stores an uploaded build log (`log/<drv name>`); a newer log of the same derivation replaces the old one. */
  async writeLog(relativePath: string, body: Readable): Promise<void> {
    if (classifyCachePath(relativePath) !== 'log') throw new CacheError(`${relativePath} is not a log file name`);
    await rename(await this.writeTemp(relativePath, body), join(this.dir, relativePath));
  }

  /**
   * Validates an uploaded narinfo against the NAR already uploaded (its hash and size, through its compression),
   * runs `check` (who may publish this path; a fixed-output hash), replaces its signatures with the coordinator's,
   * and stores it; returns it as signed. The first narinfo stored for a path stays: substituters may already have
   * fetched it, and a binary cache entry must not change under them.
   */
  async writeNarInfo(
    relativePath: string,
    narInfo: string | NarInfo,
    check?: (info: NarInfo) => Promise<void>,
  ): Promise<NarInfo> {
    const info = typeof narInfo === 'string' ? parseNarInfo(narInfo) : narInfo;
    if (relativePath !== narInfoName(storePathHash(info.storePath))) {
      throw new CacheError(`${relativePath} does not match its StorePath ${info.storePath}`);
    }
    await check?.(info);
    await this.checkNar(info);
    const others = info.references.filter((r) => r !== info.storePath);
    const present = await this.hasPaths(others);
    const absent = others.filter((r) => !present.has(r));
    if (absent.length > 0) {
      throw new CacheError(
        `references of ${info.storePath} are not in the cache (upload them first): ${absent.join(' ')}`,
      );
    }
    return this.storeSigned(relativePath, info);
  }

  /**
   * Signs `info` with the coordinator's key (its own signatures replaced) and stores it unless the cache has a narinfo
   * for its path already (linked into place, which never replaces a file: "first narinfo wins" is race-free).
   */
  private async storeSigned(relativePath: string, info: NarInfo): Promise<NarInfo> {
    const { stored, sig } = await this.files.storeSignedOnce(
      this.tempFor(relativePath),
      join(this.dir, relativePath),
      serializeNarInfo({ ...info, sigs: [SIGNATURE_SLOT] }),
      fingerprint(info),
    );
    const signed: NarInfo = { ...info, sigs: [sig] };
    if (stored) this.recent.set(info.storePath, signed);
    else this.logger.debug({ storePath: info.storePath }, 'narinfo already in the cache; keeping the first one');
    return signed;
  }

  private async checkNar(info: NarInfo): Promise<void> {
    const nar = narNameHash(info.url);
    if (nar === undefined) throw new CacheError(`URL ${info.url} of ${info.storePath} is not a NAR in this cache`);
    const size = statSync(join(this.dir, info.url), { throwIfNoEntry: false })?.size;
    if (size === undefined) throw new CacheError(`URL ${info.url} of ${info.storePath} was not uploaded first`);
    if (info.fileHash !== undefined && info.fileHash !== `sha256:${nar}`) {
      throw new CacheError(`FileHash of ${info.storePath} does not match its URL ${info.url}`);
    }
    if (info.fileSize !== undefined && info.fileSize !== size) {
      throw new CacheError(`FileSize ${info.fileSize} of ${info.storePath} differs from the uploaded ${size} bytes`);
    }
    // An uncompressed NAR is the file itself, so its claimed hash and size can be checked for free; a compressed
    // one is decompressed and hashed, so that a narinfo never vouches for content nobody checked.
    if (info.compression === 'none') {
      if (info.narSize !== size || info.narHash !== `sha256:${nar}`) {
        throw new CacheError(`NarHash/NarSize of ${info.storePath} do not match its uncompressed NAR ${info.url}`);
      }
      return;
    }
    if (!canVerifyCompression(info.compression)) {
      throw new CacheError(
        `compression ${info.compression} of ${info.url} cannot be checked here; upload it uncompressed`,
      );
    }
    const actual = await narHashOfFile(join(this.dir, info.url), info.compression);
    if (actual.narSize !== info.narSize || actual.narHash !== info.narHash) {
      throw new CacheError(`NarHash/NarSize of ${info.storePath} do not match its ${info.compression} NAR ${info.url}`);
    }
  }

  /** A fresh temporary file's path in the directory of `relativePath`, for an atomic rename or link into place. */
  private tempFor(relativePath: string): string {
    return join(this.dir, dirname(relativePath), `${TEMP_PREFIX}${randomUUID()}`);
  }

  private async writeTemp(relativePath: string, body: Readable, onChunk?: (chunk: Buffer) => void): Promise<string> {
    const tmp = this.tempFor(relativePath);
    try {
      await pipeline(
        body,
        async function* (source: AsyncIterable<Buffer>) {
          for await (const chunk of source) {
            onChunk?.(chunk);
            yield chunk;
          }
        },
        createWriteStream(tmp, { flags: 'wx' }),
      );
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
    return tmp;
  }
}

/** Whether a NAR of `bytes` (the size an upload declares) is taken in memory rather than streamed to disk. */
export function narFitsInMemory(bytes: number | undefined): bytes is number {
  return bytes !== undefined && bytes <= SMALL_FILE_BYTES;
}

/** The hash a NAR's file name claims for its content. */
function claimedNarHash(relativePath: string): string {
  const claimed = narNameHash(relativePath);
  if (claimed === undefined) throw new CacheError(`${relativePath} is not a NAR file name`);
  return claimed;
}

function notItsName(relativePath: string, actual: string): CacheError {
  return new CacheError(`${relativePath}: content hashes to sha256:${actual}, not to the hash in its name`);
}

/** What the narinfo of a `.drv` says, kept while the closure is written (not its text: closures run to 100,000). */
interface DerivationNar {
  /** Nix base32 of the NAR's SHA-256: the file's name, as it is not compressed. */
  narHash: string;
  narSize: number;
  ca: string;
  /** Its input derivations and sources, sorted. */
  references: string[];
}

/** The derivations grouped so that every one they refer to among them is in an earlier group. */
function byDepth(drvs: ReadonlyMap<string, DerivationNar>): string[][] {
  const depth = new Map<string, number>();
  const levels: string[][] = [];
  for (const p of inputsFirst(drvs.keys(), (q) => drvs.get(q)?.references)) {
    let d = 0;
    for (const input of drvs.get(p)!.references) d = Math.max(d, (depth.get(input) ?? -1) + 1);
    depth.set(p, d);
    (levels[d] ??= []).push(p);
  }
  return levels;
}
