import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { Checkpointer } from './checkpointer.js';
import { openDatabase } from './database.js';

const dir = mkdtempSync(join(tmpdir(), 'ekaci-checkpointer-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('Checkpointer', () => {
  it('copies the WAL into the database file from its thread, and gives the writer its checkpoints back on stop', async () => {
    const file = join(dir, 'db.sqlite');
    const db = openDatabase(file);
    db.exec('CREATE TABLE blobs (b BLOB NOT NULL)');
    const errors: Error[] = [];
    const checkpointer = new Checkpointer(db, (err) => errors.push(err));
    expect(db.pragma('wal_autocheckpoint', { simple: true })).toBe(16_384);
    const before = statSync(file).size;
    // About 1,300 pages of WAL: below the writer's own threshold, so only the thread copies them.
    const insert = db.prepare('INSERT INTO blobs (b) VALUES (?)');
    for (let i = 0; i < 100; i++) db.transaction(() => insert.run(randomBytes(50 * 1024)))();
    expect(statSync(`${file}-wal`).size).toBeGreaterThan(5 * 1024 * 1024);
    await vi.waitFor(() => expect(statSync(file).size).toBeGreaterThan(before + 5 * 1024 * 1024), {
      timeout: 20_000,
      interval: 50,
    });
    await checkpointer.stop();
    expect(db.pragma('wal_autocheckpoint', { simple: true })).toBe(1000);
    expect(errors).toEqual([]);
    db.close();
  });

  it('keeps a process that has nothing else to do alive until its thread has ended', () => {
    // Its thread does not hold the process open while it runs; a stop awaited last must still finish.
    const script = join(dir, 'stop-last.mts');
    const here = (f: string) => fileURLToPath(new URL(f, import.meta.url));
    writeFileSync(
      script,
      [
        `import { Checkpointer } from ${JSON.stringify(here('./checkpointer.ts'))};`,
        `import { openDatabase } from ${JSON.stringify(here('./database.ts'))};`,
        `const db = openDatabase(${JSON.stringify(join(dir, 'stop-last.sqlite'))});`,
        'await new Checkpointer(db, (err) => console.log(err.message)).stop();',
        'db.close();',
        "console.log('stopped');",
      ].join('\n'),
    );
    const out = execFileSync(process.execPath, ['--import', 'tsx', script], { encoding: 'utf8' });
    expect(out.trim()).toBe('stopped');
  });
});
