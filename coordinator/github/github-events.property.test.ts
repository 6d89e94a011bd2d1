import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import fc from 'fast-check';
import type { z } from 'zod';
import { afterAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { resolvesOrFailsWith } from '../../test/support/fuzz.js';
import { AuditLog } from '../audit-log.js';
import { openDatabase } from '../db/database.js';
import type { AppRegistry, Served } from './app-registry.js';
import type { CommandRunner } from './command-runner.js';
import { MalformedPayloadError } from './errors.js';
import { GitHubEvents } from './github-events.js';
import * as payloads from './payloads.js';
import type { RunPipeline } from './run-pipeline.js';
import { RunStore } from './run-store.js';

const RUNS = 200;
const HANDLED = [
  'pull_request',
  'push',
  'merge_group',
  'check_run',
  'check_suite',
  'issue_comment',
  'pull_request_review',
  'installation',
  'installation_repositories',
];

interface Example {
  name: string;
  examples: Array<Record<string, unknown>>;
}
const require = createRequire(import.meta.url);
const documented = (
  JSON.parse(readFileSync(require.resolve('@octokit/webhooks-examples/api.github.com/index.json'), 'utf8')) as Example[]
).filter((e) => HANDLED.includes(e.name));
const examples = documented.flatMap((e) =>
  e.examples.map((payload) => ({ event: e.name, payload: withInstallation(payload) })),
);

/** Repository webhooks carry no installation and are ignored before parsing; every app delivery has one. */
function withInstallation(payload: Record<string, unknown>): Record<string, unknown> {
  return 'installation' in payload ? payload : { ...payload, installation: { id: 42, node_id: 'x' } };
}

/**
 * The handler over a real run store; only what talks to GitHub or starts work is a stand-in, and it serves every
 * installation and repository so that payloads reach the deepest code they can.
 */
const db = openDatabase(':memory:');
afterAll(() => db.close());
const served = { installationId: 42 } as Served;
let started = 0;
const events = new GitHubEvents({
  runs: new RunStore(db),
  apps: {
    served: () => Promise.resolve(served),
    allowed: () => true,
    remember: () => Promise.resolve(),
    forget: () => {},
  } as unknown as AppRegistry,
  pipeline: { start: () => void started++, cancel: () => {} } as unknown as RunPipeline,
  reporter: { set: () => {} },
  commands: {
    headMoved: () => Promise.resolve(),
    run: () => Promise.resolve(),
    evaluateMerge: () => Promise.resolve(),
  } as unknown as CommandRunner,
  audit: new AuditLog(db),
  settings: { buildDraftPullRequests: false, requireApproval: true, approvedUsers: ['trusted'] },
  writeAccess: (_served, _repo, login) => Promise.resolve(login.length % 2 === 0),
  logger: silentLogger(),
});

let deliveries = 0;
function handle(event: string, payload: unknown): Promise<void | Error> {
  const d = { event, payload, deliveryId: `fuzz-${deliveries++}` };
  return resolvesOrFailsWith(MalformedPayloadError, () => events.handle(d));
}

/** A value no one meant: wrong types, numbers at every edge, deep nesting. */
const hostile: fc.Arbitrary<unknown> = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom(null, -1, 0, 1.5, 2 ** 53, 1e308, '', '0'.repeat(40), 'a/b', '../..', '__proto__', [], {}),
  fc.nat(5_000).map((depth) => {
    let v: unknown = 1;
    for (let i = 0; i < depth; i++) v = [v];
    return v;
  }),
);

const SCHEMAS: Record<string, z.ZodType> = {
  pull_request: payloads.pullRequestEvent,
  push: payloads.pushEvent,
  merge_group: payloads.mergeGroupEvent,
  check_run: payloads.checkRunEvent,
  check_suite: payloads.checkSuiteEvent,
  issue_comment: payloads.issueCommentEvent,
  pull_request_review: payloads.pullRequestReviewEvent,
  installation: payloads.installationEvent,
  installation_repositories: payloads.installationRepositoriesEvent,
};

interface SchemaDef {
  type: string;
  shape?: Record<string, z.ZodType>;
  innerType?: z.ZodType;
  element?: z.ZodType;
}

/** The fields eka-ci reads, from its payload schemas: a mutation there reaches the handler, one elsewhere passes by. */
function readPaths(schema: z.ZodType, at: string[] = []): string[][] {
  const def = (schema as unknown as { _zod: { def: SchemaDef } })._zod.def;
  if (def.shape) return [at, ...Object.entries(def.shape).flatMap(([k, v]) => readPaths(v, [...at, k]))];
  if (def.element) return [at, ...readPaths(def.element, [...at, '0'])];
  if (def.innerType) return readPaths(def.innerType, at);
  return [at];
}

/** Every key and index in `value`, to the depth where GitHub's payloads keep what eka-ci reads. */
function places(value: unknown, at: string[] = [], depth = 4): string[][] {
  if (typeof value !== 'object' || value === null || depth === 0) return [at];
  return [
    at,
    ...Object.keys(value).flatMap((k) => places((value as Record<string, unknown>)[k], [...at, k], depth - 1)),
  ];
}

function changed(value: unknown, at: readonly string[], by: unknown): unknown {
  const [head, ...rest] = at;
  if (head === undefined) return by;
  const copy = (Array.isArray(value) ? [...(value as unknown[])] : { ...(value as object) }) as Record<string, unknown>;
  if (rest.length === 0 && by === REMOVE) delete copy[head];
  else copy[head] = changed(copy[head], rest, by);
  return copy;
}
const REMOVE = Symbol('remove');

describe('GitHub webhook payloads', () => {
  it('handles every payload GitHub documents for the events eka-ci acts on', async () => {
    expect(examples.length).toBeGreaterThan(50);
    for (const { event, payload } of examples) {
      const result = await handle(event, payload);
      expect(result, `${event} ${String(payload.action)}`).toBeUndefined();
    }
    // Pull requests, pushes to the default branch and merge groups got as far as starting their runs.
    expect(started).toBeGreaterThan(0);
  });

  it('handles a payload with any field eka-ci reads missing, null or of another type, or fails it naming the event', async () => {
    // Exhaustive rather than sampled: one example per event and action, every field read, every kind of wrong.
    const seen = new Set<string>();
    const distinct = examples.filter(
      ({ event, payload }) =>
        !seen.has(`${event}/${String(payload.action)}`) && seen.add(`${event}/${String(payload.action)}`),
    );
    for (const { event, payload } of distinct) {
      for (const at of readPaths(SCHEMAS[event]!).filter((p) => p.length > 0)) {
        for (const by of [REMOVE, null, {}, [], '', -1, 2 ** 53]) {
          const result = await handle(event, changed(payload, at, by));
          if (result instanceof Error) expect(result.message.startsWith(`${event} payload: `)).toBe(true);
        }
      }
    }
  });

  it('handles a payload with any field changed or missing, or fails it with MalformedPayloadError naming the event', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...examples),
        fc.nat(),
        fc.boolean(),
        fc.oneof(hostile, fc.constant(REMOVE)),
        async ({ event, payload }, pick, anywhere, by) => {
          const all = anywhere ? places(payload) : readPaths(SCHEMAS[event]!);
          const result = await handle(event, changed(payload, all[pick % all.length]!, by));
          if (result instanceof Error) expect(result.message.startsWith(`${event} payload: `)).toBe(true);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('handles or refuses any JSON delivered under any event name', async () => {
    const event = fc.oneof(fc.constantFrom(...HANDLED), fc.stringMatching(/^[a-z][a-z0-9_]{0,20}$/));
    await fc.assert(
      fc.asyncProperty(event, hostile, fc.boolean(), async (e, payload, installed) => {
        const body =
          installed && typeof payload === 'object' && payload !== null
            ? { ...payload, installation: { id: 1 } }
            : payload;
        await handle(e, body);
      }),
      { numRuns: RUNS },
    );
  });
});
