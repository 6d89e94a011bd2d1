import {
  type ChangeSummary,
  type PackageRef,
  type SetChange,
  groupChanges,
} from '../../../coordinator/review/change-summary.js';
import type { AttrReview, Review } from '../../../coordinator/review/model.js';
import { type Child, h, replace } from '../dom.js';
import { attrLink, table } from './review-table.js';

/**
 * The review's package changes (review.changes, coordinator/review/change-summary.ts), in the markdown summary's
 * order: a counts line, then versions, broken, licenses, failing meta fields, new and removed packages, platforms and
 * maintainers. A change many attributes share (a license, a platform, a maintainer) is one row naming them.
 */

// Attributes named in a shared change's row before "and N more", which opens the rest.
const MAX_NAMED = 3;

export function packageChangesSection(review: Review, multiJob: boolean): Child {
  const c = review.changes;
  if (!c) return false;
  // An attribute links to its build where the review lists it (meta-only changes are in its unchanged attributes).
  const reviewed = new Map(review.attrs.map((a) => [`${a.job}\u0000${a.attr}`, a]));
  const name = (p: PackageRef): Child => {
    const a: AttrReview | undefined = reviewed.get(`${p.job}\u0000${p.attr}`);
    return a
      ? attrLink(a, multiJob)
      : [h('code', null, p.attr), multiJob && h('span', { class: 'muted' }, ` (${p.job})`)];
  };
  const names = (attrs: PackageRef[]): Child => {
    const rest = attrs.slice(MAX_NAMED);
    const list = (xs: PackageRef[]): Child[] => xs.map((a, i) => [i > 0 && ', ', name(a)]);
    return [
      list(attrs.slice(0, MAX_NAMED)),
      rest.length > 0 &&
        h(
          'details',
          {
            class: 'more-attrs',
            // Built when opened: a platform added treewide names tens of thousands of attributes.
            ontoggle: (event: Event) => {
              const details = event.currentTarget as HTMLDetailsElement;
              const body = details.querySelector('.rest');
              if (details.open && body && !body.hasChildNodes()) replace(body, list(rest));
            },
          },
          h('summary', null, `and ${rest.length} more`),
          h('span', { class: 'rest' }),
        ),
    ];
  };
  const listed = (xs: string[]): string => (xs.length > 0 ? xs.join(', ') : '—');
  const version = (v: string | null): string => v ?? '—';
  const setRows = (list: SetChange[]): Child[][] =>
    groupChanges(list, (x) => JSON.stringify([x.added, x.removed])).map((g) => [
      listed(g.change.added),
      listed(g.change.removed),
      names(g.attrs),
    ]);
  const total = (Object.values(c) as unknown[][]).reduce((n, list) => n + list.length, 0);
  return h(
    'section',
    { class: 'review-section', id: 'package-changes', 'data-count': total },
    h('h2', null, `Package changes (${total})`),
    h('p', { class: 'change-counts' }, counts(c)),
    kind('versions', 'Version changes', c.versions.length, () =>
      table(
        ['Attribute', 'Package', 'Version base → head'],
        c.versions.map((v) => [
          name(v),
          v.base.pname !== null && v.head.pname !== null && v.base.pname !== v.head.pname
            ? [h('code', null, v.base.pname), ' → ', h('code', null, v.head.pname)]
            : h('code', null, v.head.pname ?? v.base.pname ?? '—'),
          `${version(v.base.version)} → ${version(v.head.version)}`,
        ]),
      ),
    ),
    kind('broken', 'Broken', c.broken.length, () =>
      table(
        ['Attribute', 'meta.broken base → head'],
        c.broken.map((b) => [name(b), `${b.base ? 'broken' : 'not broken'} → ${b.head ? 'broken' : 'not broken'}`]),
      ),
    ),
    kind('licenses', 'License changes', c.licenses.length, () =>
      table(
        ['Base', 'Head', 'Attributes'],
        groupChanges(c.licenses, (l) => JSON.stringify([l.base, l.head])).map((g) => [
          listed(g.change.base),
          listed(g.change.head),
          names(g.attrs),
        ]),
      ),
    ),
    kind('meta-errors', 'Meta fields failing to evaluate', c.metaErrors.length, () =>
      table(
        ['Attribute', 'Field', 'Base → head', 'Error'],
        c.metaErrors.map((e) => [
          name(e),
          h('code', null, e.field),
          e.side === 'head' ? 'ok → error' : 'error → ok',
          h('pre', { class: 'error-text' }, e.error),
        ]),
      ),
    ),
    kind('new-packages', 'New packages', c.added.length, () =>
      table(
        ['Attribute', 'Package', 'Version'],
        c.added.map((p) => [name(p), h('code', null, p.pname ?? '—'), version(p.version)]),
      ),
    ),
    kind('removed-packages', 'Removed packages', c.removed.length, () =>
      table(
        ['Attribute', 'Package', 'Version'],
        c.removed.map((p) => [name(p), h('code', null, p.pname ?? '—'), version(p.version)]),
      ),
    ),
    kind('platforms', 'Platform changes', c.platforms.length, () =>
      table(['Added', 'Removed', 'Attributes'], setRows(c.platforms)),
    ),
    kind('maintainers', 'Maintainer changes', c.maintainers.length, () =>
      table(['Added', 'Removed', 'Attributes'], setRows(c.maintainers)),
    ),
  );
}

function kind(id: string, heading: string, count: number, body: () => HTMLElement): Child {
  if (count === 0) return false;
  return h('div', { class: 'change-kind', 'data-kind': id }, h('h3', null, `${heading} (${count})`), body());
}

/** The counts line of the markdown summary, in its words. */
function counts(c: ChangeSummary): string {
  const plural = (n: number, noun: string): string => `${n} ${noun}${n === 1 ? '' : 's'}`;
  const newErrors = c.metaErrors.filter((e) => e.side === 'head').length;
  const newlyBroken = c.broken.filter((b) => b.head).length;
  const parts = [
    c.versions.length > 0 && plural(c.versions.length, 'version change'),
    c.added.length > 0 && plural(c.added.length, 'new package'),
    c.removed.length > 0 && plural(c.removed.length, 'removed package'),
    newlyBroken > 0 && `${newlyBroken} newly broken`,
    c.broken.length > newlyBroken && `${c.broken.length - newlyBroken} no longer broken`,
    c.licenses.length > 0 && plural(c.licenses.length, 'license change'),
    c.platforms.length > 0 && plural(c.platforms.length, 'platform change'),
    c.maintainers.length > 0 && plural(c.maintainers.length, 'maintainer change'),
    newErrors > 0 && `${plural(newErrors, 'meta field')} newly failing to evaluate`,
    c.metaErrors.length > newErrors && `${plural(c.metaErrors.length - newErrors, 'meta field')} fixed`,
  ];
  return `${parts.filter(Boolean).join(', ')}.`;
}
