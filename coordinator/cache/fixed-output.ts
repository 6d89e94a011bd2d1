import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { CacheError } from '../../common/errors.js';
import { type Derivation, isFixedOutput, parseDerivation } from '../../common/nix/derivation.js';
import { flatFileHashOfNar, narHashOfFile } from '../../common/nix/nar.js';
import { normaliseSha256 } from '../../common/nix/narinfo.js';

/** Hash algorithms a fixed-output derivation may declare, as Node's crypto names them. */
const ALGORITHMS = new Set(['md5', 'sha1', 'sha256', 'sha512']);

/**
 * Checks an uploaded output of a fixed-output derivation against the hash the derivation declares: the NAR's hash
 * for recursive (`r:`) hashing, the single file's contents for flat hashing. An agent holding the lease of a fetcher
 * could otherwise publish any content under the fetcher's output path. Other derivations' outputs are not
 * content-addressed and pass without their `.drv` being read (a lease knows what its derivation is).
 */
export async function checkFixedOutput(
  lease: { drvPath: string; fixedOutput: boolean },
  storePath: string,
  cacheDir: string,
  narUrl: string,
  compression: string,
): Promise<void> {
  if (!lease.fixedOutput) return;
  const drvPath = lease.drvPath;
  // A .drv is small and in the local store: read at once, not over turns of a busy event loop.
  const drv: Derivation = parseDerivation(readFileSync(drvPath, 'utf8'), drvPath);
  const out = drv.outputs.out;
  if (!isFixedOutput(drv) || out === undefined || out.path !== storePath) return;
  const recursive = out.hashAlgo.startsWith('r:');
  const algorithm = recursive ? out.hashAlgo.slice(2) : out.hashAlgo;
  const file = join(cacheDir, narUrl);
  if (recursive) {
    if (algorithm !== 'sha256') {
      throw new CacheError(`${drvPath} declares a recursive ${algorithm} hash, which eka-ci cannot check`);
    }
    const { narHash } = await narHashOfFile(file, compression);
    if (narHash !== normaliseSha256(`sha256:${out.hash}`, 'outputHash')) {
      throw new CacheError(`${storePath} does not have the NAR hash ${drvPath} declares`);
    }
    return;
  }
  if (!ALGORITHMS.has(algorithm))
    throw new CacheError(`${drvPath} declares a ${out.hashAlgo} hash, which eka-ci cannot check`);
  if ((await flatFileHashOfNar(file, compression, algorithm)) !== out.hash) {
    throw new CacheError(`${storePath} does not have the ${algorithm} hash ${drvPath} declares`);
  }
}
