import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS } from '../../common/nix/cli.js';

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
  private readonly nonce = randomBytes(6).toString('hex');
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
      this.exitReason = `nix repl exited (${signal ?? `code ${code}`})`;
      this.state = 'dead';
      this.wake?.();
    });
    child.on('error', (e) => {
      this.exitReason = `nix repl could not run: ${e.message}`;
      this.state = 'dead';
      this.wake?.();
    });
  }

  /** Starts a repl and runs `setup` (lines defining the evaluator's helpers); rejects if setup fails. */
  static async start(setup: readonly string[]): Promise<EvalWorker> {
    // Flakes on for `builtins.getFlake` (flake jobs, see `evaluateFlake`); a plain file evaluates the same.
    const child = spawn('nix', ['repl', ...NO_SUBSTITUTERS, ...NIX_EXPERIMENTAL], { stdio: ['pipe', 'pipe', 'pipe'] });
    const worker = new EvalWorker(child);
    worker.state = 'ready';
    for (const line of setup) {
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

  /** Resident memory of the repl in MiB (0 when unknown), read from /proc. */
  rssMiB(): number {
    try {
      const status = readFileSync(`/proc/${this.child.pid}/status`, 'utf8');
      const m = /^VmRSS:\s+(\d+) kB/m.exec(status);
      return m ? Number(m[1]) / 1024 : 0;
    } catch {
      return 0;
    }
  }

  /**
   * Sends one line of Nix and waits for its reply. `timeoutMs` bounds an evaluation that never ends: the process
   * is killed and the request answers with an error.
   */
  async request(line: string, timeoutMs = 0): Promise<ReplReply> {
    if (this.state === 'dead') return { ok: false, error: this.exitReason, traces: [] };
    if (this.state === 'busy') throw new Error('EvalWorker.request while a request is in flight');
    if (line.includes('\n')) throw new Error('EvalWorker.request takes one line of Nix');
    this.state = 'busy';
    const sentinel = `__ekaci_${this.nonce}_${++this.seq}`;
    // On a line of its own: the echoed request line also contains the quoted sentinel.
    const outMark = `\n"${sentinel}"\n`;
    const errMark = `trace: ${sentinel}\n`;
    this.child.stdin.write(`${line}\nbuiltins.trace "${sentinel}" "${sentinel}"\n`);
    const timer =
      timeoutMs > 0
        ? setTimeout(() => {
            this.exitReason = `evaluation did not finish within ${timeoutMs} ms`;
            this.kill();
          }, timeoutMs)
        : undefined;
    try {
      for (;;) {
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
