import { z } from 'zod';
import { MalformedPayloadError } from './errors.js';

/**
 * The parts of GitHub's webhook payloads eka-ci reads, validated: a payload that lacks them is malformed and its
 * delivery fails with a message naming the missing field, instead of an `undefined` deep inside a handler.
 * Everything else in a payload passes through unread.
 */

const user = z.looseObject({ login: z.string(), type: z.string().optional() });

const repository = z.looseObject({
  full_name: z.string().regex(/^[^/\s]+\/[^/\s]+$/),
  clone_url: z.string(),
  default_branch: z.string().optional(),
  private: z.boolean().optional(),
});

const installation = z.looseObject({ id: z.number().int().positive() });

const pullRequest = z.looseObject({
  number: z.number().int().positive(),
  title: z.string(),
  state: z.string(),
  draft: z.boolean().optional(),
  user,
  author_association: z.string(),
  head: z.looseObject({ sha: z.string(), ref: z.string(), repo: repository.nullable() }),
  base: z.looseObject({ sha: z.string(), ref: z.string(), repo: repository }),
  /** When GitHub last changed the pull request (for a `synchronize`, the push). */
  updated_at: z.string().optional(),
});

export const pullRequestEvent = z.looseObject({
  action: z.string(),
  pull_request: pullRequest,
  repository,
  installation,
});

export const pushEvent = z.looseObject({
  ref: z.string(),
  before: z.string(),
  after: z.string(),
  deleted: z.boolean().optional(),
  repository,
  installation,
});

export const mergeGroupEvent = z.looseObject({
  action: z.string(),
  merge_group: z.looseObject({
    head_sha: z.string(),
    base_sha: z.string(),
    head_ref: z.string(),
    base_ref: z.string(),
  }),
  repository,
  installation,
});

export const checkRunEvent = z.looseObject({
  action: z.string(),
  sender: user.optional(),
  check_run: z.looseObject({ head_sha: z.string(), name: z.string() }),
  requested_action: z.looseObject({ identifier: z.string() }).nullish(),
  repository,
  installation,
});

export const checkSuiteEvent = z.looseObject({
  action: z.string(),
  sender: user.optional(),
  check_suite: z.looseObject({ head_sha: z.string() }),
  repository,
  installation,
});

export const issueCommentEvent = z.looseObject({
  action: z.string(),
  issue: z.looseObject({ number: z.number().int().positive(), pull_request: z.unknown().optional() }),
  comment: z.looseObject({
    id: z.number().int(),
    body: z.string().nullable(),
    user,
    created_at: z.string().optional(),
  }),
  repository,
  installation,
});

export const pullRequestReviewEvent = z.looseObject({
  action: z.string(),
  pull_request: z.looseObject({ number: z.number().int().positive() }),
  repository,
  installation,
});

export const installationEvent = z.looseObject({
  action: z.string(),
  installation: z.looseObject({ id: z.number().int().positive(), account: user.nullable() }),
});

export const installationRepositoriesEvent = z.looseObject({
  action: z.string(),
  installation: z.looseObject({ id: z.number().int().positive() }),
  repositories_removed: z.array(z.looseObject({ full_name: z.string() })).default([]),
});

/** A pull request as webhooks and `GET /repos/{owner}/{repo}/pulls/{pull_number}` both describe it. */
export const pullRequestSchema = pullRequest;

export type PullRequestPayload = z.infer<typeof pullRequest>;
export type RepositoryPayload = z.infer<typeof repository>;

/** Parses a payload for `event`, or throws an error naming the event and the first missing or wrong field. */
export function parsePayload<T extends z.ZodType>(schema: T, event: string, payload: unknown): z.infer<T> {
  const r = schema.safeParse(payload);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  throw new MalformedPayloadError(`${event} payload: ${issue.path.join('.') || '(top level)'}: ${issue.message}`);
}
