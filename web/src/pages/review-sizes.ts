import type { AttrReview, OutputSizes, Review } from '../../../coordinator/review/model.js';
import type { Memo } from '../api.js';
import { h } from '../dom.js';
import { bytes } from '../format.js';
import { attrLink, table } from './review-table.js';
import { sizeBars, sizeHistory } from './size-chart.js';

// Attributes whose size history is read for a sparkline.
const MAX_SPARKLINES = 20;

export interface SizeRow {
  a: AttrReview;
  s: OutputSizes;
}

/** Outputs whose size moved and that were built on both sides; warnings (the job's size_check) first, then largest. */
export function sizeChanges(attrs: AttrReview[]): SizeRow[] {
  return attrs
    .flatMap((a) => (a.sizes ?? []).map((s) => ({ a, s })))
    .filter(({ s }) => s.base && s.head && (s.closureSizeDelta !== 0 || s.narSizeDelta !== 0))
    .sort(
      (x, y) =>
        Number(y.s.warning) - Number(x.s.warning) ||
        Math.abs(y.s.closureSizePercent ?? 0) - Math.abs(x.s.closureSizePercent ?? 0),
    );
}

/** The size changes in figures, base and head as bars, and the attribute's size over its commits. */
export function sizeTable(
  rows: SizeRow[],
  review: Review,
  o: { repo: string; signal: AbortSignal; memo: Memo },
  multiJob: boolean,
): HTMLElement {
  const marked = { base: review.base.rev, head: review.head.rev };
  const signed = (n: number | null, f: (n: number) => string): string =>
    n === null ? '—' : `${n < 0 ? '−' : '+'}${f(Math.abs(n))}`;
  return table(
    ['Attribute', 'Output', 'Closure base → head', 'Change', 'Output (NAR)', 'Chart', 'History'],
    rows.map(({ a, s }, i) => [
      [attrLink(a, multiJob), s.warning && h('span', { class: 'tag warn' }, 'over the size check')],
      h('code', null, s.output),
      `${bytes(s.base?.closureSize)} → ${bytes(s.head?.closureSize)}`,
      h(
        'span',
        { class: 'size-delta' },
        signed(s.closureSizeDelta, bytes),
        ' (',
        signed(s.closureSizePercent, (n) => `${n.toFixed(1)} %`),
        ')',
      ),
      signed(s.narSizeDelta, bytes),
      sizeBars(s),
      i < MAX_SPARKLINES ? sizeHistory(a.attr, a.job, s.output, marked, o) : '',
    ]),
    (i) => (rows[i]!.s.warning ? 'size-row warning' : 'size-row'),
  );
}
