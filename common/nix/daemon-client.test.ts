import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { nonce, tempDir, writeNixFile } from '../../test/support/nix-project.js';
import { IllegalStateError, NixCommandError } from '../errors.js';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, runNix, runNixChecked } from './cli.js';
import { NixDaemonConnection, type DaemonOptions } from './daemon-client.js';

const isRoot = process.getuid?.() === 0;
const LOCAL_ONLY = { substituters: '' };
// A fractional sleep time nobody else uses lets the test find its builder among all processes.
const SLEEP_MARK = `60.${Date.now() % 1_000_000}`;

const DERIVATIONS = String.raw`rec {
  hello = mk "hello" { script = "echo hello; echo world; echo x > $out"; };
  second = mk "second" { script = "echo second build; echo y > $out"; };
  viaHook = mk "via-hook" { script = "echo built beside the hook; echo z > $out"; };
  busy = mk "busy" { script = "/bin/sleep 0.3; echo w > $out"; };
  failing = mk "failing" { script = "echo about to fail; exit 3"; };
  silent = mk "silent" { script = "exec /bin/sleep 30"; };
  chatty = mk "chatty" { script = "while :; do echo tick; /bin/sleep 0.2; done"; };
  longSleep = mk "long-sleep" { script = "echo started; exec /bin/sleep ${SLEEP_MARK}"; };
  dies = mk "dies" { script = "echo started; exec /bin/sleep 5"; };
  unbuilt = mk "unbuilt" { };
  tree = mk "tree" { script = ''
    export PATH=/usr/bin:/bin
    mkdir -p $out/a/b $out/empty-dir
    echo leaf > $out/a/b/leaf
    printf '#!/bin/sh\necho hi\n' > $out/run && chmod +x $out/run
    ln -s a/b/leaf $out/link
    : > $out/empty-file
    head -c 700000 /dev/urandom > $out/big
  ''; };
  input = mk "input" { script = "echo input-content > $out"; };
  consumer = mk "consumer" { deps = [ input ]; script = "echo consuming; read line < $deps; echo \"$line\" > $out"; };
}`;

type Name =
  | 'hello'
  | 'second'
  | 'viaHook'
  | 'busy'
  | 'failing'
  | 'silent'
  | 'chatty'
  | 'longSleep'
  | 'dies'
  | 'unbuilt'
  | 'tree'
  | 'input'
  | 'consumer';

let dir: string;
const drv = {} as Record<Name, string>;
const out = {} as Record<Name, string>;
const connections: NixDaemonConnection[] = [];

async function open(options: DaemonOptions = {}): Promise<NixDaemonConnection> {
  const c = await NixDaemonConnection.open({ nixOptions: LOCAL_ONLY, ...options });
  connections.push(c);
  return c;
}

async function pathInfoJson(path: string): Promise<{ narHash: string; narSize: number }> {
  const json = await runNixChecked('nix', [...NIX_EXPERIMENTAL, ...NO_SUBSTITUTERS, 'path-info', '--json', path]);
  const [info] = JSON.parse(json) as { narHash: string; narSize: number }[];
  if (!info) throw new Error(`no path info for ${path}`);
  return info;
}

/** `sha256:<base32>` as nix path-info prints it → hex, as the daemon sends it. */
async function toHex(narHash: string): Promise<string> {
  const base32 = narHash.replace(/^sha256:/, '');
  return (await runNixChecked('nix-hash', ['--type', 'sha256', '--to-base16', base32])).trim();
}

function pidsRunning(argument: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    try {
      if (readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').includes(argument)) pids.push(Number(entry));
    } catch {
      // exited while we looked
    }
  }
  return pids;
}

async function waitFor(condition: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}

beforeAll(async () => {
  dir = tempDir('ekaci-daemon-');
  const file = writeNixFile(dir, `daemon-${nonce()}`, DERIVATIONS);
  const names = Object.keys({
    hello: 0,
    second: 0,
    viaHook: 0,
    busy: 0,
    failing: 0,
    silent: 0,
    chatty: 0,
    longSleep: 0,
    dies: 0,
    unbuilt: 0,
    tree: 0,
    input: 0,
    consumer: 0,
  } satisfies Record<Name, 0>) as Name[];
  const args = [...NO_SUBSTITUTERS, file, ...names.flatMap((n) => ['-A', n])];
  const drvs = (await runNixChecked('nix-instantiate', args)).trim().split('\n');
  const outs = (await runNixChecked('nix-store', [...NO_SUBSTITUTERS, '-q', '--outputs', ...drvs])).trim().split('\n');
  names.forEach((name, i) => {
    drv[name] = drvs[i] ?? '';
    out[name] = outs[i] ?? '';
  });
});

afterEach(() => {
  for (const c of connections.splice(0)) c.kill();
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('NixDaemonConnection', () => {
  it('handshakes with Nix 2.8 at worker protocol 1.34 and is ready', async () => {
    const c = await open();
    expect(c.status).toBe('ready');
    expect(c.protocol).toBe((1 << 8) | 34);
    expect(c.nixVersion).toMatch(/^2\.\d+/);
    expect(c.pid).toBeGreaterThan(0);
  });

  it('builds a derivation and streams its log lines as they arrive, after the line announcing the build', async () => {
    const c = await open();
    const lines: string[] = [];
    expect(await c.buildPaths([`${drv.hello}!*`], (l) => lines.push(l))).toEqual({ ok: true });
    expect(lines).toEqual([`building '${drv.hello}'`, 'hello', 'world']);
    expect(readFileSync(out.hello, 'utf8')).toBe('x\n');
    expect(c.status).toBe('ready');
  });

  it("builds through Nix's own build hook when remote builds are allowed", async () => {
    const c = await open({ remoteBuilds: true });
    const lines: string[] = [];
    expect(await c.buildPaths([`${drv.viaHook}!out`], (l) => lines.push(l))).toEqual({ ok: true });
    expect(lines).toEqual([`building '${drv.viaHook}'`, 'built beside the hook']);
  });

  it('runs two builds one after the other on one connection', async () => {
    const c = await open();
    const lines: string[] = [];
    expect(await c.buildPaths([`${drv.hello}!out`], (l) => lines.push(l))).toEqual({ ok: true });
    expect(await c.buildPaths([`${drv.second}!out`], (l) => lines.push(l))).toEqual({ ok: true });
    expect(lines).toContain('second build');
    expect(existsSync(out.second)).toBe(true);
  });

  it('resolves a failing builder as ok:false, status 100, with a message naming the derivation', async () => {
    const c = await open();
    const lines: string[] = [];
    const result = await c.buildPaths([`${drv.failing}!*`], (l) => lines.push(l));
    expect(result).toMatchObject({ ok: false, status: 100 });
    if (result.ok) return;
    expect(result.message).toContain(drv.failing);
    expect(result.message).toContain('failed with exit code 3');
    expect(result.message).not.toMatch(/\u001b\[/);
    expect(lines).toContain('about to fail');
    // The connection survives a failed build.
    expect(c.status).toBe('ready');
    expect(await c.buildPaths([`${drv.hello}!*`])).toEqual({ ok: true });
  });

  it('reports a build silent for longer than maxSilentTime as timed out (101)', async () => {
    const c = await open();
    await c.setOptions({ maxSilentTime: 1 });
    const started = Date.now();
    const result = await c.buildPaths([`${drv.silent}!*`]);
    expect(result).toMatchObject({ ok: false, status: 101 });
    if (!result.ok) expect(result.message).toMatch(/timed out after 1 seconds of silence/);
    expect(Date.now() - started).toBeLessThan(15_000);
  });

  it('reports a build running longer than buildTimeout as timed out (101)', async () => {
    const c = await open();
    await c.setOptions({ buildTimeout: 1 });
    const lines: string[] = [];
    const result = await c.buildPaths([`${drv.chatty}!*`], (l) => lines.push(l));
    expect(result).toMatchObject({ ok: false, status: 101 });
    if (!result.ok) expect(result.message).toMatch(/timed out after 1 seconds/);
    expect(lines).toContain('tick');
  });

  it('sends the same options once per connection, a change again, and builds under the last ones sent', async () => {
    const c = await open();
    // Every request goes out in one write to the daemon's end of the connection.
    const requests = vi.spyOn((c as unknown as { transport: { write(b: Buffer): boolean } }).transport, 'write');

    await c.setOptions({ buildTimeout: 1 });
    await c.setOptions({ buildTimeout: 1 });
    await c.setOptions({ buildTimeout: 2 });
    await c.setOptions({ buildTimeout: 1 });
    await c.setOptions({ buildTimeout: 1 });

    expect(requests).toHaveBeenCalledTimes(3);
    const result = await c.buildPaths([`${drv.chatty}!*`]);
    expect(result).toMatchObject({ ok: false, status: 101 });
    if (!result.ok) expect(result.message).toMatch(/timed out after 1 seconds/);
  });

  it('resolves a build of a path that is not in the store as ok:false with status 1', async () => {
    const c = await open();
    const result = await c.buildPaths(['/nix/store/00000000000000000000000000000000-missing.drv!out']);
    expect(result).toMatchObject({ ok: false, status: 1 });
  });

  it('queries the path info of a built output, matching nix path-info', async () => {
    const c = await open();
    await c.buildPaths([`${drv.hello}!out`]);
    const info = await c.queryPathInfo(out.hello);
    const expected = await pathInfoJson(out.hello);
    expect(info).toMatchObject({ deriver: drv.hello, references: [], narSize: expected.narSize, sigs: [], ca: '' });
    expect(info?.narHash).toBe(await toHex(expected.narHash));
    expect(info?.registrationTime).toBeGreaterThan(0);
    expect(await c.queryPathInfo(out.unbuilt)).toBeUndefined();
  });

  it('returns the valid subset of the paths asked about', async () => {
    const c = await open();
    await c.buildPaths([`${drv.hello}!out`]);
    const valid = await c.queryValidPaths([out.hello, drv.unbuilt, out.unbuilt]);
    expect(valid).toEqual(new Set([out.hello, drv.unbuilt]));
  });

  it('streams a NAR whose sha256 and size are the narHash and narSize of the path', async () => {
    const c = await open();
    expect(await c.buildPaths([`${drv.tree}!out`])).toEqual({ ok: true });
    const hash = createHash('sha256');
    let size = 0;
    for await (const chunk of c.narFromPath(out.tree)) {
      hash.update(chunk);
      size += chunk.length;
    }
    const expected = await pathInfoJson(out.tree);
    expect(size).toBe(expected.narSize);
    expect(hash.digest('hex')).toBe(await toHex(expected.narHash));
    expect(c.status).toBe('ready');
  });

  it('stays usable after a NAR consumer stops early', async () => {
    const c = await open();
    await c.buildPaths([`${drv.tree}!out`]);
    for await (const chunk of c.narFromPath(out.tree)) {
      expect(chunk.length).toBeGreaterThan(0);
      break;
    }
    expect(c.status).toBe('ready');
    expect(await c.queryValidPaths([out.tree])).toEqual(new Set([out.tree]));
  });

  it('rejects narFromPath of an invalid path and stays usable', async () => {
    const c = await open();
    const read = async (): Promise<void> => {
      for await (const _ of c.narFromPath(out.unbuilt));
    };
    await expect(read()).rejects.toThrow(/is not valid/);
    expect(c.status).toBe('ready');
  });

  it('refuses a second operation while one is running', async () => {
    const c = await open();
    const build = c.buildPaths([`${drv.busy}!out`]);
    await expect(c.queryValidPaths([out.busy])).rejects.toBeInstanceOf(IllegalStateError);
    await expect(c.close()).rejects.toBeInstanceOf(IllegalStateError);
    expect(await build).toEqual({ ok: true });
    await c.close();
    expect(c.status).toBe('closed');
    await expect(c.queryValidPaths([out.busy])).rejects.toThrow(/closed/);
  });

  it('rejects the pending call with NixCommandError quoting its stderr when the daemon dies', async () => {
    const wrapper = join(dir, 'noisy-daemon.sh');
    writeFileSync(wrapper, '#!/bin/sh\necho "wrapper: about to exec nix-daemon" >&2\nexec nix-daemon "$@"\n');
    chmodSync(wrapper, 0o755);
    const c = await open({ command: wrapper });
    const pid = c.pid ?? 0;
    const build = c.buildPaths([`${drv.dies}!*`], (line) => {
      if (line === 'started') process.kill(pid, 'SIGKILL');
    });
    const error = await build.catch((e: unknown) => e);
    expect(error).toBeInstanceOf(NixCommandError);
    expect((error as Error).message).toMatch(/killed by SIGKILL[^]*during busy with buildPaths/);
    expect((error as Error).message).toContain('wrapper: about to exec nix-daemon');
    expect(c.status).toBe('closed');
  });

  it('kill() cancels a running build, builder included', async () => {
    const c = await open();
    let started = false;
    const build = c.buildPaths([`${drv.longSleep}!*`], (line) => {
      if (line === 'started') started = true;
    });
    await waitFor(() => started && pidsRunning(SLEEP_MARK).length > 0, 10_000);
    c.kill();
    await expect(build).rejects.toThrow(/kill\(\) was called/);
    await waitFor(() => pidsRunning(SLEEP_MARK).length === 0, 5_000);
    expect(c.status).toBe('closed');
  });

  it.skipIf(!isRoot)(
    'substitutes a .drv and its inputs from a file:// cache into an empty store, then builds it',
    async () => {
      const cache = join(dir, 'cache');
      const emptyNix = join(dir, 'empty-nix');
      mkdirSync(emptyNix);
      await runNixChecked('nix-store', [...NO_SUBSTITUTERS, '--realise', drv.input]);
      const copy = [...NIX_EXPERIMENTAL, ...NO_SUBSTITUTERS, 'copy', '--to', `file://${cache}`];
      await runNixChecked('nix', [...copy, '--derivation', drv.consumer]);
      await runNixChecked('nix', [...copy, out.input]);

      // Its own mount namespace with an empty /nix: a store that has nothing but what it substitutes.
      const wrapper = join(dir, 'isolated-daemon.sh');
      writeFileSync(
        wrapper,
        `#!/bin/sh\nexec unshare -m /bin/sh -c 'mount --bind "$0" /nix && exec nix-daemon "$@"' ${emptyNix} "$@"\n`,
      );
      chmodSync(wrapper, 0o755);
      const c = await open({
        command: wrapper,
        nixOptions: { substituters: `file://${cache}`, 'require-sigs': 'false' },
      });
      expect(await c.queryValidPaths([drv.consumer, out.input])).toEqual(new Set());

      const lines: string[] = [];
      expect(await c.buildPaths([`${drv.consumer}!out`], (l) => lines.push(l))).toEqual({ ok: true });
      expect(lines).toContain('consuming');
      expect(await c.queryValidPaths([drv.consumer, drv.input, out.input, out.consumer])).toEqual(
        new Set([drv.consumer, drv.input, out.input, out.consumer]),
      );
      expect((await c.queryPathInfo(out.input))?.ultimate).toBe(false);
      expect((await c.queryPathInfo(out.consumer))?.ultimate).toBe(true);
      // Built in the private store only.
      const onHost = await runNix('nix-store', ['--check-validity', out.consumer]);
      expect(onHost.code).not.toBe(0);
      await c.close();
    },
  );
});
