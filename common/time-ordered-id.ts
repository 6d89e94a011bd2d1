import { randomFillSync } from 'node:crypto';

const ID_BYTES = 16;
/** Random bytes for this many ids are drawn at once: one call into the CSPRNG per id cost most of making one. */
const POOLED_IDS = 256;
const pool = Buffer.alloc(ID_BYTES * POOLED_IDS);
let used = pool.length;

/**
 * A UUID of version 7 (RFC 9562): 48 bits of milliseconds since the epoch, then 74 random bits. Ids made one after
 * another sort together, so a table keyed by them grows at one end of its index instead of dirtying a random page
 * of it per row; the random bits keep them unguessable.
 */
export function timeOrderedId(nowMs: number = Date.now()): string {
  if (used === pool.length) {
    randomFillSync(pool);
    used = 0;
  }
  // Each id's bytes are used once, then drawn afresh with the rest of the pool.
  const b = pool.subarray(used, used + ID_BYTES);
  used += ID_BYTES;
  b.writeUIntBE(Math.max(0, Math.floor(nowMs)) % 2 ** 48, 0, 6);
  b[6] = (b[6]! & 0x0f) | 0x70;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
