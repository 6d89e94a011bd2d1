import type { ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { sleep } from '../common/backoff.js';
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import { spawnAgentProcess } from '../cli/embedded.js';
import { killGroup, startCli } from './support/cli.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

const children: ChildProcess[] = [];

afterEach(() => {
  for (const c of children.splice(0)) killGroup(c);
});

function ekaci(args: string[], env: NodeJS.ProcessEnv = {}, program = 'ekaci'): ReturnType<typeof startCli> {
  const run = startCli(args, { env, program });
  children.push(run.child);
  return run;
}

describe('ekaci build', () => {
  it('builds the requested attributes and prints JSON; exit 1 when one fails', async () => {
    const dir = tempDir();
    const file = writeNixFile(
      dir,
      nonce(),
      `rec {
        ok = mk "ok" { };
        bad = mk "bad" { script = "exit 1"; };
        after = mk "after" { deps = [ bad ]; };
        gpu = mk "gpu" { requiredSystemFeatures = [ "cuda" ]; };
      }`,
    );
    const r = await ekaci([
      'build',
      file,
      '-A',
      'ok',
      '-A',
      'after',
      '-A',
      'gpu',
      '--json',
      '--data-dir',
      join(dir, 'data'),
    ]).done;
    expect(r.stderr).toBe('');
    expect(r.code).toBe(1);
    const json = JSON.parse(r.stdout) as { builds: Array<Record<string, unknown>> };
    expect(json.builds.map((b) => [b.attr, b.state])).toEqual([
      ['ok', 'succeeded'],
      ['after', 'dependency-failed'],
      // No local agent has the feature and none can join an embedded run: reported at once, not after a grace.
      ['gpu', 'unbuildable'],
    ]);
    expect(json.builds[1]?.rootCause).toMatch(/-bad-.*\.drv$/);
    const outputs = json.builds[0]?.outputs as Array<{
      name: string;
      path: string;
      narSize: number;
      closureSize: number;
    }>;
    expect(outputs[0]?.name).toBe('out');
    expect(outputs[0]?.narSize).toBeGreaterThan(0);
    expect(outputs[0]?.closureSize).toBeGreaterThanOrEqual(outputs[0]!.narSize);
    expect(json.builds[0]).toMatchObject({ attempts: 1, agent: 'local-1' });
  });

  it('ends with the evaluation error when the file does not evaluate, the system started meanwhile stopped', async () => {
    const dir = tempDir();
    const file = writeNixFile(dir, nonce(), `rec { a = mk "a" { }; b = throw "no b here"; }`);
    const r = await ekaci(['build', file, '-A', 'b', '--data-dir', join(dir, 'data')]).done;
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('no b here');
    expect(r.stdout).toBe('');
  });

  it('exits 0 and prints one line per attribute when everything succeeds', async () => {
    const dir = tempDir();
    const file = writeNixFile(dir, nonce(), `rec { a = mk "a" { }; b = mk "b" { deps = [ a ]; }; }`);
    const r = await ekaci(['build', file, '--data-dir', join(dir, 'data')]).done;
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^succeeded +a +\/nix\/store\/.*-a-.*\.drv$/m);
    expect(r.stdout).toMatch(/^succeeded +b +/m);
    expect(r.stdout).toMatch(/2 succeeded \(2 attributes/);
    // Its progress goes to stderr (no terminal: plain lines), ending with the counts.
    const progress = r.stderr.trim().split('\n');
    expect(progress[0]).toBe('building 2 attributes…');
    expect(progress.at(-1)).toMatch(/^builds: 0 queued, 0 running, 2 done, 0 failed \(\d+:\d\d\)$/);
  });

  it.each([
    [['build', '/nonexistent/file.nix'], /no such file/],
    [['build', 'FILE', '-A', 'nope'], /attribute 'nope' does not exist/],
    [['build', 'FILE', '-A', 'number'], /attribute 'number' is a int, not a derivation/],
    [['build', 'FILE', '-A', 'a', '--config', 'BADTOML'], /is not valid TOML/],
    [['build', 'FILE', '-A', 'a', '--config', 'UNKNOWNKEY'], /web\.colour: Unrecognized key/],
    [['build', 'FILE', '--agents', 'many'], /--agents takes a whole number/],
    [['build'], /missing required argument 'file'/],
  ])('refuses bad input %j with exit 2 and a clear message', async (args, message) => {
    const dir = tempDir();
    const file = writeNixFile(dir, nonce(), `{ a = mk "a" { }; number = 3; }`);
    writeFileSync(join(dir, 'bad.toml'), 'data_dir = [unclosed');
    writeFileSync(join(dir, 'unknown.toml'), '[web]\ncolour = "blue"\n');
    const resolved = args.map((a) =>
      a === 'FILE'
        ? file
        : a === 'BADTOML'
          ? join(dir, 'bad.toml')
          : a === 'UNKNOWNKEY'
            ? join(dir, 'unknown.toml')
            : a,
    );
    const r = await ekaci([...resolved, '--data-dir', join(dir, 'data')]).done;
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stdout).toBe('');
  });
});

describe('ekaci-coordinator agent-token', () => {
  it('creates a token a running coordinator accepts, and revokes it so the agent is disconnected', async () => {
    const dir = tempDir();
    const [grpcPort, webPort] = [await freePort(), await freePort()];
    const config = join(dir, 'coordinator.toml');
    writeFileSync(
      config,
      `data_dir = "${join(dir, 'data')}"\n[web]\nport = ${webPort}\n[grpc]\nport = ${grpcPort}\n[local_agent]\nenabled = false\n`,
    );
    const created = await ekaci(['agent-token', 'create', 'builder-1', '--config', config], {}, 'ekaci-coordinator')
      .done;
    expect(created.code).toBe(0);
    const token = created.stdout.trim();
    expect(token).toMatch(/^ekaci_[0-9a-f]{64}$/);
    ekaci(['--config', config], {}, 'ekaci-coordinator');
    while (
      !(await fetch(`http://127.0.0.1:${webPort}/readyz`).then(
        (r) => r.ok,
        () => false,
      ))
    )
      await sleep(100);

    const agent = spawnAgentProcess({
      coordinator: `127.0.0.1:${grpcPort}`,
      token,
      agentId: 'builder-1',
      dir: join(dir, 'agent'),
      isolated: false,
      logLevel: 'error',
      stdio: 'pipe',
    });
    children.push(agent);
    let agentErr = '';
    agent.stderr!.on('data', (b: Buffer) => (agentErr += b.toString()));
    const agentExit = new Promise<number | null>((resolve) => agent.on('exit', (code) => resolve(code)));
    const connected = async (): Promise<string> =>
      (await (await fetch(`http://127.0.0.1:${webPort}/metrics`)).text()).match(
        /^ekaci_agents_connected (\d+)/m,
      )?.[1] ?? '';
    while ((await connected()) !== '1') await sleep(100);

    const revoked = await ekaci(['agent-token', 'revoke', 'builder-1', '--config', config], {}, 'ekaci-coordinator')
      .done;
    expect(revoked.code).toBe(0);
    expect(await agentExit).not.toBe(0);
    expect(agentErr).toMatch(/token refused by coordinator/);
    expect(await connected()).toBe('0');
    const listed = await ekaci(['agent-token', 'list', '--config', config], {}, 'ekaci-coordinator').done;
    expect(listed.stdout).toMatch(/^builder-1\t\S+\trevoked /m);
  });
});

describe('a coordinator killed with SIGKILL mid-build', () => {
  it('resumes after a restart: the agent keeps its lease, the result is recorded once, no log byte is lost', async () => {
    const dir = tempDir();
    const data = join(dir, 'data');
    const [grpcPort, webPort] = [await freePort(), await freePort()];
    const token = `ekaci_test_${nonce()}${nonce()}`;
    const config = join(dir, 'coordinator.toml');
    writeFileSync(
      config,
      `data_dir = "${data}"
lease_ttl_seconds = 20
unbuildable_grace_seconds = 120
[web]
port = ${webPort}
[grpc]
port = ${grpcPort}
[local_agent]
enabled = false
[[agent_tokens]]
name = "restart-test"
token = "${token}"
`,
    );
    const file = writeNixFile(
      dir,
      nonce(),
      `{ chatty = mk "chatty" { script = "i=1; while [ $i -le 20 ]; do echo line $i; /bin/sleep 0.25; i=$((i+1)); done; echo ok > $out"; }; }`,
    );
    const args = ['build', file, '-A', 'chatty', '--agents', '0', '--config', config, '--json'];
    const first = ekaci(args);
    children.push(
      spawnAgentProcess({
        coordinator: `127.0.0.1:${grpcPort}`,
        token,
        agentId: 'restart-test',
        dir: join(dir, 'agent'),
        isolated: process.getuid?.() === 0,
        logLevel: 'error',
      }),
    );
    // Wait until the build is running and part of its log has reached the coordinator.
    const logDir = join(data, 'logs');
    let log: string | undefined;
    while (!(log = findLog(logDir)) || statSync(log).size < 30) await sleep(50);
    first.child.kill('SIGKILL');
    await first.done;
    await sleep(1_000); // the build goes on, its log spooled by the agent

    const second = await ekaci(args).done;
    expect(second.stderr).toBe('');
    expect(second.code).toBe(0);
    const [build] = (JSON.parse(second.stdout) as { builds: Array<{ state: string; attempts: number; drv: string }> })
      .builds;
    expect(build).toMatchObject({ state: 'succeeded', attempts: 1 });

    const expected = Array.from({ length: 20 }, (_, i) => `line ${i + 1}`);
    const lines = readFileSync(log, 'utf8')
      .split('\n')
      .filter((l) => l.startsWith('line '));
    expect(lines).toEqual(expected);

    const db = new Database(join(data, 'ekaci.sqlite'), { readonly: true });
    const events = db
      .prepare("SELECT COUNT(*) AS n FROM events WHERE drv_path = ? AND state = 'succeeded'")
      .get(build!.drv);
    const attempts = db.prepare('SELECT state FROM attempts WHERE drv_path = ?').all(build!.drv);
    db.close();
    expect(events).toEqual({ n: 1 });
    expect(attempts).toEqual([{ state: 'succeeded' }]);
  });
});

/** The first attempt's log of the `chatty` derivation (`logs/<first two characters>/<drv name>.1.log`). */
function findLog(logDir: string): string | undefined {
  if (!existsSync(logDir)) return undefined;
  for (const shard of readdirSync(logDir)) {
    const file = readdirSync(join(logDir, shard)).find((f) => f.includes('-chatty-') && f.endsWith('.drv.1.log'));
    if (file) return join(logDir, shard, file);
  }
  return undefined;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}
