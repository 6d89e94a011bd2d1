/**
 * The schema, as an append-only list of migrations. Never edit a released migration: add one. Each runs in
 * its own transaction and is recorded in `schema_migrations`.
 */
export const MIGRATIONS: readonly string[] = [
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
];
