import { join } from 'node:path';
import { CacheError } from '../../common/errors.js';
import { sourceStorePath, textStorePath } from '../../common/nix/derivation.js';
import { flatFileHashOfNar, narHashOfFile } from '../../common/nix/nar.js';
import { type NarInfo, fromNixBase32, normaliseSha256 } from '../../common/nix/narinfo.js';
import { storePathName } from '../../common/nix/store-path.js';

/**
 * Checks that a narinfo describes a content-addressed path truly: its `CA` field (`text:sha256:…` for `.drv` files
 * and `builtins.toFile`, `fixed:r:sha256:…` for sources added from a directory or file) matches the NAR's content,
 * and the store path is the one Nix computes from that hash, the references and the name. Such a path proves itself:
 * whoever uploads it cannot make it mean anything else, so a build client with an API token may upload the `.drv`
 * closure it wants built (`ekaci build --coordinator`) without being trusted with outputs. Anything else is refused.
 */
export async function checkContentAddressed(info: NarInfo, cacheDir: string): Promise<void> {
  const ca = /^(text|fixed:r):sha256:(\S+)$/.exec(info.ca ?? '');
  if (!ca) {
    throw new CacheError(
      `${info.storePath} is not content-addressed (CA ${info.ca ?? 'missing'}): an API token may upload only .drv ` +
        'files and sources, whose store paths prove their content',
    );
  }
  const claimed = normaliseSha256(`sha256:${ca[2]!}`, 'CA');
  const hex = fromNixBase32(claimed.slice('sha256:'.length), 32).toString('hex');
  const file = join(cacheDir, info.url);
  const name = storePathName(info.storePath);
  let expected: string;
  if (ca[1] === 'text') {
    if (info.references.includes(info.storePath))
      throw new CacheError(`${info.storePath}: a text path cannot refer to itself`);
    const content = await flatFileHashOfNar(file, info.compression, 'sha256');
    if (content !== hex) throw new CacheError(`${info.storePath}: its content does not have the hash its CA says`);
    expected = textStorePath(hex, info.references, name);
  } else {
    const { narHash } = await narHashOfFile(file, info.compression);
    if (narHash !== claimed) throw new CacheError(`${info.storePath}: its NAR does not have the hash its CA says`);
    expected = sourceStorePath(hex, info.references, info.storePath, name);
  }
  if (expected !== info.storePath) {
    throw new CacheError(`${info.storePath} is not the store path of its content (that is ${expected})`);
  }
}
