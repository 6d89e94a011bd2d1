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
    super('EKACI_ERR_REPO_CONFIG', problems.map((p) => `${source}: ${p}`).join('\n'), options);
  }
}
