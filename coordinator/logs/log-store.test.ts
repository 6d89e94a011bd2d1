import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LogStore } from './log-store.js';

const dir = mkdtempSync(join(tmpdir(), 'ekaci-log-store-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const drv = (hash: string, name: string): string => `/nix/store/${hash.padEnd(32, '0')}-${name}.drv`;

describe('LogStore', () => {
  it('keeps the logs of many derivations in shared directories, one file per attempt', () => {
    const root = join(dir, 'shared');
    const logs = new LogStore(root);
    const paths = [drv('ab', 'one'), drv('ab1', 'two'), drv('cd', 'three')].flatMap((d) => [
      logs.pathFor(d, 1),
      logs.pathFor(d, 2),
    ]);
    for (const [i, path] of paths.entries()) logs.append(path, 0, Buffer.from(`attempt ${i}\n`));
    logs.closeAll();
    expect(readdirSync(root).sort()).toEqual(['ab', 'cd']);
    expect(readdirSync(join(root, 'ab'))).toHaveLength(4);
    expect(paths.map((p) => logs.read(p).toString())).toEqual(paths.map((_, i) => `attempt ${i}\n`));
  });

  it('makes a directory again when it went away, and reads a log where its attempt says it is', () => {
    const root = join(dir, 'removed');
    const logs = new LogStore(root);
    const first = logs.pathFor(drv('ef', 'first'), 1);
    logs.append(first, 0, Buffer.from('first\n'));
    logs.close(first);
    rmSync(join(root, 'ef'), { recursive: true });
    const second = logs.pathFor(drv('ef', 'second'), 1);
    logs.append(second, 0, Buffer.from('second\n'));
    expect(logs.read(second).toString()).toBe('second\n');
    expect(existsSync(first)).toBe(false);

    // A log of the layout before (logs/<drv name>/<attempt>.log) is read through the path its attempt recorded.
    const before = join(root, `${drv('gh', 'old').slice('/nix/store/'.length)}`, '1.log');
    mkdirSync(join(before, '..'), { recursive: true });
    writeFileSync(before, 'from before\n');
    expect(logs.tail(before, 5)).toBe('from before');
  });
});
