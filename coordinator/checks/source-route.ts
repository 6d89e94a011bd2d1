import { spawn } from 'node:child_process';
import Router from '@koa/router';
import type { AccessControl } from '../access/access-control.js';
import type { AuditLog } from '../audit-log.js';
import { baseGitEnv } from '../git/git-process.js';
import type { RequestState } from '../http/server.js';
import type { CheckManager } from './check-manager.js';

export interface SourceRouteOptions {
  access: AccessControl;
  checks: CheckManager;
  audit: AuditLog;
  /** The coordinator's bare mirror of a repository URL. */
  mirrorDir(cloneUrl: string): string;
}

/** The path (under the coordinator's HTTP root) where the holder of a check lease downloads its commit. */
export function checkSourcePath(leaseId: string): string {
  return `/agent/leases/${encodeURIComponent(leaseId)}/source.tar`;
}

/**
 * `GET /agent/leases/:leaseId/source.tar`: the commit a check lease runs on, as `git archive` makes it from the
 * coordinator's mirror (tracked files only, no `.git`, no credentials). Only the agent holding the lease now gets
 * it: agents never clone repositories themselves, and a token proves nothing about another agent's lease.
 */
export function checkSourceRouter(options: SourceRouteOptions): Router<RequestState> {
  const router = new Router<RequestState>();
  router.get('/leases/:leaseId/source.tar', (ctx) => {
    const principal = ctx.state.principal;
    const leaseId = String(ctx.params.leaseId);
    const source = options.checks.openLease(leaseId);
    if (!options.access.holdsLease(principal, source)) {
      const agent = principal.kind === 'agent' ? principal.name : undefined;
      if (agent !== undefined) options.audit.record(`agent:${agent}`, 'agent.source-refused', { leaseId });
      ctx.status = principal.kind === 'anonymous' ? 401 : 403;
      ctx.body = {
        error: {
          code: 'EKACI_ERR_AUTH',
          message:
            agent !== undefined
              ? `agent ${agent} holds no open check lease ${JSON.stringify(leaseId)}`
              : 'a check’s source is for the agent that holds its lease: send its agent token',
        },
      };
      return;
    }
    const git = spawn('git', ['archive', '--format=tar', source!.commit], {
      cwd: options.mirrorDir(source!.cloneUrl),
      env: baseGitEnv(process.env),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    git.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s.slice(0, 4096)));
    // A failed archive (a mirror that lost the commit) ends the body early; the agent sees a truncated tar and an
    // error from tar, and reports an infrastructure failure.
    git.on('close', (code) => {
      if (code !== 0) git.stdout.destroy(new Error(`git archive ${source!.commit} failed: ${stderr.trim()}`));
    });
    git.on('error', (err) => git.stdout.destroy(err));
    ctx.set('Content-Type', 'application/x-tar');
    ctx.body = git.stdout;
  });
  return router;
}
