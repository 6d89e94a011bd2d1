import { z } from 'zod';
import { GitHubResponseError } from './errors.js';
import { pullRequestSchema } from './payloads.js';

/**
 * The parts of GitHub's REST responses eka-ci reads, checked before they are read: Octokit's types describe what
 * GitHub documents, not what arrives. A response of another shape becomes a GitHubResponseError naming the
 * operation and what was expected (never `data.map is not a function` half-way through a run). Everything else in a
 * response passes through unread.
 */
export interface ResponseShape<T extends z.ZodType> {
  /** What the response should be, for the error message: "a list of commits". */
  expected: string;
  schema: T;
}

const shape = <T extends z.ZodType>(expected: string, schema: T): ResponseShape<T> => ({ expected, schema });

const positiveId = z.number().int().positive();

/** `GET /repos/{owner}/{repo}/installation` */
export const installationResponse = shape('an installation with a numeric id', z.looseObject({ id: positiveId }));

/** `GET /repos/{owner}/{repo}/pulls/{pull_number}/commits` */
export const pullCommitsResponse = shape(
  'a list of commits, each with commit.message',
  z.array(z.looseObject({ commit: z.looseObject({ message: z.string() }) })),
);

/** `GET /repos/{owner}/{repo}/pulls/{pull_number}` */
export const pullResponse = shape('a pull request', pullRequestSchema);

/** `GET /repos/{owner}/{repo}/collaborators/{username}/permission` */
export const permissionResponse = shape(
  'a permission level',
  z.looseObject({ permission: z.string(), role_name: z.string().optional() }),
);

/** `POST /repos/{owner}/{repo}/check-runs` */
export const createdCheckRunResponse = shape('a check run with a numeric id', z.looseObject({ id: positiveId }));

/** `GET /repos/{owner}/{repo}/commits/{ref}/check-runs` */
export const checkRunsResponse = shape(
  'an object with a list of check_runs',
  z.looseObject({
    check_runs: z.array(z.looseObject({ id: positiveId, external_id: z.string().nullish() })),
  }),
);

// How much of an unexpected response the error quotes: enough to recognise it (an error page, a wrapper object).
const QUOTED_CHARS = 200;

/** The response's data in the shape `expected` describes, or a GitHubResponseError naming `operation`. */
export function readResponse<T extends z.ZodType>(
  expected: ResponseShape<T>,
  operation: string,
  response: { status: number; data: unknown },
): z.infer<T> {
  const r = expected.schema.safeParse(response.data);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  const where = issue.path.length > 0 ? ` (at ${issue.path.join('.')}: ${issue.message})` : '';
  throw new GitHubResponseError(
    `GitHub answered ${operation} (${response.status}) with ${describe(response.data)} where ${expected.expected} ` +
      `was expected${where}: ${quote(response.data)}`,
    operation,
    response.status,
    expected.expected,
  );
}

function describe(data: unknown): string {
  if (data === null) return 'null';
  if (Array.isArray(data)) return 'a list';
  if (typeof data === 'object') return 'an object';
  return `a ${typeof data}`;
}

function quote(data: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(data) ?? String(data);
  } catch {
    text = String(data);
  }
  return text.length > QUOTED_CHARS ? `${text.slice(0, QUOTED_CHARS)}…` : text;
}
