/**
 * What every reader of bench/logs does with the text it receives, whichever way it came (SSE, `cat`, a pipe): a
 * SHA-256 of all of it, its length, when its first byte arrived, and when each of the builder's marker lines
 * (bench/logs-builder.ts) became whole. The SSE followers and the baselines run this same code, so the ratio
 * between them is the cost of the way the bytes came, not of what was done with them.
 */
import { createHash } from 'node:crypto';
import { MARKER, type MarkerKind, nsToMs } from './logs-builder.js';

/** A marker line as a reader saw it: the builder's clock when printed, the reader's when whole, both in ms. */
export interface Seen {
  kind: MarkerKind;
  index: number;
  printedAt: number;
  seenAt: number;
  /** Byte offset of the line's first byte in what this reader received. */
  offset: number;
  /** Byte offset just past the line's newline. */
  endOffset: number;
}

export type Mark = [printedAt: number, seenAt: number, endOffset: number];

export interface ReadResult {
  bytes: number;
  sha256: string;
  firstByteAt: number | null;
  start: Seen | null;
  end: Seen | null;
  /** Flood markers (`MARK`) and quiet ones (`TRICKLE`): printed and seen (ms), and the offset past the line. */
  marks: Mark[];
  trickle: Mark[];
  doneAt: number;
}

export class LogReader {
  private readonly hash = createHash('sha256');
  private bytes = 0;
  private firstByteAt: number | null = null;
  private start: Seen | null = null;
  private end: Seen | null = null;
  private readonly marks: Mark[] = [];
  private readonly trickle: Mark[] = [];
  /** The start of a marker line (or what may be one) that the last text cut off, and its offset. */
  private pending = '';
  private pendingOffset = 0;

  /** Takes the next piece of text, received at `at` (ms on the realtime clock). */
  feed(text: string, at: number): void {
    if (text.length === 0) return;
    this.firstByteAt ??= at;
    const base = this.bytes;
    const ascii = text.length === Buffer.byteLength(text, 'utf8');
    // The same bytes either way; latin1 copies a one-byte string as it is, where utf8 would encode it.
    this.hash.update(text, ascii ? 'latin1' : 'utf8');
    this.bytes += ascii ? text.length : Buffer.byteLength(text, 'utf8');
    const offsetOf = (i: number): number => base + (ascii ? i : Buffer.byteLength(text.slice(0, i), 'utf8'));
    let from = 0;
    if (this.pending !== '') {
      const nl = text.indexOf('\n');
      if (nl < 0) {
        this.pending += text;
        return;
      }
      const line = this.pending + text.slice(0, nl);
      this.pending = '';
      this.line(line, at, this.pendingOffset, offsetOf(nl + 1));
      from = nl + 1;
    }
    for (;;) {
      const i = text.indexOf(MARKER, from);
      if (i < 0) break;
      const nl = text.indexOf('\n', i);
      if (nl < 0) {
        this.hold(text.slice(i), offsetOf(i));
        return;
      }
      this.line(text.slice(i, nl), at, offsetOf(i), offsetOf(nl + 1));
      from = nl + 1;
    }
    // A marker cut off inside its tag ("@@EKA") is not found above: keep a last line that may start one.
    const last = text.lastIndexOf('\n') + 1;
    if (last >= from && text.length - last < MARKER.length && MARKER.startsWith(text.slice(last))) {
      this.hold(text.slice(last), offsetOf(last));
    }
  }

  /** Whether the end of the flood (`END`) has been seen. */
  get ended(): boolean {
    return this.end !== null;
  }

  result(doneAt: number): ReadResult {
    return {
      bytes: this.bytes,
      sha256: this.hash.copy().digest('hex'),
      firstByteAt: this.firstByteAt,
      start: this.start,
      end: this.end,
      marks: this.marks,
      trickle: this.trickle,
      doneAt,
    };
  }

  private hold(text: string, offset: number): void {
    this.pending = text;
    this.pendingOffset = offset;
  }

  private line(line: string, at: number, offset: number, endOffset: number): void {
    if (!line.startsWith(MARKER)) return;
    const [kind, index, ns] = line.slice(MARKER.length).split(' ') as [MarkerKind, string, string];
    const printedAt = nsToMs(ns);
    if (kind === 'MARK') this.marks.push([printedAt, at, endOffset]);
    else if (kind === 'TRICKLE') this.trickle.push([printedAt, at, endOffset]);
    else {
      const seen: Seen = { kind, index: Number(index), printedAt, seenAt: at, offset, endOffset };
      if (kind === 'START') this.start ??= seen;
      else if (kind === 'END') this.end ??= seen;
    }
  }
}
