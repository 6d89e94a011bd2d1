import { failedChecks, isBlockingEvalFailure, isNewEvalFailure } from '../../../coordinator/review/classify.js';
import type { AttrReview, CheckResult, Review, SideResult } from '../../../coordinator/review/model.js';
import type { Memo } from '../api.js';
import { type Child, h, link } from '../dom.js';
import { buildHref, storeName } from '../format.js';
import { packageChangesSection } from './review-changes.js';
import { failureLog, logTail } from './review-logs.js';
import { type SizeRow, sizeChanges, sizeTable } from './review-sizes.js';
import { attrLink, table } from './review-table.js';
import { badge } from './widgets.js';

/**
 * The review as a page, in the order a reviewer needs it (the markdown summary's, coordinator/review/markdown.ts):
 * the verdict; newly failing with each failing root and its log; evaluation errors; size changes with a chart;
 * dependency changes; newly succeeding; still failing; not built; added; removed; package changes (versions, licenses,
 * …). Every attribute links to its build.
 */

// Failing roots whose log is read for the page (a root that broke its dependents has its tail in the review).
const MAX_FETCHED_LOGS = 10;
// Attributes named beside a root cause or dependency change before "and N more".
const MAX_NAMED = 3;

export interface ReviewOptions {
  repo: string;
  signal: AbortSignal;
  memo: Memo;
}

export function reviewView(review: Review, o: ReviewOptions): HTMLElement {
  const attrs = [...review.attrs].sort((a, b) => a.attr.localeCompare(b.attr) || a.job.localeCompare(b.job));
  const multiJob = new Set(attrs.map((a) => a.job)).size > 1;
  const name = (a: AttrReview): Child => attrLink(a, multiJob);
  const outcome = (x: string): AttrReview[] => attrs.filter((a) => a.outcome === x);
  const newlyFailing = outcome('newly-failing');
  const newEval = attrs.filter(isNewEvalFailure);
  const oldEval = attrs.filter((a) => a.head?.eval === 'error' && a.base?.eval === 'error');
  const sizes = sizeChanges(attrs);
  const notBuilt = attrs.filter((a) => a.change === 'changed' && !a.outcome && a.head?.eval === 'ok');
  return h(
    'div',
    { class: 'review' },
    verdict(review, newlyFailing, newEval, sizes),
    h(
      'p',
      { class: 'revisions' },
      'Base ',
      h('code', null, review.base.rev.slice(0, 12)),
      ' → head ',
      h('code', null, review.head.rev.slice(0, 12)),
    ),
    review.configChanged &&
      h(
        'p',
        { class: 'problem' },
        "This change edits eka-ci's configuration: it is judged by the base's rules until it is merged, and only " +
          'someone with write access may merge it.',
      ),
    review.heldBack &&
      h(
        'div',
        { class: 'problem held-back' },
        h('strong', null, review.heldBack.title),
        h(
          'p',
          null,
          "By the base's build rules, the change was evaluated and its rebuilds counted but not built: only attributes " +
            'named by ',
          h('code', null, '@eka-ci build'),
          ' commands or commit titles were. What was not built is listed under "Not built".',
        ),
      ),
    section('newly-failing', 'Newly failing', newlyFailing.length, [
      resultsTable(newlyFailing, name),
      rootCauses(newlyFailing, o),
    ]),
    section('checks', 'Checks', review.checks?.length ?? 0, [checksTable(review, o)]),
    section('eval-errors', 'Evaluation errors', newEval.length + oldEval.length, [
      table(
        ['Attribute', 'System', 'Evaluation base → head', 'Error'],
        [...newEval, ...oldEval].map((a) => [
          name(a),
          a.system ?? '—',
          [a.base?.eval ?? '—', ' → error', isNewEvalFailure(a) && !isBlockingEvalFailure(a) && ' (allowed)'],
          errorMessage(a.head?.error ?? ''),
        ]),
      ),
    ]),
    section('sizes', 'Size changes', sizes.length, [sizeTable(sizes, review, o, multiJob)]),
    dependencySection(attrs, multiJob),
    section('newly-succeeding', 'Newly succeeding', outcome('newly-succeeding').length, [
      resultsTable(outcome('newly-succeeding'), name),
    ]),
    section('still-failing', 'Still failing', outcome('still-failing').length, [
      resultsTable(outcome('still-failing'), name),
    ]),
    section('not-built', 'Not built', notBuilt.length, [resultsTable(notBuilt, name)]),
    section('added', 'Added', attrs.filter((a) => a.change === 'added').length, [
      table(
        ['Attribute', 'System', 'Head'],
        attrs.filter((a) => a.change === 'added').map((a) => [name(a), a.system ?? '—', sideBadge(a.head)]),
      ),
    ]),
    section('removed', 'Removed', attrs.filter((a) => a.change === 'removed').length, [
      table(
        ['Attribute', 'System', 'Base'],
        attrs.filter((a) => a.change === 'removed').map((a) => [name(a), a.system ?? '—', sideBadge(a.base)]),
      ),
    ]),
    packageChangesSection(review, multiJob),
    notListed(review, attrs),
  );
}

/** The derivations whose state the review shows: their build events make the page read it again. */
export function reviewDerivations(review: Review): Set<string> {
  const drvs = new Set<string>();
  for (const a of review.attrs) {
    for (const d of [a.base?.drv, a.head?.drv, ...(a.rootCauses ?? []).map((r) => r.drv)]) if (d) drvs.add(d);
  }
  return drvs;
}

function verdict(review: Review, newlyFailing: AttrReview[], newEval: AttrReview[], sizes: SizeRow[]): HTMLElement {
  const blocking = newEval.filter(isBlockingEvalFailure).length;
  const allowed = newEval.length - blocking;
  const warnings = sizes.filter((s) => s.s.warning).length;
  const checks = failedChecks(review).length;
  const bad = [
    newlyFailing.length > 0 && `${newlyFailing.length} newly failing`,
    blocking > 0 && `${blocking} new evaluation error${blocking === 1 ? '' : 's'}`,
    checks > 0 && `${checks} check${checks === 1 ? '' : 's'} not passing`,
  ].filter(Boolean);
  const notes = [
    allowed > 0 && `${allowed} new evaluation error${allowed === 1 ? '' : 's'} allowed by allow_eval_failures`,
    warnings > 0 && `${warnings} size warning${warnings === 1 ? '' : 's'}`,
  ].filter(Boolean);
  return h(
    'p',
    { class: `verdict ${bad.length > 0 ? 'bad' : 'good'}`, 'data-newly-failing': review.summary['newly-failing'] ?? 0 },
    bad.length > 0 ? `✗ ${bad.join(', ')}` : '✓ nothing newly failing',
    notes.length > 0 && h('span', { class: 'warn' }, ` · ⚠ ${notes.join(' · ')}`),
  );
}

/** The repository's checks: each one's result, and for one that did not pass, its error and the end of its output. */
function checksTable(review: Review, o: ReviewOptions): Child {
  const checks = [...(review.checks ?? [])].sort(
    (a, b) => a.name.localeCompare(b.name) || a.system.localeCompare(b.system),
  );
  const failed = new Set(failedChecks(review));
  const logHref = (c: CheckResult): string =>
    `/api/v1/repos/${o.repo}/commits/${review.head.rev}/checks/${encodeURIComponent(c.name)}/log?system=${encodeURIComponent(c.system)}`;
  return [
    table(
      ['Check', 'System', 'Result', 'Exit code', 'Time', 'Output'],
      checks.map((c) => [
        h('code', null, c.name),
        c.system,
        badge(c.state),
        c.exitCode === null ? '—' : String(c.exitCode),
        c.seconds === null ? '—' : `${c.seconds.toFixed(1)} s`,
        c.state === 'waiting' || c.state === 'queued' || c.state === 'unbuildable' ? '—' : link(logHref(c), 'log'),
      ]),
    ),
    checks
      .filter((c) => failed.has(c))
      .map((c) =>
        h(
          'div',
          { class: 'check-failure', 'data-check': c.name },
          h('h3', null, `${c.name} (${c.system})`),
          c.error && h('p', { class: 'problem' }, c.error),
          c.logTail !== '' && logTail(c.logTail),
        ),
      ),
  ];
}

function section(id: string, heading: string, count: number, body: Child[]): Child {
  if (count === 0) return false;
  return h(
    'section',
    { class: 'review-section', id, 'data-count': count },
    h('h2', null, `${heading} (${count})`),
    body,
  );
}

function sideBadge(s: SideResult | undefined): Child {
  if (!s) return '—';
  return s.eval === 'error' ? badge('eval-error') : badge(s.build);
}

function resultsTable(list: AttrReview[], name: (a: AttrReview) => Child): HTMLElement {
  return table(
    ['Attribute', 'System', 'Base → head'],
    list.map((a) => [name(a), a.system ?? '—', [sideBadge(a.base), ' → ', sideBadge(a.head)]]),
  );
}

/**
 * Each failing root once, with the attributes it breaks and the end of its log: a dependency failure's root comes
 * with its log tail in the review; an attribute that failed itself is its own root, and its log is read here.
 */
function rootCauses(newlyFailing: AttrReview[], o: ReviewOptions): Child {
  const roots = new Map<string, { logTail?: string; attrs: AttrReview[] }>();
  for (const a of newlyFailing) {
    const own = a.head?.drv && (a.head.build === 'failed' || a.head.build === 'timed-out') ? a.head.drv : undefined;
    const causes: Array<{ drv: string; logTail?: string }> = a.rootCauses ?? (own ? [{ drv: own }] : []);
    for (const c of causes) {
      const root = roots.get(c.drv) ?? { attrs: [] };
      root.logTail ??= c.logTail;
      root.attrs.push(a);
      roots.set(c.drv, root);
    }
  }
  let fetched = 0;
  return [...roots].map(([drv, root]) => {
    /** The attribute whose own build this is, when one failed by itself; the others are broken by it. */
    const self = root.attrs.find((a) => a.head?.drv === drv);
    const breaks = [...new Set(root.attrs.map((a) => a.attr))].filter((n) => n !== self?.attr);
    const log =
      root.logTail !== undefined
        ? logTail(root.logTail)
        : fetched++ < MAX_FETCHED_LOGS
          ? failureLog(drv, o)
          : h('p', { class: 'muted' }, 'Its log is on ', link(buildHref(drv), 'its build page'), '.');
    return h(
      'div',
      { class: 'root-cause', 'data-root': drv },
      h(
        'h3',
        null,
        link(buildHref(drv), storeName(drv)),
        self?.head?.build === 'timed-out' ? ' timed out' : ' failed',
        breaks.length > 0 && [
          ', breaking ',
          breaks.slice(0, MAX_NAMED).map((n, i) => [i > 0 && ', ', h('code', null, n)]),
          breaks.length > MAX_NAMED && ` and ${breaks.length - MAX_NAMED} more`,
        ],
      ),
      log,
    );
  });
}

/** Nix prints the trace first and the error last: the message from the last `error:` on, the rest on demand. */
function errorMessage(error: string): Child {
  const lines = error.trim().split('\n');
  let last = lines.length - 1;
  while (last > 0 && !/^\s*error:\s*\S/.test(lines[last] ?? '')) last--;
  const message = lines.slice(last).join('\n').trim();
  return [
    h('pre', { class: 'error-text' }, message || '—'),
    last > 0 && h('details', null, h('summary', null, 'Whole trace'), h('pre', { class: 'error-text' }, error)),
  ];
}

/** Dependency changes grouped by what changed, most widespread first: a version bump shows once, not per attribute. */
function dependencySection(attrs: AttrReview[], multiJob: boolean): Child {
  const groups = new Map<string, { name: string; base: string[]; head: string[]; attrs: AttrReview[] }>();
  for (const a of attrs) {
    for (const d of a.dependencies ?? []) {
      const key = JSON.stringify([d.name, d.base, d.head]);
      const group = groups.get(key) ?? { name: d.name, base: d.base, head: d.head, attrs: [] };
      if (!group.attrs.includes(a)) group.attrs.push(a);
      groups.set(key, group);
    }
  }
  const sorted = [...groups.values()].sort((x, y) => y.attrs.length - x.attrs.length || x.name.localeCompare(y.name));
  const versions = (v: string[]): string => (v.length > 0 ? v.join(', ') : '—');
  return section('dependencies', 'Runtime dependency changes', sorted.length, [
    table(
      ['Dependency', 'Base', 'Head', 'Attributes'],
      sorted.map((g) => [
        h('code', null, g.name),
        versions(g.base),
        versions(g.head),
        [
          g.attrs.slice(0, MAX_NAMED).map((a, i) => [i > 0 && ', ', attrLink(a, multiJob)]),
          g.attrs.length > MAX_NAMED && ` and ${g.attrs.length - MAX_NAMED} more`,
        ],
      ]),
    ),
  ]);
}

function notListed(review: Review, attrs: AttrReview[]): Child {
  const stillSucceeding =
    review.summary['still-succeeding'] ?? attrs.filter((a) => a.outcome === 'still-succeeding').length;
  const unchanged = review.summary['unchanged'] ?? attrs.filter((a) => a.change === 'unchanged' && !a.outcome).length;
  const parts = [
    stillSucceeding > 0 && `${stillSucceeding} still succeeding`,
    unchanged > 0 && `${unchanged} unchanged`,
  ];
  const shown = parts.filter(Boolean);
  return shown.length > 0 && h('p', { class: 'muted' }, `Not listed: ${shown.join(', ')}.`);
}
