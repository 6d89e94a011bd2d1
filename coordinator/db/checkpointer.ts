import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import type { Db } from './database.js';

/** How often the thread checkpoints the WAL. */
const CHECKPOINT_INTERVAL_MS = 250;
/**
 * The writer's own checkpoint, in pages of WAL, is kept as a backstop: under a steady stream of commits the thread's
 * checkpoint never catches up with the last one, and SQLite starts the WAL over only after one that did. SQLite's
 * default is 1000 pages. The writer finds most of them copied already, but still syncs: at 4096 pages (16 MiB),
 * one commit in a hundred took 14 ms in a steady stream of commits of 60 random rows; at 16384 (64 MiB of WAL at
 * most), 1.2 ms.
 */
const BACKSTOP_PAGES = 16_384;
const DEFAULT_AUTOCHECKPOINT_PAGES = 1000;

// The thread's code: it needs nothing from this repository, so it runs from a string and needs no file of its own
// (which a test run from sources would not have compiled).
const THREAD = `
const { parentPort, workerData } = require('node:worker_threads');
const Database = require(workerData.module);
const db = new Database(workerData.file, { fileMustExist: true });
const timer = setInterval(() => {
  try {
    db.pragma('wal_checkpoint(PASSIVE)');
  } catch (err) {
    parentPort.postMessage({ message: String(err && err.message), code: err && err.code });
  }
}, workerData.intervalMs);
parentPort.on('message', () => {
  clearInterval(timer);
  db.close();
  parentPort.close();
});
`;

/**
 * Copies the WAL into the database file on a thread of its own. A checkpoint syncs both files to disk, and made on
 * the event loop after a commit (SQLite's default) it was most of what a commit cost: 13 % of a busy coordinator's
 * time (bench/fleet). The thread's checkpoints run beside the commits, which only append to the WAL.
 */
export class Checkpointer {
  private readonly worker: Worker;
  private readonly exited: Promise<void>;
  private stopping = false;

  /** `onError` hears of a checkpoint that failed (a full disk) and of the thread ending unasked. */
  constructor(
    private readonly db: Db,
    onError: (err: Error) => void,
  ) {
    db.pragma(`wal_autocheckpoint = ${BACKSTOP_PAGES}`);
    this.worker = new Worker(THREAD, {
      eval: true,
      workerData: {
        module: createRequire(import.meta.url).resolve('better-sqlite3'),
        file: db.name,
        intervalMs: CHECKPOINT_INTERVAL_MS,
      },
    });
    this.worker.unref();
    this.worker.on('message', (m: { message: string; code?: string }) =>
      onError(Object.assign(new Error(`WAL checkpoint failed: ${m.message}`), { code: m.code })),
    );
    this.exited = new Promise((resolve) => {
      this.worker.on('error', (err) => onError(err));
      this.worker.on('exit', () => {
        // Without the thread, the writer checkpoints as often as SQLite would.
        if (!this.stopping && db.open) {
          db.pragma(`wal_autocheckpoint = ${DEFAULT_AUTOCHECKPOINT_PAGES}`);
          onError(new Error('the WAL checkpoint thread ended; checkpoints are made after commits again'));
        }
        resolve();
      });
    });
  }

  /** Ends the thread; the writer's checkpoints go back to SQLite's default. */
  async stop(): Promise<void> {
    this.stopping = true;
    // Held until it ended: a process with nothing else to do would otherwise exit here, its stop never finished.
    this.worker.ref();
    this.worker.postMessage('stop');
    await this.exited;
    if (this.db.open) this.db.pragma(`wal_autocheckpoint = ${DEFAULT_AUTOCHECKPOINT_PAGES}`);
  }
}
