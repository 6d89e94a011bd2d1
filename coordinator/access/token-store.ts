import { createHash, randomBytes } from 'node:crypto';
import { ConfigError } from '../../common/errors.js';
import type { Db } from '../db/database.js';
import type { AuditLog } from '../audit-log.js';

// 32 random bytes: guessing is hopeless, and the hex form fits comfortably in a header and a netrc file.
const TOKEN_BYTES = 32;
const TOKEN_PREFIX = 'ekaci_';

/** Agent tokens prove an agent's identity; API tokens a person's or program's, for the HTTP API. */
export type TokenKind = 'agent' | 'api';

const TABLES: Record<TokenKind, string> = { agent: 'agent_tokens', api: 'api_tokens' };

export interface TokenIdentity {
  name: string;
}

/**
 * Tokens of one kind. Tokens from the configuration (and ephemeral ones, for agents this process starts) live in
 * memory; tokens made with `agent-token create` / `api-token create` live in the database as SHA-256 hashes (the
 * token itself is shown once). Revocation is seen by a running coordinator through `refresh()`, which it calls
 * periodically.
 */
export class TokenStore {
  private readonly configured = new Map<string, string>(); // hash -> name
  private stored = new Map<string, string>(); // hash -> name, non-revoked rows only
  private readonly table: string;

  constructor(
    private readonly db: Db,
    private readonly audit: AuditLog,
    configTokens: ReadonlyArray<{ name: string; token: string }>,
    readonly kind: TokenKind = 'agent',
  ) {
    this.table = TABLES[kind];
    for (const t of configTokens) this.configured.set(hashToken(t.token), t.name);
    this.refresh();
  }

  /** Re-reads the database's tokens; returns the names whose tokens are no longer valid. */
  refresh(): string[] {
    const rows = this.db.prepare(`SELECT name, token_hash FROM ${this.table} WHERE revoked_at IS NULL`).all() as Array<{
      name: string;
      token_hash: string;
    }>;
    const next = new Map(rows.map((r) => [r.token_hash, r.name]));
    const gone = [...this.stored].filter(([hash]) => !next.has(hash)).map(([, name]) => name);
    this.stored = next;
    return gone;
  }

  /** The identity behind a presented token, or undefined. Compares hashes in constant time. */
  verify(token: string | undefined): TokenIdentity | undefined {
    if (!token) return undefined;
    // Looked up by the token's SHA-256: what the time of a lookup could tell is about the hash of what was sent,
    // which says nothing about a valid token (a fleet's uploads verify a token per request; comparing each known
    // hash in turn cost a share of the coordinator's time).
    const hash = hashToken(token);
    const found = this.configured.get(hash) ?? this.stored.get(hash);
    return found === undefined ? undefined : { name: found };
  }

  /** A token held only in this process's memory (the embedded system's own agents); gone when it exits. */
  ephemeral(name: string): string {
    const token = generateToken();
    this.configured.set(hashToken(token), name);
    return token;
  }

  create(name: string, actor: string): string {
    if (!/^[A-Za-z0-9._-]+$/.test(name))
      throw new ConfigError(`token name "${name}": letters, digits, ".", "_", "-" only`);
    const exists = this.db.prepare(`SELECT revoked_at FROM ${this.table} WHERE name = ?`).get(name) as
      { revoked_at: number | null } | undefined;
    if (exists && exists.revoked_at === null) {
      throw new ConfigError(`an ${this.kind} token named "${name}" exists already; revoke it first`);
    }
    const token = generateToken();
    this.db
      .prepare(
        `INSERT INTO ${this.table} (name, token_hash, created_at, revoked_at) VALUES (?, ?, ?, NULL) ` +
          'ON CONFLICT(name) DO UPDATE SET token_hash = excluded.token_hash, created_at = excluded.created_at, revoked_at = NULL',
      )
      .run(name, hashToken(token), Date.now());
    this.audit.record(actor, `${this.kind}-token.create`, { name });
    this.refresh();
    return token;
  }

  revoke(name: string, actor: string): boolean {
    const r = this.db
      .prepare(`UPDATE ${this.table} SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL`)
      .run(Date.now(), name);
    if (r.changes > 0) this.audit.record(actor, `${this.kind}-token.revoke`, { name });
    this.refresh();
    return r.changes > 0;
  }

  list(): Array<{ name: string; createdAt: number; revokedAt: number | null }> {
    return (
      this.db.prepare(`SELECT name, created_at, revoked_at FROM ${this.table} ORDER BY name`).all() as Array<{
        name: string;
        created_at: number;
        revoked_at: number | null;
      }>
    ).map((r) => ({ name: r.name, createdAt: r.created_at, revokedAt: r.revoked_at }));
  }
}

export function generateToken(): string {
  return TOKEN_PREFIX + randomBytes(TOKEN_BYTES).toString('hex');
}

function hashToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}
