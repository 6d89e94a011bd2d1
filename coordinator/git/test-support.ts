/**
 * Real git fixtures for the git-layer tests: repositories with real commits, and a real HTTP server that runs
 * `git http-backend` (CGI) behind Basic authentication.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import type { GitAuth } from './git-process.js';

export { TempDirs } from '../../common/nix/test-support.js';

const run = promisify(execFile);

/** Git as the tests run it: a fixed identity, and neither the machine's nor the user's git configuration. */
export function testGitEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return {
    ...process.env,
    GIT_AUTHOR_NAME: 'Eka Test',
    GIT_AUTHOR_EMAIL: 'test@eka-ci.invalid',
    GIT_COMMITTER_NAME: 'Eka Test',
    GIT_COMMITTER_EMAIL: 'test@eka-ci.invalid',
    GIT_CONFIG_NOSYSTEM: '1',
    GIT_CONFIG_GLOBAL: '/dev/null',
    ...extra,
  };
}

/** A non-bare repository on branch `main` that tests commit to. */
export class TestRepo {
  /** Wraps an existing repository (bare ones too, for inspecting mirrors). */
  constructor(readonly dir: string) {}

  static async create(dir: string): Promise<TestRepo> {
    await run('git', ['init', '--quiet', '--initial-branch=main', dir], { env: testGitEnv() });
    return new TestRepo(dir);
  }

  async git(...args: string[]): Promise<string> {
    const { stdout } = await run('git', args, { cwd: this.dir, env: testGitEnv() });
    return stdout.trim();
  }

  /** Writes `files` (path → content), commits everything, and returns the new commit's sha. */
  async commit(message: string, files: Record<string, string>): Promise<string> {
    for (const [path, content] of Object.entries(files)) {
      await mkdir(dirname(join(this.dir, path)), { recursive: true });
      await writeFile(join(this.dir, path), content);
    }
    await this.git('add', '--all');
    await this.git('commit', '--quiet', '--message', message);
    return this.git('rev-parse', 'HEAD');
  }
}

export interface GitHttpServer {
  /** `http://127.0.0.1:PORT`; repositories are at `${base}/<path under the project root>`. */
  base: string;
  /** Requests that reached `git http-backend` (passed authentication). */
  served: number;
  close(): Promise<void>;
}

/** Serves every repository under `projectRoot` over smart HTTP, to clients that send `credentials` as Basic auth. */
export async function serveGitOverHttp(
  projectRoot: string,
  credentials: GitAuth | ((given: GitAuth) => boolean),
): Promise<GitHttpServer> {
  const accepts =
    typeof credentials === 'function'
      ? credentials
      : (given: GitAuth) => given.username === credentials.username && given.password === credentials.password;
  const state = { served: 0 };
  const server = createServer((req, res) => {
    const basic = /^Basic (.+)$/.exec(req.headers.authorization ?? '')?.[1];
    const [username = '', ...password] = Buffer.from(basic ?? '', 'base64')
      .toString('utf8')
      .split(':');
    if (!basic || !accepts({ username, password: password.join(':') })) {
      req.resume();
      res.writeHead(401, { 'WWW-Authenticate': 'Basic realm="eka-ci test"' }).end();
      return;
    }
    state.served += 1;
    httpBackend(projectRoot, username, req, res);
  });
  server.listen(0, '127.0.0.1');
  await new Promise<void>((resolve) => server.once('listening', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    base: `http://127.0.0.1:${port}`,
    get served() {
      return state.served;
    },
    close: () =>
      new Promise<void>((resolve, reject) => {
        server.closeAllConnections();
        server.close((err) => (err ? reject(err) : resolve()));
      }),
  };
}

/** Runs one CGI request through `git http-backend` and relays its `Status:` and headers as the HTTP response. */
function httpBackend(projectRoot: string, user: string, req: IncomingMessage, res: ServerResponse): void {
  const url = new URL(req.url ?? '/', 'http://localhost');
  const header = (name: string): string => {
    const value = req.headers[name];
    return Array.isArray(value) ? value.join(', ') : (value ?? '');
  };
  const cgi = spawn('git', ['http-backend'], {
    env: {
      ...testGitEnv(),
      GIT_PROJECT_ROOT: projectRoot,
      GIT_HTTP_EXPORT_ALL: '1',
      PATH_INFO: decodeURIComponent(url.pathname),
      QUERY_STRING: url.search.slice(1),
      REQUEST_METHOD: req.method ?? 'GET',
      CONTENT_TYPE: header('content-type'),
      ...(req.headers['content-length'] === undefined ? {} : { CONTENT_LENGTH: header('content-length') }),
      HTTP_CONTENT_ENCODING: header('content-encoding'),
      HTTP_GIT_PROTOCOL: header('git-protocol'),
      REMOTE_USER: user,
      REMOTE_ADDR: req.socket.remoteAddress ?? '127.0.0.1',
    },
    // Its complaints (unknown refs in tests that ask for them) would only clutter the test output.
    stdio: ['pipe', 'pipe', 'ignore'],
  });
  req.pipe(cgi.stdin);
  let head = Buffer.alloc(0);
  let headersSent = false;
  cgi.stdout.on('data', (chunk: Buffer) => {
    if (headersSent) {
      res.write(chunk);
      return;
    }
    head = Buffer.concat([head, chunk]);
    const end = head.indexOf('\r\n\r\n');
    if (end < 0) return;
    let status = 200;
    for (const line of head.subarray(0, end).toString('latin1').split('\r\n')) {
      const colon = line.indexOf(':');
      const [name, value] = [line.slice(0, colon), line.slice(colon + 1).trim()];
      if (name.toLowerCase() === 'status') status = Number.parseInt(value, 10);
      else res.setHeader(name, value);
    }
    res.writeHead(status);
    headersSent = true;
    res.write(head.subarray(end + 4));
  });
  cgi.on('close', () => {
    if (!headersSent) res.writeHead(502);
    res.end();
  });
}
