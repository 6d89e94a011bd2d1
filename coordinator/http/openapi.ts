import { BUILD_STATES } from '../scheduler/build-state.js';
import { HOOK_RUN_STATES } from '../hooks/hook-run-store.js';

/**
 * The contract of `/api/v1`, as OpenAPI 3.1 (served at `/api/v1/openapi.json`). Tests validate every response
 * they get against it, and fail when a route exists that it does not describe: change both together.
 */

const error = { $ref: '#/components/schemas/Error' };
const errorResponse = (description: string) => ({ description, content: { 'application/json': { schema: error } } });
const denied = {
  '401': errorResponse('No credential, and the data is not public.'),
  '403': errorResponse('The credential may not do this.'),
};
const hashParameter = {
  name: 'hash',
  in: 'path',
  required: true,
  description: "The whole hash of the .drv's store path (32 characters), optionally followed by `-` and its name.",
  schema: { type: 'string', pattern: '^[0-9a-df-np-sv-z]{32}(-[A-Za-z0-9+\\-._?=]+)?$' },
};
const nullable = (type: string) => ({ type: [type, 'null'] });
const json = (description: string, schema: object) => ({ description, content: { 'application/json': { schema } } });
const object = (properties: Record<string, object>, required = Object.keys(properties)) => ({
  type: 'object',
  additionalProperties: false,
  required,
  properties,
});
const pathString = (name: string, description?: string) => ({
  name,
  in: 'path',
  required: true,
  ...(description ? { description } : {}),
  schema: { type: 'string' },
});
const repoParameters = [pathString('owner'), pathString('repo')];
const counts = { type: 'object', additionalProperties: { type: 'integer', minimum: 0 } };
const neighbours = object({
  count: { type: 'integer', minimum: 0 },
  derivations: {
    type: 'array',
    items: object({
      drvPath: { type: 'string' },
      state: { anyOf: [{ $ref: '#/components/schemas/BuildState' }, { type: 'null' }] },
    }),
  },
});
const logResponses = {
  '200': {
    description:
      'The log (`text/plain`), or with `follow=1` / `Accept: text/event-stream` the log followed live as ' +
      'Server-Sent Events: `log` events (data: a JSON string of the text; id: bytes sent so far, for ' +
      '`Last-Event-ID`), then one `end` event whose data is an `EndOfLog`.',
    content: {
      'text/plain': { schema: { type: 'string' } },
      'text/event-stream': { schema: { type: 'string' } },
    },
  },
  '206': {
    description: 'The part of the log a `Range: bytes=…` header asked for; `Content-Range` says which.',
    content: { 'text/plain': { schema: { type: 'string' } } },
  },
  ...denied,
  '404': errorResponse('No such derivation, or no such attempt of it.'),
  '416': errorResponse('The range starts past the end of the log.'),
};
const logParameters = [
  hashParameter,
  { name: 'follow', in: 'query', required: false, schema: { type: 'string', enum: ['0', '1'] } },
  { name: 'Range', in: 'header', required: false, schema: { type: 'string', pattern: '^bytes=' } },
  { name: 'Last-Event-ID', in: 'header', required: false, schema: { type: 'string', pattern: '^[0-9]+$' } },
];

const runProperties = {
  id: { type: 'integer' },
  repo: { type: 'string' },
  kind: { type: 'string', enum: ['pull_request', 'push', 'merge_group'] },
  prNumber: nullable('integer'),
  baseSha: nullable('string'),
  headSha: { type: 'string' },
  state: {
    type: 'string',
    enum: ['queued', 'awaiting-approval', 'evaluating', 'building', 'done', 'cancelled', 'failed'],
  },
  error: nullable('string'),
  untrusted: { type: 'boolean' },
  createdAt: { type: 'integer' },
  updatedAt: { type: 'integer' },
  rebuildCountBySystem: {
    description: 'Rebuilds per system, once the commits are diffed.',
    anyOf: [{ type: 'null' }, counts],
  },
  review: {
    description: "The review's counts (see Review.summary), once built.",
    anyOf: [{ type: 'null' }, counts],
  },
  eta: {
    description:
      'While the run builds: how long what it still needs will take, as max(critical path, max over systems of ' +
      'remaining work ÷ connected build slots). Each unfinished derivation is estimated from recorded builds of ' +
      'its pname (same system, else any system, else a guess: the median of everything recorded); a running one ' +
      'counts what is left of its estimate. Null when the run is not building or nothing it needs is unfinished.',
    anyOf: [
      { type: 'null' },
      object({
        seconds: { type: 'integer', minimum: 0 },
        bound: {
          type: 'string',
          enum: ['critical-path', 'work'],
          description: 'Which bound decided: the longest chain, or the queue of a system over its slots.',
        },
        criticalPath: {
          type: 'array',
          items: { type: 'string' },
          description:
            'The longest chain of .drv paths, from what builds first to a root; a chain longer than 10 keeps its ' +
            'first 8 and last 2.',
        },
        criticalPathLength: { type: 'integer', minimum: 0 },
        criticalPathSeconds: { type: 'integer', minimum: 0 },
        basis: object({
          estimated: {
            type: 'integer',
            minimum: 0,
            description: 'Unfinished derivations estimated from builds of their pname.',
          },
          guessed: { type: 'integer', minimum: 0, description: 'Unfinished derivations whose pname was never built.' },
        }),
        computedAt: { type: 'integer', description: 'When it was computed (ms since the epoch).' },
      }),
    ],
  },
};

export const OPENAPI_DOCUMENT = {
  openapi: '3.1.0',
  info: {
    title: 'eka-ci coordinator API',
    version: '1.0.0',
    description:
      'Builds, their attempts and logs, build requests and reviews. Send `Authorization: Bearer <API token>`; ' +
      'without one, only what a public coordinator shows of public repositories is readable. Errors are ' +
      '`{"error": {"code", "message"}}`.',
  },
  servers: [{ url: '/api/v1' }],
  components: {
    securitySchemes: { token: { type: 'http', scheme: 'bearer' } },
    schemas: {
      Error: {
        type: 'object',
        required: ['error'],
        additionalProperties: false,
        properties: {
          error: {
            type: 'object',
            required: ['code', 'message'],
            additionalProperties: false,
            properties: { code: { type: 'string', pattern: '^EKACI_ERR_[A-Z_]+$' }, message: { type: 'string' } },
          },
        },
      },
      BuildState: { type: 'string', enum: BUILD_STATES },
      HookRun: object({
        id: { type: 'integer' },
        hook: { type: 'string', description: 'The `[[hooks]]` id.' },
        attempt: { type: 'integer', description: "The derivation's attempt whose result started it." },
        result: { type: 'string', enum: ['success', 'failure'] },
        buildState: { type: 'string', enum: ['succeeded', 'failed', 'timed-out'] },
        state: { type: 'string', enum: HOOK_RUN_STATES },
        reason: { ...nullable('string'), description: 'Why it was skipped, or what went wrong.' },
        exitCode: nullable('integer'),
        signal: nullable('string'),
        runId: { ...nullable('integer'), description: 'The GitHub run whose context it ran in; null: a request.' },
        repo: { type: 'string' },
        branch: { type: 'string' },
        attr: { type: 'string' },
        job: { type: 'string' },
        commitSha: { type: 'string' },
        logBytes: { type: 'integer', minimum: 0 },
        logTruncated: { type: 'boolean' },
        logUrl: nullable('string'),
        queuedAt: { type: 'integer' },
        startedAt: nullable('integer'),
        finishedAt: nullable('integer'),
      }),
      AttemptState: {
        type: 'string',
        enum: [
          'assigned',
          'accepted',
          'started',
          'succeeded',
          'failed',
          'timed-out',
          'infra-error',
          'cancelled',
          'lost',
        ],
      },
      Derivation: {
        type: 'object',
        required: ['drv_path', 'system', 'state', 'attempts', 'root_cause', 'error', 'agent_id'],
        properties: {
          drv_path: { type: 'string' },
          system: { type: 'string' },
          required_features: { type: 'string', description: 'JSON list' },
          is_fod: { type: 'integer', enum: [0, 1] },
          prefer_local: { type: 'integer', enum: [0, 1] },
          untrusted: { type: 'integer', enum: [0, 1] },
          private: { type: 'integer', enum: [0, 1] },
          state: { $ref: '#/components/schemas/BuildState' },
          attempts: { type: 'integer', minimum: 0 },
          root_cause: { ...nullable('string'), description: 'For dependency-failed: the failed derivation.' },
          error: nullable('string'),
          agent_id: nullable('string'),
        },
      },
      Output: {
        type: 'object',
        required: ['name', 'path', 'nar_size', 'closure_size'],
        properties: {
          drv_path: { type: 'string' },
          name: { type: 'string' },
          path: { type: 'string' },
          nar_size: nullable('integer'),
          closure_size: nullable('integer'),
        },
      },
      Attempt: {
        type: 'object',
        required: ['lease_id', 'attempt', 'agent_id', 'state', 'assigned_at', 'log_bytes'],
        properties: {
          lease_id: { type: 'string' },
          drv_path: { type: 'string' },
          attempt: { type: 'integer', minimum: 1 },
          agent_id: { type: 'string' },
          state: { $ref: '#/components/schemas/AttemptState' },
          assigned_at: { type: 'integer' },
          started_at: nullable('integer'),
          finished_at: nullable('integer'),
          expires_at: { type: 'integer' },
          error: nullable('string'),
          log_bytes: { type: 'integer', minimum: 0 },
          cancel_reason: nullable('string'),
          log_truncated: { type: 'integer', enum: [0, 1] },
        },
      },
      Agent: {
        type: 'object',
        additionalProperties: false,
        required: [
          'id',
          'hostname',
          'os',
          'systems',
          'supportedFeatures',
          'mandatoryFeatures',
          'maxJobs',
          'nixVersion',
          'sandboxed',
          'lastSeen',
          'connected',
          'freeSlots',
          'draining',
          'drained',
          'leases',
        ],
        properties: {
          id: { type: 'string', description: 'The name of its token.' },
          hostname: { type: 'string' },
          os: { type: 'string' },
          systems: { type: 'array', items: { type: 'string' } },
          supportedFeatures: { type: 'array', items: { type: 'string' } },
          mandatoryFeatures: { type: 'array', items: { type: 'string' } },
          maxJobs: { type: 'integer' },
          nixVersion: { type: 'string' },
          sandboxed: { type: 'boolean', description: "Its builds run in Nix's sandbox (measured at its start)." },
          lastSeen: { type: 'integer', description: 'ms since the epoch: its last Hello or heartbeat.' },
          connected: { type: 'boolean' },
          freeSlots: { type: 'integer', minimum: 0 },
          draining: { type: 'boolean', description: 'The agent itself drains (it is stopping).' },
          drained: {
            description: "An operator's drain: no new work until resumed.",
            anyOf: [
              { type: 'null' },
              object({ at: { type: 'integer' }, by: nullable('string'), reason: nullable('string') }),
            ],
          },
          leases: {
            type: 'array',
            items: {
              type: 'object',
              additionalProperties: false,
              required: ['leaseId', 'drvPath', 'attempt', 'expiresAt'],
              properties: {
                leaseId: { type: 'string' },
                drvPath: { type: 'string' },
                attempt: { type: 'integer', minimum: 1 },
                expiresAt: { type: 'integer' },
              },
            },
          },
        },
      },
      EndOfLog: {
        type: 'object',
        required: ['attempt', 'attemptState', 'state', 'bytes', 'truncated'],
        properties: {
          attempt: { type: 'integer' },
          attemptState: { anyOf: [{ $ref: '#/components/schemas/AttemptState' }, { type: 'null' }] },
          state: { anyOf: [{ $ref: '#/components/schemas/BuildState' }, { type: 'null' }] },
          error: nullable('string'),
          bytes: { type: 'integer', minimum: 0 },
          truncated: { type: 'boolean' },
        },
      },
      BuildResult: {
        type: 'object',
        required: ['attr', 'drvPath', 'state', 'attempts', 'agent', 'error', 'rootCause', 'outputs'],
        properties: {
          attr: { type: 'string' },
          drvPath: { type: 'string' },
          state: { $ref: '#/components/schemas/BuildState' },
          attempts: { type: 'integer' },
          agent: nullable('string'),
          error: nullable('string'),
          rootCause: nullable('string'),
          outputs: {
            type: 'array',
            items: {
              type: 'object',
              required: ['name', 'path', 'narSize', 'closureSize'],
              properties: {
                name: { type: 'string' },
                path: { type: 'string' },
                narSize: nullable('integer'),
                closureSize: nullable('integer'),
              },
            },
          },
        },
      },
      Run: object(runProperties),
      PullRequest: object({
        number: { type: 'integer' },
        title: { type: 'string' },
        author: { type: 'string' },
        state: { type: 'string', enum: ['open', 'closed'] },
        draft: { type: 'boolean' },
        headSha: { type: 'string' },
        baseSha: { type: 'string' },
        baseRef: { type: 'string' },
        updatedAt: { type: 'integer' },
        rebuilds: { type: 'integer', minimum: 0 },
        newlyFailing: nullable('integer'),
        run: { anyOf: [{ type: 'null' }, { $ref: '#/components/schemas/Run' }] },
        review: { ...nullable('string'), description: 'The review, once the run recorded it.' },
      }),
      Event: {
        description: 'A state change (`GET /events`).',
        oneOf: [
          object({
            type: { const: 'build' },
            drvPath: { type: 'string' },
            state: { $ref: '#/components/schemas/BuildState' },
            attempt: { type: 'integer' },
            agentId: nullable('string'),
          }),
          object({
            type: { const: 'run' },
            id: { type: 'integer' },
            repo: { type: 'string' },
            kind: { type: 'string' },
            prNumber: nullable('integer'),
            headSha: { type: 'string' },
            state: { type: 'string' },
          }),
          object({
            type: { const: 'agent' },
            id: { type: 'string' },
            connected: { type: 'boolean' },
            drained: { type: 'boolean' },
          }),
          object({
            type: { const: 'check' },
            repo: { type: 'string' },
            commit: { type: 'string' },
            name: { type: 'string' },
            system: { type: 'string' },
            state: { type: 'string' },
          }),
        ],
      },
      OutputSizes: (() => {
        const sizes = {
          anyOf: [object({ narSize: { type: 'integer' }, closureSize: { type: 'integer' } }), { type: 'null' }],
        };
        return object(
          {
            output: { type: 'string' },
            base: sizes,
            head: sizes,
            narSizeDelta: nullable('integer'),
            closureSizeDelta: nullable('integer'),
            closureSizePercent: nullable('number'),
            warning: { type: 'boolean', description: "The job's size_check.max_increase_percent was exceeded." },
            baseline: {
              ...object({
                kind: { type: 'string', enum: ['branch', 'pull-request-base'] },
                branch: { type: 'string' },
                commit: { type: 'string' },
              }),
              description:
                "With the job's size_check.base_branch: what `base` is — `branch`: that branch's newest recorded " +
                'build of the attribute, from `commit`; `pull-request-base`: the branch has none, so the pull ' +
                "request's base commit.",
            },
          },
          ['output', 'base', 'head', 'narSizeDelta', 'closureSizeDelta', 'closureSizePercent', 'warning'],
        );
      })(),
      Review: {
        type: 'object',
        description: 'A review of a pair of commits: what changed, what fails newly, sizes (see the README).',
        required: ['base', 'head', 'attrs', 'summary'],
        properties: {
          base: { type: 'object', required: ['rev'], properties: { rev: { type: 'string' } } },
          head: { type: 'object', required: ['rev'], properties: { rev: { type: 'string' } } },
          configChanged: { const: true },
          attrs: {
            type: 'array',
            items: {
              type: 'object',
              required: ['attr'],
              properties: { sizes: { type: 'array', items: { $ref: '#/components/schemas/OutputSizes' } } },
            },
          },
          summary: { type: 'object', additionalProperties: { type: 'integer' } },
          changes: { $ref: '#/components/schemas/ChangeSummary' },
          heldBack: {
            type: 'object',
            description:
              "What the base's build rules held back (a mass rebuild over max_rebuild_count, a change touching only " +
              'skip_build_paths): the change was evaluated, only attributes named by commands and commit titles built.',
            required: ['title', 'lines', 'limits'],
            additionalProperties: false,
            properties: {
              title: { type: 'string' },
              lines: { type: 'array', items: { type: 'string' }, description: 'The report as markdown lines.' },
              limits: {
                type: 'array',
                items: {
                  type: 'object',
                  required: ['limit', 'built'],
                  additionalProperties: false,
                  properties: {
                    limit: {
                      type: 'object',
                      required: ['kind', 'job'],
                      properties: {
                        kind: { enum: ['max-rebuild-count', 'skip-build-paths'] },
                        job: { type: 'string' },
                        system: { type: 'string' },
                        rebuilds: { type: 'integer' },
                        limit: { type: 'integer' },
                        from: { enum: ['job', 'server'] },
                        files: { type: 'integer' },
                        globs: {
                          type: 'array',
                          items: {
                            type: 'object',
                            required: ['glob', 'files'],
                            properties: { glob: { type: 'string' }, files: { type: 'integer' } },
                          },
                        },
                      },
                    },
                    built: {
                      type: 'array',
                      description: 'Attributes built despite the limit (named by a command or commit title).',
                      items: {
                        type: 'object',
                        required: ['attr', 'system'],
                        properties: { attr: { type: 'string' }, system: { type: 'string' } },
                      },
                    },
                  },
                },
              },
              checks: {
                type: 'array',
                description: 'Repository checks not run: their shells would build what the limits hold back.',
                items: {
                  type: 'object',
                  required: ['name', 'system'],
                  additionalProperties: false,
                  properties: { name: { type: 'string' }, system: { type: 'string' } },
                },
              },
            },
          },
        },
      },
      ChangeSummary: (() => {
        const at = {
          job: { type: 'string' },
          attr: { type: 'string' },
          system: { ...nullable('string'), description: "The head's system (the base's for a removed package)." },
        };
        const strings = { type: 'array', items: { type: 'string' } };
        const version = {
          ...object({ pname: nullable('string'), version: nullable('string') }),
          description:
            '`pname` and `version` as evaluated, or parsed from the derivation name (as `builtins.parseDrvName`) ' +
            'where it has neither; null where unknown or where the field failed to evaluate.',
        };
        const list = (description: string, properties: Record<string, object>) => ({
          type: 'array',
          description,
          items: object({ ...at, ...properties }),
        });
        return {
          ...object({
            versions: list('Version changes (same or unknown pname), and renames (both pnames known, different).', {
              base: version,
              head: version,
            }),
            added: list('Attributes with a derivation on head only.', {
              pname: nullable('string'),
              version: nullable('string'),
            }),
            removed: list('Attributes with a derivation on base only.', {
              pname: nullable('string'),
              version: nullable('string'),
            }),
            licenses: list('`meta.license` compared as sets; [] is no license.', { base: strings, head: strings }),
            maintainers: list('`meta.maintainers` that came and went.', { added: strings, removed: strings }),
            platforms: list('`meta.platforms` that came and went.', { added: strings, removed: strings }),
            broken: list('`meta.broken` (absent is false) turned on or off.', {
              base: { type: 'boolean' },
              head: { type: 'boolean' },
            }),
            metaErrors: list(
              'A field that failed to evaluate on one side only (`side`), and so was not compared. `meta` is the ' +
                'whole set, where the evaluator could not tell which field failed.',
              {
                field: {
                  type: 'string',
                  enum: ['pname', 'version', 'license', 'maintainers', 'platforms', 'broken', 'meta'],
                },
                side: { type: 'string', enum: ['base', 'head'] },
                error: { type: 'string' },
              },
            ),
          }),
          description:
            "What the change does to the packages, from every attribute of both commits' evaluations (a meta-only " +
            'change leaves the derivation alike). Every list is sorted by job, then attribute. Absent when nothing ' +
            'changed.',
        };
      })(),
    },
  },
  security: [{ token: [] }, {}],
  paths: {
    '/agents': {
      get: {
        summary: 'Every agent that has connected: capabilities, whether it is connected now, free slots, leases.',
        responses: {
          '200': {
            description: 'The agents, by id.',
            content: {
              'application/json': {
                schema: {
                  type: 'object',
                  required: ['agents'],
                  properties: { agents: { type: 'array', items: { $ref: '#/components/schemas/Agent' } } },
                },
              },
            },
          },
          ...denied,
        },
      },
    },
    '/queues': {
      get: {
        summary: 'What waits to be built, per lane, who serves each lane, and why nobody does.',
        responses: {
          '200': {
            description: 'The queues.',
            content: {
              'application/json': {
                schema: {
                  type: 'object',
                  additionalProperties: false,
                  required: ['pending', 'lanes'],
                  properties: {
                    pending: {
                      type: 'integer',
                      minimum: 0,
                      description: 'Derivations not finished: queued, buildable or building.',
                    },
                    lanes: {
                      type: 'array',
                      items: {
                        type: 'object',
                        additionalProperties: false,
                        required: ['kind', 'system', 'features', 'untrusted', 'buildable', 'waitingSince', 'agents'],
                        properties: {
                          kind: { type: 'string', enum: ['build', 'fixed-output'] },
                          system: { type: 'string' },
                          features: { type: 'array', items: { type: 'string' } },
                          untrusted: {
                            type: 'boolean',
                            description: 'Code of someone without write access: sandboxed agents only.',
                          },
                          buildable: { type: 'integer', minimum: 1 },
                          waitingSince: { type: 'integer', description: 'ms since the epoch, of the oldest.' },
                          agents: { type: 'array', items: { type: 'string' } },
                          why: {
                            type: 'string',
                            description: 'Why the lane waits, when no connected agent serves it.',
                          },
                        },
                      },
                    },
                  },
                },
              },
            },
          },
          ...denied,
        },
      },
    },
    '/openapi.json': {
      get: {
        summary: 'This document.',
        security: [{}],
        responses: {
          '200': { description: 'OpenAPI 3.1', content: { 'application/json': { schema: { type: 'object' } } } },
        },
      },
    },
    '/derivations/{hash}': {
      get: {
        summary: 'A derivation: its state, outputs and attempts.',
        parameters: [hashParameter],
        responses: {
          '200': {
            description: 'The derivation.',
            content: {
              'application/json': {
                schema: object({
                  derivation: { $ref: '#/components/schemas/Derivation' },
                  outputs: { type: 'array', items: { $ref: '#/components/schemas/Output' } },
                  attempts: { type: 'array', items: { $ref: '#/components/schemas/Attempt' } },
                  history: {
                    type: 'array',
                    description: 'Every state it went through, oldest first (the first 500).',
                    items: object({
                      attempt: { type: 'integer' },
                      state: { $ref: '#/components/schemas/BuildState' },
                      agent_id: nullable('string'),
                      detail: nullable('string'),
                      at: { type: 'integer' },
                    }),
                  },
                  dependencies: { ...neighbours, description: 'Its input derivations (the first 500).' },
                  dependents: { ...neighbours, description: 'Derivations that take it as an input (the first 500).' },
                }),
              },
            },
          },
          ...denied,
          '404': errorResponse('No such derivation.'),
        },
      },
    },
    '/derivations/{hash}/cancel': {
      post: {
        summary: 'Cancels a derivation that is queued or building; what only it blocked ends dependency-failed.',
        parameters: [hashParameter],
        responses: {
          '202': json('Cancelled (a running build stops within its grace period).', {
            type: 'object',
            required: ['drvPath', 'state'],
            properties: { drvPath: { type: 'string' }, state: { $ref: '#/components/schemas/BuildState' } },
          }),
          ...denied,
          '404': errorResponse('No such derivation.'),
          '409': errorResponse('It is not queued or building.'),
        },
      },
    },
    '/derivations/{hash}/rebuild': {
      post: {
        summary: 'Builds a derivation again, a failed one included; a request like `POST /builds` makes.',
        parameters: [hashParameter],
        responses: {
          '202': json(
            'Accepted; `GET /requests/{id}` follows it.',
            object({ id: { type: 'integer' }, url: { type: 'string' } }),
          ),
          ...denied,
          '404': errorResponse('No such derivation.'),
          '422': errorResponse('Its .drv closure is no longer readable.'),
        },
      },
    },
    '/agents/{id}/drain': {
      post: {
        summary:
          'Drains an agent: no new work (what it runs finishes) until resumed; kept across restarts. Admins only.',
        parameters: [pathString('id', 'The agent id (its token name).')],
        requestBody: {
          required: false,
          content: { 'application/json': { schema: object({ reason: { type: 'string', maxLength: 500 } }, []) } },
        },
        responses: {
          '200': json('Drained.', object({ id: { type: 'string' }, drained: { const: true } })),
          '400': errorResponse('The body is not what this route takes.'),
          ...denied,
          '404': errorResponse('No agent of that id ever connected.'),
          '415': errorResponse('The body is not JSON.'),
        },
      },
    },
    '/agents/{id}/resume': {
      post: {
        summary: "Ends an operator's drain of an agent. Admins only.",
        parameters: [pathString('id', 'The agent id (its token name).')],
        responses: {
          '200': json('Resumed.', object({ id: { type: 'string' }, drained: { const: false } })),
          ...denied,
          '404': errorResponse('No agent of that id ever connected.'),
        },
      },
    },
    '/me': {
      get: {
        summary:
          'Who the caller is: what a page may offer them, and the CSRF token a login session sends with changes.',
        security: [{}],
        responses: {
          '200': json(
            'The caller.',
            object({
              kind: { type: 'string', enum: ['anonymous', 'agent', 'api', 'user'] },
              name: nullable('string'),
              admin: { type: 'boolean' },
              csrfToken: {
                ...nullable('string'),
                description: 'For a login session: send it as `X-CSRF-Token` with every POST.',
              },
              login: { ...nullable('string'), description: 'Where to log in with GitHub, when configured.' },
            }),
          ),
          ...denied,
        },
      },
    },
    '/events': {
      get: {
        summary: 'State changes of builds, runs and agents, live, as Server-Sent Events.',
        description:
          'Events `build`, `run` and `agent` (data: an `Event` as JSON; id: what to send back as `Last-Event-ID` ' +
          'to resume). `reset` says events were missed (a restart, a long absence): reload. Each caller sees only ' +
          'what it may read; agent events need a credential.',
        parameters: [{ name: 'Last-Event-ID', in: 'header', required: false, schema: { type: 'string' } }],
        responses: {
          '200': { description: 'The event stream.', content: { 'text/event-stream': { schema: { type: 'string' } } } },
          ...denied,
        },
      },
    },
    '/audit': {
      get: {
        summary: 'The latest privileged actions, newest first. Admins only.',
        parameters: [
          { name: 'limit', in: 'query', required: false, schema: { type: 'integer', minimum: 1, maximum: 1000 } },
        ],
        responses: {
          '200': json(
            'The audit log.',
            object({
              entries: {
                type: 'array',
                items: object({
                  at: { type: 'integer' },
                  actor: { type: 'string' },
                  action: { type: 'string' },
                  detail: nullable('string'),
                }),
              },
            }),
          ),
          ...denied,
        },
      },
    },
    '/repos': {
      get: {
        summary: 'Repositories: those the GitHub Apps serve, and any with evaluations (`ekaci review`).',
        responses: {
          '200': json(
            'The repositories the caller may read, by name.',
            object({
              repositories: {
                type: 'array',
                items: object({
                  name: { type: 'string' },
                  github: { type: 'boolean' },
                  private: { type: 'boolean' },
                  defaultBranch: nullable('string'),
                  openPullRequests: { type: 'integer', minimum: 0 },
                  lastEvaluatedAt: nullable('integer'),
                }),
              },
            }),
          ),
          ...denied,
        },
      },
    },
    '/repos/{owner}/{repo}/pulls': {
      get: {
        summary: "A repository's pull requests with their latest run's rebuild and newly-failing counts.",
        parameters: [
          ...repoParameters,
          { name: 'state', in: 'query', required: false, schema: { type: 'string', enum: ['open', 'closed', 'all'] } },
          {
            name: 'sort',
            in: 'query',
            required: false,
            description: 'Most recently updated, most rebuilds or most newly failing first.',
            schema: { type: 'string', enum: ['updated', 'rebuilds', 'failing'] },
          },
        ],
        responses: {
          '200': json(
            'The pull requests.',
            object({
              pullRequests: { type: 'array', items: { $ref: '#/components/schemas/PullRequest' } },
            }),
          ),
          '400': errorResponse('A query parameter is wrong.'),
          ...denied,
          '404': errorResponse('No GitHub App serves the repository.'),
        },
      },
    },
    '/repos/{owner}/{repo}/commits/{sha}': {
      get: {
        summary:
          "A commit (or a unique prefix of ≥ 7 digits): each job's evaluation, its runs and builds, its reviews.",
        parameters: [...repoParameters, pathString('sha')],
        responses: {
          '200': json(
            'The commit.',
            object({
              repo: { type: 'string' },
              commit: { type: 'string' },
              evaluations: {
                type: 'array',
                items: object({
                  job: { type: 'string' },
                  attrs: { type: 'integer', minimum: 0 },
                  errors: { type: 'integer', minimum: 0 },
                  allowEvalFailures: { type: 'boolean' },
                  seconds: { type: 'number' },
                  evaluatedAt: { type: 'integer' },
                }),
              },
              runs: {
                type: 'array',
                items: object({
                  ...runProperties,
                  builds: { ...counts, description: "The head's root builds by state." },
                }),
              },
              reviews: {
                type: 'array',
                items: object({ base: { type: 'string' }, url: { type: 'string' } }),
              },
              checks: {
                type: 'array',
                description: "The repository's checks on this commit, one per check and system.",
                items: object({
                  name: { type: 'string' },
                  system: { type: 'string' },
                  state: {
                    type: 'string',
                    enum: [
                      'waiting',
                      'queued',
                      'running',
                      'succeeded',
                      'failed',
                      'timed-out',
                      'cancelled',
                      'unbuildable',
                    ],
                  },
                  exitCode: nullable('integer'),
                  seconds: nullable('number'),
                  logTail: { type: 'string' },
                  error: nullable('string'),
                  logUrl: { type: 'string' },
                }),
              },
            }),
          ),
          ...denied,
          '404': errorResponse('No evaluation or run of such a commit.'),
        },
      },
    },
    '/repos/{owner}/{repo}/commits/{sha}/checks/{name}/log': {
      get: {
        summary:
          "A repository check's output (its latest attempt); the `end` event of a followed log carries the check's " +
          'state, exit code and error.',
        parameters: [
          ...repoParameters,
          pathString('sha'),
          pathString('name'),
          { name: 'system', in: 'query', required: false, schema: { type: 'string' } },
          ...logParameters.slice(1),
        ],
        responses: {
          ...logResponses,
          '404': errorResponse('No such check on the commit, it has not started, or it runs on several systems.'),
        },
      },
    },
    '/repos/{owner}/{repo}/pulls/{number}': {
      get: {
        summary: 'One pull request, as the list shows it.',
        parameters: [
          ...repoParameters,
          { name: 'number', in: 'path', required: true, schema: { type: 'string', pattern: '^[0-9]+$' } },
        ],
        responses: {
          '200': json('The pull request.', { $ref: '#/components/schemas/PullRequest' }),
          ...denied,
          '404': errorResponse('No such pull request was seen.'),
        },
      },
    },
    '/repos/{owner}/{repo}/pulls/{number}/commands': {
      post: {
        summary:
          'A comment command (`approve SHA`, `merge [merge|squash|rebase]`, `merge cancel`, `rebuild`, `build ATTR…`) ' +
          'given on the web UI by a logged-in GitHub user, decided by the same rules as a comment.',
        parameters: [
          ...repoParameters,
          { name: 'number', in: 'path', required: true, schema: { type: 'string', pattern: '^[0-9]+$' } },
        ],
        requestBody: {
          required: true,
          content: { 'application/json': { schema: object({ command: { type: 'string', minLength: 1 } }) } },
        },
        responses: {
          '202': json('Accepted.', object({ accepted: { const: true }, message: { type: 'string' } })),
          '400': errorResponse('The body is not what this route takes.'),
          ...denied,
          '404': errorResponse('No App serves the repository.'),
          '415': errorResponse('The body is not JSON.'),
        },
      },
    },
    '/repos/{owner}/{repo}/commits/{sha}/rebuild-failed': {
      post: {
        summary: "A commit's newest run again, its failed builds included (API tokens; writers of the repository).",
        parameters: [...repoParameters, pathString('sha', 'The full commit sha.')],
        responses: {
          '202': json('The run starts again.', object({ repo: { type: 'string' }, commit: { type: 'string' } })),
          '400': errorResponse('Not a full commit sha.'),
          ...denied,
          '409': errorResponse("No run of the commit, or no longer an open pull request's head."),
        },
      },
    },
    '/runs/{id}/timeline': {
      get: {
        summary:
          "A run's builds per agent over time (every attempt in its closure since it began) and its critical path.",
        parameters: [{ name: 'id', in: 'path', required: true, schema: { type: 'string', pattern: '^[0-9]+$' } }],
        responses: {
          '200': json(
            'The timeline.',
            object({
              run: { $ref: '#/components/schemas/Run' },
              closure: { type: 'integer', minimum: 0, description: 'Derivations of the closure looked at.' },
              truncated: { type: 'boolean', description: 'The closure was larger than the walk allows.' },
              builds: {
                type: 'array',
                items: object({
                  drvPath: { type: 'string' },
                  attr: nullable('string'),
                  attempt: { type: 'integer' },
                  agentId: { type: 'string' },
                  state: { $ref: '#/components/schemas/AttemptState' },
                  assignedAt: { type: 'integer' },
                  startedAt: nullable('integer'),
                  finishedAt: nullable('integer'),
                  critical: { type: 'boolean' },
                }),
              },
              criticalPath: {
                type: 'array',
                description: 'From the first build to the one that finished last, each waiting for the one before.',
                items: { type: 'string' },
              },
            }),
          ),
          ...denied,
          '404': errorResponse('No such run.'),
        },
      },
    },
    '/repos/{owner}/{repo}/attributes/{attr}/sizes': {
      get: {
        summary: "An attribute's output sizes in each evaluated commit, oldest first.",
        parameters: [
          ...repoParameters,
          pathString('attr', 'The attribute path, as the job names it.'),
          { name: 'job', in: 'query', required: false, schema: { type: 'string' } },
        ],
        responses: {
          '200': json(
            'The sizes.',
            object({
              repo: { type: 'string' },
              attr: { type: 'string' },
              points: {
                type: 'array',
                items: object({
                  commit: { type: 'string' },
                  job: { type: 'string' },
                  evaluatedAt: { type: 'integer' },
                  drvPath: nullable('string'),
                  system: nullable('string'),
                  error: nullable('string'),
                  state: { anyOf: [{ $ref: '#/components/schemas/BuildState' }, { type: 'null' }] },
                  outputs: {
                    type: 'array',
                    items: object({
                      name: { type: 'string' },
                      narSize: nullable('integer'),
                      closureSize: nullable('integer'),
                    }),
                  },
                }),
              },
            }),
          ),
          ...denied,
          '404': errorResponse('No evaluation of the repository has the attribute.'),
        },
      },
    },
    '/sizes': {
      get: {
        summary:
          "An attribute's output sizes as built on its repository's branches (a point where its derivation changed), " +
          'oldest first: the newest `limit` points that match.',
        parameters: [
          { name: 'repo', in: 'query', required: true, description: 'OWNER/NAME', schema: { type: 'string' } },
          {
            name: 'attr',
            in: 'query',
            required: true,
            description: 'Relative to its job.',
            schema: { type: 'string' },
          },
          { name: 'branch', in: 'query', required: false, schema: { type: 'string' } },
          { name: 'job', in: 'query', required: false, schema: { type: 'string' } },
          { name: 'output', in: 'query', required: false, schema: { type: 'string' } },
          {
            name: 'limit',
            in: 'query',
            required: false,
            schema: { type: 'integer', minimum: 1, maximum: 10000, default: 1000 },
          },
        ],
        responses: {
          '200': json(
            'The points.',
            object({
              repo: { type: 'string' },
              attr: { type: 'string' },
              points: {
                type: 'array',
                items: object({
                  branch: { type: 'string' },
                  commit: { type: 'string' },
                  job: { type: 'string' },
                  output: { type: 'string' },
                  system: { type: 'string' },
                  drvPath: { type: 'string' },
                  narSize: { type: 'integer', minimum: 0 },
                  closureSize: { type: 'integer', minimum: 0 },
                  recordedAt: { type: 'integer', description: 'When it was recorded (ms since the epoch).' },
                }),
              },
            }),
          ),
          '400': errorResponse('repo or attr is missing, or limit is not a whole number from 1 to 10000.'),
          ...denied,
          '404': errorResponse('No recorded sizes match.'),
        },
      },
    },
    '/derivations/{hash}/log': {
      get: {
        summary: "The log of the derivation's latest attempt.",
        parameters: logParameters,
        responses: logResponses,
      },
    },
    '/derivations/{hash}/attempts/{attempt}/log': {
      get: {
        summary: 'The log of one attempt; every attempt keeps its own.',
        parameters: [
          ...logParameters,
          { name: 'attempt', in: 'path', required: true, schema: { type: 'string', pattern: '^[0-9]+$' } },
        ],
        responses: logResponses,
      },
    },
    '/derivations/{hash}/hooks': {
      get: {
        summary: "The post-build hook runs of a derivation's results, oldest first (with a credential only).",
        parameters: [hashParameter],
        responses: {
          '200': json(
            'Its hook runs.',
            object({ runs: { type: 'array', items: { $ref: '#/components/schemas/HookRun' } } }),
          ),
          ...denied,
          '404': errorResponse('No such derivation.'),
        },
      },
    },
    '/hook-runs/{id}/log': {
      get: {
        summary:
          "A hook run's output (stdout and stderr, credential values replaced); the `end` event of a followed log " +
          "carries the run's state, exit code and reason. With a credential only.",
        parameters: [
          { name: 'id', in: 'path', required: true, schema: { type: 'string', pattern: '^[0-9]+$' } },
          ...logParameters.slice(1),
        ],
        responses: {
          ...logResponses,
          '404': errorResponse('No such hook run, or it has not started (queued or skipped).'),
        },
      },
    },
    '/builds': {
      post: {
        summary: "Builds derivations whose .drv files are in the coordinator's store.",
        requestBody: {
          required: true,
          content: {
            'application/json': {
              schema: {
                type: 'object',
                description:
                  'Either `drvs` or `roots` (the same, each with the name results show). A .drv that is not in the ' +
                  "coordinator's store is taken from its binary cache, where an upload with an API token puts it " +
                  '(`ekaci build --coordinator`, or `nix copy --derivation --to`).',
                oneOf: [{ required: ['drvs'] }, { required: ['roots'] }],
                additionalProperties: false,
                properties: {
                  drvs: { type: 'array', minItems: 1, items: { type: 'string', pattern: '^/nix/store/.+\\.drv$' } },
                  roots: {
                    type: 'array',
                    minItems: 1,
                    items: object({
                      attr: { type: 'string', minLength: 1 },
                      drvPath: { type: 'string', pattern: '^/nix/store/.+\\.drv$' },
                    }),
                  },
                  private: { type: 'boolean', default: false },
                },
              },
            },
          },
        },
        responses: {
          '202': {
            description: 'Accepted; `GET /requests/{id}` follows it.',
            content: {
              'application/json': {
                schema: {
                  type: 'object',
                  required: ['id', 'url'],
                  properties: { id: { type: 'integer' }, url: { type: 'string' } },
                },
              },
            },
          },
          '400': errorResponse('The body is not what this route takes.'),
          ...denied,
          '413': errorResponse('The body is too large.'),
          '415': errorResponse('The body is not JSON.'),
          '422': errorResponse("A .drv is neither in the coordinator's store nor in its cache, or cannot be read."),
        },
      },
    },
    '/requests/{id}': {
      get: {
        summary: 'A build request: whether it has settled, and each root’s result.',
        parameters: [{ name: 'id', in: 'path', required: true, schema: { type: 'string', pattern: '^[0-9]+$' } }],
        responses: {
          '200': {
            description: 'The request.',
            content: {
              'application/json': {
                schema: {
                  type: 'object',
                  required: ['settled', 'builds'],
                  properties: {
                    settled: { type: 'boolean' },
                    builds: { type: 'array', items: { $ref: '#/components/schemas/BuildResult' } },
                  },
                },
              },
            },
          },
          ...denied,
        },
      },
    },
    '/reviews': {
      get: {
        summary: 'The recorded review of two commits of a repository (commits by a unique prefix of ≥ 7 digits).',
        parameters: [
          { name: 'repo', in: 'query', required: true, schema: { type: 'string' } },
          { name: 'base', in: 'query', required: true, schema: { type: 'string' } },
          { name: 'head', in: 'query', required: true, schema: { type: 'string' } },
          { name: 'format', in: 'query', required: false, schema: { type: 'string', enum: ['json', 'markdown'] } },
          { name: 'job', in: 'query', required: false, schema: { type: 'array', items: { type: 'string' } } },
        ],
        responses: {
          '200': {
            description: 'The review, as JSON or as the markdown of the summary check.',
            content: {
              'application/json': { schema: { $ref: '#/components/schemas/Review' } },
              'text/markdown': { schema: { type: 'string' } },
            },
          },
          '400': errorResponse('A query parameter is missing or wrong.'),
          ...denied,
          '404': errorResponse('No evaluation of a commit, or no review of the pair, was recorded.'),
        },
      },
    },
  },
} as const;
