import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { startGitHubStandIn, type GitHubStandIn, type RecordedRequest } from '../../test/support/github-standin.js';
import { openDatabase, type Db } from '../db/database.js';
import { GitHubAppClient } from './app-client.js';
import { CheckRunReporter, type CheckRunReporterOptions, type CheckRunSpec, type CheckTarget } from './check-runs.js';
import { CheckRunSpecError } from './errors.js';

const INSTALLATION = 11;
const OWNER = 'nixos';
const REPO = 'nixpkgs';
// Each test reports on a commit of its own, so the stand-in's check runs never mix between tests.
let sha: string;
let shaCounter = 0;

let standIn: GitHubStandIn;
let github: GitHubAppClient;
let dir: string;
let dbFile: string;
let db: Db;
const reporters: CheckRunReporter[] = [];

beforeAll(async () => {
  standIn = await startGitHubStandIn();
  standIn.addInstallation(INSTALLATION, OWNER);
  standIn.addRepo({ owner: OWNER, name: REPO, installationId: INSTALLATION });
});
afterAll(async () => {
  await standIn.close();
});
beforeEach(async () => {
  sha = (++shaCounter).toString(16).padStart(40, '0');
  standIn.requests.length = 0;
  // One attempt per request: the client's own retries are tested with the client; here failures reach the reporter.
  github = new GitHubAppClient({
    id: 'test',
    credentials: { appId: standIn.appId, privateKey: standIn.privateKey },
    apiUrl: standIn.url,
    logger: silentLogger(),
    retry: { maxAttempts: 1 },
  });
  dir = await mkdtemp(join(tmpdir(), 'ekaci-check-runs-'));
  dbFile = join(dir, 'ekaci.sqlite');
  db = openDatabase(dbFile);
});
afterEach(async () => {
  for (const r of reporters.splice(0)) r.stopNow();
  if (db.open) db.close();
  await rm(dir, { recursive: true, force: true });
  expect(standIn.invalid.splice(0)).toEqual([]);
});

function reporter(options: Partial<CheckRunReporterOptions> = {}, on: Db = db): CheckRunReporter {
  // Retries are made fast by shrinking the backoff, not by skipping it.
  const r = new CheckRunReporter(on, github, {
    minIntervalMs: 10,
    logger: silentLogger(),
    retryBaseMs: 2,
    retryCapMs: 4,
    ...options,
  });
  reporters.push(r);
  return r;
}

function target(): CheckTarget {
  return { installationId: INSTALLATION, owner: OWNER, repo: REPO, headSha: sha };
}

function spec(overrides: Partial<CheckRunSpec> = {}): CheckRunSpec {
  return { name: 'eka-ci / build', status: 'queued', title: 'Waiting', summary: 'Waiting for an agent', ...overrides };
}

function runs(name = 'eka-ci / build') {
  return standIn.checkRuns(`${OWNER}/${REPO}`, sha).filter((r) => r.name === name);
}

/** The creates and updates GitHub received for one check run of this test's commit. */
function sendsOf(name = 'eka-ci / build'): RecordedRequest[] {
  const ids = new Set(runs(name).map((r) => `/check-runs/${r.id}`));
  return standIn.requests.filter((r) => {
    if (r.operationId === 'checks/create') {
      const body = r.body as { name: string; head_sha: string };
      return body.name === name && body.head_sha === sha;
    }
    return r.operationId === 'checks/update' && [...ids].some((id) => r.path.endsWith(id));
  });
}

describe('CheckRunReporter', () => {
  it('creates a check run with its first state, then updates that check run with later ones', async () => {
    const r = reporter();
    r.start();
    r.set(target(), spec({ detailsUrl: 'https://ci.example/run/1', externalId: 'run-1' }));
    await r.flush();
    expect(sendsOf().map((s) => s.method)).toEqual(['POST']);
    expect(runs()).toMatchObject([{ status: 'queued', detailsUrl: 'https://ci.example/run/1', externalId: 'run-1' }]);

    r.set(target(), spec({ status: 'in_progress', title: 'Building', summary: '3 of 10 built' }));
    await r.flush();
    r.set(target(), spec({ status: 'completed', conclusion: 'success', title: 'Built', summary: 'All 10 built' }));
    await r.flush();

    expect(sendsOf().map((s) => s.method)).toEqual(['POST', 'PATCH', 'PATCH']);
    const [run] = runs();
    expect(run).toMatchObject({ status: 'completed', conclusion: 'success', updates: 2 });
    expect(run?.output).toMatchObject({ title: 'Built', summary: 'All 10 built' });
    expect(r.states(OWNER, REPO, sha)).toEqual([
      { name: 'eka-ci / build', status: 'completed', conclusion: 'success', githubId: run?.id, failedError: null },
    ]);
  });

  it('coalesces twenty sets within the interval into at most two requests, the last carrying the last state', async () => {
    // The interval is measured on this clock, so the sets fall inside it however slowly the test runs.
    let clock = Date.now();
    const r = reporter({ minIntervalMs: 50, now: () => clock });
    r.start();
    for (let i = 1; i <= 20; i++) {
      r.set(target(), spec({ status: 'in_progress', title: 'Building', summary: `${i} of 20 built` }));
      await new Promise((resolve) => setImmediate(resolve));
    }
    clock += 50;
    await r.flush();

    expect(sendsOf().length).toBeLessThanOrEqual(2);
    expect(runs()).toMatchObject([{ status: 'in_progress', output: { summary: '20 of 20 built' } }]);
  });

  it('sends nothing for a state identical to the one GitHub already has', async () => {
    const r = reporter();
    r.start();
    r.set(target(), spec());
    await r.flush();
    r.set(target(), spec());
    // A change undone before it was sent is no change either.
    r.set(target(), spec({ summary: 'Something else' }));
    r.set(target(), spec());
    await r.flush();

    expect(sendsOf()).toHaveLength(1);
  });

  it('after a restart, sends a state whose reporter was stopped before sending it, creating the check run once', async () => {
    const before = reporter();
    before.start();
    before.set(target(), spec({ status: 'in_progress', title: 'Building' }));
    before.stopNow();
    db.close();

    const after = reporter({}, (db = openDatabase(dbFile)));
    after.start();
    await after.flush();

    expect(runs()).toMatchObject([{ status: 'in_progress', output: { title: 'Building' } }]);
    expect(sendsOf().map((s) => s.method)).toEqual(['POST']);
  });

  it('after a restart, updates a check run whose GitHub id it stored instead of creating another', async () => {
    // An interval far longer than the test keeps the second state unsent until the restart.
    const before = reporter({ minIntervalMs: 3_600_000 });
    before.start();
    before.set(target(), spec());
    await before.flush();
    before.set(target(), spec({ status: 'completed', conclusion: 'failure', title: '2 failed', summary: 'hello' }));
    before.stopNow();
    db.close();

    const after = reporter({}, (db = openDatabase(dbFile)));
    after.start();
    await after.flush();

    expect(sendsOf().map((s) => s.method)).toEqual(['POST', 'PATCH']);
    expect(runs()).toMatchObject([{ status: 'completed', conclusion: 'failure', updates: 1 }]);
  });

  it('after a restart, adopts a check run whose create went out but whose answer was lost, instead of creating another', async () => {
    const before = reporter();
    before.start();
    before.set(target(), spec());
    await before.flush();
    before.stopNow();
    // As if the coordinator died between GitHub creating the check run and the id reaching the database.
    db.prepare('UPDATE check_runs SET github_id = NULL, sent_json = NULL, dirty = 1').run();
    db.close();

    const after = reporter({}, (db = openDatabase(dbFile)));
    after.start();
    after.set(target(), spec({ status: 'completed', conclusion: 'success', title: 'done' }));
    await after.flush();

    expect(runs()).toMatchObject([{ status: 'completed', conclusion: 'success', updates: 1 }]);
    expect(sendsOf().map((s) => s.method)).toEqual(['POST', 'PATCH']);
    expect(standIn.requests.filter((r) => r.method === 'GET' && r.path.endsWith('/check-runs'))).toHaveLength(1);
  });

  it('records a state GitHub refuses with 422 as failed, gives up on it, and still sends the other check runs', async () => {
    standIn.failNext(
      { method: 'POST', pathPrefix: `/repos/${OWNER}/${REPO}/check-runs` },
      { status: 422, body: { message: 'Validation Failed' } },
    );
    const r = reporter();
    r.start();
    // Sent in name order, one at a time: `a` meets the failure.
    r.set(target(), spec({ name: 'a' }));
    r.set(target(), spec({ name: 'b' }));
    await r.flush();
    await r.flush();

    const [a, b] = r.states(OWNER, REPO, sha);
    expect(a).toMatchObject({ name: 'a', githubId: null, failedError: expect.stringContaining('422') as unknown });
    expect(b).toMatchObject({ name: 'b', githubId: runs('b')[0]?.id, failedError: null });
    expect(runs('a')).toEqual([]);
    expect(sendsOf('a')).toHaveLength(1);

    // A new state for the failed check run is tried afresh.
    r.set(target(), spec({ name: 'a', summary: 'Fixed' }));
    await r.flush();
    expect(runs('a')).toMatchObject([{ output: { summary: 'Fixed' } }]);
    expect(r.states(OWNER, REPO, sha)[0]?.failedError).toBeNull();
  });

  it('records a check run whose creation GitHub answers in another shape as failed, naming the operation', async () => {
    // A success without the check run's id: a proxy's page, or an incident at GitHub.
    standIn.failNext(
      { method: 'POST', pathPrefix: `/repos/${OWNER}/${REPO}/check-runs` },
      { status: 201, body: [{ message: 'not a check run' }] },
    );
    const r = reporter();
    r.start();
    r.set(target(), spec());
    await r.flush();

    const [state] = r.states(OWNER, REPO, sha);
    expect(state?.githubId).toBeNull();
    expect(state?.failedError).toContain(
      'GitHubResponseError: GitHub answered POST /repos/{owner}/{repo}/check-runs (201) with a list where a check ' +
        'run with a numeric id was expected',
    );
  });

  it('retries, with backoff, a send that failed because GitHub was unavailable', async () => {
    standIn.failNext({ method: 'POST', pathPrefix: `/repos/${OWNER}/${REPO}/check-runs` }, { status: 502 }, 2);
    const r = reporter();
    r.start();
    r.set(target(), spec());
    await r.flush();

    expect(runs()).toHaveLength(1);
    expect(sendsOf().map((s) => s.status)).toEqual([502, 502, 201]);
  });

  it('clips a summary, text and title over GitHub’s limits, with a note, and action texts to theirs', async () => {
    const r = reporter();
    r.start();
    r.set(
      target(),
      spec({
        title: 't'.repeat(300),
        // Two bytes a character: within the documented 65,535 characters, but not the bytes GitHub really counts.
        summary: 'é'.repeat(40_000),
        text: 'x'.repeat(70_000),
        actions: [{ label: 'Rebuild everything now', description: 'd'.repeat(50), identifier: 'rebuild' }],
      }),
    );
    await r.flush();

    const [run] = runs();
    const output = run?.output ?? {};
    expect(Buffer.byteLength(output.summary ?? '')).toBeLessThanOrEqual(65_535);
    expect(output.summary).toMatch(/^é+\n\n… \(clipped to GitHub's 65535 bytes\)$/);
    expect(Buffer.byteLength(output.text ?? '')).toBeLessThanOrEqual(65_535);
    expect(output.text).toMatch(/clipped/);
    expect(output.title).toHaveLength(253);
    expect(run?.actions).toEqual([
      { label: 'Rebuild everythin…', description: `${'d'.repeat(37)}…`, identifier: 'rebuild' },
    ]);
  });

  it('re-opens a completed check run when it is in progress again, but ignores a stale queued unless re-running', async () => {
    const r = reporter();
    r.start();
    r.set(target(), spec({ status: 'completed', conclusion: 'success', title: 'Built' }));
    await r.flush();

    r.set(target(), spec({ status: 'queued' }));
    await r.flush();
    expect(r.states(OWNER, REPO, sha)).toMatchObject([{ status: 'completed', conclusion: 'success' }]);
    expect(sendsOf()).toHaveLength(1);

    r.set(target(), spec({ status: 'in_progress', title: 'Building again' }));
    await r.flush();
    expect(runs()).toMatchObject([{ status: 'in_progress', updates: 1 }]);

    r.set(target(), spec({ status: 'completed', conclusion: 'success', title: 'Built' }));
    await r.flush();
    r.set(target(), spec({ status: 'queued', title: 'Re-run requested' }), { rerun: true });
    await r.flush();
    expect(runs()).toMatchObject([{ status: 'queued', output: { title: 'Re-run requested' }, updates: 3 }]);
  });

  it('sends what is pending when stopped gracefully, without waiting out the interval', async () => {
    const r = reporter({ minIntervalMs: 3_600_000 });
    r.start();
    r.set(target(), spec());
    await r.flush();
    r.set(target(), spec({ status: 'completed', conclusion: 'cancelled', title: 'Cancelled' }));
    await r.stopGracefully();

    expect(r.state).toBe('stopped');
    expect(runs()).toMatchObject([{ status: 'completed', conclusion: 'cancelled' }]);
  });

  it('refuses states GitHub would reject that clipping cannot repair', () => {
    const r = reporter();
    const bad: CheckRunSpec[] = [
      spec({ status: 'completed' }),
      spec({ status: 'in_progress', conclusion: 'success' }),
      spec({ actions: [1, 2, 3, 4].map((n) => ({ label: `${n}`, description: `${n}`, identifier: `${n}` })) }),
      spec({ actions: [{ label: 'l', description: 'd', identifier: 'i'.repeat(21) }] }),
    ];
    for (const s of bad) expect(() => r.set(target(), s)).toThrow(CheckRunSpecError);
    expect(r.states(OWNER, REPO, sha)).toEqual([]);
  });

  it('rejects a pending flush when stopped at once', async () => {
    const r = reporter({ minIntervalMs: 3_600_000 });
    r.start();
    r.set(target(), spec());
    await r.flush();
    r.set(target(), spec({ status: 'in_progress' }));
    const flushed = r.flush();
    r.stopNow();
    await expect(flushed).rejects.toThrow(/stopped before every check run was sent/);
  });
});
