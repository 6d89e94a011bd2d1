import { randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import Database from 'better-sqlite3';
import { distFile, freePort, killHost, mountNamespaceOf, Watched } from './processes.js';

/**
 * `ekaci-coordinator` as an operator runs it: its own process, a TOML file, a data directory that outlives it. The
 * suite kills it (`kill -9`) and starts it again on the same directory and ports; agents keep dialling the same
 * address. With `tmpfsBytes` its data directory is a tmpfs of that size in a mount namespace of its own, so that a
 * test can fill it.
 */
export interface CoordinatorSetup {
  dir: string;
  /** Agent names; each gets a token from the configuration. */
  agents: string[];
  leaseTtlSeconds: number;
  /** Where both ports listen (a veth address for partition tests). */
  address?: string;
  /** Top-level TOML keys besides the suite's own (`build_max_log_bytes`, …). */
  extra?: Record<string, number | string | boolean>;
  tmpfsBytes?: number;
  logLevel?: string;
}

export interface RequestStatus {
  settled: boolean;
  builds: Array<{
    attr: string;
    drvPath: string;
    state: string;
    attempts: number;
    agent: string | null;
    error: string | null;
  }>;
}

export interface AttemptStatus {
  lease_id: string;
  attempt: number;
  agent_id: string;
  state: string;
  error: string | null;
  log_bytes: number;
}

export interface DerivationStatus {
  derivation: { state: string; attempts: number; error: string | null } | undefined;
  attempts: AttemptStatus[];
}

export class CoordinatorProcess {
  readonly dataDir: string;
  readonly configFile: string;
  readonly tokens = new Map<string, string>();
  readonly apiToken = `ekaci-faults-${randomBytes(12).toString('hex')}`;
  readonly address: string;
  httpPort = 0;
  grpcPort = 0;
  /** Every process this coordinator has been, in order: kills and restarts. */
  readonly incarnations: Watched[] = [];
  /** The private mount namespaces of its tmpfs, one per process. */
  private readonly namespaces = new Set<string>();

  constructor(private readonly setup: CoordinatorSetup) {
    this.dataDir = join(setup.dir, 'data');
    this.configFile = join(setup.dir, 'coordinator.toml');
    this.address = setup.address ?? '127.0.0.1';
    mkdirSync(this.dataDir, { recursive: true });
    for (const name of setup.agents) this.tokens.set(name, `ekaci-agent-${randomBytes(12).toString('hex')}`);
  }

  get current(): Watched {
    const c = this.incarnations.at(-1);
    if (!c) throw new Error('the coordinator was never started');
    return c;
  }

  get grpcTarget(): string {
    return `${this.address}:${this.grpcPort}`;
  }

  get baseUrl(): string {
    return `http://${this.address}:${this.httpPort}`;
  }

  /** A path of its data directory as the coordinator sees it (through its mount namespace when on a tmpfs). */
  dataPath(...parts: string[]): string {
    const base = this.setup.tmpfsBytes ? join(`/proc/${this.current.pid}/root`, this.dataDir) : this.dataDir;
    return join(base, ...parts);
  }

  /** Chooses the ports and writes the configuration: agents can be given the address before the first start. */
  async prepare(): Promise<void> {
    if (this.httpPort !== 0) return;
    this.httpPort = await freePort();
    this.grpcPort = await freePort();
    this.writeConfig();
  }

  /** Starts a process on the data directory and waits until it serves. */
  async start(): Promise<Watched> {
    await this.prepare();
    const main = await distFile('cli', 'ekaci-coordinator.js');
    const node = [process.execPath, main, '--config', this.configFile];
    const env = { PATH: process.env.PATH, HOME: process.env.HOME, EKACI_LOG_LEVEL: this.setup.logLevel ?? 'info' };
    const name = `coordinator#${this.incarnations.length + 1}`;
    const watched = this.setup.tmpfsBytes
      ? new Watched(
          name,
          'unshare',
          [
            ...['--mount', '--propagation', 'private', 'sh', '-c'],
            'mount -t tmpfs -o "size=$0" tmpfs "$1" && shift && exec "$@"',
            String(this.setup.tmpfsBytes),
            this.dataDir,
            ...node,
          ],
          env,
        )
      : new Watched(name, node[0]!, node.slice(1), env);
    this.incarnations.push(watched);
    await watched.waitForLine('the coordinator serves', (l) => l.msg === 'coordinator running');
    const namespace = this.setup.tmpfsBytes ? mountNamespaceOf(watched.pid) : undefined;
    if (namespace !== undefined) this.namespaces.add(namespace);
    return watched;
  }

  /** `kill -9` of the coordinator (its whole process group: a `nix copy` it started dies with it). */
  async kill9(): Promise<void> {
    const c = this.current;
    c.killGroup('SIGKILL');
    await c.exited;
  }

  /** SIGTERM, as systemd stops it; SIGKILL if it is still running long after. */
  async stop(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    const c = this.current;
    if (!c.running) return c.exited;
    c.signal('SIGTERM');
    const exit = await c.exitWithin(60_000);
    if (exit) return exit;
    c.killGroup('SIGKILL');
    throw new Error(`the coordinator did not stop within a minute of SIGTERM:\n${c.tail()}`);
  }

  /** Ends every process the suite started for this coordinator. */
  cleanUp(): void {
    for (const c of this.incarnations) c.killGroup('SIGKILL');
    killHost(
      this.incarnations.filter((c) => c.running).map((c) => c.pid),
      this.namespaces,
      this.dataDir,
    );
  }

  async api<T>(path: string, init: RequestInit = {}): Promise<T> {
    const res = await fetch(`${this.baseUrl}${path}`, {
      ...init,
      headers: { authorization: `Bearer ${this.apiToken}`, 'content-type': 'application/json', ...init.headers },
    });
    if (!res.ok) throw new Error(`${init.method ?? 'GET'} ${path}: ${res.status} ${await res.text()}`);
    return (await res.json()) as T;
  }

  /** POST /api/v1/builds: the derivations are roots of one request; returns its id. */
  async submit(drvs: readonly string[]): Promise<number> {
    const r = await this.api<{ id: number }>('/api/v1/builds', { method: 'POST', body: JSON.stringify({ drvs }) });
    return r.id;
  }

  request(id: number): Promise<RequestStatus> {
    return this.api<RequestStatus>(`/api/v1/requests/${id}`);
  }

  /** GET /api/v1/derivations/…: the derivation's row and its attempts, oldest first. */
  derivation(drvPath: string): Promise<DerivationStatus> {
    return this.api<DerivationStatus>(`/api/v1/derivations/${basename(drvPath)}`);
  }

  /** The stored log of one attempt, as the coordinator has it now ('' before the first byte). */
  log(drvPath: string, attempt: number): string {
    try {
      const name = basename(drvPath);
      return readFileSync(this.dataPath('logs', name.slice(0, 2), `${name}.${attempt}.log`), 'utf8');
    } catch {
      return '';
    }
  }

  /** `/readyz` as a load balancer sees it. */
  async readyz(): Promise<{ status: number; body: unknown }> {
    const res = await fetch(`${this.baseUrl}/readyz`);
    const text = await res.text();
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      // plain text
    }
    return { status: res.status, body };
  }

  /** The database, read-only, for audits after the coordinator stopped (or beside it: SQLite's WAL allows it). */
  openDatabase(): Database.Database {
    if (!this.setup.tmpfsBytes)
      return new Database(this.dataPath('ekaci.sqlite'), { readonly: true, fileMustExist: true });
    // SQLite cannot open a database through /proc/PID/root (the tmpfs lives in the coordinator's namespace): a copy
    // of the file and its write-ahead log, taken now, is read instead.
    const copy = mkdtempSync(join(tmpdir(), 'ekaci-faults-db-'));
    for (const f of ['ekaci.sqlite', 'ekaci.sqlite-wal']) {
      if (existsSync(this.dataPath(f))) copyFileSync(this.dataPath(f), join(copy, f));
    }
    return new Database(join(copy, 'ekaci.sqlite'), { fileMustExist: true });
  }

  private writeConfig(): void {
    const s = this.setup;
    const toml = (v: number | string | boolean): string => (typeof v === 'string' ? JSON.stringify(v) : String(v));
    const lines = [
      `data_dir = ${toml(this.dataDir)}`,
      `lease_ttl_seconds = ${s.leaseTtlSeconds}`,
      // Agents come back after every kill and partition: nothing may be declared unbuildable meanwhile.
      'unbuildable_grace_seconds = 3600',
      ...Object.entries(s.extra ?? {}).map(([k, v]) => `${k} = ${toml(v)}`),
      '[web]',
      `address = ${toml(this.address)}`,
      `port = ${this.httpPort}`,
      '[grpc]',
      `address = ${toml(this.address)}`,
      `port = ${this.grpcPort}`,
      '[local_agent]',
      'enabled = false',
      ...[...this.tokens].flatMap(([name, token]) => ['[[agent_tokens]]', `name = "${name}"`, `token = "${token}"`]),
      '[[api_tokens]]',
      'name = "faults"',
      `token = "${this.apiToken}"`,
    ];
    writeFileSync(this.configFile, `${lines.join('\n')}\n`, { mode: 0o600 });
  }
}
