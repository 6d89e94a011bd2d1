import { maintainersOf } from '../eval/maintainers.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { FetchOptions, GitMirrors } from '../git/git-mirrors.js';
import { loadRepoConfig } from '../repo-config/repo-config.js';

/**
 * The attributes a change adds or changes (a different derivation than the base's), by job.
 */
export function changedAttrs(base: CommitEvaluation, head: CommitEvaluation): Map<string, string[]> {
  const before = new Map(base.jobs.flatMap((j) => j.attrs.map((a) => [`${j.name}\u0000${a.attr}`, a.drvPath])));
  const out = new Map<string, string[]>();
  for (const j of head.jobs) {
    const attrs = j.attrs.filter((a) => before.get(`${j.name}\u0000${a.attr}`) !== a.drvPath).map((a) => a.attr);
    if (attrs.length > 0) out.set(j.name, attrs);
  }
  return out;
}

/**
 * The GitHub handles in `meta.maintainers` of every attribute a change adds or changes, read from the head
 * commit. Only `github` fields count: a maintainer's display name must never authorise the GitHub user who happens
 * to share it. Flake jobs have no per-attribute meta here; their attributes map to nobody (only writers may merge).
 * Keys are attribute names, prefixed with the job name when the repository has several jobs.
 */
export async function maintainersOfChange(o: {
  mirrors: GitMirrors;
  cloneUrl: string;
  headSha: string;
  fetch: FetchOptions;
  changed: ReadonlyMap<string, readonly string[]>;
}): Promise<Map<string, string[]>> {
  const out = new Map<string, string[]>();
  if (o.changed.size === 0) return out;
  const checkout = await o.mirrors.checkout(o.cloneUrl, o.headSha, o.fetch);
  try {
    const config = await loadRepoConfig(checkout.dir);
    const key = (job: string, attr: string): string => (o.changed.size > 1 ? `${job}.${attr}` : attr);
    for (const [jobName, attrs] of o.changed) {
      const job = config?.jobs.find((j) => j.name === jobName);
      const handles =
        job?.kind === 'file'
          ? await maintainersOf({
              checkoutDir: checkout.dir,
              file: job.relativeFile,
              attrPath: job.attrPath.join('.'),
              attrs,
            })
          : new Map<string, string[]>();
      for (const attr of attrs) out.set(key(jobName, attr), handles.get(attr) ?? []);
    }
    return out;
  } finally {
    await checkout.release();
  }
}
