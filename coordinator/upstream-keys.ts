import { dirname } from 'node:path';
import { ConfigError } from '../common/errors.js';

/**
 * Upstream eka-ci's (ekala-project/eka-ci) spellings of the coordinator configuration, read so that a user moving
 * from it keeps their `ekaci.toml`: a key that means the same here is moved to where eka-ci keeps it; a key that
 * cannot mean the same is a startup error naming it and saying what to write instead. Every such key is reported
 * at once, so one start lists all there is to change. Runs on the raw TOML, before the schema; the schema's own
 * errors (unknown keys among them) still apply to whatever is left.
 *
 * README.md, "Moving from upstream eka-ci", has the whole table.
 */

type Table = Record<string, unknown>;

// Upstream's environment override prefix (figment: `EKA_CI_<KEY>`, `EKA_CI_<TABLE>__<KEY>`).
const UPSTREAM_ENV_PREFIX = 'EKA_CI_';
// Upstream accepts these spellings of "on" for its boolean environment variables; anything else is off.
const TRUE_WORDS = new Set(['1', 'true', 'yes', 'on']);
const UPSTREAM_CALLBACK = /\/github\/auth\/callback\/?$/;

const DATA_DIR_LAYOUT =
  'eka-ci keeps its database, build logs, git mirrors and binary cache together in data_dir ' +
  '(<data_dir>/ekaci.sqlite, <data_dir>/logs, ...), so that one disk-space check covers them';

export function translateUpstreamKeys(raw: unknown, source: string, env: NodeJS.ProcessEnv): unknown {
  const problems: string[] = [];
  const problem = (key: string, advice: string, from = source): void => {
    problems.push(`${from}: ${key}: ${advice}`);
  };
  for (const name of Object.keys(env).sort()) {
    if (!name.startsWith(UPSTREAM_ENV_PREFIX) || env[name] === undefined) continue;
    problem(
      name,
      name === 'EKA_CI_CONFIG_FILE'
        ? "upstream eka-ci's configuration file variable, which eka-ci does not read: pass the file with " +
            'ekaci-coordinator --config FILE'
        : "upstream eka-ci's environment override, which eka-ci does not read: set the key in the configuration " +
            'file (EKACI_<KEY> overrides data_dir and the top-level numbers such as build_no_output_timeout_seconds)',
      'environment',
    );
  }
  if (!isTable(raw)) return finish(raw, problems);
  const out: Table = { ...raw };

  if ('db_path' in out) {
    const suggestion =
      typeof out.db_path === 'string' && out.data_dir === undefined ? ` = "${dirname(out.db_path)}"` : '';
    problem(
      'db_path',
      `${DATA_DIR_LAYOUT}: set data_dir${suggestion} instead (upstream eka-ci's database has another schema and is ` +
        'not read)',
    );
  }
  if ('logs_dir' in out) problem('logs_dir', `${DATA_DIR_LAYOUT}: remove logs_dir; build logs go to <data_dir>/logs`);

  if ('require_approval' in out) {
    const security = out.security === undefined ? {} : out.security;
    // A [security] that is not a table is the schema's to report.
    if (isTable(security)) {
      if ('require_approval' in security) {
        problem(
          'require_approval',
          'set twice: at the top level (where upstream eka-ci reads it) and as security.require_approval; keep ' +
            'security.require_approval',
        );
      } else {
        out.security = { ...security, require_approval: out.require_approval };
        delete out.require_approval;
      }
    }
  }
  if ('merge_queue_require_approval' in out) {
    if (out.merge_queue_require_approval === false) delete out.merge_queue_require_approval;
    else {
      problem(
        'merge_queue_require_approval',
        'eka-ci builds every merge group without waiting for approval: only people with write access can add a ' +
          'pull request to a merge queue, and doing so vouches for its code; remove the key',
      );
    }
  }
  if ('default_merge_method' in out) {
    if (out.default_merge_method === 'merge') delete out.default_merge_method;
    else {
      problem(
        'default_merge_method',
        'the merge method is part of the command: "@eka-ci merge" merges with a merge commit, "@eka-ci merge ' +
          'squash" and "@eka-ci merge rebase" pick the others; remove the key',
      );
    }
  }
  for (const forge of ['gitea_instances', 'gitlab_instances']) {
    if (forge in out) {
      problem(forge, 'eka-ci serves GitHub only (GitHub Enterprise Server through github_apps.api_url); remove it');
    }
  }
  if ('unix' in out) {
    problem(
      'unix',
      'the ekaci command talks to the coordinator over its HTTP API ([web]) with an API token (api_tokens, or ' +
        'ekaci-coordinator api-token create NAME); remove the [unix] table',
    );
  }

  if (isTable(out.web)) {
    const web: Table = { ...out.web };
    for (const key of ['static_dir', 'bundle_path']) {
      if (key in web) problem(`web.${key}`, 'the web UI is built into eka-ci and served by the coordinator; remove it');
    }
    if ('allowed_origins' in web) {
      if ('cors_origins' in web) {
        problem('web.allowed_origins', 'set twice, as allowed_origins and as cors_origins; keep web.cors_origins');
      } else {
        // Upstream accepts an origin written with a trailing `/` and means the origin.
        const origins = web.allowed_origins;
        web.cors_origins = Array.isArray(origins)
          ? origins.map((o: unknown) => (typeof o === 'string' ? o.replace(/\/$/, '') : o))
          : origins;
        delete web.allowed_origins;
      }
    }
    out.web = web;
  }

  if (isTable(out.oauth) && typeof out.oauth.redirect_url === 'string') {
    if (UPSTREAM_CALLBACK.test(pathOf(out.oauth.redirect_url))) {
      problem(
        'oauth.redirect_url',
        "eka-ci's login callback is /auth/callback, not upstream eka-ci's /github/auth/callback: set " +
          `redirect_url = "${out.oauth.redirect_url.replace(UPSTREAM_CALLBACK, '/auth/callback')}" and the same ` +
          "URL as the OAuth app's callback URL in GitHub",
      );
    }
  }

  applyUpstreamEnv(out, env);
  return finish(out, problems);
}

/** Upstream's own `EKACI_*` variables whose keys eka-ci has under another name; they override the file, as there. */
function applyUpstreamEnv(out: Table, env: NodeJS.ProcessEnv): void {
  const table = (key: string): Table => {
    const existing = out[key];
    const copy: Table = isTable(existing) ? { ...existing } : {};
    out[key] = copy;
    return copy;
  };
  const flag = (value: string): boolean => TRUE_WORDS.has(value.trim().toLowerCase());
  if (env.EKACI_ALLOW_INSECURE_WEBHOOKS !== undefined) {
    table('security').allow_insecure_webhooks = flag(env.EKACI_ALLOW_INSECURE_WEBHOOKS);
  }
  if (env.EKACI_ALLOW_PRIVATE_CACHE_HOSTS !== undefined) {
    table('security').allow_private_cache_hosts = flag(env.EKACI_ALLOW_PRIVATE_CACHE_HOSTS);
  }
  if (env.EKACI_WEB_ALLOWED_ORIGINS !== undefined) {
    table('web').cors_origins = env.EKACI_WEB_ALLOWED_ORIGINS.split(',')
      .map((o) => o.trim().replace(/\/$/, ''))
      .filter((o) => o !== '');
  }
}

function finish(value: unknown, problems: string[]): unknown {
  if (problems.length > 0) throw new ConfigError(problems.join('\n'));
  return value;
}

function pathOf(url: string): string {
  try {
    return new URL(url).pathname;
  } catch {
    return '';
  }
}

function isTable(value: unknown): value is Table {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
