import { once } from 'node:events';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NO_SUBSTITUTERS, runNixChecked } from '../../common/nix/cli.js';
import { checkedFetch } from '../../test/support/api-contract.js';
import { startCoordinator, startWithAgent } from '../../test/support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from '../../test/support/nix-project.js';
import type { Coordinator } from '../coordinator.js';
import { RunStore } from '../github/run-store.js';
import { HOOK_VARIABLES } from './hook-config.js';
import { HOOK_PATH } from './hook-runner.js';
import type { HookRunRow } from './hook-run-store.js';

const TOKEN = 'hook-service-test-token-0123456789';
const auth = { authorization: `Bearer ${TOKEN}` };
const CANARY = 'coordinator-secret-canary-value';
const CREDENTIAL = 'hook-credential-value-5f2e9d';

let coordinator: Coordinator | undefined;
let agent: Awaited<ReturnType<typeof startWithAgent>>['agent'] | undefined;

afterEach(async () => {
  await agent?.stopNow();
  await coordinator?.stopNow();
  coordinator = undefined;
  agent = undefined;
  delete process.env.EKACI_HOOK_TEST_CANARY;
  delete process.env.EKACI_HOOK_TEST_TOKEN;
});

async function start(hooks: unknown[], overrides: Record<string, unknown> = {}): Promise<Coordinator> {
  ({ coordinator, agent } = await startWithAgent(TOKEN, 'hook-agent', { hooks, ...overrides }));
  return coordinator;
}

/** `.drv`s of plain derivations (`mk` of test/support/nix-project.ts), by attribute. */
async function instantiate(attrs: Record<string, string>): Promise<Record<string, string>> {
  const body = `{ ${Object.entries(attrs)
    .map(([a, script]) => `${a} = mk "${a}" { script = ${JSON.stringify(script)}; };`)
    .join(' ')} }`;
  const file = writeNixFile(tempDir(), nonce(), body);
  const out: Record<string, string> = {};
  for (const a of Object.keys(attrs)) {
    out[a] = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, '-A', a])).trim();
  }
  return out;
}

const OK = 'echo built > $out';
const hashOf = (drvPath: string): string => drvPath.slice('/nix/store/'.length, '/nix/store/'.length + 32);

/** A GitHub run of `repo` with `roots` (head side), as the run pipeline records one before it submits its builds. */
function githubRun(
  c: Coordinator,
  repo: string,
  roots: Record<string, string>,
  o: { kind?: 'push' | 'pull_request'; branch?: string; prNumber?: number; untrusted?: boolean } = {},
): number {
  const runs = new RunStore(c.db);
  const cloneUrl = `https://github.com/${repo}.git`;
  runs.upsertRepository({ fullName: repo, installationId: 1, cloneUrl, defaultBranch: 'main', private: false });
  const id = runs.createRun({
    repo,
    installationId: 1,
    kind: o.kind ?? 'push',
    headSha: nonce().padEnd(40, '0'),
    baseCloneUrl: cloneUrl,
    headCloneUrl: cloneUrl,
    branch: o.branch ?? 'main',
    ...(o.prNumber !== undefined ? { prNumber: o.prNumber } : {}),
    untrusted: o.untrusted ?? false,
  });
  runs.setRoots(
    id,
    Object.entries(roots).map(([attr, drvPath]) => ({ side: 'head', drvPath, attr, system: 'x86_64-linux' })),
  );
  return id;
}

async function build(c: Coordinator, roots: Record<string, string>, source = 'test', untrusted = false) {
  const request = await c.manager.submit(
    Object.entries(roots).map(([attr, drvPath]) => ({ attr, drvPath })),
    source,
    { untrusted },
  );
  return c.manager.waitFor(request);
}

/** The hook runs of `drvPath` once `count` of them have ended (skipped ones end at once). */
async function ended(c: Coordinator, drvPath: string, count: number): Promise<HookRunRow[]> {
  const done = (): HookRunRow[] => c.hooks.runsOf(drvPath).filter((r) => r.state !== 'queued' && r.state !== 'running');
  while (done().length < count) await once(c.hooks, 'finished');
  return c.hooks.runsOf(drvPath);
}

async function fileContents(path: string): Promise<string> {
  while (!existsSync(path) || readFileSync(path, 'utf8') === '') await new Promise((r) => setTimeout(r, 10));
  return readFileSync(path, 'utf8').trim();
}

/** Whether a process is there and not a zombie waiting to be reaped. */
function alive(pid: number): boolean {
  try {
    return !readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z ');
  } catch {
    return false;
  }
}

function readEnv(file: string): Record<string, string> {
  return Object.fromEntries(
    readFileSync(file, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  );
}

describe('post-build hooks', () => {
  it("runs after a success with the build's variables, its env and credentials, and none of the coordinator's", async () => {
    process.env.EKACI_HOOK_TEST_CANARY = CANARY;
    process.env.EKACI_HOOK_TEST_TOKEN = CREDENTIAL;
    const report = join(tempDir(), 'env');
    const c = await start([
      {
        id: 'report',
        // The shell reads the variables from its environment; its output is the run's log.
        command: ['/bin/sh', '-c', '/usr/bin/env > "$REPORT"; echo "pushing $OUT_PATHS with $EKACI_HOOK_TEST_TOKEN"'],
        env: { REPORT: report, WHERE: '$REPO@${BRANCH}' },
        credentials: { env: { vars: ['EKACI_HOOK_TEST_TOKEN'] } },
        on: ['success', 'failure'],
        permissions: { allowed_repos: ['my-org/*'], allowed_branches: ['main'] },
      },
    ]);
    const { hello } = await instantiate({ hello: OK });
    const runId = githubRun(c, 'my-org/app', { 'ci.x.hello': hello! });
    const commit = (c.db.prepare('SELECT head_sha FROM github_runs WHERE id = ?').get(runId) as { head_sha: string })
      .head_sha;
    // Job names may contain dots: the commit's evaluated jobs say where the job ends and the attribute begins.
    for (const job of ['ci', 'ci.x']) {
      c.db
        .prepare(
          `INSERT INTO evaluations (repo, commit_sha, job, allow_eval_failures, seconds, created_at, complete)
           VALUES ('my-org/app', ?, ?, 0, 1, 0, 1)`,
        )
        .run(commit, job);
    }
    const [result] = await build(c, { 'ci.x.hello': hello! }, 'github my-org/app push head');
    expect(result?.state).toBe('succeeded');

    const [run] = await ended(c, hello!, 1);
    expect(run).toMatchObject({
      hook_id: 'report',
      state: 'succeeded',
      exit_code: 0,
      result: 'success',
      run_id: runId,
    });
    const env = readEnv(report);
    const outPath = c.store.outputsOf(hello!)[0]!.path;
    expect(env).toMatchObject({
      PATH: HOOK_PATH,
      DRV_PATH: hello,
      OUT_PATHS: outPath,
      ATTR: 'ci.x.hello',
      REPO: 'my-org/app',
      BRANCH: 'main',
      RESULT: 'success',
      EKA_JOB_NAME: 'ci.x',
      EKA_SYSTEM: 'x86_64-linux',
      EKA_COMMIT_SHA: commit,
      EKA_IS_FOD: 'false',
      EKA_BUILD_STATE: 'succeeded',
      EKA_BUILD_LOG_PATH: c.store.attemptsOf(hello!)[0]!.log_path,
      WHERE: 'my-org/app@main',
      REPORT: report,
      EKACI_HOOK_TEST_TOKEN: CREDENTIAL,
    });
    // Nothing else: what the shell itself sets (PWD) aside, the coordinator's environment stays with it.
    const expected = new Set(['PATH', ...HOOK_VARIABLES, 'REPORT', 'WHERE', 'EKACI_HOOK_TEST_TOKEN', 'PWD']);
    expect(Object.keys(env).filter((k) => !expected.has(k))).toEqual([]);
    expect(readFileSync(report, 'utf8')).not.toContain(CANARY);

    // Its output, with the credential's value replaced, is served like a build log (to credential holders).
    const api = (path: string): string => `http://127.0.0.1:${c.httpPort}/api/v1${path}`;
    const list = await checkedFetch(api(`/derivations/${hashOf(hello!)}/hooks`), { headers: auth });
    const listed = list.json<{ runs: Array<{ hook: string; state: string; logUrl: string }> }>().runs;
    expect(listed).toMatchObject([{ hook: 'report', state: 'succeeded' }]);
    const log = await checkedFetch(`http://127.0.0.1:${c.httpPort}${listed[0]!.logUrl}`, { headers: auth });
    expect(log.text).toBe(`pushing ${outPath} with [redacted]\n`);
    expect((await checkedFetch(api(`/derivations/${hashOf(hello!)}/hooks`))).status).toBe(401);
    expect((await checkedFetch(`http://127.0.0.1:${c.httpPort}${listed[0]!.logUrl}`)).status).toBe(401);
    const followed = await fetch(`http://127.0.0.1:${c.httpPort}${listed[0]!.logUrl}?follow=1`, { headers: auth });
    const events = await followed.text();
    expect(events).toContain('event: end');
    expect(events).toContain('"state":"succeeded"');

    // Every run is in the audit log, without the credential.
    const audit = c.audit.recent().filter((e) => e.actor === 'hook:report');
    expect(audit.map((e) => e.action)).toEqual(['hook.finished', 'hook.started']);
    expect(JSON.parse(audit[0]!.detail)).toMatchObject({ drvPath: hello, state: 'succeeded', repo: 'my-org/app' });
    expect(JSON.stringify(audit)).not.toContain(CREDENTIAL);
    const metrics = await (await fetch(`http://127.0.0.1:${c.httpPort}/metrics`, { headers: auth })).text();
    expect(metrics).toContain('ekaci_hook_runs_total{hook="report",result="succeeded"} 1');
  });

  it('runs each hook only on the results it asked for: success, failure', async () => {
    const c = await start([
      {
        id: 'on-success',
        command: ['/bin/sh', '-c', 'echo "$RESULT $EKA_BUILD_STATE [$OUT_PATHS]"'],
        permissions: { allow_all: true },
      },
      {
        id: 'on-failure',
        command: ['/bin/sh', '-c', 'echo "$RESULT $EKA_BUILD_STATE [$OUT_PATHS] $REPO"'],
        on: 'failure',
        permissions: { allow_all: true },
      },
    ]);
    const drvs = await instantiate({ good: OK, bad: 'echo broken; exit 1' });
    // A request from the CLI or API has no repository: only hooks allowed for all serve it.
    const results = await build(c, { good: drvs.good!, bad: drvs.bad! });
    expect(results.map((r) => r.state).sort()).toEqual(['failed', 'succeeded']);
    const [good] = await ended(c, drvs.good!, 1);
    const [bad] = await ended(c, drvs.bad!, 1);
    // Both hooks' runs for a result are recorded together: the other hook has none for it.
    expect(c.hooks.runsOf(drvs.good!)).toHaveLength(1);
    expect(c.hooks.runsOf(drvs.bad!)).toHaveLength(1);
    expect(good).toMatchObject({
      hook_id: 'on-success',
      state: 'succeeded',
      result: 'success',
      repo: '',
      run_id: null,
    });
    expect(bad).toMatchObject({ hook_id: 'on-failure', state: 'succeeded', result: 'failure', build_state: 'failed' });
    expect(c.logs.read(good!.log_path!).toString()).toBe(
      `success succeeded [${c.store.outputsOf(drvs.good!)[0]!.path}]\n`,
    );
    expect(c.logs.read(bad!.log_path!).toString()).toBe('failure failed [] \n');
  });

  it('skips, saying why, a hook whose permissions do not cover the repository or the branch', async () => {
    const c = await start([
      {
        id: 'main-only',
        command: ['/bin/true'],
        permissions: { allowed_repos: ['my-org/*'], allowed_branches: ['main'] },
      },
    ]);
    const drvs = await instantiate({ elsewhere: OK, release: OK, allowed: OK });
    githubRun(c, 'other-org/lib', { elsewhere: drvs.elsewhere! }, { kind: 'pull_request', prNumber: 3 });
    githubRun(c, 'my-org/app', { release: drvs.release! }, { kind: 'pull_request', prNumber: 4, branch: 'release-1' });
    githubRun(c, 'my-org/app', { allowed: drvs.allowed! });
    await build(c, { elsewhere: drvs.elsewhere!, release: drvs.release!, allowed: drvs.allowed! });
    const [elsewhere] = await ended(c, drvs.elsewhere!, 1);
    const [release] = await ended(c, drvs.release!, 1);
    const [allowed] = await ended(c, drvs.allowed!, 1);
    expect(elsewhere).toMatchObject({ state: 'skipped', log_path: null, repo: 'other-org/lib' });
    expect(elsewhere!.reason).toBe(
      "the hook's permissions do not allow pull request other-org/lib#3 (head, branch main)",
    );
    expect(release).toMatchObject({ state: 'skipped', branch: 'release-1' });
    expect(release!.reason).toBe(
      "the hook's permissions do not allow pull request my-org/app#4 (head, branch release-1)",
    );
    expect(allowed).toMatchObject({ state: 'succeeded', repo: 'my-org/app', branch: 'main' });
    const skips = c.audit.recent().filter((e) => e.action === 'hook.skipped');
    expect(skips.map((e) => (JSON.parse(e.detail) as { drvPath: string }).drvPath).sort()).toEqual(
      [drvs.elsewhere, drvs.release].sort(),
    );
    const log = await checkedFetch(`http://127.0.0.1:${c.httpPort}/api/v1/hook-runs/${elsewhere!.id}/log`, {
      headers: auth,
    });
    expect(log.status).toBe(404);
  });

  it('never gives credentials to a build only a fork pull request asked for, and uses a trusted context when one exists', async () => {
    process.env.EKACI_HOOK_TEST_TOKEN = CREDENTIAL;
    const c = await start(
      [
        {
          id: 'with-secret',
          command: ['/bin/sh', '-c', 'echo "$REPO $BRANCH"'],
          credentials: { env: { vars: ['EKACI_HOOK_TEST_TOKEN'] } },
          permissions: { allow_all: true },
        },
        { id: 'plain', command: ['/bin/true'], permissions: { allow_all: true } },
      ],
      { security: { allow_unsandboxed_untrusted_builds: true } },
    );
    const drvs = await instantiate({ forkOnly: OK, shared: OK });
    const pushRun = githubRun(c, 'my-org/app', { shared: drvs.shared! });
    const fork = { kind: 'pull_request' as const, prNumber: 9, untrusted: true };
    githubRun(c, 'my-org/app', { forkOnly: drvs.forkOnly!, shared: drvs.shared! }, fork);
    await build(c, { forkOnly: drvs.forkOnly! }, 'github my-org/app pull_request #9 head', true);
    await build(c, { shared: drvs.shared! }, 'github my-org/app push head');

    const forkOnly = await ended(c, drvs.forkOnly!, 2);
    expect(forkOnly.find((r) => r.hook_id === 'plain')).toMatchObject({ state: 'succeeded' });
    const secret = forkOnly.find((r) => r.hook_id === 'with-secret')!;
    expect(secret).toMatchObject({ state: 'skipped', log_path: null });
    expect(secret.reason).toBe(
      'the hook has credentials and pull request my-org/app#9 (head, branch main) is untrusted code ' +
        '(a pull request by someone without write access)',
    );
    // The same derivation asked for by a push too: the hook runs once, in the push's context.
    const shared = await ended(c, drvs.shared!, 2);
    const withSecret = shared.find((r) => r.hook_id === 'with-secret')!;
    expect(withSecret).toMatchObject({ state: 'succeeded', run_id: pushRun });
    expect(shared.find((r) => r.hook_id === 'plain')!.run_id).not.toBe(pushRun);
  });

  it("records a slow hook's run while later builds' results are recorded without waiting for it", async () => {
    const dir = tempDir();
    const gate = join(dir, 'open');
    const c = await start([
      {
        id: 'slow',
        // Waits for the test to open the gate: a hook that takes as long as the test wants.
        command: ['/bin/sh', '-c', 'while [ ! -e "$GATE" ]; do /bin/sleep 0.05; done; echo done'],
        env: { GATE: gate },
        permissions: { allow_all: true },
      },
    ]);
    const drvs = await instantiate({ first: OK, second: OK });
    await build(c, { first: drvs.first! });
    while (c.hooks.runsOf(drvs.first!)[0]?.state !== 'running') await once(c.hooks, 'started');

    await build(c, { second: drvs.second! });
    const secondRecorded = c.db
      .prepare("SELECT at FROM events WHERE drv_path = ? AND state = 'succeeded'")
      .get(drvs.second!) as { at: number };
    // The second result is in the database while the first hook still runs.
    expect(c.hooks.runsOf(drvs.first!)[0]).toMatchObject({ state: 'running', finished_at: null });

    writeFileSync(gate, '');
    const [first] = await ended(c, drvs.first!, 1);
    expect(first).toMatchObject({ state: 'succeeded' });
    expect(first!.finished_at!).toBeGreaterThanOrEqual(secondRecorded.at);
    await ended(c, drvs.second!, 1);
  });

  it('refuses to start with a hook whose credentials cannot be read, naming the hook and the source', async () => {
    const missing = join(tempDir(), 'no-such-token.env');
    await expect(
      startCoordinator(tempDir(), {
        hooks: [
          {
            id: 'notify',
            command: ['/bin/true'],
            credentials: { file: { path: missing } },
            permissions: { allow_all: true },
          },
        ],
      }),
    ).rejects.toThrow(/hooks\.notify\.credentials: .*no-such-token\.env.*ENOENT/);
  });

  it('kills a hook at its timeout, records credentials it could not read, and interrupts what runs at a stop', async () => {
    const dir = tempDir();
    // Readable at the start (where unreadable credentials stop the coordinator), gone by the time the hook runs.
    writeFileSync(join(dir, 'token.env'), 'EKACI_HOOK_TEST_TOKEN=a-token-value-1\n');
    const c = await start(
      [
        { id: 'stuck', command: ['/bin/sleep', '1000'], timeout_seconds: 1, permissions: { allow_all: true } },
        {
          id: 'no-token',
          command: ['/bin/true'],
          credentials: { file: { path: join(dir, 'token.env') } },
          permissions: { allow_all: true },
        },
        {
          id: 'running-at-stop',
          command: ['/bin/sh', '-c', 'echo $$ > "$PID_FILE"; exec /bin/sleep 3600'],
          env: { PID_FILE: join(dir, 'pid') },
          timeout_seconds: 3_600,
          permissions: { allow_all: true },
        },
      ],
      // The hook running at the stop would run for an hour were it not killed.
      { security: { max_hook_timeout_seconds: 3_600 } },
    );
    rmSync(join(dir, 'token.env'));
    const { x } = await instantiate({ x: OK });
    await build(c, { x: x! });
    const runs = await ended(c, x!, 2);
    expect(runs.find((r) => r.hook_id === 'stuck')).toMatchObject({
      state: 'timed-out',
      signal: 'SIGTERM',
      reason: 'still running after timeout_seconds (1): killed',
    });
    const noToken = runs.find((r) => r.hook_id === 'no-token')!;
    expect(noToken.state).toBe('error');
    expect(noToken.reason).toMatch(/^credentials \(.*token\.env.*\): .*hooks\.no-token\.credentials.*ENOENT/);

    const pid = Number(await fileContents(join(dir, 'pid')));
    const interrupted = once(c.hooks, 'finished') as Promise<[HookRunRow]>;
    await c.stopNow();
    const [row] = await interrupted;
    expect(row).toMatchObject({ hook_id: 'running-at-stop', state: 'interrupted', reason: 'the coordinator stopped' });
    while (alive(pid)) await new Promise((r) => setTimeout(r, 10));
  });
});
