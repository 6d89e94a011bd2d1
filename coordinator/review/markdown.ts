import { type PackageRef, groupChanges } from './change-summary.js';
import { failedChecks, isBlockingEvalFailure, isNewEvalFailure } from './classify.js';
import type { AttrReview, CheckResult, OutputSizes, Review, SideResult } from './model.js';
import { count as fmt, plural } from './numbers.js';

/**
 * The review as GitHub-flavoured markdown, for a check run's summary and `ekaci review`. Sections come in the
 * order a reviewer needs them — verdict, newly failing, evaluation errors (new ones first), size warnings, then
 * the rest, then what the change does to the packages (versions, licenses, …) — and when the text would not fit in
 * `maxChars` it is shortened from the least important end, always
 * saying what was left out. Tables are never cut mid-row: a table is either shown (perhaps with its first rows only)
 * or replaced by a count line.
 */

/** GitHub rejects a check run whose `output.summary` is longer than this. */
export const GITHUB_SUMMARY_MAX_CHARS = 65_535;
/** The error that broke a build is almost always in its last lines; 30 is what fits a screen. */
const LOG_EXCERPT_LINES = 30;
/** A single log line (minified output, progress bars) must not eat the whole budget. */
const MAX_LOG_LINE_CHARS = 400;
/** An evaluation error in a table cell shows its final message, not the whole trace. */
const MAX_ERROR_CHARS = 300;
/** Attributes named next to a root cause or dependency change before "and N more"; a hint, not a list. */
const MAX_NAMED_ATTRS = 3;

export interface MarkdownOptions {
  /** Longest allowed result, in UTF-16 code units (what GitHub counts); default GITHUB_SUMMARY_MAX_CHARS. */
  maxChars?: number;
  /** Where a reviewer reads the full details (logs) of one attribute; without it tables have no link column. */
  detailsUrl?: (attr: AttrReview) => string;
}

interface Table {
  heading: string;
  /** What the rows are, for "… 1,234 still failing attributes left out to fit". */
  noun: string;
  header: string;
  rows: string[];
  /** The number in the heading, where a row stands for several attributes (default: the rows). */
  count?: number;
  /** Heading level: 3, or 4 for a table inside a section (Package changes). */
  level?: 3 | 4;
  /** Blocks shown before the heading when the table has rows: the heading and counts of the section it opens. */
  lead?: string[];
}

interface RootCauseGroup {
  drv: string;
  logTail: string;
  attrs: AttrReview[];
  /** The first newly-failing row this root breaks; the group is shown while that row is. */
  firstRow: number;
}

interface Document {
  /** What the base's build rules held back, first: the review below is of a change not (wholly) built. */
  heldBack: string | null;
  verdict: string;
  revisions: string;
  /** In priority order; the first is "Newly failing", which the root causes belong to. */
  tables: Table[];
  rootCauses: RootCauseGroup[];
  /** The repository checks' blocks (renderChecks), shown after the first table. */
  checks: string[];
  counts: string | null;
}

/** How much of the document to show: log excerpts for the first `logs` root causes, `rows[i]` rows of table i. */
interface Plan {
  logs: number;
  rows: number[];
}

export function renderMarkdown(review: Review, options: MarkdownOptions = {}): string {
  const maxChars = options.maxChars ?? GITHUB_SUMMARY_MAX_CHARS;
  const doc = buildDocument(review, options.detailsUrl);
  const full: Plan = { logs: doc.rootCauses.length, rows: doc.tables.map((t) => t.rows.length) };
  const text = (plan: Plan) => render(doc, plan, maxChars).join('\n\n') + '\n';
  const fits = (plan: Plan) => text(plan).length <= maxChars;
  if (fits(full)) return text(full);

  // First the log excerpts go, from the last root cause up; the root-cause lines themselves stay.
  const logs = largest(0, full.logs - 1, (logs) => fits({ ...full, logs }));
  if (logs !== undefined) return text({ ...full, logs });

  // Then tables are filled in priority order: each gets as many rows as fit after those before it, so the
  // lowest-priority tables collapse to a count line first and the highest are truncated last.
  const rows = full.rows.map(() => 0);
  full.rows.forEach((n, i) => {
    rows[i] = largest(0, n, (r) => fits({ logs: 0, rows: rows.map((x, j) => (j === i ? r : x)) })) ?? 0;
  });
  const plan = { logs: 0, rows };
  if (fits(plan)) return text(plan);
  return squeeze(render(doc, plan, maxChars), maxChars);
}

function render(doc: Document, plan: Plan, maxChars: number): string[] {
  const blocks = [...(doc.heldBack === null ? [] : [doc.heldBack]), doc.verdict, doc.revisions];
  doc.tables.forEach((table, i) => {
    const shown = plan.rows[i] ?? 0;
    blocks.push(...renderTable(table, shown));
    if (i === 0) blocks.push(...renderRootCauses(doc.rootCauses, shown, plan.logs), ...doc.checks);
  });
  if (doc.counts) blocks.push(doc.counts);
  const shortened = plan.logs < doc.rootCauses.length || doc.tables.some((t, i) => (plan.rows[i] ?? 0) < t.rows.length);
  if (shortened) blocks.push(`_Shortened to fit ${fmt(maxChars)} characters; what was left out is noted above._`);
  return blocks;
}

function renderTable(table: Table, shown: number): string[] {
  const n = table.rows.length;
  if (n === 0) return [];
  const count = table.count ?? n;
  const heading = `${'#'.repeat(table.level ?? 3)} ${table.heading} (${fmt(count)})`;
  const lead = table.lead ?? [];
  if (shown === 0) return [...lead, heading, `… ${fmt(count)} ${table.noun} left out to fit.`];
  const blocks = [...lead, heading, [table.header, ...table.rows.slice(0, shown)].join('\n')];
  // A blank line must separate this from the table, or GFM would read it as one more row.
  if (shown < n) blocks.push(`… ${fmt(n - shown)} more not shown.`);
  return blocks;
}

function renderRootCauses(groups: RootCauseGroup[], shownRows: number, logs: number): string[] {
  const blocks: string[] = [];
  let omittedLogs = 0;
  groups.forEach((group, i) => {
    if (group.firstRow >= shownRows) return;
    blocks.push(`**Root cause** ${codeSpan(group.drv)} breaks ${namedAttrs(group.attrs, false)}`);
    if (group.logTail.trim() === '') return;
    if (i < logs) blocks.push(logDetails(group.drv, group.logTail));
    else omittedLogs++;
  });
  if (omittedLogs > 0) blocks.push(`… log excerpts of ${plural(omittedLogs, 'root cause')} left out to fit.`);
  return blocks;
}

/** Last resort for a tiny budget: whole blocks (no tables remain at this point) while they fit. */
function squeeze(blocks: string[], maxChars: number): string {
  const note = `… the rest of the review is left out to fit ${fmt(maxChars)} characters.`;
  let text = blocks[0] ?? '';
  for (const block of blocks.slice(1, -1)) {
    if (text.length + block.length + note.length + 5 > maxChars) break;
    text += '\n\n' + block;
  }
  if (text.length + note.length + 3 <= maxChars) text += '\n\n' + note;
  text += '\n';
  if (text.length <= maxChars) return text;
  // Cut by code points so the verdict's emoji is never split into half a surrogate pair.
  let cut = '';
  for (const ch of text) {
    if (cut.length + ch.length > maxChars) break;
    cut += ch;
  }
  return cut;
}

/** Largest x in [lo, hi] satisfying a monotone (true…true false…false) predicate; undefined if none. */
function largest(lo: number, hi: number, ok: (x: number) => boolean): number | undefined {
  if (hi < lo || !ok(lo)) return undefined;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (ok(mid)) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

function buildDocument(review: Review, detailsUrl: MarkdownOptions['detailsUrl']): Document {
  const attrs = [...review.attrs].sort(byName);
  const changed = review.changes ? (Object.values(review.changes) as PackageRef[][]).flat() : [];
  const multiJob = new Set([...attrs, ...changed].map((a) => a.job)).size > 1;
  const label = (a: PackageRef) => codeCell(a.attr) + (multiJob ? ` (${escapeText(a.job)})` : '');
  const system = (a: AttrReview) => (a.system ? codeCell(a.system) : '—');
  const link = detailsUrl ? (a: AttrReview) => [`[details](${escapeUrl(detailsUrl(a))})`] : () => [];
  const linkHeader = detailsUrl ? ['details'] : [];
  const outcome = (o: string) => attrs.filter((a) => a.outcome === o);
  const moved = (a: AttrReview) => `${side(a.base)} → ${side(a.head)}`;
  const results = (heading: string, noun: string, list: AttrReview[]): Table => ({
    heading,
    noun,
    header: header(['attribute', 'system', 'base → head', ...linkHeader]),
    rows: list.map((a) => row([label(a), system(a), moved(a), ...link(a)])),
  });

  const newlyFailing = outcome('newly-failing');
  const newEval = attrs.filter(isNewEvalFailure);
  const blockingEval = newEval.filter(isBlockingEvalFailure);
  const allowedEval = newEval.length - blockingEval.length;
  const oldEval = attrs.filter((a) => a.head?.eval === 'error' && a.base?.eval === 'error');
  const sizeWarnings = attrs.flatMap((a) => (a.sizes ?? []).filter((s) => s.warning).map((s) => ({ a, s })));
  const added = attrs.filter((a) => a.change === 'added');
  // Changed attributes whose head evaluated but whose comparison says nothing: unbuildable (no agent with the
  // system or features), cancelled, or not built at all (`--no-build`). A reviewer must see them, not miss them.
  const notBuilt = attrs.filter((a) => a.change === 'changed' && !a.outcome && a.head?.eval === 'ok');
  const removed = attrs.filter((a) => a.change === 'removed');

  const tables: Table[] = [
    results('Newly failing', 'newly failing attributes', newlyFailing),
    {
      heading: 'Evaluation errors',
      noun: 'evaluation errors',
      header: header(['attribute', 'system', 'evaluation base → head', 'error']),
      rows: [...newEval, ...oldEval].map((a) =>
        row([label(a), system(a), evalMove(a), errorCell(a.head?.error ?? '')]),
      ),
    },
    {
      heading: 'Size warnings',
      noun: 'size warnings',
      header: header(['attribute', 'output', 'base closure', 'head closure', 'delta', 'percent']),
      rows: sizeWarnings.map(({ a, s }) => row([label(a), codeCell(s.output), ...sizeCells(s)])),
    },
    results('Newly succeeding', 'newly succeeding attributes', outcome('newly-succeeding')),
    results('Still failing', 'still failing attributes', outcome('still-failing')),
    {
      heading: 'Not built',
      noun: 'changed attributes not built',
      header: header(['attribute', 'system', 'base → head', ...linkHeader]),
      rows: notBuilt.map((a) => row([label(a), system(a), moved(a), ...link(a)])),
    },
    {
      heading: 'Added',
      noun: 'added attributes',
      header: header(['attribute', 'system', 'head result', ...linkHeader]),
      rows: added.map((a) => row([label(a), system(a), side(a.head), ...link(a)])),
    },
    {
      heading: 'Removed',
      noun: 'removed attributes',
      header: header(['attribute', 'system', 'base result']),
      rows: removed.map((a) => row([label(a), system(a), side(a.base)])),
    },
    ...packageTables(review, label),
    dependencyTable(attrs),
  ];

  const parts = [
    ...(newlyFailing.length > 0 ? [`${fmt(newlyFailing.length)} newly failing`] : []),
    ...(blockingEval.length > 0 ? [plural(blockingEval.length, 'new evaluation error')] : []),
  ];
  const notPassing = failedChecks(review).length;
  if (notPassing > 0) parts.push(`${plural(notPassing, 'check')} not passing`);
  let verdict = parts.length > 0 ? `❌ ${parts.join(', ')}` : '✅ nothing newly failing';
  if (allowedEval > 0) verdict += ` · ⚠️ ${plural(allowedEval, 'new evaluation error')} allowed by allow_eval_failures`;
  if (sizeWarnings.length > 0) verdict += ` · ⚠️ ${plural(sizeWarnings.length, 'size warning')}`;

  // The summary may count attributes the review does not list one by one, so it wins where it has a count.
  const stillSucceeding = review.summary['still-succeeding'] ?? outcome('still-succeeding').length;
  const unchanged = review.summary['unchanged'] ?? attrs.filter((a) => a.change === 'unchanged' && !a.outcome).length;
  const notListed = [
    ...(stillSucceeding > 0 ? [`${fmt(stillSucceeding)} still succeeding`] : []),
    ...(unchanged > 0 ? [`${fmt(unchanged)} unchanged`] : []),
  ];
  const counts = notListed.length > 0 ? `Not listed: ${notListed.join(', ')}.` : null;

  return {
    heldBack: review.heldBack ? [review.heldBack.title, review.heldBack.lines.join('\n')].join('\n\n') : null,
    verdict,
    revisions:
      `Base ${codeSpan(review.base.rev.slice(0, 12))} → head ${codeSpan(review.head.rev.slice(0, 12))}` +
      (review.configChanged
        ? "\n\n**This change edits eka-ci's configuration.** It is judged by the base's rules until it is merged, " +
          'and only someone with write access may merge it.'
        : ''),
    tables,
    rootCauses: rootCauseGroups(newlyFailing),
    checks: renderChecks(review.checks ?? []),
    counts,
  };
}

const CHECK_ICONS: Record<CheckResult['state'], string> = {
  waiting: '⏳',
  queued: '⏳',
  running: '🔄',
  succeeded: '✅',
  failed: '❌',
  'timed-out': '⏱️',
  cancelled: '⛔',
  unbuildable: '🚫',
};
// Failed checks whose output is shown; the rest are in the table, with their logs a click away.
const MAX_CHECK_LOGS = 10;

/** The repository checks: a table, then what each one that did not pass said (its error and its last lines). */
export function renderChecks(checks: readonly CheckResult[]): string[] {
  if (checks.length === 0) return [];
  const sorted = [...checks].sort((a, b) => compare(a.name, b.name) || compare(a.system, b.system));
  const table = [
    header(['check', 'system', 'result', 'exit code', 'time']),
    ...sorted.map((c) =>
      row([
        codeCell(c.name),
        codeCell(c.system),
        `${CHECK_ICONS[c.state]} ${c.state}`,
        c.exitCode === null ? '—' : String(c.exitCode),
        c.seconds === null ? '—' : `${c.seconds.toFixed(1)} s`,
      ]),
    ),
  ].join('\n');
  const blocks = [`### Checks (${fmt(checks.length)})`, table];
  const failed = failedChecks({ checks: sorted });
  for (const c of failed.slice(0, MAX_CHECK_LOGS)) {
    const what = `check ${c.name} (${c.system})`;
    if (c.error)
      blocks.push(`**${escapeText(what)}**: ${escapeText(truncate(stripControl(c.error), MAX_ERROR_CHARS))}`);
    if (c.logTail.trim() !== '') blocks.push(logDetails(what, c.logTail));
  }
  if (failed.length > MAX_CHECK_LOGS)
    blocks.push(`… the output of ${fmt(failed.length - MAX_CHECK_LOGS)} more left out.`);
  return blocks;
}

/** One root often breaks hundreds of attributes; it is named, and its log shown, once. */
function rootCauseGroups(newlyFailing: AttrReview[]): RootCauseGroup[] {
  const groups = new Map<string, RootCauseGroup>();
  newlyFailing.forEach((a, firstRow) => {
    for (const cause of a.rootCauses ?? []) {
      const group = groups.get(cause.drv) ?? { drv: cause.drv, logTail: cause.logTail, attrs: [], firstRow };
      group.attrs.push(a);
      groups.set(cause.drv, group);
    }
  });
  return [...groups.values()];
}

/**
 * The change summary (review.changes): a counts line, then one table per kind of change — each attribute's own row
 * where the change is its own (a version, `meta.broken`, a failing field, a package added or removed), one row per
 * distinct change where many attributes often share it (a license, platforms, maintainers moving treewide).
 */
function packageTables(review: Review, label: (a: PackageRef) => string): Table[] {
  const c = review.changes;
  if (!c) return [];
  const nothing = (list: string[]) => (list.length > 0 ? list.map(escapeText).join(', ') : '—');
  const version = (v: string | null) => (v === null ? '—' : escapeText(v));
  const pname = (p: string | null) => (p === null ? '—' : codeCell(p));
  const brokenWord = (b: boolean) => (b ? 'broken' : 'not broken');
  const grouped = (
    heading: string,
    noun: string,
    columns: [string, string],
    groups: Array<{ cells: [string, string]; attrs: PackageRef[] }>,
    count: number,
  ): Table => ({
    heading,
    noun,
    header: header([...columns, 'attributes']),
    rows: groups.map((g) => row([...g.cells, namedAttrs(g.attrs, true)])),
    count,
    level: 4,
  });
  const setGroups = (list: typeof c.platforms, show: (xs: string[]) => string) =>
    groupChanges(list, (x) => JSON.stringify([x.added, x.removed])).map((g) => ({
      cells: [show(g.change.added), show(g.change.removed)] as [string, string],
      attrs: g.attrs,
    }));
  const newErrors = c.metaErrors.filter((e) => e.side === 'head').length;
  const newlyBroken = c.broken.filter((b) => b.head).length;
  const parts = [
    ...(c.versions.length > 0 ? [plural(c.versions.length, 'version change')] : []),
    ...(c.added.length > 0 ? [plural(c.added.length, 'new package')] : []),
    ...(c.removed.length > 0 ? [plural(c.removed.length, 'removed package')] : []),
    ...(newlyBroken > 0 ? [`${fmt(newlyBroken)} newly broken`] : []),
    ...(c.broken.length > newlyBroken ? [`${fmt(c.broken.length - newlyBroken)} no longer broken`] : []),
    ...(c.licenses.length > 0 ? [plural(c.licenses.length, 'license change')] : []),
    ...(c.platforms.length > 0 ? [plural(c.platforms.length, 'platform change')] : []),
    ...(c.maintainers.length > 0 ? [plural(c.maintainers.length, 'maintainer change')] : []),
    ...(newErrors > 0 ? [plural(newErrors, 'meta field') + ' newly failing to evaluate'] : []),
    ...(c.metaErrors.length > newErrors ? [`${plural(c.metaErrors.length - newErrors, 'meta field')} fixed`] : []),
  ];
  const tables: Table[] = [
    {
      heading: 'Version changes',
      noun: 'version changes',
      header: header(['attribute', 'package', 'version base → head']),
      rows: c.versions.map((v) =>
        row([
          label(v),
          v.base.pname !== null && v.head.pname !== null && v.base.pname !== v.head.pname
            ? `${pname(v.base.pname)} → ${pname(v.head.pname)}`
            : pname(v.head.pname ?? v.base.pname),
          `${version(v.base.version)} → ${version(v.head.version)}`,
        ]),
      ),
      level: 4,
    },
    {
      heading: 'Broken',
      noun: 'meta.broken changes',
      header: header(['attribute', 'meta.broken base → head']),
      rows: c.broken.map((b) => row([label(b), `${brokenWord(b.base)} → ${brokenWord(b.head)}`])),
      level: 4,
    },
    grouped(
      'License changes',
      'license changes',
      ['base', 'head'],
      groupChanges(c.licenses, (l) => JSON.stringify([l.base, l.head])).map((g) => ({
        cells: [nothing(g.change.base), nothing(g.change.head)],
        attrs: g.attrs,
      })),
      c.licenses.length,
    ),
    {
      heading: 'Meta fields failing to evaluate',
      noun: 'meta evaluation errors',
      header: header(['attribute', 'field', 'base → head', 'error']),
      rows: c.metaErrors.map((e) =>
        row([label(e), codeCell(e.field), e.side === 'head' ? 'ok → error' : 'error → ok', errorCell(e.error)]),
      ),
      level: 4,
    },
    {
      heading: 'New packages',
      noun: 'new packages',
      header: header(['attribute', 'package', 'version']),
      rows: c.added.map((p) => row([label(p), pname(p.pname), version(p.version)])),
      level: 4,
    },
    {
      heading: 'Removed packages',
      noun: 'removed packages',
      header: header(['attribute', 'package', 'version']),
      rows: c.removed.map((p) => row([label(p), pname(p.pname), version(p.version)])),
      level: 4,
    },
    grouped(
      'Platform changes',
      'platform changes',
      ['added', 'removed'],
      setGroups(c.platforms, nothing),
      c.platforms.length,
    ),
    grouped(
      'Maintainer changes',
      'maintainer changes',
      ['added', 'removed'],
      setGroups(c.maintainers, nothing),
      c.maintainers.length,
    ),
  ];
  const first = tables.find((t) => t.rows.length > 0);
  if (first) first.lead = ['### Package changes', `${parts.join(', ')}.`];
  return tables;
}

/** Dependency changes grouped by what changed, most widespread first: a version bump shows once, not per attribute. */
function dependencyTable(attrs: AttrReview[]): Table {
  const groups = new Map<string, { name: string; base: string[]; head: string[]; attrs: AttrReview[] }>();
  for (const a of attrs) {
    for (const d of a.dependencies ?? []) {
      const key = JSON.stringify([d.name, d.base, d.head]);
      const group = groups.get(key) ?? { name: d.name, base: d.base, head: d.head, attrs: [] };
      if (!group.attrs.some((x) => x.attr === a.attr)) group.attrs.push(a);
      groups.set(key, group);
    }
  }
  const sorted = [...groups.values()].sort((x, y) => y.attrs.length - x.attrs.length || compare(x.name, y.name));
  const versions = (v: string[]) => (v.length > 0 ? v.map(escapeText).join(', ') : '—');
  return {
    heading: 'Runtime dependency changes',
    noun: 'dependency changes',
    header: header(['dependency', 'base', 'head', 'attributes']),
    rows: sorted.map((g) => row([codeCell(g.name), versions(g.base), versions(g.head), namedAttrs(g.attrs, true)])),
  };
}

function namedAttrs(attrs: ReadonlyArray<{ attr: string }>, inTable: boolean): string {
  const names = [...new Set(attrs.map((a) => a.attr))];
  const shown = names.slice(0, MAX_NAMED_ATTRS).map(inTable ? codeCell : codeSpan);
  const more = names.length - shown.length;
  return shown.join(', ') + (more > 0 ? ` and ${fmt(more)} more` : '');
}

function logDetails(drv: string, logTail: string): string {
  const lines = stripControl(logTail).split('\n');
  while (lines.length > 0 && lines[lines.length - 1]?.trim() === '') lines.pop();
  const tail = lines.slice(-LOG_EXCERPT_LINES).map((l) => truncate(l, MAX_LOG_LINE_CHARS));
  const summary = `Last ${plural(tail.length, 'log line')} of <code>${escapeHtml(drv)}</code>`;
  return `<details><summary>${summary}</summary>\n\n${codeBlock(tail.join('\n'))}\n\n</details>`;
}

/**
 * Text shown as it is, in a fenced code block: a log, or an error quoting what a pull request wrote (the attribute
 * path its config names may hold a newline and a fence). The fence is longer than any run of backticks in the text,
 * so no line of it can close the block and go on as markdown. Colour codes and control characters are dropped.
 */
export function codeBlock(text: string): string {
  const body = stripControl(text);
  const fence = '`'.repeat(Math.max(3, longestRun(body, '`') + 1));
  return `${fence}\n${body}\n${fence}`;
}

/** Nix prints the trace first and the actual error last; the cell shows from the last `error:` on. */
function errorCell(error: string): string {
  const lines = stripControl(error).trim().split('\n');
  let last = lines.length - 1;
  while (last > 0 && !/^\s*error:\s*\S/.test(lines[last] ?? '')) last--;
  const message = lines
    .slice(last)
    .map((l) => l.trim())
    .join('\n');
  return message ? escapeText(truncate(message, MAX_ERROR_CHARS)) : '—';
}

/** What a size was compared with, where the job's size_check.base_branch chose it. */
function baselineNote(s: OutputSizes): string {
  const b = s.baseline;
  if (!b) return '';
  const branch = escapeText(b.branch);
  const commit = b.commit.slice(0, 12);
  return b.kind === 'branch'
    ? ` (${branch} @ ${commit})`
    : ` (the pull request's base ${commit}: ${branch} has no recorded build of it)`;
}

function sizeCells(s: OutputSizes): string[] {
  const signed = (n: number | null, f: (n: number) => string) => (n === null ? '—' : (n < 0 ? '−' : '+') + f(n));
  return [
    (s.base ? bytes(s.base.closureSize) : '—') + baselineNote(s),
    s.head ? bytes(s.head.closureSize) : '—',
    signed(s.closureSizeDelta, (n) => bytes(Math.abs(n))),
    signed(s.closureSizePercent, (n) => `${Math.abs(n).toFixed(1)} %`),
  ];
}

function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

/** How an attribute that fails to evaluate on head did on base; a new error its job allows is marked so. */
function evalMove(a: AttrReview): string {
  const allowed = isNewEvalFailure(a) && !isBlockingEvalFailure(a) ? ' (allowed)' : '';
  return `${a.base?.eval ?? '—'} → error${allowed}`;
}

function side(s: SideResult | undefined): string {
  if (!s) return '—';
  return s.eval === 'error' ? 'eval error' : s.build;
}

function header(cells: string[]): string {
  return row(cells) + '\n' + row(cells.map(() => '---'));
}

function row(cells: string[]): string {
  return `| ${cells.join(' | ')} |`;
}

/** Inline code that survives any backticks in its content (whitespace, newlines included, made single spaces). */
export function codeSpan(text: string): string {
  const flat = text.replace(/\s+/g, ' ');
  const fence = '`'.repeat(longestRun(flat, '`') + 1);
  const pad = flat.startsWith('`') || flat.endsWith('`') ? ' ' : '';
  return `${fence}${pad}${flat}${pad}${fence}`;
}

/** In a GFM table even a pipe inside a code span ends the cell unless escaped. */
function codeCell(text: string): string {
  return codeSpan(text).replace(/\|/g, '\\|');
}

/** Literal text: every character markdown could act on is backslash-escaped; newlines become `<br>`. */
export function escapeText(text: string): string {
  return text.replace(/[\\`*_[\]<>|~&#!]/g, '\\$&').replace(/\r\n?|\n/g, '<br>');
}

function escapeHtml(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** Characters that would end a markdown link destination or a table cell. */
function escapeUrl(url: string): string {
  return url.replace(/[\s()<>|"`]/g, (c) => encodeURIComponent(c));
}

/** Drops colour codes and control characters (keeping tabs and newlines), which render as garbage. */
function stripControl(text: string): string {
  return text
    .replace(/\u001b\[[0-9;?]*[ -/]*[@-~]/g, '')
    .replace(/\r\n?/g, '\n')
    .replace(/[\u0000-\u0008\u000b-\u001f\u007f]/g, '');
}

function longestRun(text: string, ch: string): number {
  let longest = 0;
  let run = 0;
  for (const c of text) {
    run = c === ch ? run + 1 : 0;
    longest = Math.max(longest, run);
  }
  return longest;
}

function truncate(text: string, max: number): string {
  return text.length > max ? text.slice(0, max - 1) + '…' : text;
}

/** Numeric-aware, so `python3.9` sorts before `python3.10` as a reader expects. */
const collator = new Intl.Collator('en', { numeric: true });

function compare(a: string, b: string): number {
  return collator.compare(a, b);
}

function byName(a: AttrReview, b: AttrReview): number {
  return compare(a.attr, b.attr) || compare(a.system ?? '', b.system ?? '') || compare(a.job, b.job);
}
