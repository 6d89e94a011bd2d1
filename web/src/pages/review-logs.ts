import { AnsiParser } from '../ansi.js';
import { apiFetch, type Memo } from '../api.js';
import { h } from '../dom.js';
import { storeHash } from '../format.js';

/** The end of a failure's log on the review page, with its colours: what tells a reviewer why it failed. */

// As many lines as the review keeps of a root cause's log (coordinator/review ROOT_CAUSE_LOG_LINES).
const TAIL_LINES = 30;
// Read from the end of a log to find those lines; a longer last line is shown cut.
const TAIL_BYTES = 16 * 1024;

/** A log tail the review already holds. */
export function logTail(text: string): HTMLElement {
  const pre = h('pre', { class: 'log-text log-tail' });
  fill(pre, text);
  return pre;
}

/** The tail of a failed derivation's latest log, read now (it is not part of the review). */
export function failureLog(drvPath: string, o: { signal: AbortSignal; memo: Memo }): HTMLElement {
  const { signal } = o;
  const pre = h('pre', { class: 'log-text log-tail' }, 'Reading the log…');
  const path = `/derivations/${storeHash(drvPath)}/log`;
  const read = async (): Promise<string> => {
    const r = await apiFetch(path, { headers: { Range: `bytes=-${TAIL_BYTES}` }, signal }, [416]);
    return r.status === 416 ? '' : r.text();
  };
  void o
    .memo(`log:${drvPath}`, read)
    .then((text) => fill(pre, text === '' ? '(the log is empty)' : text))
    .catch((err: unknown) => {
      if (!signal.aborted) pre.textContent = `Cannot read the log: ${(err as Error).message}`;
    });
  return pre;
}

function fill(pre: HTMLElement, text: string): void {
  const lines = text.replace(/\r\n?/g, '\n').replace(/\n+$/, '').split('\n');
  const parser = new AnsiParser();
  const segments = [...parser.push(lines.slice(-TAIL_LINES).join('\n')), ...parser.end()];
  pre.replaceChildren(
    ...segments.map(({ text, classes }) =>
      classes === '' ? document.createTextNode(text) : h('span', { class: classes }, text),
    ),
  );
}
