import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { runNixChecked } from '../../common/nix/cli.js';
import { BinaryCache } from './binary-cache.js';
import { generateSigningKey } from './signing-key.js';
import { StorePublisher } from './store-publisher.js';
import { TempDirs, buildTrivial, nixEnv, realiseFromCache } from './test-support.js';

const temp = new TempDirs();
const key = generateSigningKey('publisher-test-1');
let env: NodeJS.ProcessEnv;
let work: string;

beforeAll(async () => {
  work = await temp.make();
  env = nixEnv(work);
});
afterAll(() => temp.removeAll());

describe('StorePublisher', () => {
  it('marks its store with a path no other store has, and copies closures from it into the cache', async () => {
    const cache = new BinaryCache({ dir: await temp.make(), secretKey: key.secretKey, logger: silentLogger() });
    const publisher = (await StorePublisher.open(cache, silentLogger()))!;
    try {
      expect(publisher.marker).toMatch(/^\/nix\/store\/[a-z0-9]{32}-ekaci-store-marker$/);
      await runNixChecked('nix-store', ['--check-validity', publisher.marker], { env });
      const built = await buildTrivial(work, env, 2);

      await publisher.publish([built.out]);

      // The output and the dependencies it refers to, each signed: a store that has nothing substitutes it.
      expect(await cache.hasPaths([built.out, ...built.deps])).toEqual(new Set([built.out, ...built.deps]));
      const empty = await temp.make();
      const r = await realiseFromCache(empty, env, built.out, {
        url: `file://${cache.dir}`,
        publicKey: cache.publicKey,
      });
      expect(r.stderr).not.toMatch(/error/);
      expect(r.stdout.trim()).toBe(built.out);
    } finally {
      await publisher.close();
    }
  });

  it('refuses a path its store does not hold, naming it', async () => {
    const cache = new BinaryCache({ dir: await temp.make(), secretKey: key.secretKey, logger: silentLogger() });
    const publisher = (await StorePublisher.open(cache, silentLogger()))!;
    const absent = `/nix/store/${'1'.repeat(32)}-never-built`;
    try {
      await expect(publisher.publish([absent])).rejects.toThrow(
        `${absent} is not valid in the coordinator's Nix store`,
      );
      // The connection is still in step for the next publication.
      const built = await buildTrivial(work, env);
      await publisher.publish([built.out]);
      expect(await cache.hasPaths([built.out])).toEqual(new Set([built.out]));
    } finally {
      await publisher.close();
    }
  });

  it('opens its connection again, with the same marker, when its daemon went away', async () => {
    const cache = new BinaryCache({ dir: await temp.make(), secretKey: key.secretKey, logger: silentLogger() });
    // No daemon answers there: the publisher runs a nix-daemon of its own, which this test can stop.
    const publisher = (await StorePublisher.open(cache, silentLogger(), join(work, 'no-daemon.socket')))!;
    try {
      const first = await buildTrivial(work, env);
      await publisher.publish([first.out]);
      execFileSync('pkill', ['-TERM', '-P', String(process.pid), '-f', 'nix-daemon']);
      const second = await buildTrivial(work, env);

      // The publication that meets the dead connection may fail (its build is retried); the next one works.
      await publisher.publish([second.out]).catch(() => undefined);
      await publisher.publish([second.out]);

      expect(await cache.hasPaths([second.out])).toEqual(new Set([second.out]));
      await runNixChecked('nix-store', ['--check-validity', publisher.marker], { env });
    } finally {
      await publisher.close();
    }
  });
});
