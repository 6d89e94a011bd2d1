import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import type { AgentMessage, LogChunk } from '../../common/proto/ekaci/agent/v1/agent.js';
import { LogShipper, type LogSink } from './shipper.js';
import { LogSpool } from './spool.js';

let dir: string;
let spool: LogSpool;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-spool-'));
  spool = new LogSpool(dir);
  spool.prepare();
});

afterEach(() => rmSync(dir, { recursive: true, force: true }));

/** A sink that records chunks; the shipper's windowing is what is under test, not the transport. */
class RecordingSink implements LogSink {
  writable = true;
  readonly chunks: LogChunk[] = [];
  send(message: AgentMessage): boolean {
    if (message.msg?.$case === 'logChunk') this.chunks.push(message.msg.value);
    return true;
  }
}

describe('LogSpool', () => {
  it('removes logs and GC roots left by an earlier agent process', () => {
    writeFileSync(join(dir, 'logs', 'old.log'), 'x');
    mkdirSync(join(dir, 'gcroots', 'old'));
    new LogSpool(dir).prepare();
    expect(readdirSync(join(dir, 'logs'))).toEqual([]);
    expect(readdirSync(join(dir, 'gcroots'))).toEqual([]);
  });

  it('writes the netrc for the coordinator host readable by the agent only', () => {
    spool.writeNetrc('coord.example', 'tok');
    expect(readFileSync(spool.netrcPath, 'utf8')).toBe('machine coord.example login ekaci password tok\n');
    expect(statSync(spool.netrcPath).mode & 0o777).toBe(0o600);
  });

  it('keeps a lease id that is not a plain file name inside the spool directory', () => {
    const log = spool.open('../../etc/evil');
    expect(log.path.startsWith(join(dir, 'logs'))).toBe(true);
    expect(spool.gcRoot('a/b', '../out').startsWith(join(dir, 'gcroots'))).toBe(true);
  });
});

describe('LeaseLog', () => {
  it('counts bytes only once they are on disk and reads them back by offset', async () => {
    const log = spool.open('l');
    log.append(Buffer.from('hello '));
    log.append(Buffer.from('world'));
    await log.close();
    expect(log.size).toBe(11);
    expect(readFileSync(log.path, 'utf8')).toBe('hello world');
    expect((await log.read(6, 100)).toString()).toBe('world');
  });

  it('refuses appends after close and deletes its file on remove', async () => {
    const log = spool.open('l');
    await log.close();
    expect(() => log.append(Buffer.from('late'))).toThrow(/cannot append to a closed log/);
    await log.remove();
    expect(existsSync(log.path)).toBe(false);
  });
});

describe('LogShipper', () => {
  it('sends chunks of at most the chunk size and never more than the window beyond the last LogAck', async () => {
    const shipper = new LogShipper(10, silentLogger());
    const sink = new RecordingSink();
    const log = spool.open('l');
    shipper.track('l', log);
    shipper.attach(sink, 25);
    log.append(Buffer.from('0123456789'.repeat(10)));
    await log.close();
    await shipper.whenPumped();
    expect(sink.chunks.map((c) => [c.offset, c.data.length])).toEqual([
      [0, 10],
      [10, 10],
      [20, 5],
    ]);
    shipper.ack('l', 10);
    await shipper.whenPumped();
    expect(sink.chunks.slice(3).map((c) => [c.offset, c.data.length])).toEqual([[25, 10]]);
  });

  it('reports a log complete only when it is closed and every byte is acknowledged', async () => {
    const shipper = new LogShipper(1024, silentLogger());
    const completed: string[] = [];
    shipper.on('complete', (id) => completed.push(id));
    const sink = new RecordingSink();
    const log = spool.open('l');
    shipper.track('l', log);
    shipper.attach(sink, 4096);
    log.append(Buffer.from('abc'));
    await expect.poll(() => sink.chunks.length).toBe(1);
    shipper.ack('l', 3);
    expect(completed).toEqual([]);
    await log.close();
    expect(completed).toEqual(['l']);
    expect(shipper.fullyAcked('l')).toBe(true);
  });

  it('resumes after a reconnect at the offset the coordinator names, without gaps or repeats', async () => {
    const shipper = new LogShipper(4, silentLogger());
    const first = new RecordingSink();
    const log = spool.open('l');
    shipper.track('l', log);
    shipper.attach(first, 8);
    log.append(Buffer.from('abcdefghijkl'));
    await log.close();
    await shipper.whenPumped();
    expect(first.chunks.map((c) => c.offset)).toEqual([0, 4]);
    shipper.detach();
    shipper.resume('l', 6);
    const second = new RecordingSink();
    shipper.attach(second, 8);
    await shipper.whenPumped();
    expect(second.chunks.map((c) => [c.offset, c.data.toString()])).toEqual([
      [6, 'ghij'],
      [10, 'kl'],
    ]);
  });

  it('takes turns between leases so one chatty build cannot starve another', async () => {
    const shipper = new LogShipper(2, silentLogger());
    const sink = new RecordingSink();
    const a = spool.open('a');
    const b = spool.open('b');
    shipper.track('a', a);
    shipper.track('b', b);
    a.append(Buffer.from('aaaaaaaa'));
    b.append(Buffer.from('bbbb'));
    await a.close();
    await b.close();
    shipper.attach(sink, 8);
    await expect.poll(() => sink.chunks.length).toBe(4);
    expect(sink.chunks.map((c) => c.leaseId)).toEqual(['a', 'b', 'a', 'b']);
  });

  it('waits while the stream cannot take more and continues when the shipper is pumped again', async () => {
    const shipper = new LogShipper(4, silentLogger());
    const sink = new RecordingSink();
    sink.writable = false;
    const log = spool.open('l');
    shipper.track('l', log);
    shipper.attach(sink, 100);
    log.append(Buffer.from('12345678'));
    await log.close();
    await shipper.whenPumped();
    expect(sink.chunks).toEqual([]);
    sink.writable = true;
    shipper.pump();
    await shipper.whenPumped();
    expect(Buffer.concat(sink.chunks.map((c) => c.data)).toString()).toBe('12345678');
  });
});
