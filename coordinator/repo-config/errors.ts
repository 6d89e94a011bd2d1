import { EkaciError } from '../../common/errors.js';

/**
 * A repository's `.eka-ci/config.json` (or `.ekaci/config.json`) cannot be used: it is too large, not JSON, does
 * not match the schema, or names a job file or bind path that is missing or lies outside the checkout. Thrown by
 * `loadRepoConfig` / `compileRepoConfig`; the message lists every problem, each prefixed with the config file, and
 * is meant to be shown verbatim in the failed check so the pull request author can fix the file.
 *
 * A repository with no config file at all is not this error: `loadRepoConfig` returns `undefined` for it.
 */
export class RepoConfigError extends EkaciError {
  constructor(
    /** The config file, relative to the checkout (`.eka-ci/config.json`). */
    readonly source: string,
    /** One line per problem, without the `source` prefix. */
    readonly problems: readonly string[],
    options?: { cause?: unknown },
  ) {
    super('EKACI_ERR_REPO_CONFIG', problems.map((p) => `${source}: ${oneLine(p)}`).join('\n'), options);
  }
}

/**
 * A problem quotes what the file says (a bind path, a shell attribute), and a pull request controls that text: a
 * newline in it would start a line of its own, which could pass for another problem. Control characters and line
 * separators are shown as JSON escapes, so each problem stays one line.
 */
function oneLine(problem: string): string {
  return problem.replace(/[\u0000-\u001f\u007f\u2028\u2029]/g, (c) => {
    const short = ({ '\n': '\\n', '\r': '\\r', '\t': '\\t' } as Record<string, string>)[c];
    return short ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
  });
}
