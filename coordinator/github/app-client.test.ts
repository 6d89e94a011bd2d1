import { generateKeyPairSync } from 'node:crypto';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { startGitHubStandIn, type GitHubStandIn } from '../../test/support/github-standin.js';
import { GitHubAppClient, type GitHubAppClientOptions } from './app-client.js';
import { GitHubApiError, GitHubResponseError, GitHubUnavailableError } from './errors.js';

const HEAD = 'a'.repeat(40);
const repo = { owner: 'nixos', repo: 'nixpkgs' };
let standIn: GitHubStandIn;

// Backoff and the secondary-limit minimum shrunk to milliseconds; waits that GitHub dictates (retry-after,
// x-ratelimit-reset) stay real, which is what the tests check.
const FAST = { backoffBaseMs: 5, backoffCapMs: 20, secondaryRateLimitWaitMs: 10, resetMarginMs: 0 };

function client(overrides: Partial<GitHubAppClientOptions> = {}): GitHubAppClient {
  return new GitHubAppClient({
    id: 'test',
    credentials: { appId: standIn.appId, privateKey: standIn.privateKey },
    apiUrl: standIn.url,
    logger: silentLogger(),
    retry: FAST,
    ...overrides,
  });
}

function requestsFor(operationId: string) {
  return standIn.requests.filter((r) => r.operationId === operationId);
}

beforeAll(async () => {
  standIn = await startGitHubStandIn();
  standIn.addInstallation(11, 'nixos');
  standIn.addRepo({ owner: 'nixos', name: 'nixpkgs', installationId: 11 });
  standIn.addPull('nixos/nixpkgs', {
    number: 1,
    title: 'hello: update',
    user: 'alice',
    authorAssociation: 'CONTRIBUTOR',
    headSha: HEAD,
    headRef: 'hello',
    baseSha: 'b'.repeat(40),
    baseRef: 'master',
  });
});
afterAll(async () => {
  await standIn.close();
});
beforeEach(() => {
  standIn.setRateLimit(5000, Math.floor(Date.now() / 1000) + 3600);
  standIn.requests.length = 0;
});
afterEach(() => {
  expect(standIn.invalid.splice(0)).toEqual([]);
});

describe('GitHubAppClient', () => {
  it('finds the installation with the app JWT, and calls the API with an installation token issued for it', async () => {
    const github = client();
    expect(await github.installationFor('nixos', 'nixpkgs')).toBe(11);
    const octokit = await github.octokit(11);
    const { data } = await octokit.request('GET /repos/{owner}/{repo}', repo);
    expect(data.full_name).toBe('nixos/nixpkgs');
    await octokit.request('GET /repos/{owner}/{repo}/pulls/{pull_number}', { ...repo, pull_number: 1 });

    expect(standIn.requests.map((r) => [r.operationId, r.auth, r.installationId])).toEqual([
      ['apps/get-repo-installation', 'app-jwt', undefined],
      ['apps/create-installation-access-token', 'app-jwt', undefined],
      ['repos/get', 'installation', 11],
      ['pulls/get', 'installation', 11],
    ]);
  });

  it('remembers which installation serves a repository', async () => {
    const github = client();
    await github.installationFor('nixos', 'nixpkgs');
    expect(await github.installationFor('NixOS', 'Nixpkgs')).toBe(11);
    expect(requestsFor('apps/get-repo-installation')).toHaveLength(1);
  });

  it('answers undefined for a repository the app is not installed on', async () => {
    expect(await client().installationFor('someone', 'elsewhere')).toBeUndefined();
  });

  it('refuses an installation answered in another shape with an error naming the operation, and remembers nothing', async () => {
    const github = client();
    standIn.failNext(
      { method: 'GET', pathPrefix: '/repos/nixos/nixpkgs/installation' },
      { status: 200, body: { message: 'Moved Permanently' } },
    );
    const error = await github.installationFor('nixos', 'nixpkgs').catch((e: unknown) => e);
    expect(error).toBeInstanceOf(GitHubResponseError);
    // Handled wherever GitHub's refusals are.
    expect(error).toBeInstanceOf(GitHubApiError);
    expect(error).toMatchObject({
      code: 'EKACI_ERR_GITHUB_RESPONSE',
      operation: 'GET /repos/{owner}/{repo}/installation',
      status: 200,
      expected: 'an installation with a numeric id',
    });
    expect((error as Error).message).toBe(
      'GitHub answered GET /repos/{owner}/{repo}/installation (200) with an object where an installation with a ' +
        'numeric id was expected (at id: Invalid input: expected number, received undefined): ' +
        '{"message":"Moved Permanently"}',
    );
    expect(await github.installationFor('nixos', 'nixpkgs')).toBe(11);
  });

  it('hands out clone credentials that carry a working installation token', async () => {
    const auth = await client().cloneAuth(11);
    expect(auth.username).toBe('x-access-token');
    expect(auth.password).toMatch(/^ghs_/);
    const res = await fetch(`${standIn.url}/installation/repositories`, {
      headers: { authorization: `token ${auth.password}` },
    });
    expect(res.status).toBe(200);
  });

  it('waits out a secondary rate limit for as long as retry-after says, then retries', async () => {
    const octokit = await client().octokit(11);
    standIn.failNext(
      { method: 'POST', pathPrefix: '/repos/nixos/nixpkgs/check-runs' },
      {
        status: 403,
        headers: { 'retry-after': '1' },
        body: { message: 'You have exceeded a secondary rate limit. Please wait a few minutes before you try again.' },
      },
    );
    const { status } = await octokit.request('POST /repos/{owner}/{repo}/check-runs', {
      ...repo,
      name: 'eka-ci',
      head_sha: HEAD,
    });
    expect(status).toBe(201);
    const [refused, retried] = requestsFor('checks/create');
    expect([refused?.status, retried?.status]).toEqual([403, 201]);
    expect(retried!.at - refused!.at).toBeGreaterThanOrEqual(1000);
    expect(standIn.checkRuns('nixos/nixpkgs', HEAD).filter((r) => r.name === 'eka-ci')).toHaveLength(1);
  });

  it('backs off after a secondary rate limit that names no wait, and retries', async () => {
    const octokit = await client().octokit(11);
    standIn.failNext(
      { pathPrefix: '/repos/nixos/nixpkgs/pulls/1' },
      { status: 403, body: { message: 'You have exceeded a secondary rate limit.' } },
    );
    expect(
      (await octokit.request('GET /repos/{owner}/{repo}/pulls/{pull_number}', { ...repo, pull_number: 1 })).status,
    ).toBe(200);
    expect(requestsFor('pulls/get').map((r) => r.status)).toEqual([403, 200]);
  });

  it('holds the next request until x-ratelimit-reset once a response reports the budget spent', async () => {
    const octokit = await client().octokit(11);
    await octokit.request('GET /repos/{owner}/{repo}', repo); // the token is fetched before the budget runs out
    const reset = Math.floor(Date.now() / 1000) + 2;
    standIn.setRateLimit(1, reset);
    await octokit.request('GET /repos/{owner}/{repo}', repo);
    await octokit.request('GET /repos/{owner}/{repo}', repo);
    const [, last, next] = requestsFor('repos/get');
    expect([last?.status, next?.status]).toEqual([200, 200]);
    expect(next!.at).toBeGreaterThanOrEqual(reset * 1000);
    expect(standIn.requests.filter((r) => r.status === 403)).toEqual([]);
  });

  it('waits until the reset after a primary rate-limit refusal, then retries', async () => {
    const octokit = await client().octokit(11);
    await octokit.request('GET /repos/{owner}/{repo}', repo);
    const reset = Math.floor(Date.now() / 1000) + 1;
    standIn.setRateLimit(0, reset);
    expect((await octokit.request('GET /repos/{owner}/{repo}', repo)).status).toBe(200);
    const [, refused, retried] = requestsFor('repos/get');
    expect([refused?.status, retried?.status]).toEqual([403, 200]);
    expect(retried!.at).toBeGreaterThanOrEqual(reset * 1000);
  });

  it('retries server errors with backoff, and gives up after the bounded number of attempts', async () => {
    const octokit = await client({ retry: { ...FAST, maxAttempts: 3 } }).octokit(11);
    standIn.failNext(
      { pathPrefix: '/repos/nixos/nixpkgs/pulls/1' },
      { status: 502, body: { message: 'Server Error' } },
      2,
    );
    expect(
      (await octokit.request('GET /repos/{owner}/{repo}/pulls/{pull_number}', { ...repo, pull_number: 1 })).status,
    ).toBe(200);
    expect(requestsFor('pulls/get').map((r) => r.status)).toEqual([502, 502, 200]);

    standIn.failNext(
      { pathPrefix: '/repos/nixos/nixpkgs/pulls/1' },
      { status: 503, body: { message: 'Unavailable' } },
      3,
    );
    const failure = octokit.request('GET /repos/{owner}/{repo}/pulls/{pull_number}', { ...repo, pull_number: 1 });
    await expect(failure).rejects.toThrow(GitHubUnavailableError);
    await expect(failure).rejects.toMatchObject({ code: 'EKACI_ERR_GITHUB_UNAVAILABLE', status: 503 });
    expect(requestsFor('pulls/get')).toHaveLength(6);
  });

  it('retries a failing token request a bounded number of times, and names it when giving up', async () => {
    const octokit = await client({ retry: { ...FAST, maxAttempts: 3 } }).octokit(11);
    standIn.failNext({ pathPrefix: '/app/installations/11/access_tokens' }, { status: 503 }, 3);
    await expect(octokit.request('GET /repos/{owner}/{repo}', repo)).rejects.toMatchObject({
      code: 'EKACI_ERR_GITHUB_UNAVAILABLE',
      operation: 'POST /app/installations/{installation_id}/access_tokens',
    });
    expect(requestsFor('apps/create-installation-access-token')).toHaveLength(3);
    expect(requestsFor('repos/get')).toHaveLength(0);
  });

  it('raises a named error for a 404, naming the operation and quoting GitHub', async () => {
    const octokit = await client().octokit(11);
    const failure = octokit.request('GET /repos/{owner}/{repo}/pulls/{pull_number}', { ...repo, pull_number: 999 });
    await expect(failure).rejects.toThrow(GitHubApiError);
    await expect(failure).rejects.toMatchObject({
      code: 'EKACI_ERR_GITHUB_API',
      status: 404,
      operation: 'GET /repos/{owner}/{repo}/pulls/{pull_number}',
      githubMessage: 'Not Found',
    });
    await expect(failure).rejects.toThrow(
      /GitHub refused GET \/repos\/\{owner\}\/\{repo\}\/pulls\/\{pull_number\} \(404\): Not Found/,
    );
    expect(requestsFor('pulls/get')).toHaveLength(1);
  });

  it('is refused with a named 401 error when the private key is not the app’s', async () => {
    const privateKey = generateKeyPairSync('rsa', {
      modulusLength: 2048,
      privateKeyEncoding: { type: 'pkcs1', format: 'pem' },
      publicKeyEncoding: { type: 'spki', format: 'pem' },
    }).privateKey;
    const github = client({ credentials: { appId: standIn.appId, privateKey } });
    await expect(github.installationFor('nixos', 'nixpkgs')).rejects.toMatchObject({
      code: 'EKACI_ERR_GITHUB_API',
      status: 401,
      message: expect.stringContaining('check the app id and private key') as string,
    });
  });

  it('reports every response and the remaining budget to its metrics', async () => {
    const calls: Array<[string, number]> = [];
    const remaining: number[] = [];
    const github = client({
      metrics: { calls: (op, status) => calls.push([op, status]), rateLimitRemaining: (n) => remaining.push(n) },
    });
    const octokit = await github.octokit(11);
    standIn.failNext({ pathPrefix: '/repos/nixos/nixpkgs/pulls/1' }, { status: 500 });
    await octokit.request('GET /repos/{owner}/{repo}/pulls/{pull_number}', { ...repo, pull_number: 1 });
    expect(calls).toEqual([
      ['POST /app/installations/{installation_id}/access_tokens', 201],
      ['GET /repos/{owner}/{repo}/pulls/{pull_number}', 500],
      ['GET /repos/{owner}/{repo}/pulls/{pull_number}', 200],
    ]);
    expect(remaining).toHaveLength(3);
    expect(remaining[2]).toBeLessThan(remaining[0]!);
  });
});
