import { readFile, readdir } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GitFetchError } from './errors.js';
import { GitMirrors } from './git-mirrors.js';
import { TempDirs, TestRepo, serveGitOverHttp, testGitEnv, type GitHttpServer } from './test-support.js';

const temp = new TempDirs();
const credentials = { username: 'x-access-token', password: 'ghs_s3cr3t-installation-token' };
let server: GitHttpServer;
let url: string;
let tip: string;
let older: string;

beforeAll(async () => {
  const root = await temp.make('ekaci-git-http-');
  const repo = await TestRepo.create(join(root, 'owner', 'repo'));
  older = await repo.commit('first', { 'default.nix': '1\n' });
  tip = await repo.commit('second', { 'default.nix': '2\n' });
  await repo.git('update-ref', 'refs/pull/7/head', older);
  server = await serveGitOverHttp(root, credentials);
  url = `${server.base}/owner/repo`;
});
afterAll(async () => {
  await server.close();
  await temp.removeAll();
});

/** GitMirrors whose log lines (at debug level) are kept, to check that no secret reaches them. */
async function newMirrors(fetchTimeoutMs?: number): Promise<{ mirrors: GitMirrors; logs: string[] }> {
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      logs.push(chunk.toString('utf8'));
      done();
    },
  });
  const mirrors = new GitMirrors({
    dir: await temp.make('ekaci-git-mirrors-'),
    logger: pino({ level: 'debug' }, sink),
    env: testGitEnv(),
    fetchTimeoutMs,
  });
  return { mirrors, logs };
}

/** Every file in a mirror, so a test can prove that a credential was never written into it. */
async function mirrorText(dir: string): Promise<string> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true });
  const files = entries.filter((e) => e.isFile()).map((e) => join(e.parentPath, e.name));
  return (await Promise.all(files.map((f) => readFile(f, 'latin1')))).join('\n');
}

describe('GitMirrors over http(s)', () => {
  it('fetches with Basic credentials and never writes them into the mirror or the logs', async () => {
    const { mirrors, logs } = await newMirrors();

    const shas = await mirrors.fetch(url, ['main', 'refs/pull/7/head'], { auth: credentials });
    const checkout = await mirrors.checkout(url, older, { auth: credentials });

    expect(shas).toEqual(
      new Map([
        ['main', tip],
        ['refs/pull/7/head', older],
      ]),
    );
    expect(await readFile(join(checkout.dir, 'default.nix'), 'utf8')).toBe('1\n');
    await checkout.release();
    const mirror = await mirrorText(mirrors.mirrorDir(url));
    expect(mirror).toContain(tip);
    expect(mirror).not.toContain(credentials.password);
    expect(logs.join('')).toContain('fetched');
    expect(logs.join('')).not.toContain(credentials.password);
  });

  it('fails without credentials with an error that names the repository and says credentials are needed', async () => {
    const { mirrors } = await newMirrors();

    const err = await mirrors.ensureCommit(url, 'main').catch((e: unknown) => e);

    expect(err).toBeInstanceOf(GitFetchError);
    expect(err).toMatchObject({ code: 'EKACI_ERR_GIT_FETCH' });
    expect((err as Error).message).toContain(`could not fetch 'main' from ${url}`);
    expect((err as Error).message).toContain('the repository needs credentials, or refused the ones given');
    expect((err as Error).message).not.toContain(credentials.password);
  });

  it('fails with refused credentials with an error that does not contain the password', async () => {
    const { mirrors, logs } = await newMirrors();
    const wrong = { username: 'x-access-token', password: 'ghs_wrong-token-d0-not-print' };

    const err = await mirrors.ensureCommit(url, 'main', { auth: wrong }).catch((e: unknown) => e);

    expect(err).toBeInstanceOf(GitFetchError);
    expect((err as Error).message).toContain('refused the ones given');
    expect((err as Error).message).not.toContain(wrong.password);
    expect(logs.join('')).not.toContain(wrong.password);
    expect(await mirrorText(mirrors.mirrorDir(url))).not.toContain(wrong.password);
  });

  it('refuses a URL with credentials in it without repeating them', async () => {
    const { mirrors } = await newMirrors();
    const withToken = url.replace('http://', `http://${credentials.username}:${credentials.password}@`);

    const err = await mirrors.ensureCommit(withToken, 'main').catch((e: unknown) => e);

    expect(err).toMatchObject({ code: 'EKACI_ERR_GIT_URL' });
    expect((err as Error).message).toContain('pass them as the auth option');
    expect((err as Error).message).not.toContain(credentials.password);
  });

  it('gives up on a server that never answers after the fetch timeout', async () => {
    const silent = createServer(() => undefined);
    silent.listen(0, '127.0.0.1');
    await new Promise<void>((resolve) => silent.once('listening', resolve));
    const { port } = silent.address() as AddressInfo;
    const { mirrors } = await newMirrors(500);

    await expect(mirrors.ensureCommit(`http://127.0.0.1:${port}/owner/repo`, 'main')).rejects.toThrow(
      `fetching 'main' from http://127.0.0.1:${port}/owner/repo timed out after 0.5 s`,
    );
    silent.closeAllConnections();
    silent.close();
  });
});
