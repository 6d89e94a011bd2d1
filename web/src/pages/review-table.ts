import type { AttrReview } from '../../../coordinator/review/model.js';
import { type Child, h, replace } from '../dom.js';
import { buildHref } from '../format.js';

/** The review page's building blocks: attribute links and tables that stay short until asked. */

// Rows a table shows before "show all": a nixpkgs review lists thousands of attributes.
const MAX_ROWS = 100;

/** An attribute, linked to the build that decides it (head's, or base's for a removed one). */
export function attrLink(a: AttrReview, multiJob: boolean): Child {
  const drv = a.head?.drv ?? a.base?.drv;
  const label = [h('code', null, a.attr), multiJob && h('span', { class: 'muted' }, ` (${a.job})`)];
  return drv ? h('a', { href: buildHref(drv), class: 'attr', 'data-attr': a.attr }, label) : label;
}

/** A table of rows, the first MAX_ROWS shown and the rest behind a button. */
export function table(headers: string[], rows: Child[][], rowClass?: (i: number) => string | undefined): HTMLElement {
  const tr = (cells: Child[], i: number): HTMLElement =>
    h(
      'tr',
      { class: rowClass?.(i) },
      cells.map((c) => h('td', null, c)),
    );
  const body = h('tbody', null, rows.slice(0, MAX_ROWS).map(tr));
  const more =
    rows.length > MAX_ROWS &&
    h(
      'button',
      {
        type: 'button',
        class: 'show-all',
        onclick: (event: Event) => {
          replace(body, rows.map(tr));
          (event.target as HTMLElement).remove();
        },
      },
      `Show all ${rows.length}`,
    );
  const head = h(
    'thead',
    null,
    h(
      'tr',
      null,
      headers.map((x) => h('th', null, x)),
    ),
  );
  return h('div', { class: 'table-wrap' }, h('table', null, head, body), more);
}
