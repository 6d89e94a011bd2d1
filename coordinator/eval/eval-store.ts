import { existsSync, lstatSync, mkdirSync, readFileSync } from 'node:fs';
import Database from 'better-sqlite3';
import { EvaluationError } from '../../common/errors.js';
import { NO_SUBSTITUTERS, lastLines, runNix } from '../../common/nix/cli.js';
import type { NixDaemonConnection } from '../../common/nix/daemon-client.js';
import {
  type Derivation,
  addDerivationStore,
  derivationReferences,
  inputsFirst,
  readStoreDerivation,
  walkMissing,
} from '../../common/nix/derivation.js';
import { narChunks } from '../../common/nix/nar.js';
import { isDrvPath, storePathName } from '../../common/nix/store-path.js';

// Paths per wopQueryValidPaths: one request, whatever the closure, would be one large message.
const VALID_QUERY_BATCH = 5000;

/** What `importDerivations` did: paths added to the Nix store, and paths it found there already. */
export interface ImportReport {
  added: number;
  present: number;
}

/**
 * The evaluation store: a Nix store of the coordinator's own (`local?root=<data dir>/eval-store`) that sandboxed
 * evaluators write `.drv` files and sources into directly, instead of through a nix-daemon. A daemon stores each
 * `.drv` in its own request (≈250 µs apiece on Nix 2.8, most of an evaluation of nixpkgs' size), while a review
 * only reads `.drv` files and builds a few of them: paths reach the Nix store when a build needs them
 * (`importDerivations`), not when they are evaluated. A commit evaluated again writes only its new `.drv` files, as
 * Nix finds the rest valid.
 *
 * Trust: the store is written by processes that evaluate repository code, so nothing read from it is taken on its
 * word. A `.drv` read by the coordinator is checked against its path (`readStoreDerivation`); a path imported into
 * the Nix store is handed to the daemon as content, the daemon computes its path, and a path that comes out
 * different is refused. The daemon's store never holds what the evaluation store merely claims.
 *
 * Lifecycle: `open` (registers the store with `readStoreDerivation`) → `close`. Evaluations root what they write in
 * the store's own state directory, under their commit's roots (see GcRoots); `collect` deletes what the commits no
 * longer kept left behind.
 */
export class EvalStore {
  private readonly unregister: () => void;

  private constructor(readonly root: string) {
    this.unregister = addDerivationStore(root);
  }

  static open(root: string): EvalStore {
    mkdirSync(root, { recursive: true });
    return new EvalStore(root);
  }

  /** Its state directory (its database, its GC roots). */
  get stateDir(): string {
    return `${this.root}/nix/var/nix`;
  }

  /**
   * Runs Nix's collector on the store: what no GC root (`directRegistrar(stateDir)`) nor running evaluator holds is
   * deleted. Throws EvaluationError with Nix's message when it fails.
   */
  async collect(): Promise<void> {
    const r = await runNix('nix-store', ['--store', this.uri, ...NO_SUBSTITUTERS, '--gc']);
    if (r.code !== 0) throw new EvaluationError(`collecting the evaluation store: ${lastLines(r.stderr, 3)}`);
  }

  /** The store's Nix URI, for `--store`. */
  get uri(): string {
    return `local?root=${this.root}`;
  }

  /** Whether the store holds a file at `storePath` (not whether Nix registered it: `importDerivations` checks). */
  holds(storePath: string): boolean {
    try {
      lstatSync(this.root + storePath);
      return true;
    } catch {
      return false;
    }
  }

  close(): void {
    this.unregister();
  }

  /**
   * Puts the `.drv` closures of `drvPaths` into the Nix store behind `daemon`, inputs first, with the sources they
   * name: every path of the closure that is not valid there and that this store holds. A valid path's closure is
   * valid (Nix keeps that invariant), so the walk stops at paths the Nix store has. Paths this store does not hold
   * are left to the Nix store (evaluated through a daemon, or built before). Throws EvaluationError, naming the
   * path, for content that does not match its path.
   */
  async importDerivations(drvPaths: readonly string[], daemon: NixDaemonConnection): Promise<ImportReport> {
    const missing = new Map<string, Derivation>();
    const sources = new Set<string>();
    let present = 0;
    await walkMissing(
      drvPaths.filter((p) => this.holds(p)),
      async (level) => {
        const valid = await validPaths(daemon, level);
        present += valid.size;
        return valid;
      },
      (p) => {
        if (!isDrvPath(p)) {
          sources.add(p);
          return [];
        }
        const d = readStoreDerivation(p);
        missing.set(p, d);
        return derivationReferences(d).filter((r) => this.holds(r));
      },
    );
    if (missing.size === 0 && sources.size === 0) return { added: 0, present };
    const infos = this.sourceInfos([...sources]);
    for (const p of orderSources(sources, infos)) await this.importSource(p, infos.get(p)!, daemon);
    for (const p of inputsFirst(missing.keys(), (q) => inputDrvsOf(missing.get(q)))) {
      await this.add(p, 'text:sha256', derivationReferences(missing.get(p)!), [readFileSync(this.root + p)], daemon);
    }
    return { added: missing.size + sources.size, present };
  }

  /** Content addresses and references of sources, as the store's database records them (checked when added). */
  private sourceInfos(paths: readonly string[]): Map<string, { ca: string; references: string[] }> {
    const out = new Map<string, { ca: string; references: string[] }>();
    if (paths.length === 0) return out;
    const dbPath = `${this.root}/nix/var/nix/db/db.sqlite`;
    if (!existsSync(dbPath)) throw new EvaluationError(`the evaluation store ${this.root} has no database`);
    const db = new Database(dbPath, { readonly: true, fileMustExist: true });
    try {
      const row = db.prepare<[string], { id: number; ca: string | null }>(
        'SELECT id, ca FROM ValidPaths WHERE path = ?',
      );
      const refs = db
        .prepare<[number], { path: string }>(
          'SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?',
        )
        .pluck();
      for (const p of paths) {
        const r = row.get(p);
        if (!r) throw new EvaluationError(`the evaluation store does not have ${p} registered`);
        out.set(p, { ca: r.ca ?? '', references: (refs.all(r.id) as unknown as string[]).filter((x) => x !== p) });
      }
    } finally {
      db.close();
    }
    return out;
  }

  /** A source (`./builder.sh`, `builtins.toFile`): its bytes as its content address says they were hashed. */
  private async importSource(
    p: string,
    info: { ca: string; references: readonly string[] },
    daemon: NixDaemonConnection,
  ): Promise<void> {
    const method = info.ca.slice(0, info.ca.lastIndexOf(':'));
    const file = this.root + p;
    if (method === 'text:sha256') {
      await this.add(p, method, info.references, [readFileSync(file)], daemon);
    } else if (method === 'fixed:r:sha256' && info.references.length === 0) {
      await this.add(p, method, [], narChunks(file), daemon);
    } else if (/^fixed:[a-z0-9]+$/.test(method) && method !== 'fixed:r' && info.references.length === 0) {
      await this.add(p, method, [], [readFileSync(file)], daemon);
    } else {
      throw new EvaluationError(`${p} in the evaluation store: cannot add a path with content address "${info.ca}"`);
    }
  }

  private async add(
    p: string,
    method: string,
    references: readonly string[],
    content: Iterable<Buffer>,
    daemon: NixDaemonConnection,
  ): Promise<void> {
    const stored = await daemon.addToStore(storePathName(p), method, references, content);
    if (stored !== p) {
      throw new EvaluationError(
        `${p} in the evaluation store does not match its content (as ${method}, the content is ${stored}): ` +
          'not imported',
      );
    }
  }
}

async function validPaths(daemon: NixDaemonConnection, paths: readonly string[]): Promise<Set<string>> {
  const out = new Set<string>();
  for (let i = 0; i < paths.length; i += VALID_QUERY_BATCH) {
    for (const p of await daemon.queryValidPaths(paths.slice(i, i + VALID_QUERY_BATCH))) out.add(p);
  }
  return out;
}

/** Sources that other sources refer to (a `builtins.toFile` naming another file) first. */
function orderSources(sources: ReadonlySet<string>, infos: ReadonlyMap<string, { references: string[] }>): string[] {
  const order: string[] = [];
  const done = new Set<string>();
  // Content-addressed references cannot form a cycle, and a source refers to few others: recursion is safe.
  const visit = (p: string): void => {
    if (done.has(p)) return;
    done.add(p);
    for (const r of infos.get(p)?.references ?? []) if (sources.has(r)) visit(r);
    order.push(p);
  };
  for (const p of sources) visit(p);
  return order;
}

function inputDrvsOf(d: Derivation | undefined): string[] | undefined {
  return d === undefined ? undefined : Object.keys(d.inputDrvs);
}
