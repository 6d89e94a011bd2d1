import { existsSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { IllegalStateError, UsageError } from '../common/errors.js';
import { type CommitEvaluation, evaluateCommit } from '../coordinator/eval/repo-evaluation.js';
import { readAheadClosure } from '../coordinator/graph/commit-diff.js';
import { checkSpecs } from '../coordinator/checks/check-specs.js';
import { failedChecks, isNewlyFailing } from '../coordinator/review/classify.js';
import { renderMarkdown } from '../coordinator/review/markdown.js';
import {
  type HeldBack,
  heldBackOf,
  limitChecks,
  readBuildRules,
  rebuildsBySystem,
} from '../coordinator/review/build-limits.js';
import { reviewRoots } from '../coordinator/review/review-roots.js';
import { attrsFromCommitTitles } from '../coordinator/github/ofborg-titles.js';
import { EmbeddedSystem } from './embedded.js';
import { type CommonOptions, type RepoContext, openContext } from './eval-commands.js';
import { Progress } from './progress.js';

// As many commit titles as the GitHub pipeline reads (one page of a pull request's commits): a longer change is a
// mass change, which the rebuild diff covers anyway.
const MAX_COMMIT_TITLES = 100;

export interface ReviewOptions extends Omit<CommonOptions, 'json'> {
  base: string;
  head: string;
  agents: string;
  config?: string;
  /** Write the markdown summary here too. */
  markdown?: string;
  /** Write the JSON review here. */
  json?: string;
  build: boolean;
}

/**
 * `ekaci review`: evaluates both commits, builds what the change touches on the embedded system, and prints the
 * review as markdown. Exit 0 when nothing is newly failing (build or evaluation), 1 when something is. Builds the
 * base's rules hold back (a mass rebuild, a change touching only `skip_build_paths`: see build-limits.ts) are said
 * above the review, as in the summary check; what was not built never counts as failing.
 */
export async function reviewCommand(opts: ReviewOptions): Promise<number> {
  const agents = Number(opts.agents);
  if (!Number.isInteger(agents) || agents < 1)
    throw new UsageError(`--agents takes a whole number ≥ 1, got "${opts.agents}"`);
  // Checked before the work: a review that ends in "cannot write the file" wasted it.
  for (const [flag, file] of [
    ['--markdown', opts.markdown],
    ['--json', opts.json],
  ] as const) {
    if (file !== undefined && !existsSync(dirname(resolve(file))))
      throw new UsageError(`${flag} ${file}: the directory ${dirname(resolve(file))} does not exist`);
  }
  const c = await openContext({ ...opts, json: false }, { unbuildable_grace_seconds: 0 });
  try {
    return await review(c, opts);
  } finally {
    c.close();
  }
}

async function review(c: RepoContext, opts: ReviewOptions): Promise<number> {
  const config = c.config;
  const agents = Number(opts.agents);
  const progress = new Progress(process.stderr);
  const evaluate = async (rev: string, side: string): Promise<CommitEvaluation> => {
    progress.line(`evaluating ${side} ${rev}…`);
    const counter = progress.evaluating(`${side} ${rev}`);
    let e: CommitEvaluation;
    try {
      e = await evaluateCommit({
        ...c,
        rev: c.revision(rev),
        jobs: opts.job,
        onResult: (r) => counter.attr(!!r.error),
      });
    } finally {
      counter.end();
    }
    const attrs = e.jobs.flatMap((j) => j.attrs);
    const errors = attrs.filter((a) => a.error).length;
    const seconds = e.jobs.reduce((t, j) => t + j.seconds, 0);
    progress.line(
      `  ${side} ${e.commit.slice(0, 12)}: ${attrs.length} attributes, ${errors} evaluation errors (${seconds.toFixed(1)} s)`,
    );
    return e;
  };
  const base = await evaluate(opts.base, 'base');
  // The base's .drv files are read while the head evaluates, in the evaluator's own processes.
  const readAhead = readAheadClosure(base);
  const head = await evaluate(opts.head, 'head');
  await readAhead;

  config.dataDir = c.dataDir;
  config.web = { ...config.web, address: '127.0.0.1', port: 0 };
  config.grpc = { ...config.grpc, address: '127.0.0.1', port: 0 };
  const system = new EmbeddedSystem({
    coordinator: config,
    agents,
    maxJobs: config.localAgent.maxJobs,
    logger: c.logger,
  });
  await system.start();
  const { manager, store, reviews, checks } = system.coordinator;
  const onSignal = (): void => {
    progress.line('interrupted: cancelling builds…');
    manager.cancel(manager.activeDerivations(), 'interrupted by the user');
    checks.cancel(c.repo, head.commit, 'interrupted by the user');
  };
  process.once('SIGINT', onSignal);
  try {
    const diffs = await reviews.record(c.repo, base, head);
    let heldBack: HeldBack | undefined;
    if (opts.build) {
      // OfBorg-style commit titles name attributes to build, as on GitHub (a local review has no comment commands).
      const titles = await c.mirrors.commitTitles(c.repo, base.commit, head.commit, MAX_COMMIT_TITLES);
      const rules = await readBuildRules(c.mirrors, {
        baseUrl: c.repo,
        headUrl: c.repo,
        base: base.commit,
        head: head.commit,
        serverMaxRebuildCount: config.rebuild.maxRebuildCount,
      });
      const { roots, limits } = reviewRoots({
        head,
        diffs,
        named: attrsFromCommitTitles(titles),
        builds: store,
        rules,
      });
      // The repository's checks run on the embedded agent too, beside the builds, under the same policy as on GitHub
      // (the base's check must allow the network as well); the user's own code is trusted. Those whose shells would
      // build what the limits hold back do not.
      const { run: specs, held } = limitChecks(
        checkSpecs(head, base, { networkPermitted: true, timeoutSeconds: config.checks.timeoutSeconds }),
        base,
        limits,
      );
      heldBack = heldBackOf(limits, rebuildsBySystem(diffs), held);
      if (heldBack) progress.line(heldBack.title);
      const headRoots = roots.filter((r) => r.side === 'head');
      const baseRoots = roots.filter((r) => r.side === 'base');
      progress.line(`building ${headRoots.length} head and ${baseRoots.length} base attributes…`);
      progress.watch(manager, store);
      const checkIds = checks.request({
        repo: c.repo,
        commit: head.commit,
        cloneUrl: c.repo,
        checks: specs,
        untrusted: false,
        private: true,
        rerunFailed: false,
      });
      if (specs.length > 0) progress.line(`running ${specs.length} checks…`);
      try {
        const requests = [];
        // The .drv files built stay in the Nix store with the commits' evaluations, as the evaluation rooted them.
        const rooted = (commit: string) => ({ gcRootsDir: join(c.dataDir, 'gcroots', commit) });
        if (headRoots.length > 0)
          requests.push(await manager.submit(headRoots, `ekaci review head ${head.commit}`, rooted(head.commit)));
        if (baseRoots.length > 0)
          requests.push(await manager.submit(baseRoots, `ekaci review base ${base.commit}`, rooted(base.commit)));
        await Promise.all([...requests.map((r) => manager.waitFor(r)), checks.waitFor(checkIds)]);
      } finally {
        progress.stop();
      }
    }
    const review = await reviews.reviewOf(c.repo, base.commit, head.commit, opts.job, { evaluations: { base, head } });
    if (!review) throw new IllegalStateError('the evaluations just recorded are missing from the database');
    if (heldBack) review.heldBack = heldBack;
    const markdown = renderMarkdown(review);
    if (opts.markdown) writeFileSync(opts.markdown, markdown);
    if (opts.json) writeFileSync(opts.json, `${JSON.stringify(review, null, 2)}\n`);
    process.stdout.write(markdown);
    return isNewlyFailing(review) || failedChecks(review).length > 0 ? 1 : 0;
  } finally {
    process.off('SIGINT', onSignal);
    await system.stop();
  }
}
