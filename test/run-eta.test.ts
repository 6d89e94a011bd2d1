import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import { sleep } from '../common/backoff.js';
import { checkedFetch } from './support/api-contract.js';
import { FakeGitHub, completedChecks, deliver, startGitHubCoordinator } from './support/github-app.js';
import { tempDir } from './support/nix-project.js';

// A chain eta-a ← eta-b ← eta-c of builds that take a second each.
const PNAMES = ['eta-a', 'eta-b', 'eta-c'];

/** Snapshots of a repository whose base holds the chain at `base` and whose head holds it at `head`. */
function chainSnapshots(base: string, head: string): string {
  const dir = tempDir('ekaci-eta-snapshots-');
  for (const [snapshot, version] of [
    ['1-base', base],
    ['2-head', head],
  ] as const) {
    mkdirSync(join(dir, snapshot, '.eka-ci'), { recursive: true });
    writeFileSync(join(dir, snapshot, '.eka-ci', 'config.json'), '{ "jobs": { "pkgs": { "file": "default.nix" } } }');
    writeFileSync(
      join(dir, snapshot, 'default.nix'),
      `let
        inherit (import ./lib.nix) mk;
        step = name: deps: mk { inherit name deps; version = "${version}"; script = "/bin/sleep 1; echo \${name} $deps > $out"; };
      in rec {
        a = step "eta-a" [ ];
        b = step "eta-b" [ a ];
        c = step "eta-c" [ b ];
      }`,
    );
  }
  return dir;
}

interface Eta {
  seconds: number;
  bound: string;
  criticalPath: string[];
  basis: { estimated: number; guessed: number };
}
interface Pull {
  run: { id: number; state: string; eta: Eta | null } | null;
}

describe('a run’s ETA', () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem;

  beforeAll(async () => {
    github = await FakeGitHub.start();
    system = await startGitHubCoordinator(github, join(tempDir('ekaci-eta-'), 'data'), {
      build_no_output_timeout_seconds: 30,
    });
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
  });

  it('is estimated from earlier builds of the same packages, in the API and in the summary check', async () => {
    // A first pull request builds the chain at 1.0 (its base) and 2.0 (its head): how long each package takes is
    // recorded.
    const first = github.pullRequest('acme/eta-first', chainSnapshots('1.0', '2.0'), { number: 1 });
    expect((await deliver(system, 'pull_request', first.payload('opened'))).status).toBe(202);
    await completedChecks(github, 'acme/eta-first', first.head, 3);
    const means = system.coordinator.store.db
      .prepare(`SELECT pname, mean_seconds FROM build_durations WHERE pname IN (${PNAMES.map(() => '?').join(',')})`)
      .all(...PNAMES) as Array<{ pname: string; mean_seconds: number }>;
    expect(means.map((m) => m.pname).sort()).toEqual(PNAMES);
    expect(means.every((m) => m.mean_seconds >= 1)).toBe(true);

    // A second one builds new versions of the same packages (3.0 and 4.0): while it builds, its ETA comes from them.
    const second = github.pullRequest('acme/eta-second', chainSnapshots('3.0', '4.0'), { number: 2 });
    expect((await deliver(system, 'pull_request', second.payload('opened'))).status).toBe(202);
    const url = `http://127.0.0.1:${system.coordinator.httpPort}/api/v1/repos/acme/eta-second/pulls/2`;
    let seen: Eta | undefined;
    for (;;) {
      const run = (await checkedFetch(url)).json<Pull>().run;
      if (run?.eta && run.eta.seconds > 0) {
        seen = run.eta;
        break;
      }
      if (run && ['done', 'failed', 'cancelled'].includes(run.state)) break;
      await sleep(50);
    }
    expect(seen, 'an ETA while the second pull request built').toBeDefined();
    expect(seen!.basis.guessed).toBe(0);
    expect(seen!.basis.estimated).toBeGreaterThan(0);
    // No more than the whole chain's recorded durations: what is left of it, over infinitely many agents or two slots.
    const chain = means.reduce((sum, m) => sum + m.mean_seconds, 0);
    expect(seen!.seconds).toBeLessThanOrEqual(Math.ceil(chain));
    expect(seen!.criticalPath.at(-1)).toMatch(/-eta-c-[34]\.0\.drv$/);

    // The summary check said so while it was building.
    const withEta = await github.api.waitFor(
      () =>
        github.api.requests.find((r) => {
          const output = (r.body as { output?: { title?: string; summary?: string } } | undefined)?.output;
          return output?.title?.startsWith('Building (about') && /critical path: eta-a-[34]/.test(output.summary ?? '');
        }),
      'a summary check run with the ETA',
    );
    expect((withEta.body as { output: { summary: string } }).output.summary).toMatch(
      /about \d+ s left \(critical path: eta-a-[34]\.0 → eta-b-[34]\.0 → eta-c-[34]\.0\)/,
    );
    await completedChecks(github, 'acme/eta-second', second.head, 3);
    // A finished run has no ETA.
    expect((await checkedFetch(url)).json<Pull>().run?.eta).toBeNull();
    expect(github.api.invalid).toEqual([]);
  });
});
