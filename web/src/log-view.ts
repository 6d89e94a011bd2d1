import { sseEvents } from '../../common/sse.js';
import { AnsiParser, type Segment } from './ansi.js';
import { API, type ApiError, apiFetch, authHeaders, type EndOfLog, errorOf } from './api.js';
import { h } from './dom.js';
import { bytes } from './format.js';
import { sleep } from './timing.js';

/**
 * One attempt's log: its tail first (`Range`), earlier parts on demand, and — while the attempt runs — the rest live
 * over Server-Sent Events from where the tail ended (`Last-Event-ID`). EventSource cannot send the credential, so the
 * stream is read with fetch().
 */

// The tail a log opens with: the last screens of a failure, small enough to arrive at once.
const TAIL_BYTES = 64 * 1024;
// Each step backwards through a long log.
const PAGE_BYTES = 256 * 1024;
// After a follower lost its connection (the server's `retry:` says the same).
const RECONNECT_MS = 2000;
// A reader this close to the bottom is following the log: new lines keep it at the bottom.
const STICKY_PX = 24;
// Scrolled this close to the top, the reader wants what came before.
const EARLIER_PX = 8;
const NEWLINE = 10;

export interface LogViewOptions {
  hash: string;
  attempt: number;
  /** The attempt is running: follow its log until it ends. */
  live: boolean;
  /** The coordinator cut the log at its size limit. */
  truncated: boolean;
  signal: AbortSignal;
  /** Called once a followed log has ended, with the attempt's and the derivation's final state. */
  onEnd: (end: EndOfLog) => void;
}

export class LogView {
  readonly element: HTMLElement;
  private readonly text: HTMLPreElement;
  private readonly earlier: HTMLButtonElement;
  private readonly status: HTMLElement;
  private readonly parser = new AnsiParser();
  /** The first byte shown, and the byte after the last one. */
  private firstByte = 0;
  private nextByte = 0;
  private loadingEarlier = false;

  constructor(private readonly options: LogViewOptions) {
    this.earlier = h('button', {
      class: 'log-earlier',
      type: 'button',
      hidden: true,
      onclick: () => this.clickEarlier(),
    });
    this.status = h('span', { class: 'log-status' }, 'Loading the log…');
    this.text = h('pre', { class: 'log-text', tabindex: 0 });
    this.text.addEventListener('scroll', () => {
      if (this.text.scrollTop <= EARLIER_PX) this.clickEarlier();
    });
    this.element = h('section', { class: 'log' }, h('div', { class: 'log-bar' }, this.earlier, this.status), this.text);
  }

  /** Loads the tail, then follows the log if the attempt runs. Errors are shown in the view. */
  async start(): Promise<void> {
    try {
      const { data, start, size } = await this.range(`bytes=-${TAIL_BYTES}`);
      // A tail that starts inside a line shows from the next one: the cut line belongs to the page before.
      const firstLine = start > 0 ? data.indexOf(NEWLINE) + 1 : 0;
      const from = firstLine > 0 && firstLine < data.length ? firstLine : 0;
      // A followed log continues after its last whole line, so no character or escape is cut in two.
      const to = this.options.live ? Math.max(from, data.lastIndexOf(NEWLINE) + 1) : data.length;
      this.firstByte = start + from;
      this.nextByte = start + to;
      this.render(this.parser.push(decode(data.subarray(from, to))), 'append');
      this.text.scrollTop = this.text.scrollHeight;
      this.updateEarlier();
      if (!this.options.live) {
        this.render(this.parser.end(), 'append');
        this.setStatus(
          'ended',
          size === 0 ? 'The log is empty.' : `${bytes(size)}${this.options.truncated ? ', cut at the size limit' : ''}`,
        );
        return;
      }
      await this.follow();
    } catch (err) {
      if (!this.options.signal.aborted) this.setStatus('error', `Cannot read the log: ${(err as Error).message}`);
    }
  }

  private get path(): string {
    return `/derivations/${this.options.hash}/attempts/${this.options.attempt}/log`;
  }

  /** One range of the log, where it starts, and the log's whole size. */
  private async range(range: string): Promise<{ data: Uint8Array; start: number; size: number }> {
    const r = await apiFetch(this.path, { headers: { Range: range }, signal: this.options.signal }, [416]);
    const contentRange = r.headers.get('Content-Range') ?? '';
    if (r.status === 416) {
      // Nothing to read yet: an empty log.
      const size = Number(/\/(\d+)$/.exec(contentRange)?.[1] ?? 0);
      return { data: new Uint8Array(), start: size, size };
    }
    const data = new Uint8Array(await r.arrayBuffer());
    const m = /^bytes (\d+)-\d+\/(\d+)$/.exec(contentRange);
    return m ? { data, start: Number(m[1]), size: Number(m[2]) } : { data, start: 0, size: data.length };
  }

  private clickEarlier(): void {
    if (this.firstByte === 0 || this.loadingEarlier) return;
    this.loadingEarlier = true;
    this.updateEarlier();
    void this.loadEarlier()
      .catch((err: unknown) => {
        if (!this.options.signal.aborted) this.setStatus('error', `Cannot read the log: ${(err as Error).message}`);
      })
      .finally(() => {
        this.loadingEarlier = false;
        this.updateEarlier();
      });
  }

  private async loadEarlier(): Promise<void> {
    const start = Math.max(0, this.firstByte - PAGE_BYTES);
    const { data } = await this.range(`bytes=${start}-${this.firstByte - 1}`);
    const firstLine = start > 0 ? data.indexOf(NEWLINE) + 1 : 0;
    const from = firstLine > 0 && firstLine < data.length ? firstLine : 0;
    // The page has no colours from what came before it: escapes rarely span lines, and it ends where the next began.
    const parser = new AnsiParser();
    const segments = [...parser.push(decode(data.subarray(from))), ...parser.end()];
    const height = this.text.scrollHeight;
    this.render(segments, 'prepend');
    // Keep what the reader was looking at in place.
    this.text.scrollTop += this.text.scrollHeight - height;
    this.firstByte = start + from;
  }

  private async follow(): Promise<void> {
    const { signal } = this.options;
    while (!signal.aborted) {
      try {
        const r = await fetch(`${API}${this.path}?follow=1`, {
          headers: { ...authHeaders(), Accept: 'text/event-stream', 'Last-Event-ID': String(this.nextByte) },
          signal,
        });
        if (!r.ok) {
          const error: ApiError = await errorOf(r);
          // A refusal stands; a server error (a proxy's 502 while the coordinator restarts) passes: try again.
          if (r.status < 500) {
            this.setStatus('error', `Cannot follow the log: ${error.message}`);
            return;
          }
          this.setStatus('reconnecting', `Cannot follow the log (${error.message}): trying again…`);
          await sleep(RECONNECT_MS, signal);
          continue;
        }
        this.setStatus('live', 'Following live…');
        for await (const event of sseEvents(r)) {
          if (event.event === 'log') {
            this.append(JSON.parse(event.data) as string);
            this.nextByte = Number(event.id);
          } else if (event.event === 'end') {
            this.finish(JSON.parse(event.data) as EndOfLog);
            return;
          } else if (event.event === 'error') break;
        }
      } catch {
        if (signal.aborted) return;
      }
      this.setStatus('reconnecting', 'Lost the connection: reconnecting…');
      await sleep(RECONNECT_MS, signal);
    }
  }

  private append(text: string): void {
    const t = this.text;
    const following = t.scrollHeight - t.scrollTop - t.clientHeight <= STICKY_PX;
    this.render(this.parser.push(text), 'append');
    if (following) t.scrollTop = t.scrollHeight;
  }

  private finish(end: EndOfLog): void {
    this.render(this.parser.end(), 'append');
    const how = end.attemptState ?? 'ended';
    this.setStatus(
      'ended',
      `Attempt ${end.attempt} ${how}: ${bytes(end.bytes)}${end.truncated ? ', cut at the size limit' : ''}`,
    );
    this.options.onEnd(end);
  }

  private render(segments: readonly Segment[], where: 'append' | 'prepend'): void {
    const fragment = document.createDocumentFragment();
    for (const { text, classes } of segments) {
      fragment.append(classes === '' ? document.createTextNode(text) : h('span', { class: classes }, text));
    }
    if (where === 'append') this.text.append(fragment);
    else this.text.prepend(fragment);
  }

  private updateEarlier(): void {
    this.earlier.hidden = this.firstByte === 0;
    this.earlier.disabled = this.loadingEarlier;
    this.earlier.textContent = this.loadingEarlier
      ? 'Loading…'
      : `Load earlier (${bytes(Math.min(PAGE_BYTES, this.firstByte))} of ${bytes(this.firstByte)} not shown)`;
  }

  private setStatus(state: 'live' | 'ended' | 'error' | 'reconnecting', message: string): void {
    this.status.dataset.state = state;
    this.status.textContent = message;
  }
}

function decode(data: Uint8Array): string {
  return new TextDecoder('utf-8').decode(data);
}
