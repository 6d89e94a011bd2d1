import { NIX_EXPERIMENTAL, lastLines, runNix } from '../../common/nix/cli.js';
import { type Derivation, derivationStorePath, parseDerivation } from '../../common/nix/derivation.js';
import { storePathName } from '../../common/nix/store-path.js';

/**
 * One `.drv` read from the coordinator's cache on its own, without its references: nothing in the store changes.
 * Nix checks a substituted `.drv`'s signature; this text is checked against its path instead, which hashes it.
 * Throws when the cache cannot serve it or the text does not match the path.
 */
export async function readCachedDerivation(cacheUrl: string, netrcPath: string, drvPath: string): Promise<Derivation> {
  const args = [...NIX_EXPERIMENTAL, 'store', 'cat', '--store', cacheUrl, '--option', 'netrc-file', netrcPath];
  const cat = await runNix('nix', [...args, drvPath]);
  if (cat.code !== 0) throw new Error(lastLines(cat.stderr, 3));
  const d = parseDerivation(cat.stdout, drvPath);
  if (derivationStorePath(cat.stdout, d, storePathName(drvPath)) !== drvPath) {
    throw new Error('its contents do not match its path');
  }
  return d;
}
