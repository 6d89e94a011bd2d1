import type { Db } from './db/database.js';

/** Privileged actions (tokens created or revoked, agents refused) are written here, never only to the log. */
export class AuditLog {
  constructor(private readonly db: Db) {}

  record(actor: string, action: string, detail: Record<string, unknown>): void {
    this.db
      .prepare('INSERT INTO audit_log (at, actor, action, detail) VALUES (?, ?, ?, ?)')
      .run(Date.now(), actor, action, JSON.stringify(detail));
  }

  recent(limit = 100): Array<{ at: number; actor: string; action: string; detail: string }> {
    return this.db
      .prepare('SELECT at, actor, action, detail FROM audit_log ORDER BY id DESC LIMIT ?')
      .all(limit) as Array<{
      at: number;
      actor: string;
      action: string;
      detail: string;
    }>;
  }
}
