import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { startGitHubStandIn, type GitHubStandIn } from '../../test/support/github-standin.js';
import { openDatabase } from '../db/database.js';
import { TempDirs } from '../git/test-support.js';
import { join } from 'node:path';
import { AppRegistry } from './app-registry.js';
import { RunStore } from './run-store.js';

describe('AppRegistry', () => {
  let github: GitHubStandIn;
  let enterprise: GitHubStandIn;
  const dirs = new TempDirs();

  beforeAll(async () => {
    // Two apps on two GitHubs (github.com and an Enterprise Server), each installed on its own repository.
    github = await startGitHubStandIn({ appId: 101 });
    enterprise = await startGitHubStandIn({ appId: 202 });
    github.addInstallation(1, 'acme');
    github.addRepo({ owner: 'acme', name: 'pkgs', installationId: 1 });
    enterprise.addInstallation(2, 'corp');
    enterprise.addRepo({ owner: 'corp', name: 'internal', installationId: 2 });
  });
  afterAll(async () => {
    await github.close();
    await enterprise.close();
    await dirs.removeAll();
  });

  const app = (id: string, s: GitHubStandIn, repos: string[]) => ({
    id,
    credentials: { appId: s.appId, privateKey: s.privateKey },
    permissions: { allowAll: false, allowedRepos: repos, allowedBranches: ['main'] },
    apiUrl: s.url,
  });

  it('serves each installation with the app installed on it, and remembers which one that is', async () => {
    const db = openDatabase(join(await dirs.make(), 'ekaci.sqlite'));
    const runs = new RunStore(db);
    const registry = new AppRegistry(
      [app('public', github, ['acme/*']), app('enterprise', enterprise, ['corp/*'])],
      runs,
      silentLogger(),
    );
    const corp = await registry.served(2, 'corp/internal');
    expect(corp?.app.id).toBe('enterprise');
    expect(runs.installation(2)?.app).toBe('enterprise');
    expect(registry.allowed(corp!, 'corp/internal', 'main')).toBe(true);
    expect(registry.allowed(corp!, 'acme/pkgs', 'main')).toBe(false);
    expect((await registry.served(1, 'acme/pkgs'))?.app.id).toBe('public');
    // An installation nobody configured has is not served.
    expect(await registry.served(3, 'else/where')).toBeUndefined();
    // Remembered: asking again needs no API call.
    const before = github.requests.length + enterprise.requests.length;
    expect((await registry.served(2, 'corp/internal'))?.app.id).toBe('enterprise');
    expect(github.requests.length + enterprise.requests.length).toBe(before);
    expect([...github.invalid, ...enterprise.invalid]).toEqual([]);
    db.close();
  });
});
