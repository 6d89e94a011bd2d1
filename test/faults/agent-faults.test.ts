import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { nixBase32, parseNarInfo } from '../../common/nix/narinfo.js';
import { nonce, tempDir, writeNixFile } from '../support/nix-project.js';
import { Fleet } from './support/fleet.js';
import {
  alive,
  canInjectFaults,
  distFile,
  hasCommand,
  hostProcesses,
  killHost,
  parentOf,
  until,
  Watched,
} from './support/processes.js';
import { auditBuilds, flatBody, gatedScript, instantiate, loggingScript } from './support/workload.js';

/**
 * Faults on the agent's side of a build: an agent killed while its upload is half-way into the coordinator's
 * cache, a build whose log outgrows `build_max_log_bytes`, and a cancelled build that ignores SIGTERM.
 */

const LINES = 30;

let fleet: Fleet | undefined;
const cleanups: Array<() => void> = [];

afterEach(() => {
  fleet?.cleanUp();
  fleet = undefined;
  for (const c of cleanups.splice(0)) c();
});

function touch(dir: string, file: string): void {
  writeFileSync(join(dir, file), '');
}

/** Bytes a process has written to TCP connections to `port` that the other side has not taken yet. */
function unsentBytes(pid: number, port: number): number {
  const out = execFileSync('ss', ['-tnpH', 'state', 'established', `( dport = :${port} )`], { encoding: 'utf8' });
  let most = 0;
  for (const line of out.split('\n')) {
    const [, sendQ] = line.trim().split(/\s+/);
    if (line.includes(`pid=${pid},`)) most = Math.max(most, Number(sendQ));
  }
  return most;
}

/** Files of an upload that never finished (the cache writes `.upload-*` and renames them when complete). */
function partialUploads(cacheDir: string): string[] {
  if (!existsSync(cacheDir)) return [];
  return readdirSync(cacheDir, { recursive: true, encoding: 'utf8' }).filter((f) => basename(f).startsWith('.upload-'));
}

describe.runIf(canInjectFaults() && hasCommand('ss'))('faults on the agent side of a build', () => {
  it('moves a build whose agent dies mid-upload to the other agent, and keeps the half-sent NAR out of the cache', async () => {
    fleet = new Fleet({ agents: ['fault-a', 'fault-b'], leaseTtlSeconds: 10 });
    const f = fleet;
    await f.coordinator.start();
    const agents = [await f.startAgent('fault-a'), await f.startAgent('fault-b')];
    await f.connected(['fault-a', 'fault-b']);
    const gate = f.gate();
    // 64 MiB of noise: far more than the socket buffers hold while the coordinator is not reading.
    const output = '/bin/head -c 67108864 /dev/urandom > $out';
    const drvs = await instantiate(
      flatBody(['big'], (n) => gatedScript(n, LINES, gate, { output })),
      ['big'],
    );
    const drv = drvs.get('big')!;
    const id = await f.coordinator.submit([drv]);
    await until('the builder to start', () => existsSync(join(gate, 'started-big')));
    const first = (await f.coordinator.derivation(drv)).attempts[0]!;
    const uploader = agents.find((a) => a.name === first.agent_id)!;

    // The coordinator stops reading (SIGSTOP) just before the upload begins, so that the upload is certainly
    // half-way when its agent dies: bytes sit in the socket, unread.
    touch(gate, 'release-big');
    await until('the builder to print its last line', () => existsSync(join(gate, 'printed-big')));
    f.coordinator.current.signal('SIGSTOP');
    try {
      await until('the upload to be under way', () => unsentBytes(uploader.pid, f.coordinator.httpPort) > 64 * 1024);
      uploader.kill9();
    } finally {
      f.coordinator.current.signal('SIGCONT');
    }

    const status = await f.settle(id);
    expect(status.builds.map((b) => [b.state, b.agent])).toEqual([
      ['succeeded', agents.find((a) => a !== uploader)!.name],
    ]);
    const attempts = (await f.coordinator.derivation(drv)).attempts;
    expect(attempts.map((a) => [a.agent_id, a.state])).toEqual([
      [uploader.name, 'lost'],
      [agents.find((a) => a !== uploader)!.name, 'succeeded'],
    ]);
    // What the cache holds is the second agent's NAR, whole: its content hashes to what its narinfo says.
    const outPath = (
      await f.coordinator.api<{ outputs: Array<{ path: string }> }>(`/api/v1/derivations/${basename(drv)}`)
    ).outputs[0]!.path;
    const cache = f.coordinator.dataPath('cache');
    const info = parseNarInfo(readFileSync(join(cache, `${basename(outPath).slice(0, 32)}.narinfo`), 'utf8'));
    const nar = readFileSync(join(cache, info.url));
    expect(info.compression).toBe('none');
    expect(`sha256:${nixBase32(createHash('sha256').update(nar).digest())}`).toBe(info.narHash);
    expect(nar.length).toBe(info.narSize);
    expect(partialUploads(cache), 'partial uploads left in the cache').toEqual([]);
    await f.coordinator.stop();
    const db = f.coordinator.openDatabase();
    try {
      const audit = auditBuilds(db, drvs, LINES);
      expect(audit.duplicated).toEqual([]);
      expect(audit.badLogs).toEqual([]);
    } finally {
      db.close();
    }
  });

  it('fails a build whose log outgrows build_max_log_bytes, saying so, and stores no more than the limit', async () => {
    const limit = 64 * 1024;
    fleet = new Fleet({ agents: ['fault-a', 'fault-b'], leaseTtlSeconds: 10, extra: { build_max_log_bytes: limit } });
    const f = fleet;
    await f.coordinator.start();
    await f.startAgent('fault-a');
    await f.startAgent('fault-b');
    await f.connected(['fault-a', 'fault-b']);
    // About 1.4 MB of log (16,384 lines), then an output: only the log makes it fail.
    const chatty = loggingScript('chatty', 16_384, { pause: ':' });
    const drvs = await instantiate(
      flatBody(['chatty', 'quiet'], (n) => (n === 'chatty' ? chatty : loggingScript(n, LINES))),
      ['chatty', 'quiet'],
    );
    const id = await f.coordinator.submit([...drvs.values()]);
    const status = await f.settle(id);

    const chattyResult = status.builds.find((b) => b.drvPath === drvs.get('chatty'))!;
    expect(chattyResult.state).toBe('failed');
    // Nix's own words ("killed after writing more than 65536 bytes of log output") or the coordinator's.
    expect(chattyResult.error).toMatch(/log/i);
    expect(chattyResult.error).toMatch(/limit|exceed|more than|too (large|long)|max/i);
    expect(chattyResult.attempts, 'a log over the limit is not retried').toBe(1);
    expect(status.builds.find((b) => b.drvPath === drvs.get('quiet'))!.state).toBe('succeeded');
    const stored = Buffer.byteLength(f.coordinator.log(drvs.get('chatty')!, 1));
    // The limit, and room for a line saying the log was cut.
    expect(stored).toBeGreaterThan(0);
    expect(stored).toBeLessThanOrEqual(limit + 1024);
  });

  it('kills a cancelled build that ignores SIGTERM once the cancel grace is over, with its nix-daemon hung', async () => {
    const dir = tempDir('ekaci-faults-cancel-');
    const [gate, nix, data] = ['gate', 'nix', 'data'].map((d) => join(dir, d)) as [string, string, string];
    for (const d of [gate, nix]) mkdirSync(d);
    const file = writeNixFile(
      nix,
      nonce(),
      flatBody(['stubborn'], (n) => gatedScript(n, LINES, gate, { ignoreTerm: true })),
    );
    // `ekaci build` with two agent hosts of its own (each a process in its own mount namespace and /nix); Ctrl-C
    // cancels what runs, through the coordinator's Cancel and its grace period.
    const ekaci = new Watched(
      'ekaci build',
      process.execPath,
      [await distFile('cli', 'ekaci.js'), 'build', file, '-A', 'stubborn', '--agents', '2', '--max-jobs', '1'].concat([
        '--data-dir',
        data,
      ]),
      { PATH: process.env.PATH, HOME: process.env.HOME },
    );
    cleanups.push(() => ekaci.killGroup('SIGKILL'));
    await until('the builder to start', () => existsSync(join(gate, 'started-stubborn')));
    const builderPid = Number(readFileSync(join(gate, 'pids-stubborn'), 'utf8').split('\n')[0]);
    // Its agent hosts go when the test ends, whatever happened (their stores are under the data directory, which
    // their mount namespaces show).
    const hosts = new Set<string>();
    hostProcesses([ekaci.pid], hosts, data);
    cleanups.push(() => {
      killHost(ekaci.running ? [ekaci.pid] : [], hosts, data);
      rmSync(dir, { recursive: true, force: true, maxRetries: 5 });
    });
    // Nix's daemon would kill the builder with SIGKILL on the agent's SIGTERM; a hung one leaves it to the agent.
    const daemonPid = parentOf(builderPid);
    process.kill(daemonPid, 'SIGSTOP');

    ekaci.signal('SIGINT');
    const interruptedAt = Date.now();
    await ekaci.waitForLine('the interrupt', (l) => l.raw.includes('interrupted: cancelling builds'));
    await until('the builder, which ignores SIGTERM, to be killed', () => !alive(builderPid));
    const killedAfter = (Date.now() - interruptedAt) / 1000;
    const exit = await ekaci.exited;

    expect(alive(daemonPid), 'the hung nix-daemon was killed too').toBe(false);
    expect(exit.code).toBe(1);
    expect(ekaci.lines.map((l) => l.raw).join('\n')).toMatch(/^cancelled\s+stubborn\s/m);
    process.stdout.write(
      `cancel figures: a build ignoring SIGTERM was killed ${killedAfter.toFixed(1)} s after Ctrl-C (grace 10 s)\n`,
    );
  });
});
