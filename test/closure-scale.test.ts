import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ekaci, startCli } from './support/cli.js';
import { PULL_REQUEST_CLOSURE, writeClosure } from './support/closure-fixture.js';
import { startWithAgent } from './support/coordinator-harness.js';
import { nonce, tempDir } from './support/nix-project.js';

/**
 * The shape of nearly every nixpkgs pull request (test/support/closure-fixture.ts), built with `ekaci build` as a
 * user would: 30,001 derivations, 30,000 of them built already. Every command that takes their paths must cope with
 * their number: one command line cannot hold 30,000 store paths (E2BIG).
 *
 * One agent, on the machine's store, as on a builder that has the closure already: the coordinator's side is what
 * is tested here.
 */
describe('a closure of 30,001 derivations, 30,000 of them built already', () => {
  it('builds the one that is not, and finds the others built', async () => {
    const dir = tempDir('ekaci-closure-');
    const file = await writeClosure(dir, PULL_REQUEST_CLOSURE, nonce());

    const r = await ekaci(['build', file, '-A', 'top', '--agents', '1', '--json', '--data-dir', join(dir, 'data')]);

    expect(r.stderr).not.toMatch(/E2BIG/);
    expect(r.code, r.stderr).toBe(0);
    const { builds } = JSON.parse(r.stdout) as { builds: Array<{ attr: string; state: string }> };
    expect(builds).toEqual([expect.objectContaining({ attr: 'top', state: 'succeeded' })]);
  }, 900_000);
});

describe('ekaci build --coordinator of that closure, for two pull requests in a row', () => {
  it('uploads the whole .drv closure for the first, and for the second only the derivation it changed', async () => {
    const dir = tempDir('ekaci-closure-remote-');
    const token = `ekaci_closure-${randomBytes(16).toString('hex')}`;
    const { coordinator, agent } = await startWithAgent(token, 'builder');
    const url = `http://127.0.0.1:${coordinator.httpPort}`;
    const build = async (tag: string) => {
      const file = await writeClosure(dir, PULL_REQUEST_CLOSURE, tag, `${tag}.nix`);
      const r = await startCli(['build', file, '-A', 'top', '--json', '--coordinator', url], {
        env: { EKACI_TOKEN: token },
      }).done;
      expect(r.code, r.stderr).toBe(0);
      const { builds } = JSON.parse(r.stdout) as { builds: Array<{ attr: string; state: string }> };
      expect(builds).toEqual([expect.objectContaining({ attr: 'top', state: 'succeeded' })]);
      return r.stderr;
    };
    try {
      expect(await build(nonce())).toMatch(/^uploaded 30001 derivations and 0 sources \(0 paths found/m);
      // The next pull request changes `top` only: the cache vouches for the 300 below it and their closures.
      expect(await build(nonce())).toMatch(/^uploaded 1 derivations and 0 sources \(300 paths found/m);
    } finally {
      await agent.stopNow();
      await coordinator.stopNow();
    }
  }, 900_000);
});
