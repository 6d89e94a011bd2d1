import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { descendants } from '../../common/process-tree.js';
import { Outcome, type Assign, type CheckJob } from '../../common/proto/ekaci/agent/v1/agent.js';
import { SandboxCgroups } from '../../common/sandbox/cgroup.js';
import { sandboxAvailable } from '../../common/sandbox/sandbox.js';
import { LogSpool } from '../logs/spool.js';
import { StorePool } from '../nix/store-pool.js';
import { testAssign } from '../testing/assign.js';
import { running } from '../testing/processes.js';
import { serveSource, type SourceServer } from '../testing/source-server.js';
import { Check, type CheckContext } from './check.js';

const TOKEN = `agent-token-${randomBytes(8).toString('hex')}`;
const NIX = ['--option', 'substituters', '', '--extra-experimental-features', 'nix-command'];
const QUIET = { encoding: 'utf8', stdio: 'pipe' } as const;

// Small limits, so that a few sleeps and a pipe reach them. Whether this process may make cgroups (root, or a
// delegated cgroup) decides whether the tests of limits run.
const LIMITS = { memoryBytes: 64 * 2 ** 20, maxProcesses: 20 };
const limited = await SandboxCgroups.probe(LIMITS);
const noCgroups = limited.unavailable !== null;

let source: SourceServer;
let loopback: Server;
let loopbackPort: number;
let dir: string;
let spool: LogSpool;
let pool: StorePool;

beforeAll(async () => {
  await sandboxAvailable();
  source = await serveSource(
    {
      'README.md': 'the checked-out readme\n',
      'docs/guide.md': 'a guide\n',
      'docs-link': { symlink: 'docs' },
      escape: { symlink: '/etc' },
      up: { symlink: '..' },
    },
    TOKEN,
  );
  loopback = createServer((socket) => socket.end('reached-the-loopback\n'));
  await new Promise<void>((resolve) => loopback.listen(0, '127.0.0.1', resolve));
  loopbackPort = (loopback.address() as { port: number }).port;
});

afterAll(async () => {
  await source?.close();
  loopback?.close();
});

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-check-'));
  spool = new LogSpool(join(dir, 'spool'));
  spool.prepare();
  spool.writeNetrc('127.0.0.1', TOKEN);
  pool = new StorePool(silentLogger());
});

afterEach(async () => {
  await pool.closeAll();
  rmSync(dir, { recursive: true, force: true });
});

interface CheckOptions {
  check?: Partial<CheckJob>;
  assign?: Partial<Assign>;
  context?: Partial<CheckContext>;
  leaseId?: string;
}

function check(command: string, o: CheckOptions = {}) {
  const leaseId = o.leaseId ?? `check-${randomBytes(4).toString('hex')}`;
  const job: CheckJob = {
    name: 'test',
    command,
    allowNetwork: false,
    roBind: [],
    sourceUrl: source.url,
    ...o.check,
  };
  const assign = testAssign(leaseId, '', { outputNames: [], check: job, ...o.assign });
  const log = spool.open(leaseId);
  const context: CheckContext = {
    cacheUrl: '',
    cachePublicKey: '',
    netrcPath: spool.netrcPath,
    pool,
    spool,
    token: TOKEN,
    unavailable: null,
    timeoutGraceMs: 500,
    ...o.context,
  };
  const c = new Check(assign, job, context, log, silentLogger());
  return { check: c, log, leaseId, text: () => readFileSync(log.path, 'utf8') };
}

async function run(command: string, o: CheckOptions = {}) {
  const c = check(command, o);
  const result = await c.check.run();
  return { ...result, log: c.text(), leaseId: c.leaseId };
}

async function waitForLog(text: () => string, marker: string): Promise<void> {
  await expect.poll(text, { timeout: 10_000, interval: 20 }).toContain(marker);
}

// A connection from bash without curl: its /dev/tcp.
const connect = (port: number): string => `exec 3<>/dev/tcp/127.0.0.1/${port} && read line <&3 && echo "$line"`;

describe('a check in the sandbox', () => {
  it('runs in a writable checkout of the commit at /build/source and succeeds with exit 0', async () => {
    const r = await run(
      'pwd; cat README.md; echo changed > README.md && echo new > new-file && cat README.md new-file',
    );

    expect(r.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(r.exitCode).toBe(0);
    expect(r.error).toBe('');
    expect(r.log).toMatch(/^eka-ci: check 'test': bash -c in the host's \/usr\/bin and \/bin .*network off\n/);
    expect(r.log).toContain('/build/source\r\nthe checked-out readme\r\nchanged\r\nnew\r\n');
    expect(source.requests.at(-1)?.authorization).toBe(`Bearer ${TOKEN}`);
  });

  it('reports a failing command as FAILED with its exit code', async () => {
    const r = await run('echo about to fail; exit 3');

    expect(r.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(r.exitCode).toBe(3);
    expect(r.error).toBe('exit code 3');
    expect(r.log).toContain('about to fail');
  });

  it('has no network unless the check allows it: even the host’s loopback is out of reach', async () => {
    const closed = await run(connect(loopbackPort));
    const open = await run(connect(loopbackPort), { check: { allowNetwork: true } });

    expect(closed.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(closed.log).not.toContain('reached-the-loopback');
    expect(closed.log).toContain('network off');
    expect(open.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(open.log).toContain('reached-the-loopback');
    expect(open.log).toContain('network on');
  });

  it('runs under a terminal, with TERM set and the colour-capable name', async () => {
    const r = await run('test -t 0 && test -t 1 && test -t 2 && echo "on a terminal: $TERM"');

    expect(r.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(r.log).toContain('on a terminal: xterm-256color');
  });

  describe('cannot read what belongs to the agent', () => {
    const secret = `secret-${randomBytes(8).toString('hex')}`;
    const cases: [string, () => string][] = [
      ["the agent's token file", () => writeSecret(join(dir, 'agent-token'), TOKEN)],
      ["the agent's netrc in its spool", () => spool.netrcPath],
      ["the agent user's HOME", () => writeSecret(join(dir, 'home', '.config', 'marker'), secret)],
      ["another lease's work directory", () => writeSecret(join(spool.workDir('other-lease'), 'marker'), secret)],
      ['/etc/shadow', () => '/etc/shadow'],
    ];
    it.each(cases)('%s', async (_what, pathOf) => {
      const path = pathOf();
      expect(existsSync(path)).toBe(true);

      const r = await run(`cat ${path}`);

      expect(r.outcome).toBe(Outcome.OUTCOME_FAILED);
      expect(r.exitCode).toBe(1);
      expect(r.log).toContain(`${path}: No such file or directory`);
      expect(r.log).not.toContain(TOKEN);
      expect(r.log).not.toContain(secret);
    });
  });

  it('gets only the environment of its shell and no descriptor of the agent', async () => {
    process.env.EKACI_TEST_AGENT_SECRET = TOKEN;
    try {
      const r = await run(
        'echo "<env>"; env | sort; echo "</env>"; echo -n "fds: "; ls /proc/$$/fd | tr "\\n" " "; echo; ' +
          'cat /proc/*/environ',
      );

      expect(r.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
      expect(r.log).not.toContain(TOKEN);
      const env = /<env>\r\n(.*)<\/env>/s.exec(r.log)?.[1]?.split('\r\n') ?? [];
      expect(env.map((v) => v.split('=')[0])).toEqual([
        'HOME',
        'LANG',
        'PATH',
        'PWD',
        'SHLVL',
        'TERM',
        'TMPDIR',
        '_',
        '',
      ]);
      expect(env).toEqual(expect.arrayContaining(['HOME=/tmp/home', 'PATH=/usr/bin:/bin', 'TMPDIR=/tmp']));
      expect(r.log).toContain('fds: 0 1 2 \r\n');
      expect(r.log).not.toContain(spool.dir);
    } finally {
      delete process.env.EKACI_TEST_AGENT_SECRET;
    }
  });

  it('cannot write outside its checkout, its HOME and its /tmp: the host’s files stay as they were', async () => {
    const elsewhere = join(dir, 'elsewhere');
    mkdirSync(elsewhere);
    writeFileSync(join(elsewhere, 'file'), 'original');
    const storeFile = `/nix/store/ekaci-check-escape-${randomBytes(4).toString('hex')}`;

    for (const target of [join(elsewhere, 'file'), '/usr/ekaci-check-escape', storeFile]) {
      const r = await run(`echo overwritten > ${target} && echo wrote-it`);
      expect(r.outcome).toBe(Outcome.OUTCOME_FAILED);
      expect(r.log).not.toContain('wrote-it');
    }
    expect(readFileSync(join(elsewhere, 'file'), 'utf8')).toBe('original');
    expect(existsSync('/usr/ekaci-check-escape')).toBe(false);
    expect(existsSync(storeFile)).toBe(false);

    const own = await run('echo in-home > "$HOME/f" && echo in-tmp > /tmp/f && cat "$HOME/f" /tmp/f');
    expect(own.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(own.log).toContain('in-home\r\nin-tmp');
  });

  it('sees ro_bind paths read-only, also through a symlink inside the checkout, and the rest writable', async () => {
    const r = await run(
      'cat docs/guide.md; echo x > docs/guide.md || echo docs-refused; echo x > docs/new || echo new-refused;' +
        ' echo y > elsewhere && echo rest-writable',
      { check: { roBind: ['docs-link'] } },
    );

    expect(r.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(r.log).toContain('a guide');
    expect(r.log).toContain('Read-only file system');
    expect(r.log).toContain('docs-refused');
    expect(r.log).toContain('new-refused');
    expect(r.log).toContain('rest-writable');
  });

  it.each([
    ['a symlink out of the checkout', 'escape', /ro_bind 'escape' resolves to \/etc, outside the checkout/],
    ['a symlink to its parent', 'up', /ro_bind 'up' resolves to .*, outside the checkout/],
    ['an absolute path', '/etc', /ro_bind '\/etc' must be a relative path inside the checkout/],
    ['a path with ..', 'docs/../..', /ro_bind 'docs\/\.\.\/\.\.' must be a relative path/],
    ['a missing path', 'nowhere', /ro_bind 'nowhere' does not exist in the checkout/],
  ])('fails without running anything when a ro_bind entry is %s', async (_what, entry, error) => {
    const r = await run('echo ran-anyway', { check: { roBind: ['docs', entry] } });

    expect(r.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(r.exitCode).toBeUndefined();
    expect(r.error).toMatch(error);
    expect(r.log).toBe('');
  });

  it('kills a command that ignores SIGTERM at its timeout, after the grace, leaving no process behind', async () => {
    // `started` once the sleep runs (it inherits the ignored SIGTERM), so that all three are there to be counted.
    const c = check("trap '' TERM HUP; /bin/sleep 1000 & echo started; wait", {
      assign: { timeoutSeconds: 1 },
      context: { timeoutGraceMs: 1000 },
    });
    const began = Date.now();
    const pending = c.check.run();
    await waitForLog(c.text, 'started');
    const pid = c.check.pid as number;
    const inside = descendants(pid).map((p) => p.pid);
    expect(inside.length).toBeGreaterThanOrEqual(3); // the sandbox's init, bash, sleep

    const r = await pending;

    expect(r.outcome).toBe(Outcome.OUTCOME_TIMED_OUT);
    expect(r.error).toBe('timed out after 1 s');
    expect(r.exitCode).toBeUndefined();
    // It outlived the SIGTERM at 1 s: only the SIGKILL after the grace ended it.
    expect(Date.now() - began).toBeGreaterThanOrEqual(2000);
    await expect.poll(() => [pid, ...inside].filter(running), { timeout: 2000, interval: 20 }).toEqual([]);
  });

  it('ends a check whose output exceeds the cap as FAILED, keeping the first bytes of the log', async () => {
    const r = await run('while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done', {
      assign: { maxLogBytes: 10_000 },
    });

    expect(r.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(r.error).toBe('output exceeded check_max_log_bytes (10000 bytes)');
    expect(r.exitCode).toBeUndefined();
    expect(Buffer.byteLength(r.log)).toBe(10_000);
    expect(r.log).toMatch(/^eka-ci: check 'test'/);
  });

  it('cancels a running check by SIGTERM to its processes: CANCELLED before the grace is over, none left', async () => {
    const c = check('echo started; /bin/sleep 60');
    const pending = c.check.run();
    await waitForLog(c.text, 'started');
    const pid = c.check.pid as number;
    const inside = descendants(pid).map((p) => p.pid);

    const cancelled = Date.now();
    await c.check.cancel('the pull request was closed', 20_000);
    const r = await pending;

    expect(Date.now() - cancelled).toBeLessThan(10_000);

    expect(r.outcome).toBe(Outcome.OUTCOME_CANCELLED);
    expect(r.error).toBe('cancelled: the pull request was closed');
    expect(r.exitCode).toBeUndefined();
    expect(c.check.status).toBe('done');
    await expect.poll(() => [pid, ...inside].filter(running), { timeout: 2000, interval: 20 }).toEqual([]);
  });

  it('kills a check at once, even one that ignores SIGTERM', async () => {
    const c = check("trap '' TERM; echo started; while :; do /bin/sleep 1; done");
    const pending = c.check.run();
    await waitForLog(c.text, 'started');
    const pid = c.check.pid as number;
    const inside = descendants(pid).map((p) => p.pid);

    const killed = Date.now();
    await c.check.kill('the agent stops now');
    const r = await pending;

    expect(Date.now() - killed).toBeLessThan(1500);

    expect(r.outcome).toBe(Outcome.OUTCOME_CANCELLED);
    expect(r.error).toBe('cancelled: the agent stops now');
    await expect.poll(() => [pid, ...inside].filter(running), { timeout: 2000, interval: 20 }).toEqual([]);
  });

  it('cancels a check still downloading its source, running nothing', async () => {
    const c = check('echo ran-anyway');
    const pending = c.check.run();
    await c.check.cancel('superseded by a newer commit', 1000);
    const r = await pending;

    expect(r.outcome).toBe(Outcome.OUTCOME_CANCELLED);
    expect(r.error).toBe('cancelled: superseded by a newer commit');
    expect(c.text()).toBe('');
  });

  it('removes its work directory when it ends', async () => {
    const c = check('echo data > file; echo started');
    await c.check.run();

    expect(existsSync(join(spool.dir, 'work', c.leaseId))).toBe(false);
  });

  it('reports a source it cannot download as INFRA_ERROR, saying why', async () => {
    const refused = await run('true', { context: { token: 'not-the-token' } });
    const missing = await run('true', { check: { sourceUrl: source.url.replace('source.tar', 'other.tar') } });
    const closed = await run('true', { check: { sourceUrl: `http://127.0.0.1:${await closedPort()}/source.tar` } });

    expect(refused.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(refused.error).toMatch(/cannot download the source from http:\/\/127\.0\.0\.1:\d+\/source\.tar: HTTP 401/);
    expect(missing.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(missing.error).toMatch(/HTTP 404/);
    expect(closed.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(closed.error).toMatch(
      /cannot download the source from http:\/\/127\.0\.0\.1:\d+\/source\.tar: .*ECONNREFUSED/,
    );
  });

  it('takes an archive the body goes on after (tar stops at its end marker), and refuses one cut half-way', async () => {
    const padded = await run('cat README.md', { check: { sourceUrl: source.url.replace('source.tar', 'padded.tar') } });
    const cut = await run('true', { check: { sourceUrl: source.url.replace('source.tar', 'cut.tar') } });

    expect(padded.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(padded.log).toContain('the checked-out readme');
    expect(cut.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(cut.error).toMatch(/cannot (extract|download) the source from http:\/\/127\.0\.0\.1:\d+\/cut\.tar: /);
  });

  it('fails as INFRA_ERROR on an agent whose sandbox does not start', async () => {
    const r = await run('true', { context: { unavailable: 'bwrap: setting up uid map: Permission denied' } });

    expect(r.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(r.error).toBe('this agent cannot run checks: bwrap: setting up uid map: Permission denied');
  });
});

describe(`a check with memory and process limits${
  noCgroups ? ` (skipped: this process cannot make cgroups: ${limited.unavailable})` : ''
}`, () => {
  // A test that fails midway leaves no check running, and so no cgroup behind.
  const started: Check[] = [];
  afterEach(async () => {
    await Promise.all(started.splice(0).map((c) => c.kill('the test ended')));
  });
  it.skipIf(noCgroups)('cannot fork past its process limit: forks fail, and it ends FAILED saying so', async () => {
    // dash (/bin/sh here), unlike bash, does not retry a refused fork for seconds: it fails at once. The check then
    // waits, without forking, for the test to have counted its processes.
    const c = check(
      `sh -c 'for i in $(seq 50); do /bin/sleep 30 & done; wait'; s=$?; echo "forker exited $s"; ` +
        'for ((i = 0; i < 300; i++)); do [[ -e go ]] && break; read -t 0.1; done; exit $s',
      { context: { cgroups: limited } },
    );
    started.push(c.check);
    const pending = c.check.run();
    await waitForLog(c.text, 'forker exited');
    const dirs = c.check.cgroupDirs;
    const pid = c.check.pid as number;
    const tree = [pid, ...descendants(pid).map((p) => p.pid)];
    const sleepers = tree.filter((p) => comm(p) === 'sleep');

    expect(dirs.length).toBeGreaterThan(0);
    for (const dir of dirs) expect(procsOf(dir).sort()).toEqual(tree.sort());
    expect(tree.length).toBeLessThanOrEqual(20);
    expect(sleepers.length).toBeGreaterThan(0);
    expect(sleepers.length).toBeLessThanOrEqual(20 - 3); // bubblewrap, its init and bash count too
    writeFileSync(join(spool.dir, 'work', c.leaseId, 'source', 'go'), '');
    const r = await pending;
    const log = c.text();

    expect(r.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(r.exitCode).toBe(2);
    expect(r.error).toMatch(
      /^exit code 2; (a fork|\d+ forks) refused at the check's limit of 20 processes and threads$/,
    );
    expect(log).toContain('eka-ci: limits: 64 MiB of memory, 20 processes and threads (cgroup v');
    expect(log).toContain('Cannot fork');
    expect(log).toMatch(/eka-ci: (a fork|\d+ forks) refused at the check's limit of 20 processes and threads\r\n$/);
    for (const dir of dirs) expect(existsSync(dir)).toBe(false);
  });

  it.skipIf(noCgroups)('is killed by the kernel past its memory limit: exit 137, FAILED, out of memory', async () => {
    // tail keeps its last line whole, and 200 MB of zeros is one line.
    const c = check('set -o pipefail; head -c 200M /dev/zero | tail | wc -c', {
      context: { cgroups: limited },
      assign: { timeoutSeconds: 60 },
    });
    started.push(c.check);
    const pending = c.check.run();
    await waitForLog(c.text, 'eka-ci: limits:');
    const dirs = c.check.cgroupDirs;
    const r = await pending;

    expect(r.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(r.exitCode).toBe(137);
    expect(r.error).toBe("exit code 137; out of memory: the kernel killed a process at the check's limit of 64 MiB");
    expect(c.text()).toContain("eka-ci: out of memory: the kernel killed a process at the check's limit of 64 MiB");
    expect(c.text()).not.toContain('209715200');
    expect(dirs.length).toBeGreaterThan(0);
    for (const dir of dirs) expect(existsSync(dir)).toBe(false);
  });

  it.skipIf(noCgroups)('is killed whole at its timeout, leaving no process and no cgroup', async () => {
    const c = check("trap '' TERM; echo started; while :; do /bin/sleep 1; done", {
      context: { cgroups: limited, timeoutGraceMs: 300 },
      assign: { timeoutSeconds: 1 },
    });
    started.push(c.check);
    const pending = c.check.run();
    await waitForLog(c.text, 'started');
    const dirs = c.check.cgroupDirs;
    const pid = c.check.pid as number;
    const inside = descendants(pid).map((p) => p.pid);
    for (const dir of dirs) expect(procsOf(dir).sort()).toEqual([pid, ...inside].sort());

    const r = await pending;

    expect(r.outcome).toBe(Outcome.OUTCOME_TIMED_OUT);
    expect(r.error).toBe('timed out after 1 s');
    await expect.poll(() => [pid, ...inside].filter(running), { timeout: 2000, interval: 20 }).toEqual([]);
    for (const dir of dirs) expect(existsSync(dir)).toBe(false);
  });

  it('runs without limits where the agent cannot make cgroups, saying so in its log', async () => {
    const none = await SandboxCgroups.probe(LIMITS, { root: join(dir, 'no-cgroups-here') });
    expect(none.unavailable).toMatch(/no cgroup hierarchy is mounted under/);

    const r = await run('echo ran', { context: { cgroups: none } });

    expect(r.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(r.log).toContain('eka-ci: limits: none on this agent\n');
    expect(r.log).toContain('ran');
  });
});

describe('a check with a shell derivation', () => {
  it('runs in the derivation’s environment, with its inputs substituted from the cache and on PATH', async () => {
    const shell = shellWithGreet();
    const cache = signedCache();
    copyTo(cache, shell, shell.greetOut);
    copyTo(cache, shell, shell.shellDrv);

    const r = await run('greet; echo "GREETING=$GREETING"; echo "PATH=$PATH"', {
      assign: {
        drvPath: shell.shellDrv,
        inputOutputs: [{ drvPath: shell.greetDrv, name: 'out', path: shell.greetOut }],
      },
      context: { cacheUrl: cache.url, cachePublicKey: cache.publicKey },
    });

    expect(r.error).toBe('');
    expect(r.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(r.log).toContain(`in the environment of ${shell.shellDrv}`);
    expect(r.log).toContain('greetings-from-the-shell\r\n');
    expect(r.log).toContain('GREETING=hello-from-the-shell-env\r\n');
    expect(r.log).toContain(`PATH=${shell.greetOut}/bin\r\n`);
    expect(validInStore(shell.greetOut)).toBe(true);
  });

  it('fails as INFRA_ERROR when the shell’s inputs cannot be substituted', async () => {
    const shell = shellWithGreet();
    const cache = signedCache();
    copyTo(cache, shell, shell.shellDrv);

    const r = await run('greet', {
      assign: {
        drvPath: shell.shellDrv,
        inputOutputs: [{ drvPath: shell.greetDrv, name: 'out', path: shell.greetOut }],
      },
      context: { cacheUrl: cache.url, cachePublicKey: cache.publicKey },
    });

    expect(r.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(r.error).toMatch(/^cannot make the check's shell: cannot substitute the shell's inputs from file:\/\//);
    expect(r.log).toBe('');
  });
});

function procsOf(cgroupDir: string): number[] {
  return readFileSync(join(cgroupDir, 'cgroup.procs'), 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    .map(Number);
}

function comm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
}

/** A loopback port nothing listens on: connections to it are refused. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

function writeSecret(path: string, text: string): string {
  mkdirSync(join(path, '..'), { recursive: true });
  writeFileSync(path, text, { mode: 0o600 });
  return path;
}

interface ShellFixture {
  /** The store the fixture was made in, the coordinator's: the agent's (the machine's) never had any of it. */
  store: string;
  shellDrv: string;
  greetDrv: string;
  greetOut: string;
}

/** A plain shell derivation whose one input makes `$out/bin/greet`, the input built in a store of the test's own. */
function shellWithGreet(): ShellFixture {
  const store = join(dir, 'coordinator-store');
  const nix = [...NIX, '--store', store, '--option', 'sandbox-paths', '/bin /usr /lib? /lib64?'];
  const name = `ekaci-check-${randomBytes(6).toString('hex')}`;
  const expr = join(dir, 'shell.nix');
  const greet =
    '/bin/mkdir -p $out/bin; echo \\"#!/bin/sh\\" > $out/bin/greet;' +
    ' echo \\"echo greetings-from-the-shell\\" >> $out/bin/greet; /bin/chmod +x $out/bin/greet';
  writeFileSync(
    expr,
    `let greet = derivation { name = "${name}-greet"; system = builtins.currentSystem; builder = "/bin/sh";` +
      ` args = [ "-c" "${greet}" ]; };\n` +
      `in derivation { name = "${name}-shell"; system = builtins.currentSystem; builder = "/bin/sh";` +
      ` args = [ "-c" "exit 1" ]; GREETING = "hello-from-the-shell-env"; tools = greet; }\n`,
  );
  const shellDrv = execFileSync('nix-instantiate', [...nix, expr], QUIET).trim();
  const greetDrv = execFileSync('nix-store', ['--store', store, '-q', '--references', shellDrv], QUIET)
    .split('\n')
    .find((p) => p.endsWith(`${name}-greet.drv`)) as string;
  const greetOut = execFileSync('nix-store', [...nix, '--realise', greetDrv], QUIET).trim();
  for (const path of [shellDrv, greetOut]) expect(validInStore(path)).toBe(false);
  return { store, shellDrv, greetDrv, greetOut };
}

/** A binary cache in the test's directory, signed as the coordinator's is. */
function signedCache(): { url: string; secretKey: string; publicKey: string } {
  const secretKey = join(dir, 'cache.sec');
  const publicKeyFile = join(dir, 'cache.pub');
  execFileSync('nix-store', ['--generate-binary-cache-key', 'ekaci-check-test-1', secretKey, publicKeyFile], QUIET);
  return { url: `file://${join(dir, 'cache')}`, secretKey, publicKey: readFileSync(publicKeyFile, 'utf8').trim() };
}

function copyTo(cache: { url: string; secretKey: string }, shell: ShellFixture, path: string): void {
  const to = `${cache.url}?secret-key=${cache.secretKey}`;
  const derivation = path.endsWith('.drv') ? ['--derivation'] : [];
  execFileSync('nix', [...NIX, 'copy', ...derivation, '--from', shell.store, '--to', to, path], QUIET);
}

function validInStore(path: string): boolean {
  return spawnSync('nix-store', ['--check-validity', path]).status === 0;
}
