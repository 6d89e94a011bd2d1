import Database from 'better-sqlite3';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { MIGRATIONS } from './migrations.js';

export type Db = Database.Database;

// A writer waits this long for a lock held by another process (the CLI revoking a token) before failing.
const BUSY_TIMEOUT_MS = 5_000;
const PAGE_CACHE_KIB = 64 * 1024;

/** Opens (creating if needed) the coordinator database in WAL mode and brings its schema up to date. */
export function openDatabase(file: string): Db {
  if (file !== ':memory:') mkdirSync(dirname(file), { recursive: true });
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  // NORMAL in WAL mode survives a process crash (kill -9) without losing committed transactions; only an OS
  // crash can lose the last ones, which costs a rebuild, never a wrong result.
  db.pragma('synchronous = NORMAL');
  db.pragma('foreign_keys = ON');
  // Store paths are hash-random keys: inserts land all over the B-trees, and with SQLite's default 2 MiB page
  // cache a 100k-derivation closure spends most of its time re-reading pages. 64 MiB keeps them in memory.
  db.pragma(`cache_size = -${PAGE_CACHE_KIB}`);
  db.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  migrate(db);
  return db;
}

/** Brings the schema up to date, or (a test making a database as an older release left it) up to version `upTo`. */
export function migrate(db: Db, upTo = MIGRATIONS.length): void {
  db.exec('CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)');
  const row = db.prepare('SELECT MAX(version) AS v FROM schema_migrations').get() as { v: number | null };
  const current = row.v ?? 0;
  MIGRATIONS.forEach((migration, index) => {
    const version = index + 1;
    if (version <= current || version > upTo) return;
    db.transaction(() => {
      if (typeof migration === 'string') db.exec(migration);
      else migration(db);
      db.prepare('INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)').run(version, Date.now());
    })();
  });
}
