import type { Logger } from '../../common/logging.js';
import type { GitHubAppOptions } from '../config.js';
import { type GitHubAppClientOptions, GitHubAppClient, type Octokit } from './app-client.js';
import { GitHubApiError } from './errors.js';
import { isAllowed } from './permissions.js';
import type { RunStore } from './run-store.js';

/** An installation and the configured app it belongs to. */
export interface Served {
  app: GitHubAppOptions;
  client: GitHubAppClient;
  installationId: number;
}

/**
 * The configured GitHub Apps, and which one serves each installation. Webhooks from all apps arrive at one
 * endpoint; an installation id is matched to its app the first time it is seen (by asking each app) and
 * remembered in the database.
 */
export class AppRegistry {
  private readonly clients: Array<{ app: GitHubAppOptions; client: GitHubAppClient }>;

  constructor(
    apps: readonly GitHubAppOptions[],
    private readonly runs: RunStore,
    private readonly logger: Logger,
    clientOptions: Partial<GitHubAppClientOptions> = {},
  ) {
    this.clients = apps.map((app) => ({
      app,
      client: new GitHubAppClient({
        id: app.id,
        credentials: app.credentials,
        credentialSource: app.credentialSource,
        apiUrl: app.apiUrl,
        logger,
        ...clientOptions,
      }),
    }));
  }

  /** The app serving an installation, or undefined when no configured app has it. */
  async served(installationId: number, repoFullName: string): Promise<Served | undefined> {
    const known = this.runs.installation(installationId);
    const match = known && this.clients.find((c) => c.app.id === known.app);
    if (match) return { ...match, installationId };
    const [owner = '', repo = ''] = repoFullName.split('/');
    // With one app there is nobody else to ask: the webhook came from it.
    if (this.clients.length === 1) {
      this.runs.upsertInstallation(installationId, this.clients[0]!.app.id, owner, false);
      return { ...this.clients[0]!, installationId };
    }
    for (const c of this.clients) {
      try {
        if ((await c.client.installationFor(owner, repo)) === installationId) {
          this.runs.upsertInstallation(installationId, c.app.id, owner, false);
          return { ...c, installationId };
        }
      } catch (err) {
        if (!(err instanceof GitHubApiError)) throw err;
        this.logger.warn({ app: c.app.id, err: err.message }, 'could not ask an app for its installation');
      }
    }
    return undefined;
  }

  /** Records an installation announced by an `installation` webhook, matched to an app as above. */
  async remember(installationId: number, account: string, repoFullName: string | undefined): Promise<void> {
    for (const c of this.clients) c.client.forgetInstallations();
    if (repoFullName) await this.served(installationId, repoFullName);
    else if (this.clients.length === 1)
      this.runs.upsertInstallation(installationId, this.clients[0]!.app.id, account, false);
  }

  forget(): void {
    for (const c of this.clients) c.client.forgetInstallations();
  }

  /** Whether the app's server-side permissions let it build this repository (and branch). */
  allowed(served: Served, repoFullName: string, branch?: string): boolean {
    return isAllowed(served.app.permissions, repoFullName, branch);
  }

  async octokit(served: Served): Promise<Octokit> {
    return served.client.octokit(served.installationId);
  }

  /** The client of an installation already matched to an app (runs resumed after a restart). */
  clientOf(installationId: number): GitHubAppClient | undefined {
    const known = this.runs.installation(installationId);
    return (known && this.clients.find((c) => c.app.id === known.app)?.client) ?? this.clients[0]?.client;
  }
}
