import type { CommitEvaluation } from '../eval/repo-evaluation.js';

/**
 * Who maintains what a pull request touches, for `@eka-ci merge` by someone without write access: every attribute
 * the change adds, changes (a different derivation, or an evaluation error on one side only) or removes, each with
 * the GitHub handles its `meta.maintainers` lists **in the base commit** — the pull request cannot make its author
 * a maintainer by editing `meta`. An added attribute has no maintainer in the base, so only a writer may merge a
 * pull request that adds one. Read from stored evaluations: nothing is evaluated to answer a comment. Keys are
 * attribute names, prefixed with the job name when the repository has several jobs.
 */
export function baseMaintainersOfChange(base: CommitEvaluation, head: CommitEvaluation): Map<string, string[]> {
  const jobs = [...new Set([...base.jobs, ...head.jobs].map((j) => j.name))].sort();
  const out = new Map<string, string[]>();
  for (const job of jobs) {
    const before = new Map((base.jobs.find((j) => j.name === job)?.attrs ?? []).map((a) => [a.attr, a]));
    const after = new Map((head.jobs.find((j) => j.name === job)?.attrs ?? []).map((a) => [a.attr, a]));
    for (const attr of [...new Set([...before.keys(), ...after.keys()])].sort()) {
      const b = before.get(attr);
      const h = after.get(attr);
      const same = b !== undefined && h !== undefined && b.drvPath === h.drvPath && b.error === h.error;
      if (same) continue;
      const key = jobs.length > 1 ? `${job}.${attr}` : attr;
      out.set(key, b?.meta?.githubMaintainers ?? []);
    }
  }
  return out;
}
