import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { nixBase32 } from '../../common/nix/narinfo.js';
import { LOG_BATCH_BYTES } from '../../common/nix/worker-protocol.js';
import { Outcome, type Assign } from '../../common/proto/ekaci/agent/v1/agent.js';
import { LogSpool } from '../logs/spool.js';
import { shellDerivation } from '../testing/derivations.js';
import { testAssign } from '../testing/assign.js';
import { CacheUploader } from '../nix/cache-upload.js';
import { StorePool } from '../nix/store-pool.js';
import { Build } from './build.js';
import { alive, daemonsOf } from '../testing/processes.js';

let dir: string;
let spool: LogSpool;
let cacheDir: string;
let pool: StorePool;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-build-'));
  spool = new LogSpool(join(dir, 'spool'));
  spool.prepare();
  spool.writeNetrc('127.0.0.1', 'secret');
  cacheDir = join(dir, 'cache');
  pool = new StorePool(silentLogger());
});

afterEach(async () => {
  await pool.closeAll();
  rmSync(dir, { recursive: true, force: true });
});

const assign = testAssign;

function build(a: Assign, cacheUrl = `file://${cacheDir}`, logSpool = spool) {
  const log = logSpool.open(a.leaseId);
  const context = {
    cacheUrl,
    cachePublicKey: '',
    netrcPath: spool.netrcPath,
    pool,
    uploader: new CacheUploader('secret'),
    spool: logSpool,
    token: 'secret',
  };
  return { log, build: new Build(a, context, log, silentLogger()) };
}

describe('Build', () => {
  it('builds a derivation, spools its log, uploads every output and measures it', async () => {
    const drv = await shellDerivation('echo hello; echo x > $out; echo yy > $dev', 'outputs = [ "out" "dev" ];');
    const { log, build: b } = build(assign('ok', drv));
    const result = await b.run();
    expect(result.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(result.error).toBe('');
    expect(result.outputs.map((o) => o.name).sort()).toEqual(['dev', 'out']);
    for (const output of result.outputs) {
      expect(output.path).toMatch(/^\/nix\/store\/[a-z0-9]{32}-ekaci-agent-test-/);
      expect(output.narSize).toBeGreaterThan(0);
      expect(output.closureSize).toBeGreaterThanOrEqual(output.narSize);
      const hash = output.path.slice('/nix/store/'.length, '/nix/store/'.length + 32);
      expect(existsSync(join(cacheDir, `${hash}.narinfo`))).toBe(true);
    }
    expect(log.closed).toBe(true);
    expect(readFileSync(log.path, 'utf8')).toContain('hello\n');
  });

  it('reports a failing builder as FAILED with Nix verdict as the error', async () => {
    const drv = await shellDerivation('echo about to fail; exit 3');
    const { log, build: b } = build(assign('bad', drv));
    const result = await b.run();
    expect(result.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(result.error).toMatch(/failed with exit code 3/);
    expect(result.outputs).toEqual([]);
    expect(readFileSync(log.path, 'utf8')).toContain('about to fail');
  });

  it('reports a build silent for longer than max-silent-time as TIMED_OUT', async () => {
    const drv = await shellDerivation('echo start; /bin/sleep 5; echo x > $out');
    const { build: b } = build(assign('quiet', drv, { maxSilentSeconds: 1 }));
    const result = await b.run();
    expect(result.outcome).toBe(Outcome.OUTCOME_TIMED_OUT);
    expect(result.error).toMatch(/timed out after 1 seconds of silence/);
  });

  it('reports a build running past its timeout as TIMED_OUT', async () => {
    const drv = await shellDerivation('while true; do echo tick; /bin/sleep 0.2; done');
    const { build: b } = build(assign('long', drv, { timeoutSeconds: 1 }));
    expect((await b.run()).outcome).toBe(Outcome.OUTCOME_TIMED_OUT);
  });

  it('reads a chatty build no faster than its log reaches the disk, so the log buffer stays under its bound', async () => {
    // A small high-water mark makes the disk the slow consumer: every pipe read of the daemon's output carries more
    // than this many bytes of log lines, which a reader that ignores the mark would queue for the disk at once.
    const highWater = 8 * 1024;
    // Long lines: the daemon spends its time per line, and the bound is about bytes.
    const line = 'x'.repeat(999);
    const total = 50_000_000;
    const small = new LogSpool(join(dir, 'small-spool'), highWater);
    small.prepare();
    const drv = await shellDerivation(`/usr/bin/yes ${line} | /usr/bin/head -c ${total}; echo x > $out`);
    const { log, build: b } = build(assign('chatty', drv), `file://${cacheDir}`, small);
    const result = await b.run();
    expect(result.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(log.size).toBeGreaterThanOrEqual(total);
    expect(log.buffered).toBe(0);
    // At most one batch of lines beyond the mark: the one whose append reported it.
    expect(log.peakBuffered).toBeGreaterThan(0);
    expect(log.peakBuffered).toBeLessThanOrEqual(highWater + LOG_BATCH_BYTES + line.length + 1);
  });

  it('fails a build whose log outgrows the lease limit, saying so', async () => {
    const drv = await shellDerivation(`/usr/bin/yes ${'x'.repeat(99)} | /usr/bin/head -c 100000; echo x > $out`);
    const { log, build: b } = build(assign('loud', drv, { maxLogBytes: 10_000 }));
    const result = await b.run();
    expect(result.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(result.error).toMatch(/killed after writing more than 10000 bytes of log output/);
    expect(log.size).toBeLessThan(100_000);
    // The limit is the lease's: the next build on the same daemon connection has none.
    const next = await shellDerivation(`/usr/bin/yes ${'x'.repeat(99)} | /usr/bin/head -c 100000; echo x > $out`);
    expect((await build(assign('quiet-enough', next)).build.run()).outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
  });

  it('keeps the outputs of a finished build as GC roots of the lease', async () => {
    const drv = await shellDerivation('echo x > $out; echo y > $dev', 'outputs = [ "out" "dev" ];');
    const { build: b } = build(assign('rooted', drv));
    const result = await b.run();
    expect(result.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    for (const output of result.outputs) {
      const link = spool.gcRoot('rooted', output.name);
      expect(readlinkSync(link)).toBe(output.path);
      // The daemon recorded the link under gcroots/auto, which is what `nix-store --gc` follows.
      expect(readlinkSync(autoRoot(link))).toBe(link);
    }
    spool.removeGcRoots('rooted');
    // The daemon's record now points nowhere: the collector drops it and is free to take the outputs.
    for (const output of result.outputs) expect(existsSync(spool.gcRoot('rooted', output.name))).toBe(false);
    expect(readdirSync(join(spool.dir, 'gcroots'))).toEqual([]);
  });

  it('does not leave the daemon of a failed upload running', async () => {
    const port = await closedPort();
    const drv = await shellDerivation('echo x > $out');
    const { build: b } = build(assign('refused', drv), `http://127.0.0.1:${port}`);
    const result = await b.run();
    expect(result.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(result.error).toMatch(/upload to http:\/\/127\.0\.0\.1:\d+ failed/);
    const daemons = daemonsOf(process.pid);
    expect(daemons.length).toBeGreaterThan(0);
    await pool.closeAll();
    await expect.poll(() => daemons.filter(alive), { timeout: 30_000 }).toEqual([]);
  });

  it('reports a cache that refuses the upload as INFRA_ERROR after a successful build', async () => {
    const drv = await shellDerivation('echo x > $out');
    const { build: b } = build(assign('upload', drv), 'file:///proc/ekaci-no-such-cache');
    const result = await b.run();
    expect(result.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(result.error).toMatch(/upload to file:\/\/\/proc\/ekaci-no-such-cache failed/);
  });

  it('says in the log of a retry that its outputs were valid already, where Nix would log nothing', async () => {
    const drv = await shellDerivation('echo building for real; echo x > $out');
    const first = build(assign('first-try', drv), 'file:///proc/ekaci-no-such-cache');
    expect((await first.build.run()).outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(readFileSync(first.log.path, 'utf8')).toContain('building for real');

    const again = build(assign('second-try', drv, { attempt: 2 }));
    expect((await again.build.run()).outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    const log = readFileSync(again.log.path, 'utf8');
    expect(log).not.toContain('building for real');
    expect(log).toMatch(/nothing to build: the outputs of \/nix\/store\/\S+\.drv are valid in this builder's store/);
  });

  it('cancels by stopping the whole process tree and reports CANCELLED', async () => {
    const drv = await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait');
    const { log, build: b } = build(assign('cancel', drv));
    const running = b.run();
    const pids = await waitForPids(log.path);
    expect(pids.every(alive)).toBe(true);
    await b.cancel('test', 2000);
    const result = await running;
    expect(result.outcome).toBe(Outcome.OUTCOME_CANCELLED);
    expect(result.error).toBe('cancelled: test');
    // Killed processes are reaped asynchronously by init; they must be gone promptly, not instantly.
    await expect.poll(() => pids.filter(alive), { timeout: 2000 }).toEqual([]);
  });

  it('kills the builder even when nix-store gets no chance to stop it', async () => {
    const drv = await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait');
    const { log, build: b } = build(assign('kill', drv));
    const running = b.run();
    const pids = await waitForPids(log.path);
    await b.kill('forced');
    expect((await running).outcome).toBe(Outcome.OUTCOME_CANCELLED);
    await expect.poll(() => pids.filter(alive), { timeout: 2000 }).toEqual([]);
  });
});

/** Where Nix records an indirect root: `gcroots/auto/` + the link's SHA-1 in Nix's base32. */
function autoRoot(link: string): string {
  return join('/nix/var/nix/gcroots/auto', nixBase32(createHash('sha1').update(link).digest()));
}

/** A loopback port nothing listens on: connections to it are refused. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

async function waitForPids(path: string): Promise<number[]> {
  let match: RegExpExecArray | null = null;
  await expect
    .poll(() => (match = /pids (\d+) (\d+)/.exec(readFileSync(path, 'utf8'))), { timeout: 10_000, interval: 50 })
    .not.toBeNull();
  const m = match as RegExpExecArray | null;
  return m === null ? [] : [Number(m[1]), Number(m[2])];
}
