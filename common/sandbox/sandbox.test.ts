import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type SandboxSpec, sandboxAvailable, sandboxCommand } from './sandbox.js';

/** Runs a shell script in the sandbox; answers its exit code and output. */
function run(script: string, spec: Partial<SandboxSpec> = {}): Promise<{ code: number | null; out: string }> {
  const c = sandboxCommand('/bin/sh', ['-c', script], {
    mounts: [],
    network: false,
    env: { PATH: '/usr/bin:/bin' },
    cwd: '/tmp',
    ...spec,
  });
  return new Promise((resolve, reject) => {
    const child = spawn(c.file, c.args, { env: c.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, out }));
  });
}

let server: Server;
let port: number;

beforeAll(async () => {
  await sandboxAvailable();
  server = createServer((socket) => socket.end('reached\n'));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as { port: number }).port;
});
afterAll(() => server?.close());

// A connection attempt from the shell without curl: bash's /dev/tcp. Debian's bash has it.
const connect = (p: number): string => `exec 3<>/dev/tcp/127.0.0.1/${p} && read line <&3 && echo "$line"`;

describe('the sandbox for untrusted code', () => {
  it('has no network unless asked: even the host’s loopback is out of reach', async () => {
    const closed = await run(`bash -c '${connect(port)}'`);
    const open = await run(`bash -c '${connect(port)}'`, { network: true });

    expect(closed.code).not.toBe(0);
    expect(closed.out).not.toContain('reached');
    expect(open.out).toContain('reached');
  });

  it('sees none of the host’s secrets, homes or data, and only the environment it is given', async () => {
    process.env.EKACI_TEST_SECRET = 'secret-in-the-callers-environment';
    const dataDir = mkdtempSync(join(tmpdir(), 'ekaci-sandbox-data-'));
    writeFileSync(join(dataDir, 'cache-key.sec'), 'a signing key');

    const r = await run(
      `cat /etc/shadow; cat ${dataDir}/cache-key.sec; ls /root /home; env; cat /proc/1/environ; echo done`,
      { env: { PATH: '/usr/bin:/bin', GIVEN: 'yes' } },
    );

    expect(r.out).toContain('done');
    expect(r.out).toContain('GIVEN=yes');
    expect(r.out).not.toContain('secret-in-the-callers-environment');
    expect(r.out).not.toContain('a signing key');
    expect(r.out).toMatch(/\/etc\/shadow: No such file/);
    expect(r.out).toMatch(/cache-key\.sec: No such file/);
  });

  it('shows mounts read-only unless writable, and writes land only in its own /tmp', async () => {
    const ro = mkdtempSync(join(tmpdir(), 'ekaci-sandbox-ro-'));
    const rw = mkdtempSync(join(tmpdir(), 'ekaci-sandbox-rw-'));
    writeFileSync(join(ro, 'input'), 'visible');

    const r = await run(
      `cat ${ro}/input; echo x > ${ro}/new || echo ro-refused; echo y > ${rw}/new && echo rw-ok; echo z > /usr/x || echo usr-refused; echo t > /tmp/t && echo tmp-ok`,
      {
        mounts: [{ source: ro }, { source: rw, writable: true }],
      },
    );

    expect(r.out).toContain('visible');
    expect(r.out).toContain('ro-refused');
    expect(r.out).toContain('rw-ok');
    expect(r.out).toContain('usr-refused');
    expect(r.out).toContain('tmp-ok');
  });

  it('cannot see or signal the host’s processes', async () => {
    const r = await run(
      `ls /proc | grep -c '^[0-9]' ; kill -0 ${process.pid} && echo signalled || echo no-such-process`,
    );

    const visible = Number(r.out.split('\n')[0]);
    expect(visible).toBeLessThan(5);
    expect(r.out).toContain('no-such-process');
  });
});
