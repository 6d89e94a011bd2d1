import { randomBytes } from 'node:crypto';
import Router, { type RouterContext } from '@koa/router';
import { exchangeWebFlowCode, getWebFlowAuthorizationUrl } from '@octokit/oauth-methods';
import { request } from '@octokit/request';
import type { Logger } from '../../common/logging.js';
import { SESSION_COOKIE, STATE_COOKIE, type Sessions } from '../access/sessions.js';
import type { AuditLog } from '../audit-log.js';
import type { OAuthOptions } from '../config.js';

// A login must come back from GitHub within this time.
const STATE_MAX_AGE_MS = 10 * 60_000;

export interface AuthSources {
  oauth: OAuthOptions;
  sessions: Sessions;
  audit: AuditLog;
  logger: Logger;
}

/**
 * GitHub login for the web UI (OAuth web flow): `/auth/login` sends the browser to GitHub with a random `state`, kept
 * in a signed `HttpOnly` cookie; `/auth/callback` checks it, exchanges the code for a token, asks GitHub who the user
 * is, and sets the session cookie (`HttpOnly`, `SameSite=Lax`, `Secure` over HTTPS). The user's token is not kept:
 * what a user may do is asked of GitHub through the App (see AccessControl.mayActOn). `/auth/logout` ends it.
 */
export function authRouter(sources: AuthSources): Router {
  const { oauth, sessions } = sources;
  const github = request.defaults({ baseUrl: oauth.apiUrl });
  const secure = oauth.redirectUrl.startsWith('https:');
  const cookie = (ctx: RouterContext, name: string, value: string | null, maxAge: number): void => {
    // Behind a TLS-terminating proxy the request itself is plain HTTP; the browser's side is what counts.
    ctx.cookies.secure = secure;
    ctx.cookies.set(name, value, { httpOnly: true, sameSite: 'lax', secure, maxAge, path: '/', overwrite: true });
  };
  const router = new Router();

  router.get('/auth/login', (ctx) => {
    const back = typeof ctx.query.return === 'string' && isLocalPath(ctx.query.return) ? ctx.query.return : '/';
    const state = randomBytes(16).toString('hex');
    cookie(ctx, STATE_COOKIE, sessions.sign(`${state}|${back}`), STATE_MAX_AGE_MS);
    const { url } = getWebFlowAuthorizationUrl({
      clientType: 'oauth-app',
      clientId: oauth.clientId,
      redirectUrl: oauth.redirectUrl,
      state,
      scopes: [],
      request: github,
    });
    ctx.redirect(url);
  });

  router.get('/auth/callback', async (ctx) => {
    const signed = sessions.unsign(ctx.cookies.get(STATE_COOKIE));
    cookie(ctx, STATE_COOKIE, null, 0);
    const [expected, back = '/'] = signed?.split('|') ?? [];
    const { code, state } = ctx.query;
    if (typeof code !== 'string' || typeof state !== 'string' || expected === undefined || state !== expected) {
      ctx.status = 400;
      ctx.body = {
        error: {
          code: 'EKACI_ERR_AUTH',
          message: 'this login did not start here, or took too long (its state does not match): log in again',
        },
      };
      return;
    }
    let login: string;
    try {
      const { authentication } = await exchangeWebFlowCode({
        clientType: 'oauth-app',
        clientId: oauth.clientId,
        clientSecret: oauth.clientSecret,
        code,
        redirectUrl: oauth.redirectUrl,
        request: github,
      });
      const user = await github('GET /user', { headers: { authorization: `token ${authentication.token}` } });
      login = user.data.login;
    } catch (err) {
      sources.logger.warn({ err: (err as Error).message }, 'GitHub login failed');
      ctx.status = 502;
      ctx.body = {
        error: { code: 'EKACI_ERR_AUTH', message: `GitHub did not confirm the login: ${(err as Error).message}` },
      };
      return;
    }
    cookie(ctx, SESSION_COOKIE, sessions.issue(login), oauth.sessionSeconds * 1000);
    sources.audit.record(`github:${login}`, 'user.login', {});
    ctx.redirect(back);
  });

  router.post('/auth/logout', (ctx) => {
    cookie(ctx, SESSION_COOKIE, null, 0);
    ctx.status = 204;
  });
  return router;
}

/** A path on this site (`/reviews?…`), never another site (`//evil.example`, `https://…`). */
function isLocalPath(p: string): boolean {
  return p.startsWith('/') && !p.startsWith('//') && !p.startsWith('/\\') && !/[\r\n]/.test(p);
}
