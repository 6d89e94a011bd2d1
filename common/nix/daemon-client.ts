import {
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { IllegalStateError, NixCommandError } from '../errors.js';
import { type DaemonTransport, SocketTransport, StdioTransport } from './daemon-transport.js';
import type { Derivation } from './derivation.js';
import {
  BUILD_MODE_NORMAL,
  BUILD_RESULT_BUILD_FAILURES,
  BUILD_RESULT_SUCCESSES,
  BUILD_RESULT_TIMED_OUT,
  CLIENT_PROTOCOL_VERSION,
  LVL_ERROR,
  MIN_DAEMON_PROTOCOL_VERSION,
  Op,
  PROTOCOL_WITH_BUILD_TIMES,
  PROTOCOL_WITH_BUILT_OUTPUTS,
  PROTOCOL_WITH_NIX_VERSION,
  WORKER_MAGIC_1,
  WORKER_MAGIC_2,
  WireReader,
  WireWriter,
  exitStatusFromMessages,
  protocolMajor,
  readNar,
  readStderr,
  showProtocol,
  stripAnsi,
  type DaemonErrorInfo,
  type StderrHandlers,
} from './worker-protocol.js';

// The daemon answers the greeting within milliseconds; one that has not after this long is stuck (a wrapper that
// never execs, a store lock held elsewhere) and the caller is better off with an error than a hang.
const HANDSHAKE_TIMEOUT_MS = 60_000;
// close() waits this long for the daemon to exit after its stdin closed before it kills it.
const CLOSE_TIMEOUT_MS = 10_000;
// addToStore's frame size: Nix's own client sends its content in frames of this size.
const ADD_FRAME_BYTES = 32 * 1024;

// Nix 2.8 starts its build hook once per wopBuildPaths. The default hook, build-remote, is a whole Nix process
// (≈18 ms, 2/3 of a trivial build) that only answers "decline-permanently" when no remote builders are configured.
// This one gives the same answer at the cost of a shell; it must keep reading, since Nix writes its settings and
// request to the hook after starting it and an early exit fails the build with EPIPE.
const DECLINING_BUILD_HOOK = '#!/bin/sh\necho "# decline-permanently" >&2\nexec cat >/dev/null\n';

export interface DaemonOptions {
  /** `--option NAME VALUE` pairs for the daemon: global for the connection, unlike setOptions' per-call values. */
  nixOptions?: Record<string, string>;
  env?: NodeJS.ProcessEnv;
  /** The program to run with `--stdio --option …` appended; a wrapper must exec nix-daemon in place. */
  command?: string;
  /**
   * Let Nix hand builds to the remote builders of its `builders` setting. Off by default: the build hook is then
   * replaced by one that declines at once (see DECLINING_BUILD_HOOK), a 3× speed-up for trivial builds. That
   * hook is a script under os.tmpdir(): a `command` that hides the directory from the daemon must allow remote
   * builds or set `build-hook` itself. A `build-hook` in nixOptions wins over both.
   */
  remoteBuilds?: boolean;
}

export interface BuildOptions {
  /** Seconds without output before Nix kills a build (101); 0 = never. */
  maxSilentTime?: number;
  /** Seconds a build may run in total (101); 0 = unlimited. Sent as the `timeout` setting. */
  buildTimeout?: number;
  /** NIX_BUILD_CORES for builders; 0 = all. */
  buildCores?: number;
  maxBuildJobs?: number;
  useSubstitutes?: boolean;
  keepGoing?: boolean;
  /** Any other nix.conf setting (a daemon applies restricted ones only for a trusted user; see `ignored`). */
  overrides?: Record<string, string>;
  /** Messages at this level and below come back: errors only by default; debug to hear what was ignored. */
  verbosity?: number;
}

/**
 * Where a build's output goes. A function gets it line by line as text: the builder's output, Nix's messages and its
 * "building …" and "copying …" activity. An object's `bytes` gets the same as bytes, whole lines each ending in
 * `\n`, the builder's output as many lines at once as arrived together: what a consumer of long logs uses. A
 * promise returned by either holds the connection's reading until it settles.
 */
export type BuildLogListener = ((line: string) => unknown) | { bytes: (lines: Buffer) => unknown };

export type BuildOutcome = { ok: true } | { ok: false; status: number; message: string };

export interface PathInfo {
  /** The `.drv` that produced the path, or '' when unknown. */
  deriver: string;
  /** SHA-256 of the path's NAR in lowercase hex, without an algorithm prefix (as the daemon sends it). */
  narHash: string;
  references: string[];
  /** Seconds since the epoch. */
  registrationTime: number;
  narSize: number;
  /** Built on this machine rather than substituted or copied in. */
  ultimate: boolean;
  sigs: string[];
  /** Content address (`fixed:…`, `text:…`) or ''. */
  ca: string;
}

/**
 * opening → ready ⇄ busy; ready → closing → closed (close()); any → closed (kill(), or the daemon died).
 * An operation starts only in `ready`; a second call while one runs throws IllegalStateError.
 */
export type DaemonState = 'opening' | 'ready' | 'busy' | 'closing' | 'closed';

/**
 * One long-lived connection to a Nix daemon (see DaemonTransport): a `nix-daemon --stdio` of the agent's own,
 * trusted and working directly on a single-user store, or the host's daemon socket on a multi-user host. A build
 * costs a request rather than a Nix start-up.
 *
 * Failures: a build that fails resolves `{ ok: false }`; an error the daemon reports for any other operation
 * rejects with NixCommandError and leaves the connection ready; a daemon that dies or breaks the protocol rejects
 * the pending call with NixCommandError (quoting its stderr) and leaves the connection closed.
 *
 * Cancelling a build is interrupt() then kill() (see DaemonTransport for what each does on each transport).
 */
export class NixDaemonConnection {
  private state: DaemonState = 'opening';
  private currentOp: string | undefined;
  private readonly reader: WireReader;
  private readonly exited: Promise<void>;
  /** Errors the daemon reported with STDERR_ERROR: the connection is still in step after them. */
  private readonly reportedErrors = new WeakSet<Error>();
  /** Messages the daemon sent with setOptions: a daemon ignores restricted settings of an untrusted user. */
  private ignoredSettings: string[] = [];
  /** The last wopSetOptions request the daemon accepted on this connection. */
  private optionsSet: Buffer | undefined;
  private protocolVersion = 0;
  private closedBy: Error | undefined;
  private nixVersionText = '';

  private constructor(private readonly transport: DaemonTransport) {
    this.reader = new WireReader({ pause: () => transport.pause(), resume: () => transport.resume() });
    transport.onData((chunk: Buffer) => this.reader.push(chunk));
    this.exited = transport.closed.then((error: NixCommandError) => {
      const during = this.state === 'closing' ? 'after close()' : `during ${this.describeState()}`;
      this.gone(new NixCommandError(`${error.message} (${during})`, error.exitCode, error.stderr));
    });
  }

  /** Spawns `nix-daemon --stdio` (single-user stores) and completes the handshake. */
  static async open(options: DaemonOptions = {}): Promise<NixDaemonConnection> {
    const command = options.command ?? 'nix-daemon';
    const nixOptions = {
      ...(options.remoteBuilds ? {} : { 'build-hook': decliningBuildHook() }),
      ...options.nixOptions,
    };
    return NixDaemonConnection.handshaken(StdioTransport.spawn(command, nixOptions, options.env ?? process.env));
  }

  /**
   * Connects to the daemon socket of a multi-user host and completes the handshake. The host's configuration
   * decides the build hook, sandbox and features; a user not in `trusted-users` cannot change them.
   */
  static connect(socketPath: string): Promise<NixDaemonConnection> {
    return NixDaemonConnection.handshaken(SocketTransport.connect(socketPath));
  }

  private static async handshaken(transport: DaemonTransport): Promise<NixDaemonConnection> {
    const connection = new NixDaemonConnection(transport);
    const timer = setTimeout(
      () => connection.terminate(`no handshake from ${transport.name} within ${HANDSHAKE_TIMEOUT_MS / 1000} s`),
      HANDSHAKE_TIMEOUT_MS,
    );
    try {
      await connection.handshake();
    } catch (error) {
      connection.kill();
      throw error;
    } finally {
      clearTimeout(timer);
    }
    return connection;
  }

  get pid(): number | undefined {
    return this.transport.pid;
  }

  /** What the daemon said it ignored in the last setOptions (restricted settings of an untrusted user). */
  get ignored(): readonly string[] {
    return this.ignoredSettings;
  }

  get status(): DaemonState {
    return this.state;
  }

  /** The protocol version both sides speak, e.g. 0x122 for 1.34. */
  get protocol(): number {
    return this.protocolVersion;
  }

  /** The daemon's Nix version ("2.8.0"); '' before protocol 1.33. */
  get nixVersion(): string {
    return this.nixVersionText;
  }

  /**
   * wopSetOptions. Every field is sent, so one left out returns to its default rather than keeping an old value. The
   * daemon keeps them for the connection: the same options as last time are not sent again (a round trip per build
   * of a pooled connection).
   */
  setOptions(o: BuildOptions = {}): Promise<void> {
    return this.run('setOptions', async () => {
      const overrides = { timeout: String(o.buildTimeout ?? 0), ...o.overrides };
      const w = new WireWriter()
        .u64(Op.SetOptions)
        .u64(false) // keepFailed
        .u64(o.keepGoing ?? false)
        .u64(false) // tryFallback
        .u64(o.verbosity ?? LVL_ERROR) // verbosity of STDERR_NEXT messages; build output comes as results
        .u64(o.maxBuildJobs ?? 1)
        .u64(o.maxSilentTime ?? 0)
        .u64(true) // obsolete useBuildHook
        .u64(LVL_ERROR) // verboseBuild
        .u64(0) // obsolete logType
        .u64(0) // obsolete printBuildTrace
        .u64(o.buildCores ?? availableParallelism())
        .u64(o.useSubstitutes ?? true)
        .u64(Object.keys(overrides).length);
      for (const [name, value] of Object.entries(overrides)) w.string(name).string(value);
      const request = w.bytes();
      if (this.optionsSet?.equals(request)) return;
      this.optionsSet = undefined;
      const messages: string[] = [];
      this.send(request);
      const failure = await readStderr(this.reader, { onMessage: (text) => messages.push(text) });
      if (failure) throw this.reported(failureText(failure));
      this.ignoredSettings = messages.filter((m) =>
        /ignoring (the client-specified setting|untrusted substituter)/.test(m),
      );
      this.optionsSet = request;
    });
  }

  /**
   * wopBuildPaths of derived paths such as `/nix/store/…drv!*` or `/nix/store/…drv!out`. Build log lines and
   * the daemon's messages go to `onLog` as they arrive; it must not throw (that would end the connection). While a
   * promise it returned is pending, nothing more is read from the daemon, which then stops the build's output.
   */
  buildPaths(paths: string[], onLog?: BuildLogListener): Promise<BuildOutcome> {
    return this.run('buildPaths', async () => {
      const { messages, handlers } = buildLogHandlers(onLog);
      this.send(new WireWriter().u64(Op.BuildPaths).strings(paths).u64(BUILD_MODE_NORMAL).bytes());
      const failure = await readStderr(this.reader, handlers);
      if (failure) {
        const message = failureText(failure);
        return { ok: false, status: exitStatusFromMessages([message, ...messages]), message };
      }
      await this.reader.u64(); // always 1
      return { ok: true };
    });
  }

  /**
   * wopBuildDerivation: builds `drv`, a derivation without input derivations (a BasicDerivation: its inputs are all
   * in `inputSrcs`), under the name `drvPath`, which need not be valid in the store. The daemon substitutes missing
   * inputs itself, but never a `.drv`. Logs as for buildPaths. A daemon allows it only to trusted users (for an
   * input-addressed derivation): it refuses others with a reported NixCommandError that names the privilege.
   */
  buildDerivation(drvPath: string, drv: Derivation, onLog?: BuildLogListener): Promise<BuildOutcome> {
    return this.run('buildDerivation', async () => {
      const { messages, handlers } = buildLogHandlers(onLog);
      const w = new WireWriter().u64(Op.BuildDerivation).string(drvPath);
      const outputs = Object.entries(drv.outputs).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
      w.u64(outputs.length);
      for (const [name, o] of outputs) w.string(name).string(o.path).string(o.hashAlgo).string(o.hash);
      w.strings([...new Set(drv.inputSrcs)].sort())
        .string(drv.system)
        .string(drv.builder)
        .strings(drv.args);
      const env = Object.entries(drv.env);
      w.u64(env.length);
      for (const [name, value] of env) w.string(name).string(value);
      this.send(w.u64(BUILD_MODE_NORMAL).bytes());
      const failure = await readStderr(this.reader, handlers);
      if (failure) throw this.reported(failureText(failure));
      const status = await this.reader.u64();
      const errorMsg = stripAnsi(await this.reader.string());
      if (this.protocolVersion >= PROTOCOL_WITH_BUILD_TIMES) {
        for (let i = 0; i < 4; i++) await this.reader.u64(); // timesBuilt, isNonDeterministic, startTime, stopTime
      }
      if (this.protocolVersion >= PROTOCOL_WITH_BUILT_OUTPUTS) {
        const n = await this.reader.u64();
        for (let i = 0; i < 2 * n; i++) await this.reader.string(); // DrvOutput → Realisation JSON
      }
      if (BUILD_RESULT_SUCCESSES.has(status)) return { ok: true };
      let exitStatus = exitStatusFromMessages([errorMsg, ...messages]);
      if (status === BUILD_RESULT_TIMED_OUT) exitStatus = 0x65;
      else if (BUILD_RESULT_BUILD_FAILURES.has(status)) exitStatus = (exitStatus === 1 ? 0x60 : exitStatus) | 0x64;
      return { ok: false, status: exitStatus, message: errorMsg };
    });
  }

  /**
   * wopAddIndirectRoot: `link`, a symlink of the caller's to a store path, becomes a GC root for as long as it
   * exists (the daemon records it under gcroots/auto; deleting the link releases the path). Open to any user of a
   * multi-user daemon, unlike `nix-store --add-root` on a store the caller cannot write.
   */
  addIndirectRoot(link: string): Promise<void> {
    return this.run('addIndirectRoot', async () => {
      await this.exchange(new WireWriter().u64(Op.AddIndirectRoot).string(link).bytes());
      await this.reader.u64(); // always 1
    });
  }

  /** wopQueryPathInfo; undefined when the path is not valid in the store. */
  queryPathInfo(path: string): Promise<PathInfo | undefined> {
    return this.run('queryPathInfo', () => this.pathInfo(path));
  }

  /**
   * wopAddToStore: adds content the daemon names itself, from the content and `method` (`text:sha256` with `content`
   * the file's bytes; `fixed:r:sha256` with `content` a NAR; `fixed:<algo>` with the flat file's bytes): the store
   * path the daemon made it. The daemon computes the path, so content that is not what its caller thought cannot
   * take another path's name. References are allowed for the text method only. The content is sent as it comes,
   * waiting while the daemon reads: a source tree of any size passes through bounded memory.
   */
  addToStore(name: string, method: string, references: readonly string[], content: Iterable<Buffer>): Promise<string> {
    return this.run('addToStore', async () => {
      this.send(new WireWriter().u64(Op.AddToStore).string(name).string(method).strings(references).u64(false).bytes());
      // The content follows as frames (a length, then that many bytes, unpadded), ended by an empty frame.
      let pending: Buffer[] = [];
      let pendingBytes = 0;
      const flush = async (): Promise<void> => {
        if (pendingBytes === 0) return;
        const frame = Buffer.concat([new WireWriter().u64(pendingBytes).bytes(), ...pending]);
        pending = [];
        pendingBytes = 0;
        if (!this.transport.write(frame)) await this.transport.drained();
      };
      for (const chunk of content) {
        for (let at = 0; at < chunk.length;) {
          const piece = chunk.subarray(at, at + ADD_FRAME_BYTES - pendingBytes);
          pending.push(piece);
          pendingBytes += piece.length;
          at += piece.length;
          if (pendingBytes === ADD_FRAME_BYTES) await flush();
        }
      }
      await flush();
      await this.exchange(new WireWriter().u64(0).bytes());
      const path = await this.reader.string();
      // The rest of the path's info (deriver, NAR hash, references, registration time, size, ultimate, sigs, CA).
      await this.reader.string();
      await this.reader.string();
      await this.reader.strings();
      await this.reader.u64();
      await this.reader.u64();
      await this.reader.u64();
      await this.reader.strings();
      await this.reader.string();
      return path;
    });
  }

  /** wopQueryValidPaths: the subset of `paths` that is valid, after substituting the rest if `substitute`. */
  queryValidPaths(paths: string[], substitute = false): Promise<Set<string>> {
    return this.run('queryValidPaths', async () => {
      await this.exchange(new WireWriter().u64(Op.QueryValidPaths).strings(paths).u64(substitute).bytes());
      return new Set(await this.reader.strings());
    });
  }

  /**
   * wopNarFromPath: the NAR serialisation of a valid path, streamed. The operation starts at the first read and
   * holds the connection until the NAR ends; a consumer that stops early makes it read and discard the rest.
   */
  async *narFromPath(path: string): AsyncGenerator<Buffer> {
    this.claim('narFromPath');
    let frames: AsyncGenerator<Buffer> | undefined;
    let inStep = false;
    try {
      // The daemon would fail an invalid path only after STDERR_LAST, half-way into the reply; asking first keeps
      // the connection in step, and narSize double-checks the framing.
      const info = await this.pathInfo(path);
      if (!info) throw this.reported(`path '${path}' is not valid`);
      await this.exchange(new WireWriter().u64(Op.NarFromPath).string(path).bytes());
      frames = readNar(this.reader);
      let size = 0;
      for (;;) {
        const next = await frames.next();
        if (next.done) break;
        size += next.value.length;
        yield next.value;
      }
      if (info.narSize !== 0 && size !== info.narSize) {
        throw new NixCommandError(`the NAR of ${path} has ${size} bytes, its path info says ${info.narSize}`, null, '');
      }
      inStep = true;
    } catch (error) {
      const settled = this.settle(error);
      inStep = this.reportedErrors.has(settled);
      throw settled;
    } finally {
      // Neither finished nor failed: the consumer stopped early. Read the rest so that the next reply lines up.
      if (!inStep && frames && this.state === 'busy') {
        try {
          while (!(await frames.next()).done);
          inStep = true;
        } catch (error) {
          this.settle(error);
        }
      }
      if (inStep) this.release();
    }
  }

  /** Ends the connection: closes the daemon's stdin and waits for it to exit (killing it after a grace period). */
  async close(): Promise<void> {
    if (this.state === 'closed') return this.exited;
    if (this.state !== 'ready' && this.state !== 'closing') {
      throw new IllegalStateError(`cannot close the nix-daemon connection while it is ${this.describeState()}`);
    }
    if (this.state === 'ready') {
      this.state = 'closing';
      this.transport.end();
      const timer = setTimeout(() => this.kill(), CLOSE_TIMEOUT_MS);
      await this.exited;
      clearTimeout(timer);
    }
    return this.exited;
  }

  /** Asks the running build to stop (see DaemonTransport.interrupt); the connection ends with it or is killed. */
  interrupt(): void {
    if (this.state !== 'closed') this.transport.interrupt();
  }

  /** Ends everything at once: the daemon and its builders, or the connection; a pending call rejects. Any state. */
  kill(): void {
    this.terminate('kill() was called');
  }

  private terminate(reason: string): void {
    if (this.state === 'closed') return;
    const during = this.describeState();
    this.transport.kill();
    this.gone(
      new NixCommandError(
        `${this.transport.name} killed during ${during}: ${reason}`,
        null,
        this.transport.stderrText(),
      ),
    );
  }

  private async handshake(): Promise<void> {
    this.send(new WireWriter().u64(WORKER_MAGIC_1).bytes());
    const magic = await this.reader.u64();
    if (magic !== WORKER_MAGIC_2)
      throw new NixCommandError(
        `${this.transport.name} did not answer as a Nix daemon (magic 0x${magic.toString(16)})`,
        null,
        this.transport.stderrText(),
      );
    const daemonVersion = await this.reader.u64();
    if (
      protocolMajor(daemonVersion) !== protocolMajor(CLIENT_PROTOCOL_VERSION) ||
      daemonVersion < MIN_DAEMON_PROTOCOL_VERSION
    ) {
      throw new NixCommandError(
        `${this.transport.name} speaks worker protocol ${showProtocol(daemonVersion)}; eka-ci speaks ${showProtocol(CLIENT_PROTOCOL_VERSION)} and needs at least ${showProtocol(MIN_DAEMON_PROTOCOL_VERSION)} (Nix ≥ 2.4)`,
        null,
        this.transport.stderrText(),
      );
    }
    this.protocolVersion = Math.min(daemonVersion, CLIENT_PROTOCOL_VERSION);
    this.send(new WireWriter().u64(this.protocolVersion).u64(0).u64(0).bytes());
    if (this.protocolVersion >= PROTOCOL_WITH_NIX_VERSION) this.nixVersionText = await this.reader.string();
    const failure = await readStderr(this.reader);
    if (failure)
      throw new NixCommandError(
        `${this.transport.name} refused the connection: ${failure.message}`,
        null,
        this.transport.stderrText(),
      );
    this.state = 'ready';
  }

  private async pathInfo(path: string): Promise<PathInfo | undefined> {
    await this.exchange(new WireWriter().u64(Op.QueryPathInfo).string(path).bytes());
    if ((await this.reader.u64()) === 0) return undefined;
    return {
      deriver: await this.reader.string(),
      narHash: await this.reader.string(),
      references: await this.reader.strings(),
      registrationTime: await this.reader.u64(),
      narSize: await this.reader.u64(),
      ultimate: (await this.reader.u64()) !== 0,
      sigs: await this.reader.strings(),
      ca: await this.reader.string(),
    };
  }

  /** Sends a request and reads its stderr stream; a reported error is thrown as an in-step NixCommandError. */
  private async exchange(request: Buffer): Promise<void> {
    this.send(request);
    const failure = await readStderr(this.reader);
    if (failure) throw this.reported(failureText(failure));
  }

  private async run<T>(op: string, body: () => Promise<T>): Promise<T> {
    this.claim(op);
    try {
      const result = await body();
      this.release();
      return result;
    } catch (error) {
      const settled = this.settle(error);
      if (this.reportedErrors.has(settled)) this.release();
      throw settled;
    }
  }

  private claim(op: string): void {
    if (this.state !== 'ready') {
      throw new IllegalStateError(`cannot start ${op}: the nix-daemon connection is ${this.describeState()}`);
    }
    this.state = 'busy';
    this.currentOp = op;
  }

  private release(): void {
    if (this.state !== 'busy') return;
    this.state = 'ready';
    this.currentOp = undefined;
  }

  /** An error out of an operation: reported ones keep the connection; anything else ends it. */
  private settle(error: unknown): Error {
    if (error instanceof Error && this.reportedErrors.has(error)) return error;
    this.terminate(error instanceof Error ? error.message : String(error));
    return error instanceof Error ? error : new NixCommandError(String(error), null, '');
  }

  private reported(message: string): NixCommandError {
    const error = new NixCommandError(`nix-daemon: ${this.currentOp ?? 'operation'} failed: ${message}`, null, '');
    this.reportedErrors.add(error);
    return error;
  }

  private send(bytes: Buffer): void {
    this.transport.write(bytes);
  }

  private gone(error: NixCommandError): void {
    if (this.state === 'closed') return;
    this.closedBy = error;
    this.reader.fail(error);
    this.state = 'closed';
  }

  private describeState(): string {
    if (this.state === 'busy') return `busy with ${this.currentOp ?? 'an operation'}`;
    if (this.state === 'closed' && this.closedBy) return `closed (${this.closedBy.message})`;
    return this.state;
  }
}

let decliningHookPath: string | undefined;

/**
 * The declining build hook's path. It lives in one private directory per user so that processes share it and a
 * killed one leaves nothing behind; if that directory is not safely ours, in a fresh one of this process.
 */
function decliningBuildHook(): string {
  if (decliningHookPath !== undefined) return decliningHookPath;
  const uid = process.getuid?.() ?? -1;
  let dir = join(tmpdir(), `ekaci-${uid}`);
  try {
    mkdirSync(dir, { mode: 0o700 });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  }
  const st = lstatSync(dir);
  if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o077) !== 0) {
    dir = mkdtempSync(join(tmpdir(), 'ekaci-'));
    const ownDir = dir;
    process.once('exit', () => rmSync(ownDir, { recursive: true, force: true }));
  }
  const path = join(dir, 'decline-build-hook');
  if (!existsSync(path) || readFileSync(path, 'utf8') !== DECLINING_BUILD_HOOK) {
    // Written aside and renamed, so that a daemon of another process never runs a half-written script.
    const partial = `${path}.${process.pid}`;
    writeFileSync(partial, DECLINING_BUILD_HOOK, { mode: 0o755 });
    renameSync(partial, path);
  }
  decliningHookPath = path;
  return path;
}

function failureText(failure: DaemonErrorInfo): string {
  return [failure.message, ...failure.traces].join('\n');
}

/** Where the host's nix-daemon listens on every multi-user install. */
export const HOST_DAEMON_SOCKET = '/nix/var/nix/daemon-socket/socket';

/**
 * Whether a nix-daemon answers on `socketPath`: a whole handshake, then a clean close (a daemon logs a connection
 * dropped mid-handshake as an error, which would alarm whoever reads the host's logs).
 */
export async function daemonAnswers(socketPath: string): Promise<boolean> {
  if (!existsSync(socketPath)) return false;
  let connection: NixDaemonConnection;
  try {
    connection = await NixDaemonConnection.connect(socketPath);
  } catch {
    return false;
  }
  await connection.close();
  return true;
}

/** How a build's stderr is read: log lines and activity go to the listener, messages too, and are kept for its outcome. */
function buildLogHandlers(listener?: BuildLogListener): { messages: string[]; handlers: StderrHandlers } {
  const messages: string[] = [];
  const text = typeof listener === 'object' ? (line: string) => listener.bytes(Buffer.from(`${line}\n`)) : listener;
  const handlers: StderrHandlers = {
    onBuildLogLine: typeof listener === 'function' ? listener : undefined,
    onBuildLog: typeof listener === 'object' ? (lines) => listener.bytes(lines) : undefined,
    onActivity: text,
    onMessage: (message) => {
      messages.push(message);
      return text?.(message);
    },
  };
  return { messages, handlers };
}
