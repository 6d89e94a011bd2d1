import type { Statement } from 'better-sqlite3';
import type { Db } from '../db/database.js';
import { type BuildState, isTerminal, statesBefore } from './build-state.js';

/** The rows the build pipeline reads and writes; every statement is prepared once. */

export interface DerivationRow {
  drv_path: string;
  system: string;
  required_features: string;
  is_fod: number;
  prefer_local: number;
  untrusted: number;
  private: number;
  state: BuildState;
  attempts: number;
  root_cause: string | null;
  error: string | null;
  agent_id: string | null;
}

export interface AttemptRow {
  lease_id: string;
  drv_path: string;
  attempt: number;
  agent_id: string;
  state: AttemptState;
  assigned_at: number;
  started_at: number | null;
  finished_at: number | null;
  expires_at: number;
  error: string | null;
  log_path: string;
  log_bytes: number;
  cancel_reason: string | null;
  log_truncated: number;
}

export type AttemptState =
  'assigned' | 'accepted' | 'started' | 'succeeded' | 'failed' | 'timed-out' | 'infra-error' | 'cancelled' | 'lost';

export const OPEN_ATTEMPT_STATES: ReadonlySet<AttemptState> = new Set(['assigned', 'accepted', 'started']);

export interface NewDerivation {
  drvPath: string;
  system: string;
  requiredFeatures: readonly string[];
  fixedOutput: boolean;
  preferLocal: boolean;
  inputs: readonly string[];
  outputs: Record<string, string>;
}

export interface OutputRow {
  drv_path: string;
  name: string;
  path: string;
  nar_size: number | null;
  closure_size: number | null;
}

// SQLite's default limit on bound parameters is 32766; stay well below it per IN (...) query.
const IN_BATCH = 500;

export class BuildStore {
  private readonly s;
  /** One statement per target state, allowed only from the states that may precede it. */
  private readonly moveTo = new Map<BuildState, Statement>();
  /**
   * Runs a function in a transaction, or in a savepoint inside one. Made once: better-sqlite3 builds a transaction
   * function's wrappers each time `db.transaction` is called, which cost as much as the writes of a busy fleet.
   */
  private readonly inTransaction: (fn: () => unknown) => unknown;

  constructor(readonly db: Db) {
    this.inTransaction = db.transaction((fn: () => unknown) => fn());
    this.s = {
      insertDrv: db.prepare(
        `INSERT OR IGNORE INTO derivations (drv_path, system, required_features, is_fod, prefer_local, state, active,
           attempts, created_at, updated_at, untrusted, private) VALUES (?, ?, ?, ?, ?, 'queued', 1, 0, ?, ?, ?, ?)`,
      ),
      insertInput: db.prepare('INSERT OR IGNORE INTO derivation_inputs (drv_path, input_drv) VALUES (?, ?)'),
      insertOutput: db.prepare('INSERT OR IGNORE INTO derivation_outputs (drv_path, name, path) VALUES (?, ?, ?)'),
      setOutputSizes: db.prepare(
        'UPDATE derivation_outputs SET nar_size = ?, closure_size = ? WHERE drv_path = ? AND name = ?',
      ),
      // Apart, so that an output whose path was known (all but content-addressed ones) keeps its entry in the
      // index by path, which is keyed at random: rewriting it cost a page written per build.
      setOutputPath: db.prepare('UPDATE derivation_outputs SET path = ? WHERE drv_path = ? AND name = ? AND path <> ?'),
      setAttempts: db.prepare('UPDATE derivations SET attempts = ?, agent_id = ?, updated_at = ? WHERE drv_path = ?'),
      getDrv: db.prepare('SELECT * FROM derivations WHERE drv_path = ?'),
      activeDrvs: db.prepare('SELECT * FROM derivations WHERE active = 1'),
      inputsOf: db.prepare('SELECT input_drv FROM derivation_inputs WHERE drv_path = ?'),
      outputsOf: db.prepare('SELECT * FROM derivation_outputs WHERE drv_path = ? ORDER BY name'),
      inputOutputsOf: db.prepare(
        `SELECT o.drv_path AS drvPath, o.name, o.path
           FROM derivation_inputs i JOIN derivation_outputs o ON o.drv_path = i.input_drv
          WHERE i.drv_path = ? ORDER BY i.input_drv, o.name`,
      ),
      event: db.prepare(
        'INSERT INTO events (drv_path, attempt, state, agent_id, detail, at) VALUES (?, ?, ?, ?, ?, ?)',
      ),
      insertAttempt: db.prepare(
        `INSERT INTO attempts (lease_id, drv_path, attempt, agent_id, state, assigned_at, expires_at, log_path)
         VALUES (?, ?, ?, ?, 'assigned', ?, ?, ?)`,
      ),
      getAttempt: db.prepare('SELECT * FROM attempts WHERE lease_id = ?'),
      openAttempts: db.prepare("SELECT * FROM attempts WHERE state IN ('assigned', 'accepted', 'started')"),
      setAttemptState: db.prepare(
        'UPDATE attempts SET state = ?, error = ?, finished_at = ?, log_bytes = ? WHERE lease_id = ?',
      ),
      startAttempt: db.prepare("UPDATE attempts SET state = 'started', started_at = ? WHERE lease_id = ?"),
      acceptAttempt: db.prepare("UPDATE attempts SET state = 'accepted' WHERE lease_id = ? AND state = 'assigned'"),
      setLogBytes: db.prepare('UPDATE attempts SET log_bytes = ? WHERE lease_id = ?'),
      cancelAttempt: db.prepare('UPDATE attempts SET cancel_reason = ? WHERE lease_id = ? AND cancel_reason IS NULL'),
      logTruncated: db.prepare('UPDATE attempts SET log_truncated = 1 WHERE lease_id = ?'),
      attemptsOf: db.prepare('SELECT * FROM attempts WHERE drv_path = ? ORDER BY attempt'),
      logPathOf: db.prepare('SELECT log_path FROM attempts WHERE drv_path = ? AND attempt = ?'),
      insertRequest: db.prepare('INSERT INTO requests (created_at, source) VALUES (?, ?)'),
      insertRoot: db.prepare('INSERT OR REPLACE INTO request_roots (request_id, attr, drv_path) VALUES (?, ?, ?)'),
      rootsOf: db.prepare('SELECT attr, drv_path FROM request_roots WHERE request_id = ? ORDER BY rowid'),
      trust: db.prepare('UPDATE derivations SET untrusted = 0 WHERE drv_path = ? AND untrusted = 1'),
      publish: db.prepare('UPDATE derivations SET private = 0 WHERE drv_path = ? AND private = 1'),
      privacy: db.prepare(
        `SELECT MIN(p) AS p FROM (
           SELECT d.private AS p FROM derivation_outputs o JOIN derivations d ON d.drv_path = o.drv_path
             WHERE o.path >= ? AND o.path < ?
           UNION ALL SELECT private AS p FROM derivations WHERE drv_path >= ? AND drv_path < ?)`,
      ),
    };
  }

  transaction<T>(fn: () => T): T {
    return this.inTransaction(fn) as T;
  }

  /**
   * Inserts derivations not yet known; `untrusted` and `private` describe the request that first asked for them. A
   * trusted or public request that asks for a known one again makes it so (`trust`, `publish`).
   */
  insertDerivations(
    drvs: readonly NewDerivation[],
    now: number,
    origin: { untrusted: boolean; private: boolean } = { untrusted: false, private: false },
  ): void {
    for (const d of drvs) {
      this.s.insertDrv.run(
        d.drvPath,
        d.system,
        JSON.stringify(d.requiredFeatures),
        d.fixedOutput ? 1 : 0,
        d.preferLocal ? 1 : 0,
        now,
        now,
        origin.untrusted ? 1 : 0,
        origin.private ? 1 : 0,
      );
      for (const i of d.inputs) this.s.insertInput.run(d.drvPath, i);
      for (const [name, path] of Object.entries(d.outputs)) this.s.insertOutput.run(d.drvPath, name, path);
    }
  }

  /** Trusted code wants this derivation too: any agent may build it. */
  trust(drvPath: string): void {
    this.s.trust.run(drvPath);
  }

  /** A public repository wants this derivation too: its outputs and logs are public data. */
  publish(drvPath: string): void {
    this.s.publish.run(drvPath);
  }

  /**
   * Whether what belongs to a store path (a `.drv`, an output, or `/nix/store/<hash>` naming either) is private:
   * only when every derivation it belongs to was asked for by private repositories alone.
   */
  isPrivate(storePathOrHash: string): boolean {
    const prefix = `${storePathOrHash.slice(0, '/nix/store/'.length + 32)}-`;
    const row = this.s.privacy.get(prefix, `${prefix}\uffff`, prefix, `${prefix}\uffff`) as { p: number | null };
    return row.p === 1;
  }

  /**
   * The rows of `query` (whose `IN (?)` takes the derivations) for all of `drvPaths`, asked IN_BATCH at a time: one
   * statement per batch rather than one per derivation, within SQLite's limit on bound parameters.
   */
  private selectIn<T>(query: string, drvPaths: readonly string[]): T[] {
    const rows: T[] = [];
    for (let i = 0; i < drvPaths.length; i += IN_BATCH) {
      const batch = drvPaths.slice(i, i + IN_BATCH);
      const sql = query.replace('IN (?)', `IN (${batch.map(() => '?').join(',')})`);
      for (const r of this.db.prepare(sql).all(...batch) as T[]) rows.push(r);
    }
    return rows;
  }

  /** States of the given derivations that exist, in batches. */
  states(drvPaths: readonly string[]): Map<string, DerivationRow> {
    const rows = this.selectIn<DerivationRow>('SELECT * FROM derivations WHERE drv_path IN (?)', drvPaths);
    return new Map(rows.map((r) => [r.drv_path, r]));
  }

  derivation(drvPath: string): DerivationRow | undefined {
    return this.s.getDrv.get(drvPath) as DerivationRow | undefined;
  }

  activeDerivations(): DerivationRow[] {
    return this.s.activeDrvs.all() as DerivationRow[];
  }

  /**
   * Unfinished derivations with an input in one of `failureStates`, each once, with that input's root cause (or the
   * input itself): what a crash between the slices of a failure's dependents left queued (BuildManager `load`).
   * CROSS JOIN keeps the unfinished derivations (their index) the outer loop: left to itself, SQLite scanned every
   * input edge ever recorded.
   */
  unfinishedWithFailedInput(failureStates: Iterable<BuildState>): Map<string, string> {
    const states = [...failureStates];
    const rows = this.db
      .prepare(
        `SELECT i.drv_path AS drvPath, COALESCE(f.root_cause, f.drv_path) AS rootCause
           FROM derivations d
           CROSS JOIN derivation_inputs i ON i.drv_path = d.drv_path
           JOIN derivations f ON f.drv_path = i.input_drv
          WHERE d.active = 1
            AND f.state IN (${states.map(() => '?').join(', ')})`,
      )
      .all(...states) as Array<{ drvPath: string; rootCause: string }>;
    const out = new Map<string, string>();
    for (const r of rows) if (!out.has(r.drvPath)) out.set(r.drvPath, r.rootCause);
    return out;
  }

  inputsOf(drvPath: string): string[] {
    return (this.s.inputsOf.all(drvPath) as Array<{ input_drv: string }>).map((r) => r.input_drv);
  }

  outputsOf(drvPath: string): OutputRow[] {
    return this.s.outputsOf.all(drvPath) as OutputRow[];
  }

  /** The states alone of the given derivations that exist, in batches (a row's other columns are not read). */
  stateNames(drvPaths: readonly string[]): Map<string, BuildState> {
    const rows = this.selectIn<{ drv_path: string; state: BuildState }>(
      'SELECT drv_path, state FROM derivations WHERE drv_path IN (?)',
      drvPaths,
    );
    return new Map(rows.map((r) => [r.drv_path, r.state]));
  }

  /**
   * The outputs of a derivation's inputs, input by input: one query, where a query per input cost a job with a
   * thousand inputs (nixpkgs has them) a thousand at each assignment.
   */
  inputOutputsOf(drvPath: string): Array<{ drvPath: string; name: string; path: string }> {
    return this.s.inputOutputsOf.all(drvPath) as Array<{ drvPath: string; name: string; path: string }>;
  }

  /** The outputs of many derivations, in batches; a derivation with none known is absent. */
  outputsOfMany(drvPaths: readonly string[]): Map<string, OutputRow[]> {
    const out = new Map<string, OutputRow[]>();
    const rows = this.selectIn<OutputRow>(
      'SELECT * FROM derivation_outputs WHERE drv_path IN (?) ORDER BY drv_path, name',
      drvPaths,
    );
    for (const r of rows) {
      const list = out.get(r.drv_path);
      if (list) list.push(r);
      else out.set(r.drv_path, [r]);
    }
    return out;
  }

  /**
   * Moves a derivation to `state` if the life of a derivation allows it from the state it is in (build-state.ts),
   * and records the event; returns false, changing nothing, when it does not (or the derivation is unknown). The one
   * way a derivation's state changes.
   */
  setState(
    drvPath: string,
    state: BuildState,
    attempt: number,
    at: number,
    extra: { rootCause?: string; error?: string; agentId?: string; detail?: string } = {},
  ): boolean {
    let move = this.moveTo.get(state);
    if (!move) {
      const before = statesBefore(state);
      const from = before.map((s) => `'${s}'`).join(', ');
      // `active` is written only by a move into or out of the unfinished states, so that the steps of a build leave
      // the index of unfinished derivations alone (migrations.ts).
      const enters = !isTerminal(state) && before.some(isTerminal);
      const active = isTerminal(state) ? ', active = 0' : enters ? ', active = 1' : '';
      move = this.db.prepare(
        `UPDATE derivations SET state = ?, root_cause = ?, error = ?, updated_at = ?${active} WHERE drv_path = ? AND state IN (${from || 'NULL'})`,
      );
      this.moveTo.set(state, move);
    }
    if (move.run(state, extra.rootCause ?? null, extra.error ?? null, at, drvPath).changes !== 1) return false;
    this.s.event.run(drvPath, attempt, state, extra.agentId ?? null, extra.detail ?? extra.error ?? null, at);
    return true;
  }

  recordOutput(drvPath: string, name: string, path: string, narSize: number, closureSize: number): void {
    this.s.setOutputSizes.run(narSize, closureSize, drvPath, name);
    this.s.setOutputPath.run(path, drvPath, name, path);
  }

  insertAttempt(a: {
    leaseId: string;
    drvPath: string;
    attempt: number;
    agentId: string;
    now: number;
    expiresAt: number;
    logPath: string;
  }): void {
    this.s.insertAttempt.run(a.leaseId, a.drvPath, a.attempt, a.agentId, a.now, a.expiresAt, a.logPath);
    this.s.setAttempts.run(a.attempt, a.agentId, a.now, a.drvPath);
  }

  attempt(leaseId: string): AttemptRow | undefined {
    return this.s.getAttempt.get(leaseId) as AttemptRow | undefined;
  }

  openAttempts(): AttemptRow[] {
    return this.s.openAttempts.all() as AttemptRow[];
  }

  attemptsOf(drvPath: string): AttemptRow[] {
    return this.s.attemptsOf.all(drvPath) as AttemptRow[];
  }

  /** Where an attempt's log is stored (LogStore.pathFor at the time it was made); undefined for no such attempt. */
  logPathOf(drvPath: string, attempt: number): string | undefined {
    return (this.s.logPathOf.get(drvPath, attempt) as { log_path: string } | undefined)?.log_path;
  }

  acceptAttempt(leaseId: string): void {
    this.s.acceptAttempt.run(leaseId);
  }

  startAttempt(leaseId: string, at: number): void {
    this.s.startAttempt.run(at, leaseId);
  }

  /** Closes an attempt, with the bytes of its log stored by then. */
  finishAttempt(leaseId: string, state: AttemptState, error: string | null, at: number, logBytes: number): void {
    this.s.setAttemptState.run(state, error, at, logBytes, leaseId);
  }

  setLogBytes(leaseId: string, bytes: number): void {
    this.s.setLogBytes.run(bytes, leaseId);
  }

  /** Records that an open attempt is to be cancelled, and why (before the agent is told). */
  cancelAttempt(leaseId: string, reason: string): void {
    this.s.cancelAttempt.run(reason, leaseId);
  }

  /** Records that an attempt's log reached build_max_log_bytes and the rest was dropped. */
  markLogTruncated(leaseId: string): void {
    this.s.logTruncated.run(leaseId);
  }

  createRequest(source: string, roots: ReadonlyArray<{ attr: string; drvPath: string }>, now: number): number {
    const id = Number(this.s.insertRequest.run(now, source).lastInsertRowid);
    for (const r of roots) this.s.insertRoot.run(id, r.attr, r.drvPath);
    return id;
  }

  requestRoots(requestId: number): Array<{ attr: string; drvPath: string }> {
    return (this.s.rootsOf.all(requestId) as Array<{ attr: string; drv_path: string }>).map((r) => ({
      attr: r.attr,
      drvPath: r.drv_path,
    }));
  }
}
