import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runNixChecked } from '../common/nix/cli.js';
import { parseNarInfo } from '../common/nix/narinfo.js';
import { storePathHash } from '../common/nix/store-path.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { startCoordinator } from '../test/support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from '../test/support/nix-project.js';
import { CoordinatorClient } from './coordinator-client.js';
import { uploadDerivationClosure } from './drv-upload.js';

describe("uploading a .drv closure to a coordinator's cache", () => {
  let coordinator: Coordinator;
  let client: CoordinatorClient;
  const token = `ekaci_drv-upload-${randomBytes(16).toString('hex')}`;

  beforeAll(async () => {
    coordinator = await startCoordinator(join(tempDir('ekaci-drv-upload-'), 'data'), {
      web: { port: 0, public: false },
      api_tokens: [{ name: 'client', token }],
    });
    client = new CoordinatorClient({ coordinator: `http://127.0.0.1:${coordinator.httpPort}`, token });
  });
  afterAll(() => coordinator.stopNow());

  const narinfo = async (path: string): Promise<string | undefined> => {
    const r = await fetch(`${client.base}/cache/${storePathHash(path)}.narinfo`, { headers: client.headers });
    return r.status === 404 ? undefined : r.text();
  };

  it('sends every path once, references first, and later only what lies above the paths the cache holds', async () => {
    const dir = tempDir();
    const tag = nonce();
    writeFileSync(join(dir, 'src.txt'), `source ${tag}\n`);
    const file = writeNixFile(
      dir,
      tag,
      `let
         leaf = mk "upload-leaf" { src = ./src.txt; };
         mid = mk "upload-mid" { deps = [ leaf ]; };
       in {
         first = mk "upload-first" { deps = [ mid leaf ]; };
         second = mk "upload-second" { deps = [ mid ]; };
       }`,
    );
    const [first, second] = (await runNixChecked('nix-instantiate', [file, '-A', 'first', '-A', 'second']))
      .trim()
      .split('\n') as [string, string];
    const closure = (await runNixChecked('nix-store', ['-qR', first])).trim().split('\n');
    expect(closure).toHaveLength(4); // three .drv files and the source

    expect(await uploadDerivationClosure(client, [first])).toEqual({ present: 0, derivations: 3, sources: 1 });
    for (const path of closure) {
      const text = await narinfo(path);
      expect(text, path).toBeDefined();
      // Stored as checked and signed by the coordinator: content-addressed, with its references.
      const info = parseNarInfo(text!);
      expect(info.ca).toMatch(/^(text|fixed:r):sha256:/);
      expect(info.sigs).toHaveLength(1);
    }

    // Only `second` is new: `mid` is in the cache, and so, the cache vouches, is everything below it.
    expect(await uploadDerivationClosure(client, [second])).toEqual({ present: 1, derivations: 1, sources: 0 });
    expect(await narinfo(second)).toBeDefined();
    // Nothing new at all: one question.
    expect(await uploadDerivationClosure(client, [first, second])).toEqual({ present: 2, derivations: 0, sources: 0 });
  });

  it("fails with the coordinator's reason when it refuses an upload", async () => {
    const reader = new CoordinatorClient({ coordinator: client.base, token: 'not-a-token-of-this-coordinator' });
    const file = writeNixFile(tempDir(), nonce(), `{ x = mk "upload-refused" {}; }`);
    const drv = (await runNixChecked('nix-instantiate', [file, '-A', 'x'])).trim();
    await expect(uploadDerivationClosure(reader, [drv])).rejects.toThrow(/401/);
  });
});
