import { generateKeyPairSync } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inspect } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseCredentialFile, resolveCredentials, type CredentialSource } from './credentials.js';
import { GitHubCredentialsError } from './errors.js';

// GitHub hands out PKCS#1 RSA keys ("BEGIN RSA PRIVATE KEY"); PKCS#8 works as well.
const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const KEY = rsa.privateKey.export({ type: 'pkcs1', format: 'pem' }) as string;
const PKCS8_KEY = rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
const EC_KEY = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({
  type: 'pkcs8',
  format: 'pem',
}) as string;
/** A line from the middle of the key: no message may ever contain it. */
const KEY_FRAGMENT = KEY.split('\n')[5]!;

const ENV_SOURCE: CredentialSource = {
  kind: 'env',
  appIdVar: 'GITHUB_APP_ID',
  privateKeyVar: 'GITHUB_APP_PRIVATE_KEY',
};

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-credentials-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** The error resolveCredentials throws, checked to name the app and to leak nothing of the key. */
function failure(source: CredentialSource, env: NodeJS.ProcessEnv = {}): GitHubCredentialsError {
  try {
    resolveCredentials(source, env, dir, 'main-app');
  } catch (err) {
    expect(err).toBeInstanceOf(GitHubCredentialsError);
    const e = err as GitHubCredentialsError;
    expect(e.code).toBe('EKACI_ERR_GITHUB_CREDENTIALS');
    expect(e.message).toContain('GitHub App main-app');
    expect(e.message).not.toContain(KEY_FRAGMENT);
    return e;
  }
  throw new Error('resolveCredentials succeeded');
}

describe('GitHub App credentials', () => {
  describe('from environment variables', () => {
    it('reads GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY', () => {
      const c = resolveCredentials(ENV_SOURCE, { GITHUB_APP_ID: '12345', GITHUB_APP_PRIVATE_KEY: KEY }, dir);
      expect(c).toEqual({ appId: 12345, privateKey: KEY });
    });

    it('reads the variables the configuration names', () => {
      const source: CredentialSource = { kind: 'env', appIdVar: 'ID', privateKeyVar: 'PEM' };
      expect(resolveCredentials(source, { ID: '7', PEM: KEY }, dir)).toEqual({ appId: 7, privateKey: KEY });
    });

    it('accepts a key whose newlines are written as \\n, as one-line variables carry it', () => {
      const oneLine = KEY.trim().replace(/\n/g, '\\n');
      const c = resolveCredentials(ENV_SOURCE, { GITHUB_APP_ID: '1', GITHUB_APP_PRIVATE_KEY: oneLine }, dir);
      expect(c.privateKey).toBe(KEY);
    });

    it('accepts a PKCS#8 RSA key', () => {
      const c = resolveCredentials(ENV_SOURCE, { GITHUB_APP_ID: '1', GITHUB_APP_PRIVATE_KEY: PKCS8_KEY }, dir);
      expect(c.privateKey).toBe(PKCS8_KEY);
    });

    it('names the missing variable', () => {
      const e = failure(ENV_SOURCE, { GITHUB_APP_ID: '1' });
      expect(e.message).toContain('environment variables GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY');
      expect(e.message).toContain('GITHUB_APP_PRIVATE_KEY is missing');
    });

    it('refuses an app id that is not a positive integer without repeating it', () => {
      // The classic slip: the key pasted into the id's variable. Quoting the value would print the key.
      const e = failure(ENV_SOURCE, { GITHUB_APP_ID: KEY, GITHUB_APP_PRIVATE_KEY: KEY });
      expect(e.message).toContain('GITHUB_APP_ID is not a GitHub App id');
      expect(failure(ENV_SOURCE, { GITHUB_APP_ID: '0', GITHUB_APP_PRIVATE_KEY: KEY }).message).toContain('not a');
    });

    it('refuses a key that is not a PEM, without quoting it', () => {
      const e = failure(ENV_SOURCE, { GITHUB_APP_ID: '1', GITHUB_APP_PRIVATE_KEY: `x${KEY_FRAGMENT}` });
      expect(e.message).toContain('GITHUB_APP_PRIVATE_KEY is not a PEM private key');
    });

    it('refuses a PEM that does not decode to a key, without quoting it', () => {
      const lines = KEY.trim().split('\n');
      const truncated = [...lines.slice(0, 8), lines.at(-1)].join('\n');
      const e = failure(ENV_SOURCE, { GITHUB_APP_ID: '1', GITHUB_APP_PRIVATE_KEY: truncated });
      expect(e.message).toContain('not a usable private key');
    });

    it('refuses a key that is not RSA, since GitHub signs app tokens with RS256', () => {
      const e = failure(ENV_SOURCE, { GITHUB_APP_ID: '1', GITHUB_APP_PRIVATE_KEY: EC_KEY });
      expect(e.message).toContain('is a ec key; GitHub Apps use RSA keys');
    });
  });

  describe('from a file', () => {
    it('reads a JSON object, the app id as a number or a string', async () => {
      await writeFile(join(dir, 'app.json'), JSON.stringify({ GITHUB_APP_ID: 42, GITHUB_APP_PRIVATE_KEY: KEY }));
      const c = resolveCredentials({ kind: 'file', path: join(dir, 'app.json') }, {}, '/');
      expect(c).toEqual({ appId: 42, privateKey: KEY });
    });

    it('reads KEY=VALUE lines with comments, export and a multi-line quoted key, relative to the base directory', async () => {
      const text = `# the production app\nexport GITHUB_APP_ID=43\n\nGITHUB_APP_PRIVATE_KEY="${KEY.trim()}"  # downloaded\n`;
      await writeFile(join(dir, 'app.env'), text);
      expect(resolveCredentials({ kind: 'file', path: 'app.env' }, {}, dir)).toEqual({ appId: 43, privateKey: KEY });
    });

    it('reads a key written with \\n escapes inside double quotes, and literally inside single quotes', async () => {
      const escaped = KEY.trim().replace(/\n/g, '\\n');
      await writeFile(join(dir, 'escaped.env'), `GITHUB_APP_ID=1\nGITHUB_APP_PRIVATE_KEY="${escaped}"\n`);
      await writeFile(join(dir, 'single.env'), `GITHUB_APP_ID=1\nGITHUB_APP_PRIVATE_KEY='${KEY}'\n`);
      expect(resolveCredentials({ kind: 'file', path: 'escaped.env' }, {}, dir).privateKey).toBe(KEY);
      expect(resolveCredentials({ kind: 'file', path: 'single.env' }, {}, dir).privateKey).toBe(KEY);
    });

    it('names the file it cannot read', () => {
      const e = failure({ kind: 'file', path: 'absent.env' });
      expect(e.message).toContain(`credentials file ${join(dir, 'absent.env')}: cannot read`);
      expect(e.message).toContain('ENOENT');
    });

    it('names the value the file lacks', async () => {
      await writeFile(join(dir, 'no-key.env'), 'GITHUB_APP_ID=1\n');
      expect(failure({ kind: 'file', path: 'no-key.env' }).message).toContain('GITHUB_APP_PRIVATE_KEY is missing');
    });

    it('points at a malformed line by number, not by content', async () => {
      await writeFile(join(dir, 'bad.env'), `GITHUB_APP_ID=1\n${KEY_FRAGMENT}\n`);
      expect(failure({ kind: 'file', path: 'bad.env' }).message).toContain('line 2 is not KEY=VALUE');
    });

    it('refuses an unterminated quoted value', async () => {
      await writeFile(join(dir, 'open.env'), `GITHUB_APP_ID=1\nGITHUB_APP_PRIVATE_KEY="${KEY}`);
      expect(failure({ kind: 'file', path: 'open.env' }).message).toContain(
        'line 2: the value of GITHUB_APP_PRIVATE_KEY has no closing "',
      );
    });

    it('refuses broken JSON without echoing it', async () => {
      await writeFile(join(dir, 'broken.json'), `{"GITHUB_APP_PRIVATE_KEY": "${KEY_FRAGMENT}`);
      expect(failure({ kind: 'file', path: 'broken.json' }).message).toContain('starts with "{" but is not valid');
    });
  });

  describe('from a systemd credential', () => {
    it('reads $CREDENTIALS_DIRECTORY/NAME in the file formats', async () => {
      await writeFile(join(dir, 'ekaci-github'), `GITHUB_APP_ID=44\nGITHUB_APP_PRIVATE_KEY="${KEY}"\n`);
      const source: CredentialSource = { kind: 'systemd-credential', name: 'ekaci-github' };
      expect(resolveCredentials(source, { CREDENTIALS_DIRECTORY: dir }, '/')).toEqual({ appId: 44, privateKey: KEY });
    });

    it('explains LoadCredential= when CREDENTIALS_DIRECTORY is unset', () => {
      const e = failure({ kind: 'systemd-credential', name: 'ekaci-github' });
      expect(e.message).toContain('systemd credential ekaci-github: CREDENTIALS_DIRECTORY is not set');
      expect(e.message).toContain('LoadCredential=ekaci-github:');
    });

    it('refuses a name that would leave the credentials directory', () => {
      const e = failure({ kind: 'systemd-credential', name: '../app.env' }, { CREDENTIALS_DIRECTORY: dir });
      expect(e.message).toContain('credential name "../app.env" is not a plain file name');
    });
  });

  describe("from GitHub's .pem download", () => {
    it('takes the app id from the named variable and the key from the file', async () => {
      await writeFile(join(dir, 'app.private-key.pem'), KEY);
      const source: CredentialSource = { kind: 'github-app-key-file', appIdEnv: 'APP', keyFile: 'app.private-key.pem' };
      expect(resolveCredentials(source, { APP: '45' }, dir)).toEqual({ appId: 45, privateKey: KEY });
    });

    it('names the variable and the file', () => {
      const source: CredentialSource = { kind: 'github-app-key-file', appIdEnv: 'APP', keyFile: '/nonexistent.pem' };
      const e = failure(source, { APP: '45' });
      expect(e.message).toContain('app id from APP, key file /nonexistent.pem: cannot read /nonexistent.pem');
      expect(failure({ ...source, keyFile: join(dir, 'app.private-key.pem') }).message).toContain('APP is missing');
    });
  });

  it('keeps the key out of JSON and inspect output', () => {
    const c = resolveCredentials(ENV_SOURCE, { GITHUB_APP_ID: '1', GITHUB_APP_PRIVATE_KEY: KEY }, dir);
    expect(JSON.stringify({ c })).toBe('{"c":{"appId":1,"privateKey":"[redacted]"}}');
    expect(inspect(c)).not.toContain(KEY_FRAGMENT);
    expect(c.privateKey).toBe(KEY);
  });

  it('parses credential files on their own, for tools that check them', () => {
    expect([...parseCredentialFile('A=1\nB = two words \n')]).toEqual([
      ['A', '1'],
      ['B', 'two words'],
    ]);
    expect(() => parseCredentialFile('[1, 2]')).toThrow(GitHubCredentialsError);
  });
});
