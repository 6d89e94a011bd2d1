import { spawn } from 'node:child_process';
import { realpath } from 'node:fs/promises';
import { isAbsolute, join, relative, sep } from 'node:path';
import { once } from 'node:events';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { ReadableStream } from 'node:stream/web';
import { lastLines } from '../../common/nix/cli.js';

/**
 * Downloads the commit's source, a tar archive, from the coordinator (`Authorization: Bearer <token>`) and extracts
 * it into `dir` as it arrives. Throws with a message naming what failed: the request, the HTTP status, or the
 * archive. A redirect is an error: the token goes to the URL the coordinator named and nowhere else.
 *
 * The archive is the repository's content, which a pull request controls. The system's tar (GNU tar on Linux,
 * bsdtar on macOS) already refuses members with absolute names or `..`, and never writes through a symlink it
 * extracted; `--no-same-owner` keeps an agent running as root from creating files of other users.
 */
export async function fetchSource(url: string, token: string, dir: string, signal: AbortSignal): Promise<void> {
  let response: Response;
  try {
    response = await fetch(url, { headers: { authorization: `Bearer ${token}` }, redirect: 'error', signal });
  } catch (err) {
    throw new Error(`cannot download the source from ${url}: ${causeOf(err)}`);
  }
  if (!response.ok || response.body === null) {
    await response.body?.cancel();
    throw new Error(`cannot download the source from ${url}: HTTP ${response.status} ${response.statusText}`.trim());
  }
  const tar = spawn('tar', ['-x', '--no-same-owner', '-f', '-', '-C', dir], {
    stdio: ['pipe', 'ignore', 'pipe'],
    signal,
  });
  let stderr = '';
  tar.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const exited = new Promise<number | null>((resolve) => {
    tar.on('error', () => resolve(null));
    tar.on('close', (code) => resolve(code));
  });
  // The whole body is read, whatever tar does: tar exits at the archive's end marker, before the padding after it
  // (git archive fills whole records) has arrived, and writing on then would fail a good download. So a stream error
  // here is the download's, and tar's exit code says whether the archive was whole.
  let streamError: unknown = null;
  try {
    await pipeline(Readable.fromWeb(response.body as ReadableStream<Uint8Array>), intoStdin(tar.stdin));
  } catch (err) {
    streamError = err;
  }
  const code = await exited;
  if (signal.aborted) throw new Error('the download was cancelled');
  if (code !== 0) {
    const why = lastLines(stderr, 3) || (streamError === null ? `tar exited with ${code}` : causeOf(streamError));
    throw new Error(`cannot extract the source from ${url}: ${why}`);
  }
  if (streamError !== null) throw new Error(`cannot download the source from ${url}: ${causeOf(streamError)}`);
}

/** A sink that writes into a child's stdin while the child reads it and drops what comes after it stopped. */
function intoStdin(stdin: Writable): Writable {
  let open = true;
  const closed = new Promise<void>((resolve) =>
    stdin.once('close', () => {
      open = false;
      resolve();
    }),
  );
  stdin.on('error', () => (open = false));
  return new Writable({
    write(chunk: Buffer, _encoding, done) {
      if (!open || stdin.write(chunk)) return done();
      void Promise.race([once(stdin, 'drain'), closed]).then(
        () => done(),
        () => done(),
      );
    },
    final(done) {
      if (open) stdin.end();
      done();
    },
    // A download that failed half-way: tar sees its input end, and says whether what came was a whole archive.
    destroy(err, done) {
      stdin.end();
      done(err);
    },
  });
}

/**
 * The `ro_bind` entries of a check as paths relative to the checkout, symlinks resolved. An entry that is absolute,
 * has a `..` component, does not exist, or resolves outside the checkout (a symlink out of it) throws with a message
 * for the check's author.
 */
export async function readOnlyPaths(checkout: string, entries: readonly string[]): Promise<string[]> {
  const root = await realpath(checkout);
  const paths: string[] = [];
  for (const entry of entries) {
    if (entry === '' || isAbsolute(entry) || entry.split(/[/\\]/).includes('..')) {
      throw new Error(`ro_bind '${entry}' must be a relative path inside the checkout, without '..'`);
    }
    let real: string;
    try {
      real = await realpath(join(root, entry));
    } catch {
      throw new Error(`ro_bind '${entry}' does not exist in the checkout`);
    }
    const inside = relative(root, real);
    if (inside === '..' || inside.startsWith(`..${sep}`) || isAbsolute(inside)) {
      throw new Error(`ro_bind '${entry}' resolves to ${real}, outside the checkout`);
    }
    paths.push(inside);
  }
  return paths;
}

function causeOf(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const cause = err.cause instanceof Error ? `: ${err.cause.message}` : '';
  return `${err.message}${cause}`;
}
