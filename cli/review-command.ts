import { writeFileSync } from 'node:fs';
import { UsageError } from '../common/errors.js';
import { loadCoordinatorConfig } from '../coordinator/config.js';
import { evaluateCommit } from '../coordinator/eval/repo-evaluation.js';
import { isTerminal } from '../coordinator/scheduler/build-state.js';
import { isNewlyFailing } from '../coordinator/review/classify.js';
import { renderMarkdown } from '../coordinator/review/markdown.js';
import { buildReview } from '../coordinator/review/review-builder.js';
import type { Review } from '../coordinator/review/model.js';
import { EmbeddedSystem } from './embedded.js';
import { type CommonOptions, context, diffOf } from './eval-commands.js';

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
 * review as markdown. Exit 0 when nothing is newly failing (build or evaluation), 1 when something is.
 */
export async function reviewCommand(opts: ReviewOptions): Promise<number> {
  const agents = Number(opts.agents);
  if (!Number.isInteger(agents) || agents < 1)
    throw new UsageError(`--agents takes a whole number ≥ 1, got "${opts.agents}"`);
  const c = context({ ...opts, json: false });
  const progress = (line: string): void => void process.stderr.write(`${line}\n`);
  progress(`evaluating ${opts.base} (base)…`);
  const base = await evaluateCommit({ ...c, rev: opts.base, jobs: opts.job });
  progress(`evaluating ${opts.head} (head)…`);
  const head = await evaluateCommit({ ...c, rev: opts.head, jobs: opts.job });
  const diffs = await diffOf(base, head);

  const config = loadCoordinatorConfig(opts.config, process.env, { unbuildable_grace_seconds: 0 });
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
  try {
    const manager = system.coordinator.manager;
    const store = system.coordinator.store;
    if (opts.build) {
      const headRoots = diffs.flatMap((d) =>
        d.attrs
          .filter((a) => (a.change === 'changed' || a.change === 'added') && a.headDrv)
          .map((a) => ({ attr: `${d.name}.${a.attr}`, drvPath: a.headDrv! })),
      );
      // A base result is remembered per derivation: what an earlier review built is not built again.
      const baseRoots = diffs.flatMap((d) =>
        d.attrs
          .filter((a) => a.change === 'changed' && a.baseDrv)
          .filter((a) => {
            const row = store.derivation(a.baseDrv!);
            return !row || !isTerminal(row.state);
          })
          .map((a) => ({ attr: `${d.name}.${a.attr}`, drvPath: a.baseDrv! })),
      );
      progress(`building ${headRoots.length} head and ${baseRoots.length} base attributes…`);
      const requests = [];
      if (headRoots.length > 0) requests.push(await manager.submit(headRoots, `ekaci review head ${head.commit}`));
      if (baseRoots.length > 0) requests.push(await manager.submit(baseRoots, `ekaci review base ${base.commit}`));
      await Promise.all(requests.map((r) => manager.waitFor(r)));
    }
    const review: Review = await buildReview({
      baseRev: base.commit,
      headRev: head.commit,
      jobs: diffs.map((d) => ({
        name: d.name,
        maxIncreasePercent: head.jobs.find((j) => j.name === d.name)?.maxIncreasePercent,
        diff: d,
        base: base.jobs.find((j) => j.name === d.name)?.attrs ?? [],
        head: head.jobs.find((j) => j.name === d.name)?.attrs ?? [],
      })),
      build: (drv) => {
        const row = store.derivation(drv);
        if (!row) return undefined;
        return {
          state: row.state,
          rootCause: row.root_cause,
          outputs: store.outputsOf(drv).map((o) => ({
            name: o.name,
            path: o.path,
            narSize: o.nar_size,
            closureSize: o.closure_size,
          })),
        };
      },
      logTail: (drv, lines) => {
        const attempt = store.derivation(drv)?.attempts ?? 0;
        const text = system.coordinator.logs.read(system.coordinator.logs.pathFor(drv, attempt)).toString('utf8');
        return text.trimEnd().split('\n').slice(-lines).join('\n');
      },
      references: (path) => system.coordinator.references(path),
    });
    const markdown = renderMarkdown(review);
    if (opts.markdown) writeFileSync(opts.markdown, markdown);
    if (opts.json) writeFileSync(opts.json, `${JSON.stringify(review, null, 2)}\n`);
    process.stdout.write(markdown);
    return isNewlyFailing(review) ? 1 : 0;
  } finally {
    await system.stop();
  }
}
