import { describe, expect, it } from 'vitest';
import { Outbox } from './outbox.js';

describe('Outbox', () => {
  it('numbers events with increasing message ids from 1 within one agent process', () => {
    const outbox = new Outbox();
    const a = outbox.add('l1', { $case: 'accepted', value: {} });
    const b = outbox.add('l1', { $case: 'started', value: { startedAtMs: 5 } });
    const c = outbox.add('l2', { $case: 'accepted', value: {} });
    expect([a.messageId, b.messageId, c.messageId]).toEqual([1, 2, 3]);
  });

  it('gives every agent process its own random session nonce', () => {
    expect(new Outbox().sessionNonce).not.toBe(new Outbox().sessionNonce);
    expect(new Outbox().sessionNonce).toMatch(/^[0-9a-f-]{36}$/);
  });

  it('keeps events until an Ack names them and re-sends the rest in order', () => {
    const outbox = new Outbox();
    for (let i = 0; i < 4; i++) outbox.add(`l${i}`, { $case: 'accepted', value: {} });
    expect(outbox.ack([2, 4]).map((e) => e.messageId)).toEqual([2, 4]);
    expect(outbox.unacked().map((e) => e.messageId)).toEqual([1, 3]);
  });

  it('ignores acknowledgements of ids it does not hold, such as a repeated Ack', () => {
    const outbox = new Outbox();
    outbox.add('l', { $case: 'accepted', value: {} });
    expect(outbox.ack([1]).length).toBe(1);
    expect(outbox.ack([1, 99])).toEqual([]);
    expect(outbox.size).toBe(0);
  });

  it('forgets every event of a lease the coordinator dropped', () => {
    const outbox = new Outbox();
    outbox.add('gone', { $case: 'accepted', value: {} });
    outbox.add('kept', { $case: 'accepted', value: {} });
    outbox.add('gone', { $case: 'started', value: { startedAtMs: 1 } });
    outbox.forgetLease('gone');
    expect(outbox.unacked().map((e) => e.leaseId)).toEqual(['kept']);
  });
});
