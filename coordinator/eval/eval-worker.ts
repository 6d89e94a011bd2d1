import { type ChildProcessByStdio, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { processTreeRssMiB } from '../../common/platform.js';
import type { NixLauncher } from './eval-environment.js';

/**
 * What one request to the evaluator answered: the value it printed, or the error text Nix wrote instead; and, in
 * either case, the `builtins.trace` messages evaluation printed before it ended, in order.
 */
export type ReplReply = ({ ok: true; value: string } | { ok: false; error: string }) & { traces: string[] };

// While a request runs, the stderr file is looked at this often for progress (results) and a time-out. It is
// not read after every write: a reader woken for each trace competes for the CPU with the evaluator and its
// nix-daemon, and slowed evaluation through the daemon by half on two cores.
const PROGRESS_POLL_MS = 1_000;

/**
 * A long-lived `nix repl` process. Nix 2.8's repl prints an evaluation error (even an `abort` or a type error,
 * which end a `nix-instantiate` run) and carries on with everything it has loaded, so the package set is imported
 * once per worker rather than once per chunk.
 *
 * Protocol: each request is one line of Nix on stdin. It is followed by `builtins.trace "S" "S"` with a
 * per-request sentinel S, which prints `trace: S` on stderr and then `"S"` on stdout; everything before those two
 * markers is the request's reply. Values are printed as repl-quoted strings (requests wrap their value in
 * `builtins.toJSON`), an error leaves stdout without a value and its text on stderr. stderr goes to a file of the
 * worker's own (appended to, emptied after each request) that is read when the request ends.
 *
 * States: `starting` → `ready` ⇄ `busy` → `dead`. A request on a dead worker resolves to an error; the owner
 * replaces a dead worker with a new one (`EvalWorker.start`).
 */
export class EvalWorker {
  private state: 'starting' | 'ready' | 'busy' | 'dead' = 'starting';
  private stdout = '';
  private seq = 0;
  /** Secret to this worker: marks its sentinels and results so that nothing an expression prints can pass for one. */
  readonly nonce = randomBytes(16).toString('hex');
  private wake: (() => void) | undefined;
  private exitReason = '';
  /** Whether `__ekaciSentinel` is bound: requests end with a call of it rather than the whole sentinel. */
  private shortSentinel = false;

  private constructor(
    private readonly child: ChildProcessByStdio<Writable, Readable, null>,
    private readonly stderrDir: string,
    private readonly stderrFd: number,
  ) {
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (s: string) => {
      this.stdout += s;
      this.wake?.();
    });
    child.stdin.on('error', () => undefined); // EPIPE after the process died; seen as `dead` below.
    child.on('exit', (code, signal) => {
      this.exitReason ||= `nix repl exited (${signal ?? `code ${code}`})`;
      this.die();
    });
    child.on('error', (e) => {
      this.exitReason ||= `nix repl could not run: ${e.message}`;
      this.die();
    });
  }

  /**
   * Starts a repl through `launcher` (sandboxed, restricted; see EvalEnvironment) and runs the lines `setup` makes
   * from the worker's nonce (the evaluator's helpers); rejects if setup fails.
   */
  static async start(
    setup: (nonce: string) => readonly string[],
    launcher: NixLauncher,
    extraRoots: readonly string[] = [],
  ): Promise<EvalWorker> {
    const c = launcher.command('nix', ['repl'], { roots: extraRoots });
    const dir = mkdtempSync(join(tmpdir(), 'ekaci-eval-worker-'));
    // O_APPEND: after the file is emptied, Nix's next write lands at its start again.
    const fd = openSync(join(dir, 'stderr'), 'a+');
    const child = spawn(c.file, c.args, { env: c.env, stdio: ['pipe', 'pipe', fd] }) as ChildProcessByStdio<
      Writable,
      Readable,
      null
    >;
    const worker = new EvalWorker(child, dir, fd);
    worker.state = 'ready';
    // The sentinel as a binding of the repl's own (out of reach of any file it imports), so that each request after
    // this one ends with a line of a few characters (see `request`).
    const sentinel = await worker.request(
      `__ekaciSentinel = n: let s = "__ekaci_${worker.nonce}_" + toString n; in builtins.trace s s`,
    );
    if (!sentinel.ok && sentinel.error !== '') {
      worker.kill();
      throw new Error(sentinel.error);
    }
    worker.shortSentinel = true;
    for (const line of setup(worker.nonce)) {
      const r = await worker.request(line);
      if (!r.ok && r.error !== '') {
        worker.kill();
        throw new Error(r.error);
      }
    }
    return worker;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get alive(): boolean {
    return this.state !== 'dead';
  }

  /** Resident memory of the repl (and the sandbox around it) in MiB; 0 when unknown. */
  rssMiB(): number {
    return this.child.pid === undefined ? 0 : processTreeRssMiB(this.child.pid);
  }

  /**
   * Sends one line of Nix and waits for its reply. `idleTimeoutMs` bounds an evaluation that never ends: when it
   * passes without a new line starting with `progress` on stderr (a result), the process is killed and the request
   * answers with an error. It is thus a limit per attribute, not per request (measured to PROGRESS_POLL_MS).
   */
  async request(line: string, idleTimeoutMs = 0, progress?: string): Promise<ReplReply> {
    if (this.state === 'dead') return { ok: false, error: this.exitReason, traces: [] };
    if (this.state === 'busy') throw new Error('EvalWorker.request while a request is in flight');
    if (line.includes('\n')) throw new Error('EvalWorker.request takes one line of Nix');
    this.state = 'busy';
    const sentinel = `__ekaci_${this.nonce}_${++this.seq}`;
    // On a line of its own: the echoed request line also contains the quoted sentinel.
    const outMark = `\n"${sentinel}"\n`;
    const errMark = `trace: ${sentinel}\n`;
    // The repl reads its input a character at a time, three system calls each: the shorter a line, the cheaper.
    const end = this.shortSentinel ? `__ekaciSentinel ${this.seq}` : `builtins.trace "${sentinel}" "${sentinel}"`;
    this.child.stdin.write(`${line}\n${end}\n`);
    const watch = idleTimeoutMs > 0 ? this.watchProgress(idleTimeoutMs, progress) : undefined;
    try {
      for (;;) {
        const o = stripAnsi(this.stdout).indexOf(outMark);
        if (o >= 0) {
          const out = stripAnsi(this.stdout).slice(0, o);
          const stderr = this.takeStderr();
          const e = stderr.indexOf(errMark);
          this.stdout = '';
          this.state = 'ready';
          return parseReply(out, e >= 0 ? stderr.slice(0, e) : stderr);
        }
        if (!this.alive) return { ok: false, error: this.exitReason, traces: traces(this.takeStderr()) };
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
      }
    } finally {
      if (watch) clearInterval(watch);
    }
  }

  /** Ends the repl at once; a request in flight answers with an error. */
  kill(): void {
    if (this.state !== 'dead') this.child.kill('SIGKILL');
  }

  /**
   * Kills the worker when `idleTimeoutMs` pass without a new `progress` line on stderr. Looks only at what was
   * appended since the last look.
   */
  private watchProgress(idleTimeoutMs: number, progress: string | undefined): NodeJS.Timeout {
    const mark = progress === undefined ? undefined : `trace: ${progress}`;
    let lastProgress = Date.now();
    let scanned = 0;
    const timer = setInterval(
      () => {
        const size = this.stderrSize();
        if (mark !== undefined && size > scanned) {
          const from = Math.max(0, scanned - mark.length);
          if (this.readStderr(from, size).includes(mark)) lastProgress = Date.now();
          scanned = size;
        }
        if (Date.now() - lastProgress >= idleTimeoutMs) {
          this.exitReason = `an attribute did not finish evaluating within ${Math.round(idleTimeoutMs / 1000)} s`;
          this.kill();
        }
      },
      Math.min(PROGRESS_POLL_MS, idleTimeoutMs),
    );
    timer.unref();
    return timer;
  }

  private stderrSize(): number {
    try {
      return statSync(join(this.stderrDir, 'stderr')).size;
    } catch {
      return 0;
    }
  }

  private readStderr(from: number, to: number): string {
    if (to <= from) return '';
    const buf = Buffer.alloc(to - from);
    const n = readSync(this.stderrFd, buf, 0, buf.length, from);
    return buf.subarray(0, n).toString('utf8');
  }

  /** Everything the repl wrote to stderr since the last call, and the file emptied for the next request. */
  private takeStderr(): string {
    const text = this.readStderr(0, this.stderrSize());
    ftruncateSync(this.stderrFd, 0);
    return text;
  }

  private die(): void {
    if (this.state === 'dead') return;
    this.state = 'dead';
    this.wake?.();
    // A request still waiting reads what the repl wrote before it died; the file goes when the worker does.
    setImmediate(() => {
      closeSync(this.stderrFd);
      rmSync(this.stderrDir, { recursive: true, force: true });
    });
  }
}

// The repl colours values even on a pipe.
function stripAnsi(s: string): string {
  return s.replace(/\x1b\[[0-9;]*m/g, '');
}

function parseReply(stdout: string, stderr: string): ReplReply {
  // stdout holds the echoed prompt line(s) and, on success, the value: a repl-quoted string on a line of its own.
  const value = stdout
    .split('\n')
    .filter((l) => l.startsWith('"') && l.endsWith('"') && l.length >= 2)
    .pop();
  if (value !== undefined) return { ok: true, value: unquote(value), traces: traces(stderr) };
  return { ok: false, error: errorText(stderr), traces: traces(stderr) };
}

const ESCAPES: Record<string, string> = { n: '\n', r: '\r', t: '\t' };

/** Undoes the repl's string quoting (`\"`, `\\`, `\n`, `\r`, `\t`, `\$`). */
export function unquote(quoted: string): string {
  return quoted.slice(1, -1).replace(/\\(.)/gs, (_, c: string) => ESCAPES[c] ?? c);
}

function traces(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((l) => l.startsWith('trace: '))
    .map((l) => l.slice('trace: '.length));
}

/** Nix's error without the banner, warnings and traces of other requests. */
function errorText(stderr: string): string {
  return stderr
    .split('\n')
    .filter((l) => !/^Welcome to Nix|^warning:|^trace: |^\(use '--show-trace'/.test(l))
    .join('\n')
    .trim();
}
