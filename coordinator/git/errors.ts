import { EkaciError } from '../../common/errors.js';

/**
 * A repository URL is not one eka-ci can fetch: not a local path, `file://` or `http(s)://` URL, or it carries
 * credentials (pass those as `auth`, never inside the URL).
 */
export class GitUrlError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_GIT_URL', message);
  }
}

/**
 * A fetch from a repository failed for a reason other than a missing revision: unreachable host, refused or missing
 * credentials, not a git repository, or the fetch timed out. The message quotes git (credentials redacted).
 */
export class GitFetchError extends EkaciError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EKACI_ERR_GIT_FETCH', message, options);
  }
}

/**
 * A revision (branch, tag, ref or commit sha) does not exist in the repository, is not a valid ref name, or names
 * something that is not a commit.
 */
export class GitRevisionError extends EkaciError {
  constructor(
    message: string,
    readonly repository: string,
    readonly revision: string,
  ) {
    super('EKACI_ERR_GIT_REVISION', message);
  }
}

/**
 * A local git operation on a mirror failed where it should not (creating a mirror, adding or removing a worktree):
 * usually a full disk, wrong permissions, or a mirror damaged outside eka-ci. The message quotes git.
 */
export class GitCommandError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_GIT_COMMAND', message);
  }
}
