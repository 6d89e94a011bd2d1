import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EvaluationError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { PLATFORM } from '../../common/platform.js';
import { sleep } from '../../common/backoff.js';

// The daemon binds its socket within milliseconds; one that has not after this long will not.
const START_TIMEOUT_MS = 15_000;
const POLL_MS = 20;

/**
 * A `nix-daemon` of the coordinator's own, serving a single-user store (the coordinator's user owns `/nix`) on a
 * socket in a private directory. Sandboxed evaluators see the store read-only and write `.drv` files through this
 * socket, as they would through the system daemon of a multi-user host. It runs with an environment of its own,
 * never the coordinator's.
 *
 * States: `running` → `stopped`. A daemon that died is noticed by `alive` and replaced by the owner.
 */
export class PrivateNixDaemon {
  private stopped = false;

  private constructor(
    private readonly child: ChildProcess,
    private readonly dir: string,
    readonly socketPath: string,
  ) {}

  static async start(logger: Logger): Promise<PrivateNixDaemon> {
    // Short and private: a unix socket path is limited to 108 bytes, and only this user may connect.
    const dir = mkdtempSync(join(tmpdir(), 'ekaci-nixd-'));
    const socketPath = join(dir, 'socket');
    const env: Record<string, string> = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir };
    env.NIX_DAEMON_SOCKET_PATH = socketPath;
    // A test or a host may move the store or its configuration; nothing else of the caller's environment passes.
    for (const name of ['NIX_CONF_DIR', 'NIX_STORE_DIR', 'NIX_STATE_DIR', 'NIX_LOG_DIR']) {
      const value = process.env[name];
      if (value !== undefined) env[name] = value;
    }
    // `store = local`: with the default `auto`, a daemon whose store is not yet created (an empty /nix) would open
    // its own socket as its store and connect to itself, forking without end.
    const args = ['nix-daemon', '--option', 'store', 'local', '--option', 'substituters', ''];
    // The daemon must not outlive a coordinator that is killed: on Linux the kernel signals it (PR_SET_PDEATHSIG).
    const wrapped = PLATFORM === 'linux' && hasSetpriv() ? ['setpriv', '--pdeathsig', 'TERM', ...args] : args;
    const child = spawn(wrapped[0]!, wrapped.slice(1), { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (s: string) => (stderr = (stderr + s).slice(-4096)));
    const failed = new Promise<string>((resolve) => {
      child.once('error', (e) => resolve(e.message));
      child.once('exit', (code, signal) => resolve(`exited (${signal ?? `code ${code}`}): ${stderr.trim()}`));
    });
    const daemon = new PrivateNixDaemon(child, dir, socketPath);
    const started = Date.now();
    for (;;) {
      if (await canConnect(socketPath)) break;
      const why = await Promise.race([failed, sleep(POLL_MS).then(() => undefined)]);
      if (why !== undefined || Date.now() - started > START_TIMEOUT_MS) {
        daemon.stop();
        throw new EvaluationError(`cannot start a nix-daemon for sandboxed evaluation: ${why ?? 'no socket'}`);
      }
    }
    logger.debug({ pid: child.pid, socketPath }, 'private nix-daemon for evaluation started');
    child.once('exit', (code, signal) => {
      if (!daemon.stopped) logger.warn({ code, signal, stderr }, 'private nix-daemon for evaluation exited');
    });
    return daemon;
  }

  get alive(): boolean {
    return !this.stopped && this.child.exitCode === null && this.child.signalCode === null;
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    // The daemon forks a process per connection; they end when their clients (the evaluators) do.
    this.child.kill('SIGTERM');
    rmSync(this.dir, { recursive: true, force: true });
  }
}

let setpriv: boolean | undefined;

function hasSetpriv(): boolean {
  setpriv ??= spawnSync('setpriv', ['--help'], { stdio: 'ignore' }).status === 0;
  return setpriv;
}

function canConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
