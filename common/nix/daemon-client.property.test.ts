import { mkdtempSync, rmSync } from 'node:fs';
import { type Server, type Socket, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mutateBytes, mutations, resolvesOrFailsWith } from '../../test/support/fuzz.js';
import { NixCommandError } from '../errors.js';
import { NixDaemonConnection, type PathInfo } from './daemon-client.js';
import {
  CLIENT_PROTOCOL_VERSION,
  MIN_DAEMON_PROTOCOL_VERSION,
  PROTOCOL_WITH_NIX_VERSION,
  Stderr,
  WORKER_MAGIC_2,
  WireWriter,
} from './worker-protocol.js';

const RUNS = 60;
const PATH = '/nix/store/00000000000000000000000000000000-fuzz';
/** What the client sends before its first operation: WORKER_MAGIC_1, then its version, 0 and 0. */
const HANDSHAKE_BYTES = 32;
const QUERY_PATH_INFO_BYTES = new WireWriter().u64(0).string(PATH).bytes().length;

/**
 * A stand-in daemon on a real Unix socket. For each connection it sends `handshake` at once, and `reply` once the
 * client has sent `replyAfter` bytes; then it hangs up, so a client waiting for more bytes learns the daemon is gone.
 */
let dir: string;
let server: Server;
const sockets = new Set<Socket>();
let script: { handshake: Buffer; reply?: Buffer; replyAfter?: number } = { handshake: Buffer.alloc(0) };

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-daemon-fuzz-'));
  server = createServer((socket: Socket) => {
    const { handshake, reply, replyAfter = 0 } = script;
    sockets.add(socket.on('close', () => sockets.delete(socket)));
    socket.on('error', () => {});
    socket.write(handshake);
    if (reply === undefined) return void socket.end();
    let received = 0;
    socket.on('data', (chunk: Buffer) => {
      received += chunk.length;
      if (received >= replyAfter && !socket.writableEnded) socket.end(reply);
    });
  });
  await new Promise<void>((resolve) => server.listen(join(dir, 'socket'), resolve));
});

afterAll(async () => {
  for (const socket of sockets) socket.destroy();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  rmSync(dir, { recursive: true, force: true });
});

const socketPath = (): string => join(dir, 'socket');

function handshake(version: number, nixVersion: string): Buffer {
  const w = new WireWriter().u64(WORKER_MAGIC_2).u64(version);
  if (Math.min(version, CLIENT_PROTOCOL_VERSION) >= PROTOCOL_WITH_NIX_VERSION) w.string(nixVersion);
  return w.u64(Stderr.Last).bytes();
}

const supported = fc.integer({ min: MIN_DAEMON_PROTOCOL_VERSION, max: 0x1ff });
const nixVersion = fc.stringMatching(/^2\.\d{1,2}\.\d{1,2}$/);

/** Connects; a connection that opens is closed at once. Returns it, or the NixCommandError it failed with. */
async function connect(): Promise<NixDaemonConnection | Error> {
  const result = await resolvesOrFailsWith(NixCommandError, () => NixDaemonConnection.connect(socketPath()));
  if (!(result instanceof Error)) result.kill();
  return result;
}

describe('NixDaemonConnection handshake with any daemon', () => {
  it('agrees on the lower of the two protocol versions with every daemon from 1.30 up', async () => {
    await fc.assert(
      fc.asyncProperty(supported, nixVersion, async (version, nix) => {
        script = { handshake: handshake(version, nix) };
        const connection = await connect();
        expect(connection).toBeInstanceOf(NixDaemonConnection);
        const c = connection as NixDaemonConnection;
        expect(c.protocol).toBe(Math.min(version, CLIENT_PROTOCOL_VERSION));
        expect(c.nixVersion).toBe(c.protocol >= PROTOCOL_WITH_NIX_VERSION ? nix : '');
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses every other version with a NixCommandError naming it', async () => {
    const version = fc
      .oneof(
        fc.nat(0xffff),
        fc.maxSafeNat(),
        fc.integer({ min: 1, max: 2 ** 21 - 1 }).map((hi) => hi * 2 ** 32 + 0x122),
      )
      .filter((v) => v < MIN_DAEMON_PROTOCOL_VERSION || v > 0x1ff);
    await fc.assert(
      fc.asyncProperty(version, async (v) => {
        script = { handshake: handshake(v, '2.8.0') };
        const err = await connect();
        expect(err).toBeInstanceOf(NixCommandError);
        expect((err as Error).message).toMatch(/speaks worker protocol \d+\.\d+; eka-ci speaks 1\.34/);
      }),
      // 1.34 in the low bits of a version that does not fit 32 bits once passed for 1.34.
      { numRuns: RUNS, examples: [[2 ** 32 + 0x122], [2 ** 40 + 0x11e]] },
    );
  });

  it('opens or fails with a NixCommandError whatever the daemon answers, never another exception or a hang', async () => {
    const answer = fc.oneof(
      fc.tuple(supported, nixVersion, mutations()).map(([v, n, ms]) => mutateBytes(handshake(v, n), ms)),
      fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)),
    );
    await fc.assert(
      fc.asyncProperty(answer, async (bytes) => {
        script = { handshake: bytes };
        await connect();
      }),
      { numRuns: RUNS },
    );
  });
});

describe('NixDaemonConnection.queryPathInfo with any reply', () => {
  const info: fc.Arbitrary<PathInfo> = fc.record({
    deriver: fc.string({ maxLength: 30 }),
    narHash: fc.stringMatching(/^[0-9a-f]{64}$/),
    references: fc.array(fc.string({ maxLength: 30 }), { maxLength: 3 }),
    registrationTime: fc.maxSafeNat(),
    narSize: fc.maxSafeNat(),
    ultimate: fc.boolean(),
    sigs: fc.array(fc.string({ maxLength: 30 }), { maxLength: 3 }),
    ca: fc.string({ maxLength: 30 }),
  });

  /** STDERR_LAST, then the reply of protocol 1.34: valid, and the path's info when it is valid. */
  function reply(i: PathInfo | undefined): Buffer {
    const w = new WireWriter().u64(Stderr.Last);
    if (i === undefined) return w.u64(0).bytes();
    w.u64(1).string(i.deriver).string(i.narHash).strings(i.references).u64(i.registrationTime).u64(i.narSize);
    return w.u64(i.ultimate).strings(i.sigs).string(i.ca).bytes();
  }

  const serve = (r: Buffer): void => {
    script = { handshake: handshake(CLIENT_PROTOCOL_VERSION, '2.8.0'), reply: r };
    script.replyAfter = HANDSHAKE_BYTES + QUERY_PATH_INFO_BYTES;
  };

  async function query(): Promise<PathInfo | undefined | Error> {
    const c = await NixDaemonConnection.connect(socketPath());
    try {
      return await resolvesOrFailsWith(NixCommandError, () => c.queryPathInfo(PATH));
    } finally {
      c.kill();
    }
  }

  it('reads every path info the daemon sends', async () => {
    await fc.assert(
      fc.asyncProperty(fc.option(info, { nil: undefined }), async (i) => {
        serve(reply(i));
        expect(await query()).toEqual(i);
      }),
      { numRuns: RUNS },
    );
  });

  it('resolves or fails with a NixCommandError whatever the reply holds', async () => {
    await fc.assert(
      fc.asyncProperty(fc.option(info, { nil: undefined }), mutations(), async (i, ms) => {
        serve(mutateBytes(reply(i), ms));
        await query();
      }),
      { numRuns: RUNS },
    );
  });
});
