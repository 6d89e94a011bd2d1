import { randomBytes } from 'node:crypto';
import type { Reply } from './endpoint-kit.js';

/**
 * GitHub's OAuth web flow as GitHub documents it ("Authorizing OAuth apps"): `GET /login/oauth/authorize` (where a
 * person would approve; here the browser is signed in as `signedIn` and approves at once, redirecting to
 * `redirect_uri` with `code` and `state`), `POST /login/oauth/access_token` (the code, once, for a token; failures are
 * `200 {"error": "bad_verification_code"}` as on GitHub), and `GET /user` with that token.
 */
export class OAuthStandIn {
  readonly clientId = `Iv1.${randomBytes(8).toString('hex')}`;
  readonly clientSecret = randomBytes(20).toString('hex');
  /** Who the browser is signed in to GitHub as; undefined: nobody (authorize answers 401). */
  signedIn: string | undefined;
  private readonly codes = new Map<string, { login: string; redirectUri: string }>();
  private readonly tokens = new Map<string, string>();
  private nextId = 9000;
  private readonly ids = new Map<string, number>();

  /** A reply for an OAuth request, or undefined for a request of the REST API. */
  handle(
    method: string,
    path: string,
    query: Record<string, string>,
    body: unknown,
    authorization?: string,
  ): Reply | undefined {
    if (method === 'GET' && path === '/login/oauth/authorize') return this.authorize(query);
    if (method === 'POST' && path === '/login/oauth/access_token') return this.accessToken(body, query);
    if (method === 'GET' && path === '/user') {
      const token = /^(?:token|bearer) (\S+)$/i.exec(authorization ?? '')?.[1];
      const login = token === undefined ? undefined : this.tokens.get(token);
      if (login === undefined)
        return token?.startsWith('gho_') ? { status: 401, body: { message: 'Bad credentials' } } : undefined;
      return { status: 200, body: this.user(login) };
    }
    return undefined;
  }

  private authorize(query: Record<string, string>): Reply {
    if (query.client_id !== this.clientId) return { status: 404, body: { message: 'unknown client_id' } };
    if (!query.redirect_uri) return { status: 400, body: { message: 'redirect_uri is required' } };
    if (this.signedIn === undefined) return { status: 401, body: { message: 'not signed in to GitHub' } };
    const code = randomBytes(10).toString('hex');
    this.codes.set(code, { login: this.signedIn, redirectUri: query.redirect_uri });
    const to = new URL(query.redirect_uri);
    to.searchParams.set('code', code);
    if (query.state !== undefined) to.searchParams.set('state', query.state);
    return { status: 302, headers: { location: to.toString() } };
  }

  private accessToken(body: unknown, query: Record<string, string>): Reply {
    const params = { ...query, ...((body ?? {}) as Record<string, string>) };
    const fail = (error: string, description: string): Reply => ({
      status: 200,
      body: { error, error_description: description, error_uri: 'https://docs.github.com/apps/oauth' },
    });
    if (params.client_id !== this.clientId || params.client_secret !== this.clientSecret) {
      return fail('incorrect_client_credentials', 'The client_id and/or client_secret passed are incorrect.');
    }
    const grant = params.code === undefined ? undefined : this.codes.get(params.code);
    if (!grant) return fail('bad_verification_code', 'The code passed is incorrect or expired.');
    this.codes.delete(params.code!);
    if (params.redirect_uri !== undefined && params.redirect_uri !== grant.redirectUri) {
      return fail(
        'redirect_uri_mismatch',
        'The redirect_uri MUST match the registered callback URL for this application.',
      );
    }
    const token = `gho_${randomBytes(18).toString('hex')}`;
    this.tokens.set(token, grant.login);
    return { status: 200, body: { access_token: token, token_type: 'bearer', scope: '' } };
  }

  private user(login: string): Record<string, unknown> {
    let id = this.ids.get(login);
    if (id === undefined) this.ids.set(login, (id = this.nextId++));
    return {
      login,
      id,
      node_id: `U_${id}`,
      type: 'User',
      site_admin: false,
      name: login,
      html_url: `https://github.com/${login}`,
    };
  }
}
