import type { KeyObject } from 'node:crypto';
import { Worker } from 'node:worker_threads';

/** How long the thread is kept without work before it ends (a busy coordinator keeps it; a test's cache lets it go). */
const IDLE_MS = 5_000;

/** Stands in a narinfo's text for the signature the thread makes (`FileWriter.storeSignedOnce`). */
export const SIGNATURE_SLOT = '\u0000signature\u0000';

// The thread's code: only Node's own modules, so it runs from a string and needs no file of its own (which a test run
// from sources would not have compiled). Each message is one whole file: written under its temporary name, then
// renamed into place, or (a narinfo, signed here) linked into place unless a file has that name already.
const THREAD = `
const { parentPort, workerData } = require('node:worker_threads');
const crypto = require('node:crypto');
const fs = require('node:fs');
const { signer, slot } = workerData;
parentPort.on('message', (m) => {
  try {
    let sig;
    let data = m.data;
    if (m.fingerprint !== undefined) {
      sig = signer.name + ':' + crypto.sign(null, Buffer.from(m.fingerprint, 'utf8'), signer.privateKey).toString('base64');
      data = data.replace(slot, () => sig);
    }
    fs.writeFileSync(m.tmp, data, { flag: 'wx' });
    let stored = true;
    if (m.once) {
      try {
        fs.linkSync(m.tmp, m.final);
      } catch (err) {
        if (err.code !== 'EEXIST') throw err;
        stored = false;
      }
      fs.unlinkSync(m.tmp);
    } else {
      fs.renameSync(m.tmp, m.final);
    }
    parentPort.postMessage({ id: m.id, stored, sig });
  } catch (err) {
    try {
      fs.rmSync(m.tmp, { force: true });
    } catch {}
    const { message, code, errno, syscall, path } = err;
    parentPort.postMessage({ id: m.id, error: { message: String(message), code, errno, syscall, path } });
  }
});
`;

interface Reply {
  id: number;
  stored?: boolean;
  sig?: string;
  error?: { message: string; code?: string; errno?: number; syscall?: string; path?: string };
}

interface Written {
  /** False when a file had the name already (and was kept). */
  stored: boolean;
  /** `name:base64`, for a signed narinfo. */
  sig?: string;
}

/**
 * Creates the cache's files on a thread of its own, and signs its narinfos there. An upload makes two files (its NAR
 * and its narinfo), each a create, a write, a close and a rename or link, and one signature: on the event loop,
 * through libuv's threads, each file cost it ≈90–260 µs and each signature ≈90 µs (every hop wakes another thread,
 * on a busy machine often a switch to it), against ≈15 µs for one message to this thread and its answer. In
 * bench/fleet these were half of a busy coordinator's time. Errors arrive as the file call threw them, with their
 * `code` (ENOSPC is how a full disk is noticed).
 */
export class FileWriter {
  private worker: Worker | undefined;
  private readonly pending = new Map<number, { resolve: (w: Written) => void; reject: (err: Error) => void }>();
  private nextId = 1;
  private idle: NodeJS.Timeout | undefined;

  /** `signer`: the key narinfos are signed with (`name:base64` signatures, as Nix makes them). */
  constructor(private readonly signer?: { name: string; privateKey: KeyObject }) {}

  /** Writes `data` to `tmp` and renames it to `final`: a reader sees all of the file or none of it. */
  async place(tmp: string, final: string, data: Buffer): Promise<void> {
    await this.send({ tmp, final, data, once: false });
  }

  /**
   * Signs `fingerprint`, puts the signature in `text` for `SIGNATURE_SLOT`, writes it to `tmp` and links that to
   * `final` unless a file has that name already: link() never replaces a file, so of two writers of one name exactly
   * one wins. `tmp` is gone afterwards.
   */
  async storeSignedOnce(tmp: string, final: string, text: string, fingerprint: string): Promise<Required<Written>> {
    if (!this.signer) throw new Error('this FileWriter was made without a signing key');
    const { stored, sig } = await this.send({ tmp, final, data: text, once: true, fingerprint });
    return { stored, sig: sig! };
  }

  private send(m: { tmp: string; final: string; data: Buffer | string; once: boolean; fingerprint?: string }) {
    const worker = this.thread();
    const id = this.nextId++;
    // A Buffer is often a view of a larger allocation (a socket read, Node's pool), which a message would copy whole:
    // its own bytes are copied once and moved.
    const data = typeof m.data === 'string' ? m.data : new Uint8Array(m.data);
    return new Promise<Written>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      if (this.pending.size === 1) {
        clearTimeout(this.idle);
        worker.ref();
      }
      worker.postMessage({ ...m, id, data }, typeof data === 'string' ? [] : [data.buffer]);
    });
  }

  private thread(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(THREAD, { eval: true, workerData: { signer: this.signer, slot: SIGNATURE_SLOT } });
    worker.unref();
    worker.on('message', (reply: Reply) => {
      const waiting = this.pending.get(reply.id);
      if (!waiting) return;
      this.pending.delete(reply.id);
      if (this.pending.size === 0) this.rest(worker);
      if (reply.error) waiting.reject(Object.assign(new Error(reply.error.message), reply.error));
      else waiting.resolve({ stored: reply.stored ?? true, sig: reply.sig });
    });
    // A thread that ended (it should not) fails what it was writing; the next file starts a new one.
    const ended = (err: Error): void => {
      if (this.worker !== worker) return;
      this.worker = undefined;
      clearTimeout(this.idle);
      const waiting = [...this.pending.values()];
      this.pending.clear();
      for (const w of waiting) w.reject(err);
    };
    worker.on('error', ended);
    worker.on('exit', (code) => ended(new Error(`the cache's file thread ended (exit code ${code})`)));
    this.worker = worker;
    return worker;
  }

  /** No file is being written: the process may exit, and the thread ends if nothing comes for a while. */
  private rest(worker: Worker): void {
    worker.unref();
    clearTimeout(this.idle);
    this.idle = setTimeout(() => {
      if (this.worker !== worker || this.pending.size > 0) return;
      this.worker = undefined;
      void worker.terminate();
    }, IDLE_MS);
    this.idle.unref();
  }
}
