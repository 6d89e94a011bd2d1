/**
 * bench/logs-followers: the readers of bench/logs, in a process of their own (not the coordinator's), driven over
 * the IPC channel by bench/logs.ts:
 *
 * - `follow`: N Server-Sent-Events followers of one derivation's live log, each on its own connection, until each
 *   has had the `end` event;
 * - `cat`: N `cat FILE` processes at once, each read through a pipe (the baseline for throughput);
 * - `pipe`: the builder's script run by `/bin/sh` outside Nix, its output read through a pipe (the baseline for
 *   latency: what the same bytes cost with nothing between the builder and the reader).
 *
 * Every reader runs bench/logs-reader.ts on the text it gets. Times are the realtime clock in milliseconds
 * (`realtime()` of bench-env.ts), comparable with the builder's `date +%s%N`: `ready` reports how far the two clocks
 * were seen apart.
 */
import { spawn, spawnSync } from 'node:child_process';
import { request } from 'node:http';
import { sseEvents } from '../common/sse.js';
import { nsToMs } from './logs-builder.js';
import { LogReader, type ReadResult } from './logs-reader.js';
import { realtime } from './bench-env.js';

export type FollowerCommand =
  | { type: 'follow'; url: string; token: string; count: number; client: 'lean' | 'ekaci' }
  | { type: 'cat'; file: string; count: number }
  | { type: 'pipe'; script: string; env: Record<string, string>; cwd: string }
  | { type: 'stop' };

export interface FollowResult extends ReadResult {
  /** When the response's headers arrived. */
  attachedAt: number;
  /** The `end` event's data. */
  final: Record<string, unknown> | null;
  events: number;
}

export interface SpawnedResult extends ReadResult {
  /** When the process was started. */
  spawnedAt: number;
  exitCode: number | null;
}

export type FollowerReport =
  | { type: 'ready'; clockSkewMs: number }
  | { type: 'attached' }
  /** Every follower has seen the end of the flood. */
  | { type: 'caught-up' }
  | { type: 'followed'; results: FollowResult[]; cpuMs: number }
  | { type: 'catted'; results: SpawnedResult[]; cpuMs: number }
  | { type: 'piped'; result: SpawnedResult; cpuMs: number }
  | { type: 'failed'; error: string };

const now = realtime;
// With a callback, a message the bench can no longer take (it has gone) is dropped instead of ending this process.
const send = (m: FollowerReport): void => void process.send?.(m, undefined, {}, () => undefined);
const cpuMs = (since: NodeJS.CpuUsage): number => {
  const u = process.cpuUsage(since);
  return (u.user + u.system) / 1000;
};
// How many times the clock check runs `date`: the tightest bracket of several is the one least disturbed.
const CLOCK_PROBES = 5;

process.on('message', (command: FollowerCommand) => {
  void handle(command).catch((err: unknown) =>
    send({ type: 'failed', error: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
  );
});
// Ctrl-C reaches the whole process group: the bench decides when the followers stop.
process.on('SIGINT', () => undefined);
process.on('disconnect', () => process.exit(0));
send({ type: 'ready', clockSkewMs: clockSkew() });

async function handle(command: FollowerCommand): Promise<void> {
  const cpu = process.cpuUsage();
  switch (command.type) {
    case 'follow': {
      const attached: Array<Promise<void>> = [];
      const done: Array<Promise<FollowResult>> = [];
      let ended = 0;
      const onEnded = (): void => {
        if (++ended === command.count) send({ type: 'caught-up' });
      };
      for (let i = 0; i < command.count; i++) {
        const f =
          command.client === 'lean'
            ? followLean(command.url, command.token, onEnded)
            : followEkaci(command.url, command.token, onEnded);
        attached.push(f.attached);
        done.push(f.done);
      }
      await Promise.all(attached);
      send({ type: 'attached' });
      const results = await Promise.all(done);
      send({ type: 'followed', results, cpuMs: cpuMs(cpu) });
      return;
    }
    case 'cat': {
      const runs = Array.from({ length: command.count }, () => readProcess('/bin/cat', [command.file], {}));
      send({ type: 'catted', results: await Promise.all(runs), cpuMs: cpuMs(cpu) });
      return;
    }
    case 'pipe': {
      const result = await readProcess('/bin/sh', ['-c', command.script], command.env, command.cwd);
      send({ type: 'piped', result, cpuMs: cpuMs(cpu) });
      return;
    }
    case 'stop':
      process.exit(0);
  }
}

interface Following {
  attached: Promise<void>;
  done: Promise<FollowResult>;
}

/** `attached` and `done` of a follower: `attached` fails with `done` when the follower fails before it attached. */
function following(start: (attach: () => void) => Promise<FollowResult>): Following {
  let attach!: () => void;
  let notAttached!: (err: unknown) => void;
  const attached = new Promise<void>((resolve, reject) => {
    attach = resolve;
    notAttached = reject;
  });
  const done = start(attach);
  done.catch(notAttached);
  return { attached, done };
}

/**
 * A follower that reads the response's bytes itself and splits events at `\n\n` without scanning a byte twice:
 * what is measured is the coordinator, so the reader costs no more than a browser's native EventSource would.
 */
function followLean(url: string, token: string, onEnded: () => void): Following {
  return following(
    (attach) =>
      new Promise<FollowResult>((resolve, fail) => {
        const reader = new LogReader();
        let attachedAt = NaN;
        let final: Record<string, unknown> | null = null;
        let events = 0;
        let told = false;
        const req = request(
          url,
          { headers: { authorization: `Bearer ${token}`, accept: 'text/event-stream' }, agent: false },
          (res) => {
            if (res.statusCode !== 200) {
              fail(new Error(`GET ${url}: ${res.statusCode}`));
              res.resume();
              return;
            }
            attachedAt = now();
            attach();
            let parts: Buffer[] = [];
            let lastByte = -1;
            res.on('data', (chunk: Buffer) => {
              const at = now();
              let from = 0;
              for (;;) {
                let end = chunk.indexOf('\n\n', from);
                let skip = 2;
                if (from === 0 && lastByte === 10 && chunk[0] === 10) {
                  end = 0;
                  skip = 1;
                }
                if (end < 0) break;
                parts.push(chunk.subarray(from, end));
                const block = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
                parts = [];
                lastByte = -1;
                from = end + skip;
                const e = parseBlock(block.toString('utf8'));
                if (e === undefined) continue;
                events++;
                if (e.event === 'log') {
                  reader.feed(JSON.parse(e.data) as string, at);
                  if (!told && reader.ended) {
                    told = true;
                    onEnded();
                  }
                } else if (e.event === 'end') final = JSON.parse(e.data) as Record<string, unknown>;
                else if (e.event === 'error') fail(new Error(`the coordinator ended the log: ${e.data}`));
              }
              if (from < chunk.length) {
                parts.push(chunk.subarray(from));
                lastByte = chunk[chunk.length - 1]!;
              }
            });
            res.on('end', () => resolve({ ...reader.result(now()), attachedAt, final, events }));
            res.on('error', fail);
          },
        );
        req.on('error', fail);
        req.end();
      }),
  );
}

/** A follower on the project's own client code (`fetch` and common/sse.ts), as `ekaci logs --follow` reads. */
function followEkaci(url: string, token: string, onEnded: () => void): Following {
  return following(async (attach) => {
    const response = await fetch(url, { headers: { authorization: `Bearer ${token}`, accept: 'text/event-stream' } });
    if (response.status !== 200) throw new Error(`GET ${url}: ${response.status}`);
    const attachedAt = now();
    attach();
    const reader = new LogReader();
    let final: Record<string, unknown> | null = null;
    let events = 0;
    let told = false;
    for await (const e of sseEvents(response)) {
      events++;
      if (e.event === 'log') {
        reader.feed(JSON.parse(e.data) as string, now());
        if (!told && reader.ended) {
          told = true;
          onEnded();
        }
      } else if (e.event === 'end') final = JSON.parse(e.data) as Record<string, unknown>;
      else if (e.event === 'error') throw new Error(`the coordinator ended the log: ${e.data}`);
    }
    return { ...reader.result(now()), attachedAt, final, events };
  });
}

/** One event block (its lines without the blank line); undefined for a comment or `retry:` alone. */
function parseBlock(block: string): { event: string; data: string } | undefined {
  let event = 'message';
  const data: string[] = [];
  for (const line of block.split('\n')) {
    if (line.startsWith('data: ')) data.push(line.slice(6));
    else if (line.startsWith('event: ')) event = line.slice(7);
  }
  return data.length === 0 ? undefined : { event, data: data.join('\n') };
}

/** Runs a program and reads its standard output through a pipe. */
function readProcess(
  command: string,
  args: string[],
  env: Record<string, string>,
  cwd?: string,
): Promise<SpawnedResult> {
  return new Promise((resolve, reject) => {
    const reader = new LogReader();
    const decoder = new TextDecoder('utf-8');
    const spawnedAt = now();
    const child = spawn(command, args, { env, cwd, stdio: ['ignore', 'pipe', 'inherit'] });
    child.stdout.on('data', (chunk: Buffer) => reader.feed(decoder.decode(chunk, { stream: true }), now()));
    child.on('error', reject);
    child.on('close', (exitCode) => resolve({ ...reader.result(now()), spawnedAt, exitCode }));
  });
}

/**
 * How far apart this process's clock and the builder's (`date +%s%N`, the same kernel) were seen: the smallest
 * distance from `date`'s answer to the window of this process's clock around it, which is 0 when they agree.
 */
function clockSkew(): number {
  let best = Infinity;
  for (let i = 0; i < CLOCK_PROBES; i++) {
    const before = now();
    const out = spawnSync('/bin/date', ['+%s%N'], { encoding: 'utf8' }).stdout.trim();
    const after = now();
    const theirs = nsToMs(out);
    const skew = theirs < before ? before - theirs : theirs > after ? theirs - after : 0;
    best = Math.min(best, skew);
  }
  return best;
}
