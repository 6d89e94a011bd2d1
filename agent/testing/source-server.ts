import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

/** A file of the test repository: its text, or `{ symlink: target }`. */
export type RepoFile = string | { symlink: string };

/**
 * A coordinator's source endpoint as a check sees it: a real git repository committed from `files`, served as the
 * `git archive` tar of its HEAD to a request bearing `token` (401 otherwise) at `url`; any other path is a 404.
 * Two more shapes of the same archive, at `url` with its file name changed: `padded.tar` goes on for 1 MiB of zeros
 * after the archive's end (tar stops reading at the end marker: what an archive padded to whole records, arriving
 * in more than one piece, does on a small scale), and `cut.tar` ends the connection half-way through it.
 */
export interface SourceServer {
  url: string;
  /** The headers of every request, in order. */
  requests: IncomingHttpHeaders[];
  close(): Promise<void>;
}

export async function serveSource(files: Record<string, RepoFile>, token: string): Promise<SourceServer> {
  const repo = mkdtempSync(join(tmpdir(), 'ekaci-source-repo-'));
  const git = (...args: string[]): Buffer =>
    execFileSync('git', ['-c', 'user.name=eka-ci test', '-c', 'user.email=test@eka-ci.invalid', ...args], {
      cwd: repo,
      stdio: ['ignore', 'pipe', 'pipe'],
      maxBuffer: 64 * 1024 * 1024,
    });
  git('init', '--quiet');
  for (const [path, content] of Object.entries(files)) {
    const file = join(repo, path);
    mkdirSync(dirname(file), { recursive: true });
    if (typeof content === 'string') writeFileSync(file, content);
    else symlinkSync(content.symlink, file);
  }
  git('add', '--all');
  git('commit', '--quiet', '--message', 'test source');
  const tar = git('archive', '--format=tar', 'HEAD');
  rmSync(repo, { recursive: true, force: true });

  const requests: IncomingHttpHeaders[] = [];
  const server = createServer((req, res) => {
    requests.push(req.headers);
    if (req.headers.authorization !== `Bearer ${token}`) res.writeHead(401).end('unknown token');
    else if (req.url === '/source.tar') res.writeHead(200, { 'content-type': 'application/x-tar' }).end(tar);
    else if (req.url === '/padded.tar') {
      res.writeHead(200, { 'content-type': 'application/x-tar' }).end(Buffer.concat([tar, Buffer.alloc(2 ** 20)]));
    } else if (req.url === '/cut.tar') {
      res.writeHead(200, { 'content-type': 'application/x-tar', 'content-length': String(tar.length) });
      res.write(tar.subarray(0, Math.floor(tar.length / 2)), () => res.destroy());
    } else res.writeHead(404).end('no such source');
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}/source.tar`,
    requests,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}
