import type { JobEvaluation } from '../eval/repo-evaluation.js';
import { type HeldCheck, type LimitReport, heldCheckName } from '../review/build-limits.js';
import { evalFailureBlocks, isNewlyFailing } from '../review/classify.js';
import { renderChecks, renderMarkdown } from '../review/markdown.js';
import type { CheckResult, Review } from '../review/model.js';
import type { BuildState } from '../scheduler/build-state.js';
import type { CheckConclusion, CheckRunSpec } from './check-runs.js';
import { CHECK_TERMINAL_STATES } from '../checks/check-manager.js';
import { codeSpan, escapeText } from '../review/markdown.js';

/**
 * What each of a commit's few aggregated check runs says: `eka-ci / evaluation`, one `eka-ci / build (<system>)`
 * per system, and `eka-ci / summary` (the review). Pure functions of a run's evaluations, build states and review.
 */

export const EVALUATION_CHECK = 'eka-ci / evaluation';
export const SUMMARY_CHECK = 'eka-ci / summary';
export const CHECKS_CHECK = 'eka-ci / checks';
export const buildCheckName = (system: string): string => `eka-ci / build (${system})`;

/** Check-run names eka-ci owns, for the merge policy: every one must be green. */
export function isEkaciCheck(name: string): boolean {
  return name.startsWith('eka-ci / ');
}

export const REBUILD_FAILED_ACTION = {
  label: 'Rebuild failed',
  description: 'Build the failed derivations again',
  identifier: 'rebuild-failed',
} as const;

// Errors listed one by one in the evaluation check; the rest are counted (the summary has them all).
const MAX_LISTED_ERRORS = 50;

const FAILING: ReadonlySet<BuildState> = new Set(['failed', 'dependency-failed', 'timed-out']);

export function queued(name: string, title: string, detailsUrl?: string): CheckRunSpec {
  return { name, status: 'queued', title, summary: title, ...(detailsUrl ? { detailsUrl } : {}) };
}

export function inProgress(name: string, title: string, summary: string, detailsUrl?: string): CheckRunSpec {
  return { name, status: 'in_progress', title, summary, ...(detailsUrl ? { detailsUrl } : {}) };
}

export function completed(
  name: string,
  conclusion: CheckConclusion,
  title: string,
  summary: string,
  extra: Partial<Pick<CheckRunSpec, 'text' | 'detailsUrl' | 'actions'>> = {},
): CheckRunSpec {
  return { name, status: 'completed', conclusion, title, summary, ...extra };
}

/**
 * The evaluation check: failure when the head has an evaluation error the base did not have (or, without a base,
 * any error) in a job that does not allow evaluation failures (`evalFailureBlocks`).
 */
export function evaluationCheck(
  head: readonly JobEvaluation[],
  base: readonly JobEvaluation[] | undefined,
  detailsUrl: string | undefined,
): CheckRunSpec {
  const baseErrors = new Set(
    (base ?? []).flatMap((j) => j.attrs.filter((a) => a.error).map((a) => `${j.name}\u0000${a.attr}`)),
  );
  const errors = head.flatMap((j) =>
    j.attrs
      .filter((a) => a.error)
      .map((a) => ({ job: j, attr: a.attr, error: a.error!, isNew: !baseErrors.has(`${j.name}\u0000${a.attr}`) })),
  );
  const blocking = errors.filter((e) =>
    evalFailureBlocks({ headFailed: true, baseFailed: !e.isNew, allowEvalFailures: e.job.allowEvalFailures }),
  );
  const total = head.reduce((n, j) => n + j.attrs.length, 0);
  const seconds = head.reduce((t, j) => t + j.seconds, 0);
  const newCount = errors.filter((e) => e.isNew).length;
  const title =
    errors.length === 0
      ? `${total} attributes evaluated`
      : `${newCount} new evaluation error${newCount === 1 ? '' : 's'}, ${errors.length} in all`;
  const lines = [
    `Evaluated ${total} attributes in ${head.length} job${head.length === 1 ? '' : 's'} (${seconds.toFixed(1)} s).`,
  ];
  for (const e of [...errors].sort((a, b) => Number(b.isNew) - Number(a.isNew)).slice(0, MAX_LISTED_ERRORS)) {
    const first = e.error.split('\n')[0] ?? '';
    // The attribute's name and its error are the pull request's to write: quoted, never markdown.
    lines.push(
      `- ${e.isNew ? '**new** ' : ''}${codeSpan(`${e.job.name}.${e.attr}`)}: ${escapeText(first.slice(0, 300))}`,
    );
  }
  if (errors.length > MAX_LISTED_ERRORS) lines.push(`- … and ${errors.length - MAX_LISTED_ERRORS} more`);
  return completed(EVALUATION_CHECK, blocking.length > 0 ? 'failure' : 'success', title, lines.join('\n'), {
    ...(detailsUrl ? { detailsUrl } : {}),
  });
}

export interface RootResult {
  attr: string;
  drvPath: string;
  state: BuildState | undefined;
  /** Whether the review counts it as newly failing (for runs with a base); every failure counts without one. */
  newlyFailing: boolean;
}

/**
 * A build check for one system: neutral when nothing needed building; failure when a build is newly failing;
 * timed_out when every newly failing build timed out; cancelled when builds were cancelled and none failed;
 * success otherwise. A "Rebuild failed" button is offered whenever something failed.
 *
 * `limited` (see review/build-limits.ts): builds of the system were held back (a mass rebuild, a change touching only
 * `skip_build_paths`). What would have been a success is then neutral, titled with the reason, which also heads the
 * summary: nothing vouches for what was not built. A newly failing build still fails the check.
 */
export function buildCheck(
  system: string,
  roots: readonly RootResult[],
  detailsUrl: string | undefined,
  limited?: LimitReport,
): CheckRunSpec {
  const name = buildCheckName(system);
  const extra = detailsUrl ? { detailsUrl } : {};
  if (limited) {
    const spec = roots.length === 0 ? undefined : buildCheck(system, roots, detailsUrl);
    const summary = [...limited.lines, ...(spec ? ['', spec.summary] : [])].join('\n');
    if (spec && spec.conclusion !== 'success') return { ...spec, summary };
    return completed(name, 'neutral', limited.title.slice(0, 255), summary, { ...extra, ...actionsOf(spec) });
  }
  if (roots.length === 0)
    return completed(name, 'neutral', 'Nothing to build', 'No derivation needed building.', extra);
  const counts = new Map<string, number>();
  for (const r of roots) counts.set(r.state ?? 'queued', (counts.get(r.state ?? 'queued') ?? 0) + 1);
  const countLine = [...counts].map(([s, n]) => `${n} ${s}`).join(', ');
  const failing = roots.filter((r) => r.state !== undefined && FAILING.has(r.state));
  const newly = failing.filter((r) => r.newlyFailing);
  const list = (rs: readonly RootResult[]): string =>
    rs
      .slice(0, MAX_LISTED_ERRORS)
      .map((r) => `- ${codeSpan(r.attr)}: ${r.state}`)
      .join('\n') + (rs.length > MAX_LISTED_ERRORS ? `\n- … and ${rs.length - MAX_LISTED_ERRORS} more` : '');
  const listed = [...failing, ...roots.filter((r) => r.state === 'unbuildable')];
  const summary = [countLine, ...(listed.length > 0 ? ['', list(listed)] : [])].join('\n');
  const actions = failing.length > 0 ? { actions: [{ ...REBUILD_FAILED_ACTION }] } : {};
  const unbuildable = roots.filter((r) => r.state === 'unbuildable');
  let conclusion: CheckConclusion = 'success';
  if (newly.length > 0) conclusion = newly.every((r) => r.state === 'timed-out') ? 'timed_out' : 'failure';
  else if (roots.some((r) => r.state === 'cancelled')) conclusion = 'cancelled';
  // Nothing is known of a derivation no agent could take: not a success, not the change's fault either.
  else if (unbuildable.length > 0) conclusion = 'neutral';
  let title = `${roots.length - failing.length} of ${roots.length} built`;
  if (newly.length > 0) title = `${newly.length} newly failing of ${roots.length}`;
  else if (unbuildable.length > 0)
    title = `${unbuildable.length} of ${roots.length} unbuildable: no agent has their system or features`;
  return completed(name, conclusion, title, summary, { ...extra, ...actions });
}

function actionsOf(spec: CheckRunSpec | undefined): Partial<Pick<CheckRunSpec, 'actions'>> {
  return spec?.actions ? { actions: spec.actions } : {};
}

/** The running state of a build check, redrawn as builds settle. */
export function buildProgress(
  system: string,
  roots: readonly RootResult[],
  detailsUrl: string | undefined,
): CheckRunSpec {
  const done = roots.filter((r) => r.state !== undefined && !['queued', 'buildable', 'building'].includes(r.state));
  const failed = done.filter((r) => FAILING.has(r.state!));
  return inProgress(
    buildCheckName(system),
    `${done.length} of ${roots.length} done, ${failed.length} failed`,
    `Building ${roots.length} derivations for ${system}.`,
    detailsUrl,
  );
}

/**
 * The summary check: the review itself; failure exactly when something is newly failing. With `limited` (builds held
 * back, see `buildCheck`), what would have been a success is neutral, titled with the reason, which heads the summary.
 */
export function summaryCheck(
  review: Review,
  detailsUrl: string | undefined,
  attrUrl?: (drvPath: string) => string,
  limited?: LimitReport,
): CheckRunSpec {
  const markdown = renderMarkdown(
    review,
    attrUrl ? { detailsUrl: (a) => attrUrl(a.head?.drv ?? a.base?.drv ?? '') } : {},
  );
  const [verdict = '', ...rest] = markdown.split('\n');
  const failing = isNewlyFailing(review);
  const body = rest.join('\n').trim() || verdict;
  let title = verdict.replace(/^[^\w]+/u, '');
  if (limited && !failing) title = limited.title;
  return completed(
    SUMMARY_CHECK,
    failing ? 'failure' : limited ? 'neutral' : 'success',
    title.slice(0, 255),
    limited ? [...limited.lines, '', body].join('\n') : body,
    {
      ...(detailsUrl ? { detailsUrl } : {}),
    },
  );
}

/**
 * `eka-ci / checks`: the repository's checks (`checks.<name>`), each with its state, exit code, time and the end of
 * its output. In progress until every one ended; then failure when any did not pass (timed_out when all that did not
 * pass timed out, cancelled when they were cancelled), with "Rebuild failed" to run the failed ones again. Checks a
 * mass rebuild held back (`held`) are listed first; with them, checks that all passed conclude neutral.
 */
export function checksCheck(
  checks: readonly CheckResult[],
  detailsUrl: string | undefined,
  held: readonly HeldCheck[] = [],
): CheckRunSpec {
  const extra = detailsUrl ? { detailsUrl } : {};
  const heldLine =
    held.length > 0
      ? [
          `**Held back** (their shells would build what the change's limits hold back): ` +
            held.map(heldCheckName).join(', '),
        ]
      : [];
  const summary = [...heldLine, ...renderChecks(checks).slice(1)].join('\n\n');
  const heldTitle = held.length > 0 ? `, ${held.length} held back` : '';
  const done = checks.filter((c) => CHECK_TERMINAL_STATES.has(c.state));
  if (done.length < checks.length) {
    const failed = done.filter((c) => c.state !== 'succeeded').length;
    return inProgress(
      CHECKS_CHECK,
      `${done.length} of ${checks.length} done, ${failed} not passing${heldTitle}`,
      summary,
      detailsUrl,
    );
  }
  const bad = checks.filter((c) => c.state !== 'succeeded');
  if (bad.length === 0) {
    const title = `${checks.length} check${checks.length === 1 ? '' : 's'} passed${heldTitle}`;
    // What was held back did not pass: neutral, as the build checks of a mass rebuild are.
    return completed(CHECKS_CHECK, held.length > 0 ? 'neutral' : 'success', title, summary, extra);
  }
  let conclusion: CheckConclusion = 'failure';
  if (bad.every((c) => c.state === 'timed-out')) conclusion = 'timed_out';
  else if (bad.every((c) => c.state === 'cancelled')) conclusion = 'cancelled';
  const names = bad.map((c) => `${c.name} (${c.state})`).join(', ');
  return completed(
    CHECKS_CHECK,
    conclusion,
    `${bad.length} of ${checks.length} not passing: ${names}${heldTitle}`.slice(0, 255),
    summary,
    {
      ...extra,
      actions: [{ ...REBUILD_FAILED_ACTION }],
    },
  );
}
