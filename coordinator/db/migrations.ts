import { createHash } from 'node:crypto';
import type { Db } from './database.js';
import { seedBuildDurations } from '../scheduler/build-durations.js';

/** A schema change: SQL, or a function for one that must move data SQL alone cannot (it runs in a transaction). */
export type Migration = string | ((db: Db) => void);

/**
 * The schema, as an append-only list of migrations. Never edit a released migration: add one. Each runs in
 * its own transaction and is recorded in `schema_migrations`.
 */
export const MIGRATIONS: readonly Migration[] = [
  `
  CREATE TABLE derivations (
    drv_path          TEXT PRIMARY KEY,
    system            TEXT NOT NULL,
    required_features TEXT NOT NULL,             -- JSON array
    is_fod            INTEGER NOT NULL,
    prefer_local      INTEGER NOT NULL,
    state             TEXT NOT NULL,             -- see coordinator/scheduler/build-state.ts
    attempts          INTEGER NOT NULL DEFAULT 0,
    root_cause        TEXT,                      -- for dependency-failed: the failed derivation behind it
    error             TEXT,
    agent_id          TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
  ) WITHOUT ROWID;
  CREATE INDEX derivations_active ON derivations(state) WHERE state IN ('queued', 'buildable', 'building');

  CREATE TABLE derivation_inputs (
    drv_path  TEXT NOT NULL,
    input_drv TEXT NOT NULL,
    PRIMARY KEY (drv_path, input_drv)
  ) WITHOUT ROWID;
  CREATE INDEX derivation_inputs_reverse ON derivation_inputs(input_drv);

  CREATE TABLE derivation_outputs (
    drv_path     TEXT NOT NULL,
    name         TEXT NOT NULL,
    path         TEXT NOT NULL,
    nar_size     INTEGER,
    closure_size INTEGER,
    PRIMARY KEY (drv_path, name)
  ) WITHOUT ROWID;
  CREATE INDEX derivation_outputs_path ON derivation_outputs(path);

  -- One row per attempt; an attempt given to an agent is a lease.
  CREATE TABLE attempts (
    lease_id    TEXT PRIMARY KEY,
    drv_path    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    agent_id    TEXT NOT NULL,
    state       TEXT NOT NULL,                   -- assigned, accepted, started, succeeded, failed, timed-out, infra-error, cancelled, lost
    assigned_at INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER,
    expires_at  INTEGER NOT NULL,
    error       TEXT,
    log_path    TEXT NOT NULL,
    log_bytes   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (drv_path, attempt)
  );
  CREATE INDEX attempts_open ON attempts(state) WHERE state IN ('assigned', 'accepted', 'started');

  -- Every state transition of a derivation, in order.
  CREATE TABLE events (
    id       INTEGER PRIMARY KEY,
    drv_path TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    state    TEXT NOT NULL,
    agent_id TEXT,
    detail   TEXT,
    at       INTEGER NOT NULL
  );
  CREATE INDEX events_drv ON events(drv_path, id);

  CREATE TABLE agent_tokens (
    name       TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
  );

  CREATE TABLE agents (
    agent_id   TEXT PRIMARY KEY,
    token_name TEXT NOT NULL,
    hostname   TEXT NOT NULL,
    os         TEXT NOT NULL,
    systems    TEXT NOT NULL,
    features   TEXT NOT NULL,
    mandatory  TEXT NOT NULL,
    max_jobs   INTEGER NOT NULL,
    nix_version TEXT NOT NULL,
    last_seen  INTEGER NOT NULL
  );

  -- A build request (CLI, API): a set of root derivations, each under the name the user asked for.
  CREATE TABLE requests (
    id         INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    source     TEXT NOT NULL
  );
  CREATE TABLE request_roots (
    request_id INTEGER NOT NULL,
    attr       TEXT NOT NULL,
    drv_path   TEXT NOT NULL,
    PRIMARY KEY (request_id, attr)
  );

  -- Audit log of privileged actions (token created/revoked, agents admitted or refused).
  CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY,
    at     INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT
  );
  `,
  `
  -- Rebuild diffs between two commits of a repository, per job: a change summary reads them back instead of
  -- evaluating both commits again.
  CREATE TABLE rebuild_diffs (
    repo        TEXT NOT NULL,
    base_commit TEXT NOT NULL,
    head_commit TEXT NOT NULL,
    job         TEXT NOT NULL,
    diff_json   TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (repo, base_commit, head_commit, job)
  ) WITHOUT ROWID;
  `,
  `
  -- Each job's evaluation of a commit, kept so a review can be recomputed from the database for any pair of
  -- commits the coordinator has seen.
  CREATE TABLE commit_evaluations (
    repo                 TEXT NOT NULL,
    commit_sha           TEXT NOT NULL,
    job                  TEXT NOT NULL,
    allow_eval_failures  INTEGER NOT NULL,
    max_increase_percent REAL,
    attrs_json           TEXT NOT NULL,            -- JSON array of EvalResult
    seconds              REAL NOT NULL,
    created_at           INTEGER NOT NULL,
    PRIMARY KEY (repo, commit_sha, job)
  ) WITHOUT ROWID;
  `,
  `
  -- GitHub webhook deliveries, stored before they are acknowledged so a restart loses none (see
  -- coordinator/github/delivery-queue.ts). The delivery id doubles as the replay guard. Arrival order is the rowid.
  CREATE TABLE webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    event       TEXT NOT NULL,
    action      TEXT,
    payload     TEXT NOT NULL,                   -- the JSON body exactly as GitHub signed it
    source      TEXT NOT NULL,                   -- the address it came from
    received_at INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'processing', 'done', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    finished_at INTEGER
  );
  -- (state, rowid): the next pending delivery in arrival order is one index step, however many are kept.
  CREATE INDEX webhook_deliveries_state ON webhook_deliveries(state);
  CREATE INDEX webhook_deliveries_finished ON webhook_deliveries(finished_at) WHERE finished_at IS NOT NULL;
  `,
  `
  -- GitHub App state: installations and the repositories they serve, pull requests as last seen, and runs (one
  -- evaluation + build + report of a commit, possibly against a base) with the derivations each run needs.
  CREATE TABLE github_installations (
    installation_id INTEGER PRIMARY KEY,
    app             TEXT NOT NULL,                 -- the [[github_apps]] id serving it
    account         TEXT NOT NULL,
    suspended       INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL
  );
  CREATE TABLE github_repositories (
    full_name       TEXT PRIMARY KEY,              -- owner/name
    installation_id INTEGER NOT NULL,
    clone_url       TEXT NOT NULL,
    default_branch  TEXT NOT NULL,
    private         INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
  ) WITHOUT ROWID;
  CREATE TABLE github_pull_requests (
    repo               TEXT NOT NULL,
    number             INTEGER NOT NULL,
    state              TEXT NOT NULL,              -- open | closed
    head_sha           TEXT NOT NULL,
    head_clone_url     TEXT NOT NULL,
    base_sha           TEXT NOT NULL,
    base_ref           TEXT NOT NULL,
    author             TEXT NOT NULL,
    author_association TEXT NOT NULL,
    draft              INTEGER NOT NULL,
    approved_by        TEXT,                       -- who approved an outside contributor's PR by command …
    approved_sha       TEXT,                       -- … for this head: a later push needs approving again
    merge_method       TEXT,                       -- a pending @eka-ci merge …
    merge_for_sha      TEXT,                       -- … for this head
    merge_by           TEXT,
    merge_comment_id   INTEGER,                    -- the command's comment, for the rocket when merged
    merge_waiting      INTEGER NOT NULL DEFAULT 0, -- GitHub refused it for now (405); the author was told
    updated_at         INTEGER NOT NULL,
    PRIMARY KEY (repo, number)
  ) WITHOUT ROWID;
  CREATE TABLE github_runs (
    id              INTEGER PRIMARY KEY,
    repo            TEXT NOT NULL,
    installation_id INTEGER NOT NULL,
    kind            TEXT NOT NULL,                 -- pull_request | push | merge_group
    pr_number       INTEGER,
    base_sha        TEXT,
    head_sha        TEXT NOT NULL,
    base_clone_url  TEXT NOT NULL,
    head_clone_url  TEXT NOT NULL,
    extra_attrs     TEXT NOT NULL,                 -- JSON: attributes built even if unchanged
    rebuild_failed  INTEGER NOT NULL,
    state           TEXT NOT NULL,                 -- see coordinator/github/run-store.ts
    error           TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
  );
  CREATE INDEX github_runs_open ON github_runs(state) WHERE state IN ('queued', 'evaluating', 'building');
  CREATE INDEX github_runs_commit ON github_runs(repo, head_sha);
  CREATE TABLE github_run_roots (
    run_id   INTEGER NOT NULL,
    side     TEXT NOT NULL,                        -- base | head
    drv_path TEXT NOT NULL,
    attr     TEXT NOT NULL,
    system   TEXT NOT NULL,
    PRIMARY KEY (run_id, side, drv_path)
  ) WITHOUT ROWID;
  CREATE INDEX github_run_roots_drv ON github_run_roots(drv_path);
  `,
  `
  -- GitHub check runs as eka-ci wants them (desired) and as GitHub last acknowledged them (sent); see
  -- coordinator/github/check-runs.ts. A row is dirty while the two differ and a send is owed.
  CREATE TABLE check_runs (
    owner           TEXT NOT NULL,
    repo            TEXT NOT NULL,
    head_sha        TEXT NOT NULL,
    name            TEXT NOT NULL,
    installation_id INTEGER NOT NULL,
    github_id       INTEGER,                       -- null until GitHub created the check run
    desired_json    TEXT NOT NULL,
    sent_json       TEXT,                          -- null until the first successful send
    dirty           INTEGER NOT NULL,
    last_sent_at    INTEGER,
    failed_error    TEXT,                          -- GitHub refused the desired state for good
    created_at      INTEGER NOT NULL,              -- first set: check runs are created in this order
    create_attempted INTEGER NOT NULL DEFAULT 0,   -- a create was sent; its answer may have been lost
    PRIMARY KEY (owner, repo, head_sha, name)
  ) WITHOUT ROWID;
  CREATE INDEX check_runs_dirty ON check_runs(dirty) WHERE dirty = 1;
  `,
  `
  -- Trust boundaries (see ARCHITECTURE.md §7).
  -- API tokens: like agent tokens (SHA-256 hashes only), for people and programs reading or acting through the API.
  CREATE TABLE api_tokens (
    name       TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
  );
  -- untrusted: only requested by code from people without write access; built only by sandboxed agents.
  -- private: first requested for a private repository; never served without a credential.
  ALTER TABLE derivations ADD COLUMN untrusted INTEGER NOT NULL DEFAULT 0;
  ALTER TABLE derivations ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
  ALTER TABLE agents ADD COLUMN sandboxed INTEGER NOT NULL DEFAULT 0;
  -- A run builds untrusted code when its pull request's author cannot write to the repository.
  ALTER TABLE github_runs ADD COLUMN untrusted INTEGER NOT NULL DEFAULT 0;
  -- Head commits of a pull request in the order GitHub reported them, with GitHub's time: an approval covers the
  -- head of the moment the approving comment was written, not whatever was pushed after it.
  CREATE TABLE github_pull_request_heads (
    repo     TEXT NOT NULL,
    number   INTEGER NOT NULL,
    head_sha TEXT NOT NULL,
    since    INTEGER NOT NULL,                   -- ms since the epoch, GitHub's clock (the event's updated_at)
    PRIMARY KEY (repo, number, head_sha)
  ) WITHOUT ROWID;
  -- Which .eka-ci configuration each evaluated commit had (a hash of the file), so a pull request that changes it
  -- is seen as one.
  CREATE TABLE commit_configs (
    repo        TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    PRIMARY KEY (repo, commit_sha)
  ) WITHOUT ROWID;
  `,
  `
  -- Faults and limits: a cancel is recorded on its attempt before it is sent, so that it survives a restart and
  -- reaches an agent that reconnects; an attempt whose log outgrew build_max_log_bytes says so.
  ALTER TABLE attempts ADD COLUMN cancel_reason TEXT;
  ALTER TABLE attempts ADD COLUMN log_truncated INTEGER NOT NULL DEFAULT 0;
  `,
  `
  -- A failed webhook delivery waits in the database for its retry (ms since the epoch; 0: due now), so that retries
  -- can span hours and survive a restart.
  ALTER TABLE webhook_deliveries ADD COLUMN next_attempt_at INTEGER NOT NULL DEFAULT 0;
  `,
  evaluationsAsRows,
  `
  -- meta.platforms lists, stored once: a package set has a handful of them, each repeated on thousands of packages
  -- (nixpkgs' lists run to dozens of systems, most of an evaluated value's bytes).
  CREATE TABLE eval_lists (
    id     INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    json   TEXT NOT NULL
  );
  ALTER TABLE eval_values ADD COLUMN platforms_id INTEGER;  -- the value's meta.platforms, when not in its json
  `,
  `
  -- What lists of pull requests show without computing a review each: the title, and a run's counts (rebuilds per
  -- system once diffed; the review's summary once built). Operators drain an agent (no new work) through the API.
  ALTER TABLE github_pull_requests ADD COLUMN title TEXT NOT NULL DEFAULT '';
  ALTER TABLE github_runs ADD COLUMN summary_json TEXT;
  ALTER TABLE agents ADD COLUMN drained_at INTEGER;
  ALTER TABLE agents ADD COLUMN drained_by TEXT;
  ALTER TABLE agents ADD COLUMN drain_reason TEXT;
  -- An attribute across a repository's commits (its size history) without reading every evaluation whole.
  CREATE INDEX evaluation_attrs_name ON evaluation_attrs(name_id, evaluation_id);
  `,
  `
  -- Repository checks. A commit's checks as its evaluation planned them (each check's command, binds and the shell
  -- derivation per system), and each check's run on an agent: one row per commit, check and system, reused by
  -- every run of that commit until "rebuild failed" runs a failed one again.
  ALTER TABLE commit_configs ADD COLUMN checks_json TEXT;
  CREATE TABLE check_jobs (
    id              INTEGER PRIMARY KEY,
    repo            TEXT NOT NULL,
    commit_sha      TEXT NOT NULL,
    name            TEXT NOT NULL,
    system          TEXT NOT NULL,
    clone_url       TEXT NOT NULL,                -- where the coordinator's mirror of the commit is
    command         TEXT NOT NULL,
    allow_network   INTEGER NOT NULL,             -- after the base's policy and the repository's trust
    ro_bind_json    TEXT NOT NULL,
    timeout_seconds INTEGER NOT NULL,
    shell_drv       TEXT,                         -- NULL: the builder host's /bin and /usr/bin
    untrusted       INTEGER NOT NULL,
    state           TEXT NOT NULL,                -- waiting (for its shell) | queued | running | succeeded | failed |
                                                  -- timed-out | cancelled | unbuildable
    attempts        INTEGER NOT NULL DEFAULT 0,
    lease_id        TEXT UNIQUE,
    agent_id        TEXT,
    lease_expires   INTEGER,
    cancel_reason   TEXT,
    log_path        TEXT,
    log_bytes       INTEGER NOT NULL DEFAULT 0,
    exit_code       INTEGER,
    error           TEXT,
    queued_at       INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    UNIQUE (repo, commit_sha, name, system)
  );
  CREATE INDEX check_jobs_state ON check_jobs(state);
  `,
  `
  -- Binary caches. A run's branch (cache permissions are per branch); the caches each job names, as evaluated; the
  -- caches a run asked each of its head roots to be pushed to (refused: why not); and each derivation's pushes.
  ALTER TABLE github_runs ADD COLUMN branch TEXT;
  ALTER TABLE evaluations ADD COLUMN caches_json TEXT;
  CREATE TABLE run_cache_pushes (
    run_id   INTEGER NOT NULL,
    drv_path TEXT NOT NULL,
    cache_id TEXT NOT NULL,
    attr     TEXT NOT NULL,
    refused  TEXT,                               -- NULL: allowed
    PRIMARY KEY (run_id, drv_path, cache_id)
  ) WITHOUT ROWID;
  CREATE INDEX run_cache_pushes_drv ON run_cache_pushes(drv_path) WHERE refused IS NULL;
  CREATE TABLE cache_pushes (
    drv_path   TEXT NOT NULL,
    cache_id   TEXT NOT NULL,
    state      TEXT NOT NULL,                    -- pushed | failed
    attempts   INTEGER NOT NULL,
    paths      INTEGER NOT NULL DEFAULT 0,       -- store paths uploaded (those already there are not counted)
    error      TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (drv_path, cache_id)
  ) WITHOUT ROWID;
  `,
  `
  -- Post-build hooks (coordinator/hooks): one row per hook and result of a derivation's attempt, whatever became of
  -- it (queued, ran, skipped and why). Hooks look up which requests had a derivation as a root.
  CREATE TABLE hook_runs (
    id            INTEGER PRIMARY KEY,
    hook_id       TEXT NOT NULL,
    drv_path      TEXT NOT NULL,
    attempt       INTEGER NOT NULL,               -- the derivation's attempt whose result started it
    result        TEXT NOT NULL,                  -- success | failure
    build_state   TEXT NOT NULL,                  -- succeeded | failed | timed-out
    run_id        INTEGER,                        -- the GitHub run whose context it has; NULL: a CLI/API request
    attr          TEXT NOT NULL,
    repo          TEXT NOT NULL,
    branch        TEXT NOT NULL,
    commit_sha    TEXT NOT NULL,
    job           TEXT NOT NULL,
    state         TEXT NOT NULL,                  -- see coordinator/hooks/hook-run-store.ts
    reason        TEXT,                           -- why it was skipped, or what went wrong
    exit_code     INTEGER,
    signal        TEXT,
    log_path      TEXT,
    log_bytes     INTEGER NOT NULL DEFAULT 0,
    log_truncated INTEGER NOT NULL DEFAULT 0,
    queued_at     INTEGER NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER,
    UNIQUE (hook_id, drv_path, attempt)
  );
  CREATE INDEX hook_runs_drv ON hook_runs(drv_path);
  CREATE INDEX hook_runs_open ON hook_runs(state) WHERE state IN ('queued', 'running');
  CREATE INDEX request_roots_drv ON request_roots(drv_path);
  `,
  `
  -- Output sizes of a branch's builds per attribute and output (coordinator/review/size-history.ts): a point where
  -- the attribute's derivation changed on the branch, the newest [evaluation] keep_size_points kept per series. And
  -- each job's size_check.base_branch, as evaluated (reviews compare with that branch's newest point).
  CREATE TABLE size_history (
    id           INTEGER PRIMARY KEY,
    repo         TEXT NOT NULL,
    branch       TEXT NOT NULL,
    job          TEXT NOT NULL,
    attr         TEXT NOT NULL,                  -- relative to the job
    output       TEXT NOT NULL,
    system       TEXT NOT NULL,
    commit_sha   TEXT NOT NULL,
    drv_path     TEXT NOT NULL,
    nar_size     INTEGER NOT NULL,
    closure_size INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    UNIQUE (repo, branch, job, attr, output, commit_sha)
  );
  CREATE INDEX size_history_series ON size_history(repo, attr, branch, recorded_at);
  ALTER TABLE evaluations ADD COLUMN size_base_branch TEXT;
  `,
  (db) => {
    // How long builds of a package take (coordinator/scheduler/build-durations.ts), for runs' ETAs: a mean over
    // about the last 8 successful builds per system, pname and fixed-output or not; seeded from the attempts so far.
    db.exec(`
      CREATE TABLE build_durations (
        system       TEXT NOT NULL,
        pname        TEXT NOT NULL,                 -- the derivation's name without its version
        fixed_output INTEGER NOT NULL,
        samples      INTEGER NOT NULL,
        mean_seconds REAL NOT NULL,
        updated_at   INTEGER NOT NULL,
        PRIMARY KEY (system, pname, fixed_output)
      ) WITHOUT ROWID;
    `);
    seedBuildDurations(db);
  },
  `
  -- What the base's build rules held back in a run (a mass rebuild, skip_build_paths): review/build-limits.ts's
  -- HeldBack as JSON, for the review the API serves; NULL when they held nothing back.
  ALTER TABLE github_runs ADD COLUMN held_back_json TEXT;
  `,
  `
  -- Whether a derivation is unfinished (queued, buildable or building), set only when it enters or leaves that set
  -- (BuildStore.setState), and the index of unfinished derivations keyed on it. An index keyed on the state had an
  -- entry moved by every step of a build (queued, buildable, building): on random keys, two pages written per step,
  -- about two fifths of the cost of such a step. SQLite leaves a partial index alone when an UPDATE changes neither its
  -- key nor a column of its WHERE.
  ALTER TABLE derivations ADD COLUMN active INTEGER NOT NULL DEFAULT 0;
  UPDATE derivations SET active = 1 WHERE state IN ('queued', 'buildable', 'building');
  DROP INDEX derivations_active;
  CREATE INDEX derivations_unfinished ON derivations(drv_path) WHERE active = 1;
  `,
];

/**
 * Evaluations as rows (one per attribute) with names and values stored once, instead of one JSON document per commit
 * and job: a nixpkgs commit took 100–200 MB as documents, mostly repeated from the commit before. Moves what is
 * stored.
 */
function evaluationsAsRows(db: Db): void {
  db.exec(`
  CREATE TABLE evaluations (
    id                   INTEGER PRIMARY KEY,
    repo                 TEXT NOT NULL,
    commit_sha           TEXT NOT NULL,
    job                  TEXT NOT NULL,
    allow_eval_failures  INTEGER NOT NULL,
    max_increase_percent REAL,
    seconds              REAL NOT NULL,
    created_at           INTEGER NOT NULL,
    complete             INTEGER NOT NULL,          -- 0 while its attributes are being written
    UNIQUE (repo, commit_sha, job)
  );
  CREATE TABLE eval_attr_names (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
  );
  -- An attribute's value without its name: drv path, system, outputs, meta, errors (JSON), keyed by a digest of it.
  CREATE TABLE eval_values (
    id     INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    json   TEXT NOT NULL
  );
  CREATE TABLE evaluation_attrs (
    evaluation_id INTEGER NOT NULL,
    position      INTEGER NOT NULL,                 -- the order the evaluator reported them in
    name_id       INTEGER NOT NULL,
    value_id      INTEGER NOT NULL,
    PRIMARY KEY (evaluation_id, position)
  ) WITHOUT ROWID;
  `);
  const rows = db
    .prepare(
      'SELECT repo, commit_sha, job, allow_eval_failures, max_increase_percent, attrs_json, seconds, created_at FROM commit_evaluations',
    )
    .all() as Array<{
    repo: string;
    commit_sha: string;
    job: string;
    allow_eval_failures: number;
    max_increase_percent: number | null;
    attrs_json: string;
    seconds: number;
    created_at: number;
  }>;
  const job = db.prepare(
    `INSERT INTO evaluations (repo, commit_sha, job, allow_eval_failures, max_increase_percent, seconds, created_at,
       complete) VALUES (?, ?, ?, ?, ?, ?, ?, 1)`,
  );
  const name = db.prepare(
    'INSERT INTO eval_attr_names (name) VALUES (?) ON CONFLICT (name) DO UPDATE SET name = name RETURNING id',
  );
  const value = db.prepare(
    'INSERT INTO eval_values (digest, json) VALUES (?, ?) ON CONFLICT (digest) DO UPDATE SET json = json RETURNING id',
  );
  const attr = db.prepare(
    'INSERT INTO evaluation_attrs (evaluation_id, position, name_id, value_id) VALUES (?, ?, ?, ?)',
  );
  for (const r of rows) {
    const id = job.run(
      r.repo,
      r.commit_sha,
      r.job,
      r.allow_eval_failures,
      r.max_increase_percent,
      r.seconds,
      r.created_at,
    ).lastInsertRowid;
    (JSON.parse(r.attrs_json) as Array<{ attr: string }>).forEach(({ attr: attrName, ...rest }, position) => {
      const json = JSON.stringify(rest);
      const digest = createHash('sha256').update(json).digest().subarray(0, 16);
      const nameId = (name.get(attrName) as { id: number }).id;
      const valueId = (value.get(digest, json) as { id: number }).id;
      attr.run(id, position, nameId, valueId);
    });
  }
  db.exec('DROP TABLE commit_evaluations');
}
