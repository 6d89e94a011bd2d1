import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { processTreeRssMiB } from '../../common/platform.js';
import type { NixLauncher } from './eval-environment.js';

/**
 * What one request to the evaluator answered: the value it printed, or the error text Nix wrote instead; and, in
 * either case, the `builtins.trace` messages evaluation printed before it ended, in order.
 */
export type ReplReply = ({ ok: true; value: string } | { ok: false; error: string }) & { traces: string[] };

/**
 * A long-lived `nix repl` process driven over pipes. Nix 2.8's repl prints an evaluation error (even an
 * `abort` or a type error, which end a `nix-instantiate` run) and carries on with everything it has loaded, so
 * the package set is imported once per worker rather than once per chunk.
 *
 * Protocol: each request is one line of Nix. It is followed by `builtins.trace "S" "S"` with a per-request
 * sentinel S, which prints `trace: S` on stderr and `"S"` on stdout; everything before those two markers is the
 * request's reply. Values are printed as repl-quoted strings (requests wrap their value in `builtins.toJSON`),
 * an error leaves stdout without a value and its text on stderr.
 *
 * States: `starting` → `ready` ⇄ `busy` → `dead`. A request on a dead worker resolves to an error; the owner
 * replaces a dead worker with a new one (`EvalWorker.start`).
 */
export class EvalWorker {
  private state: 'starting' | 'ready' | 'busy' | 'dead' = 'starting';
  private stdout = '';
  private stderr = '';
  private seq = 0;
  /** Secret to this worker: marks its sentinels and results so that nothing an expression prints can pass for one. */
  readonly nonce = randomBytes(16).toString('hex');
  private wake: (() => void) | undefined;
  private exitReason = '';

  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (s: string) => {
      this.stdout += s;
      this.wake?.();
    });
    child.stderr.on('data', (s: string) => {
      this.stderr += s;
      this.wake?.();
    });
    child.stdin.on('error', () => undefined); // EPIPE after the process died; seen as `dead` below.
    child.on('exit', (code, signal) => {
      this.exitReason ||= `nix repl exited (${signal ?? `code ${code}`})`;
      this.state = 'dead';
      this.wake?.();
    });
    child.on('error', (e) => {
      this.exitReason ||= `nix repl could not run: ${e.message}`;
      this.state = 'dead';
      this.wake?.();
    });
  }

  /**
   * Starts a repl through `launcher` (sandboxed, restricted; see EvalEnvironment) and runs the lines `setup` makes
   * from the worker's nonce (the evaluator's helpers); rejects if setup fails.
   */
  static async start(setup: (nonce: string) => readonly string[], launcher: NixLauncher): Promise<EvalWorker> {
    const c = launcher.command('nix', ['repl']);
    const child = spawn(c.file, c.args, { env: c.env, stdio: ['pipe', 'pipe', 'pipe'] });
    const worker = new EvalWorker(child);
    worker.state = 'ready';
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
   * answers with an error. It is thus a limit per attribute, not per request.
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
    this.child.stdin.write(`${line}\nbuiltins.trace "${sentinel}" "${sentinel}"\n`);
    let timer: NodeJS.Timeout | undefined;
    const arm = (): void => {
      if (idleTimeoutMs <= 0) return;
      clearTimeout(timer);
      timer = setTimeout(() => {
        this.exitReason = `an attribute did not finish evaluating within ${Math.round(idleTimeoutMs / 1000)} s`;
        this.kill();
      }, idleTimeoutMs);
    };
    arm();
    const progressMark = progress === undefined ? undefined : `trace: ${progress}`;
    let scanned = 0;
    try {
      for (;;) {
        if (progressMark !== undefined) {
          // Only what arrived since the last look: a chunk's stderr grows to tens of KiB.
          const from = Math.max(0, scanned - progressMark.length);
          if (this.stderr.indexOf(progressMark, from) >= 0) arm();
          scanned = this.stderr.length;
        }
        const o = stripAnsi(this.stdout).indexOf(outMark);
        const e = this.stderr.indexOf(errMark);
        if (o >= 0 && e >= 0) {
          const out = stripAnsi(this.stdout).slice(0, o);
          const err = this.stderr.slice(0, e);
          this.stdout = '';
          this.stderr = this.stderr.slice(e + errMark.length);
          this.state = 'ready';
          return parseReply(out, err);
        }
        if (!this.alive) return { ok: false, error: this.exitReason, traces: traces(this.stderr) };
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /** Ends the repl at once; a request in flight answers with an error. */
  kill(): void {
    if (this.state !== 'dead') this.child.kill('SIGKILL');
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
