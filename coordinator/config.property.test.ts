import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { stringify } from 'smol-toml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError } from '../common/errors.js';
import { mutateText, mutations, nest, parsesOrFailsWith, places, replaced } from '../test/support/fuzz.js';
import { type CoordinatorOptions, compileCoordinatorConfig, loadCoordinatorConfig } from './config.js';

const RUNS = 100;
// The longest delay a Node timer keeps; a longer one fires after 1 ms.
const MAX_TIMER_MS = 2 ** 31 - 1;
// Build limits reach agents as uint32 seconds in the lease.
const MAX_UINT32 = 2 ** 32 - 1;
const ENV = {
  APP_ID: '1001',
  APP_KEY: generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey.export({
    type: 'pkcs1',
    format: 'pem',
  }) as string,
};
const TOML_TOKENS = ['[', ']', '[[', ']]', '=', '"', "'", '{', '}', ',', '.', '\n', '#', '"""', 'inf', 'nan', '1e999'];

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-config-fuzz-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const name = fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$/);
const secret = fc.string({ minLength: 16, maxLength: 40 }).filter((s) => s.trim().length === s.length);
const seconds = fc.oneof(fc.nat(100_000), fc.double({ min: 0.25, max: 100_000, noNaN: true }));
const port = fc.nat(65_535);
const tokens = fc.uniqueArray(fc.record({ name, token: secret }), {
  selector: (t) => t.name.toUpperCase(),
  maxLength: 2,
});
const opt = { requiredKeys: [] as never[] };

const app = fc.record({
  id: name,
  credentials: fc.constant({ env: { vars: ['APP_ID', 'APP_KEY'] } }),
  permissions: fc.oneof(
    fc.constant({ allow_all: true }),
    fc.record({
      allowed_repos: fc.array(fc.stringMatching(/^[a-z*]{1,8}\/[a-z*]{1,8}$/), { minLength: 1, maxLength: 3 }),
    }),
  ),
  api_url: fc.constantFrom('https://api.github.com', 'https://ghe.example.com/api/v3/'),
});

/** Any configuration an operator could write: every key optional, every value within the schema. */
const config = fc
  .record(
    {
      data_dir: fc.stringMatching(/^[a-z][a-z0-9/_-]{0,20}$/),
      build_no_output_timeout_seconds: fc.nat(1_000_000),
      build_max_duration_seconds: fc.nat(1_000_000),
      unbuildable_grace_seconds: fc.nat(1_000_000),
      lease_ttl_seconds: seconds.filter((s) => s > 0),
      max_attempts: fc.integer({ min: 1, max: 10 }),
      graph_lru_capacity: fc.integer({ min: 1, max: 1_000_000 }),
      agent_hello_timeout_seconds: seconds.filter((s) => s > 0),
      web: fc.record({ address: fc.ipV4(), port, public: fc.boolean() }, opt),
      grpc: fc.record({ address: fc.ipV4(), port }, opt),
      local_agent: fc.record(
        { enabled: fc.boolean(), max_jobs: fc.integer({ min: 1, max: 64 }), sandbox: fc.boolean() },
        opt,
      ),
      cache: fc.record({ key_name: name }, opt),
      agent_tokens: tokens,
      api_tokens: tokens,
      github_apps: fc.uniqueArray(app, { selector: (a) => a.id, maxLength: 2 }),
      security: fc.record(
        {
          webhook_secret: secret,
          require_approval: fc.boolean(),
          approved_users: fc.array(name, { maxLength: 3 }),
          allow_unsandboxed_untrusted_builds: fc.boolean(),
        },
        opt,
      ),
      evaluation: fc.record(
        {
          workers: fc.integer({ min: 1, max: 16 }),
          max_memory_mib: fc.integer({ min: 64, max: 65_536 }),
          attr_timeout_seconds: fc.integer({ min: 1, max: 3_600 }),
          sandbox: fc.boolean(),
          store: fc.constantFrom('auto', 'daemon', 'private-daemon'),
          repositories: fc.array(fc.record({ repos: fc.array(name, { minLength: 1, maxLength: 2 }) }), {
            maxLength: 2,
          }),
        },
        opt,
      ),
      github: fc.record({ build_draft_pull_requests: fc.boolean(), check_run_update_interval_seconds: seconds }, opt),
    },
    opt,
  )
  // GitHub Apps need a webhook secret.
  .map((c): Record<string, unknown> =>
    c.github_apps?.length && c.security?.webhook_secret === undefined
      ? { ...c, security: { ...c.security, allow_insecure_webhooks: true } }
      : c,
  );

/** A value no one meant: wrong types, numbers at every edge, strings that look like paths, deep nesting. */
const hostile: fc.Arbitrary<unknown> = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom(-1, 0, -0, 0.5, 2 ** 31, 2 ** 32, 2 ** 53, 1e300, -1e300, Infinity, NaN, '', '.', '..', '/', '\0'),
  fc.double(),
  fc.date({ noInvalidDate: true }),
  fc.nat(3_000).map((depth) => nest(depth, (inner) => [inner])),
  fc.nat(3_000).map((depth) => nest(depth, (inner) => ({ a: inner }))),
);

function compile(raw: unknown): CoordinatorOptions | Error {
  return parsesOrFailsWith(ConfigError, () => compileCoordinatorConfig(raw, 'fuzz.toml', ENV, dir));
}

/** What the rest of the coordinator relies on in compiled options: timers that wait, limits the lease can carry. */
function expectUsable(o: CoordinatorOptions): void {
  for (const ms of [o.leaseTtlMs, o.helloTimeoutMs, o.github.checkRunUpdateIntervalMs]) {
    expect(Number.isInteger(ms) && ms >= 0 && ms <= MAX_TIMER_MS).toBe(true);
  }
  for (const s of [o.noOutputTimeoutSeconds, o.maxDurationSeconds]) {
    expect(Number.isInteger(s) && s >= 0 && s <= MAX_UINT32).toBe(true);
  }
  for (const p of [o.web.port, o.grpc.port]) expect(Number.isInteger(p) && p >= 0 && p <= 65_535).toBe(true);
}

let files = 0;
function load(toml: string): CoordinatorOptions | Error {
  const file = join(dir, `coordinator-${files++}.toml`);
  writeFileSync(file, toml);
  return parsesOrFailsWith(ConfigError, () => loadCoordinatorConfig(file, ENV));
}

describe('coordinator configuration from any TOML', () => {
  it('compiles every configuration within the schema, the same from TOML as from the table it denotes', () => {
    fc.assert(
      fc.property(config, (c) => {
        const o = load(stringify(c));
        if (o instanceof Error) throw o;
        expectUsable(o);
        expect(o.web.port).toBe((c.web as { port?: number } | undefined)?.port ?? 8080);
        expect(o.maxAttempts).toBe(c.max_attempts ?? 3);
        expect(o.agentTokens.map((t) => t.name)).toEqual(
          ((c.agent_tokens ?? []) as { name: string }[]).map((t) => t.name),
        );
        expect(o.githubApps.map((a) => a.id)).toEqual(((c.github_apps ?? []) as { id: string }[]).map((a) => a.id));
        expect(JSON.stringify(o)).toBe(JSON.stringify(compileCoordinatorConfig(c, 'fuzz.toml', ENV, dir)));
      }),
      { numRuns: RUNS },
    );
  });

  it('compiles a configuration with any value anywhere to usable options, or refuses it with ConfigError', () => {
    fc.assert(
      fc.property(config, fc.nat(), hostile, (c, pick, value) => {
        const all = places(c, ['unknown_key']);
        const o = compile(replaced(c, all[pick % all.length]!, value));
        if (!(o instanceof Error)) expectUsable(o);
      }),
      { numRuns: RUNS * 3 },
    );
  });

  it('refuses any durations and capacities the coordinator cannot use, naming the key', () => {
    const key = fc.constantFrom(
      ['lease_ttl_seconds'],
      ['agent_hello_timeout_seconds'],
      ['build_no_output_timeout_seconds'],
      ['build_max_duration_seconds'],
      ['graph_lru_capacity'],
      ['github', 'check_run_update_interval_seconds'],
    );
    const huge = fc.oneof(
      fc.integer({ min: 2 ** 31, max: Number.MAX_SAFE_INTEGER }),
      fc.constantFrom(1e300, 2 ** 32 + 1),
    );
    fc.assert(
      fc.property(key, huge, (path, n) => {
        const o = compile(replaced({}, path, n));
        if (!(o instanceof Error)) return expectUsable(o);
        expect(o.message).toContain(`fuzz.toml: ${path.join('.')}: `);
      }),
      {
        numRuns: RUNS,
        examples: [
          [['agent_hello_timeout_seconds'], 1e7], // 116 days: the timer fired at once, closing every agent's stream
          [['lease_ttl_seconds'], 5e6], // 58 days: more milliseconds than Welcome's uint32 holds
          [['build_max_duration_seconds'], 5e9], // more seconds than the lease's uint32 holds
          [['github', 'check_run_update_interval_seconds'], 1e7],
        ],
      },
    );
  });

  it('refuses a graph cache so large that allocating it would take the coordinator down at start', () => {
    const e = compile({ graph_lru_capacity: 1_000_000_000 });
    expect(e).toBeInstanceOf(ConfigError);
    expect((e as Error).message).toMatch(/^fuzz\.toml: graph_lru_capacity: /);
  });

  it('compiles a GitHub App or refuses it with ConfigError whatever its id and key variables hold', () => {
    const id = fc.oneof(fc.string(), fc.stringMatching(/^\s*\d{1,20}\s*$/), fc.constantFrom('0', '-1', '1e3', ' 7 '));
    const key = fc.oneof(
      fc.string(),
      mutations(['-----', '\n', 'BEGIN', 'END', 'RSA PRIVATE KEY', '\\n', '=']).map((ms) =>
        mutateText(ENV.APP_KEY, ms),
      ),
      fc.constant(ENV.APP_KEY.replace(/\n/g, '\\n')),
    );
    fc.assert(
      fc.property(id, key, (appId, privateKey) => {
        const raw = {
          github_apps: [{ id: 'a', permissions: { allow_all: true } }],
          security: { allow_insecure_webhooks: true },
        };
        const env = { GITHUB_APP_ID: appId, GITHUB_APP_PRIVATE_KEY: privateKey };
        const o = parsesOrFailsWith(ConfigError, () => compileCoordinatorConfig(raw, 'fuzz.toml', env, dir));
        // No message quotes the key, even a broken one.
        const fragment = privateKey.slice(40, 80);
        if (o instanceof Error && fragment.length >= 20) expect(o.message).not.toContain(fragment);
        if (!(o instanceof Error)) expect(Number.isSafeInteger(o.githubApps[0]?.credentials.appId)).toBe(true);
      }),
      { numRuns: RUNS },
    );
  });

  it('compiles or refuses with ConfigError any damaged TOML text', () => {
    fc.assert(
      fc.property(config, mutations(TOML_TOKENS), (c, ms) => {
        const o = load(mutateText(stringify(c), ms));
        if (!(o instanceof Error)) expectUsable(o);
      }),
      { numRuns: RUNS, examples: [[{}, [{ kind: 'insert', at: 0, junk: `${'a.'.repeat(50_000)}b = 1\n` }]]] },
    );
  });
});
