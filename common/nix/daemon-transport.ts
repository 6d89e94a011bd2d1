import { spawn, type ChildProcessByStdio } from 'node:child_process';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { NixCommandError } from '../errors.js';
import { descendantGroups, signalGroup } from '../process-tree.js';

/**
 * How a NixDaemonConnection reaches a Nix daemon speaking the worker protocol:
 *
 * - `StdioTransport`: a `nix-daemon --stdio` of the agent's own, on a single-user store it owns. The process (and
 *   the builders it starts, each in a session of its own) can be signalled: cancelling is SIGTERM, then SIGKILL, to
 *   every group.
 * - `SocketTransport`: the host's daemon (`/nix/var/nix/daemon-socket/socket`), as every multi-user host — NixOS,
 *   macOS, the upstream installer — runs it. Builds run as build users the agent cannot signal: cancelling closes
 *   the connection, and the daemon stops what it ran for it.
 */
export interface DaemonTransport {
  /** For messages: `nix-daemon --stdio (pid 12)` or `the nix-daemon at /nix/var/nix/daemon-socket/socket`. */
  readonly name: string;
  /** The daemon process whose group holds the builds, when the agent started it. */
  readonly pid: number | undefined;
  onData(listener: (chunk: Buffer) => void): void;
  pause(): void;
  resume(): void;
  /** Queues bytes for the daemon; false when they went over the buffer's limit (wait for `drained`). */
  write(bytes: Buffer): boolean;
  /** Resolves once queued bytes have gone out (or the transport closed). */
  drained(): Promise<void>;
  /** No more requests: the daemon finishes and goes. */
  end(): void;
  /** Asks what runs to stop (SIGTERM to every group; a socket cannot ask, only close). */
  interrupt(): void;
  /** At once: SIGKILL to the daemon and its builders, or the connection closed. */
  kill(): void;
  /** Resolves when the transport is gone, with an error saying how. */
  readonly closed: Promise<NixCommandError>;
  /** The last of the daemon's own stderr (not the protocol's stderr stream); '' for a socket. */
  stderrText(): string;
}

// How much of the daemon's own stderr is kept to explain its death.
const STDERR_TAIL_BYTES = 8 * 1024;
const STDERR_TAIL_LINES = 10;

type DaemonChild = ChildProcessByStdio<Writable, Readable, Readable>;

export class StdioTransport implements DaemonTransport {
  readonly closed: Promise<NixCommandError>;
  private stderrTail = Buffer.alloc(0);
  private ending = false;

  private constructor(
    private readonly child: DaemonChild,
    private readonly command: string,
  ) {
    child.stderr.on('data', (chunk: Buffer) => {
      const joined = Buffer.concat([this.stderrTail, chunk]);
      this.stderrTail = joined.length > STDERR_TAIL_BYTES ? joined.subarray(joined.length - STDERR_TAIL_BYTES) : joined;
    });
    child.stdin.on('error', () => {}); // EPIPE after the daemon died; its exit is reported instead
    this.closed = new Promise((resolve) => {
      child.once('error', (error) => resolve(new NixCommandError(`cannot run ${command}: ${error.message}`, null, '')));
      child.once('close', (code, signal) => resolve(this.deathError(code, signal)));
    });
  }

  /** Spawns `command --stdio` with `--option NAME VALUE` for each of `options`. */
  static spawn(command: string, options: Record<string, string>, env: NodeJS.ProcessEnv): StdioTransport {
    const args = ['--stdio'];
    for (const [name, value] of Object.entries(options)) args.push('--option', name, value);
    // detached: a process group of its own, so a kill reaches whatever the daemon runs inside it.
    const child = spawn(command, args, { env, stdio: 'pipe', detached: true });
    return new StdioTransport(child, command);
  }

  get name(): string {
    return `${this.command} --stdio (pid ${this.child.pid})`;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  onData(listener: (chunk: Buffer) => void): void {
    this.child.stdout.on('data', listener);
  }

  pause(): void {
    this.child.stdout.pause();
  }

  resume(): void {
    this.child.stdout.resume();
  }

  write(bytes: Buffer): boolean {
    return this.child.stdin.write(bytes);
  }

  drained(): Promise<void> {
    return whenDrained(this.child.stdin, this.closed);
  }

  end(): void {
    this.ending = true;
    this.child.stdin.end(); // the daemon exits at end of input
  }

  interrupt(): void {
    this.signalAll('SIGTERM');
  }

  kill(): void {
    this.signalAll('SIGKILL');
  }

  stderrText(): string {
    return this.stderrTail.toString('utf8');
  }

  /** To the daemon's group and every descendant's group: Nix starts each builder in a session of its own. */
  private signalAll(signal: NodeJS.Signals): void {
    const pid = this.child.pid;
    if (pid === undefined) return;
    const builders = descendantGroups(pid);
    signalGroup(pid, signal);
    for (const group of builders) signalGroup(group, signal);
  }

  private deathError(code: number | null, signal: NodeJS.Signals | null): NixCommandError {
    const how = code !== null ? `exited with code ${code}` : `was killed by ${signal ?? 'a signal'}`;
    const tail = this.stderrText().trimEnd().split('\n').slice(-STDERR_TAIL_LINES).join('\n');
    const when = this.ending ? ' after its input ended' : '';
    return new NixCommandError(
      `${this.name} ${how}${when}; ${tail ? `its stderr ends with:\n${tail}` : 'it wrote nothing on stderr'}`,
      code,
      this.stderrText(),
    );
  }
}

export class SocketTransport implements DaemonTransport {
  readonly closed: Promise<NixCommandError>;
  readonly pid = undefined;

  private constructor(
    private readonly socket: Socket,
    private readonly path: string,
  ) {
    this.closed = new Promise((resolve) => {
      let error: Error | undefined;
      socket.on('error', (e) => (error = e));
      socket.once('close', () =>
        resolve(
          new NixCommandError(`${this.name} closed the connection${error ? `: ${error.message}` : ''}`, null, ''),
        ),
      );
    });
  }

  /** Connects to the daemon listening at `path`. */
  static connect(path: string): SocketTransport {
    return new SocketTransport(connect(path), path);
  }

  get name(): string {
    return `the nix-daemon at ${this.path}`;
  }

  onData(listener: (chunk: Buffer) => void): void {
    this.socket.on('data', listener);
  }

  pause(): void {
    this.socket.pause();
  }

  resume(): void {
    this.socket.resume();
  }

  write(bytes: Buffer): boolean {
    return this.socket.write(bytes);
  }

  drained(): Promise<void> {
    return whenDrained(this.socket, this.closed);
  }

  end(): void {
    this.socket.end();
  }

  // The daemon notices the closed connection and stops the builds it ran for it.
  interrupt(): void {
    this.socket.destroy();
  }

  kill(): void {
    this.socket.destroy();
  }

  stderrText(): string {
    return '';
  }
}

/** Resolves when `stream` has written what it queued, or when the transport closed (its writes are then void). */
function whenDrained(stream: Writable, closed: Promise<unknown>): Promise<void> {
  if (!stream.writableNeedDrain) return Promise.resolve();
  // A stream that fails instead closes the transport, which `closed` reports.
  const drain = once(stream, 'drain').then(
    () => undefined,
    () => undefined,
  );
  return Promise.race([drain, closed.then(() => undefined)]);
}
