import { spawn } from 'node:child_process';
import { signalGroup } from '../../common/process-tree.js';

/** Basic credentials for an http(s) repository (for GitHub: `x-access-token` and an installation token). */
export interface GitAuth {
  username: string;
  password: string;
}

export interface GitResult {
  stdout: string;
  stderr: string;
  code: number | null;
  timedOut: boolean;
}

export interface GitRunOptions {
  env: NodeJS.ProcessEnv;
  timeoutMs: number;
  cwd?: string;
  /** Written to git's standard input (`cat-file --batch`); without it, stdin is closed. */
  input?: string;
}

/**
 * Variables that point git at another repository, index or object store. Inherited from a parent that runs inside a
 * git hook (or a developer's shell), they would silently redirect every command away from the mirror.
 */
const REPOSITORY_LOCATING_VARIABLES = [
  'GIT_DIR',
  'GIT_WORK_TREE',
  'GIT_INDEX_FILE',
  'GIT_OBJECT_DIRECTORY',
  'GIT_ALTERNATE_OBJECT_DIRECTORIES',
  'GIT_COMMON_DIR',
  'GIT_NAMESPACE',
];

/** Environment variables the askpass helper reads; they exist only in the environment of one fetch. */
export const ASKPASS_USERNAME_VARIABLE = 'EKACI_GIT_USERNAME';
export const ASKPASS_PASSWORD_VARIABLE = 'EKACI_GIT_PASSWORD';

/**
 * The `GIT_ASKPASS` program. It holds no secret itself: git runs it with the prompt as `$1` once it has received a
 * 401, and it answers from variables that only that git process's environment holds (readable by the same user only,
 * unlike the argv that `-c http.extraHeader=…` would expose to everyone through `ps`). Curl then sends the credentials
 * only to the host that asked, never along a redirect.
 */
export const ASKPASS_SCRIPT = `#!/bin/sh
case "$1" in
  Username*) printf '%s\\n' "$${ASKPASS_USERNAME_VARIABLE}" ;;
  *) printf '%s\\n' "$${ASKPASS_PASSWORD_VARIABLE}" ;;
esac
`;

/** The environment every git command runs with: no prompts, stable English messages (they are parsed), no redirection. */
export function baseGitEnv(inherited: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...inherited, GIT_TERMINAL_PROMPT: '0', LC_ALL: 'C' };
  // An inherited askpass would prompt a desktop user, or answer with somebody else's credentials.
  for (const name of [...REPOSITORY_LOCATING_VARIABLES, 'GIT_ASKPASS', 'SSH_ASKPASS']) delete env[name];
  return env;
}

/**
 * `-c` options for a command that talks to a remote. Configured credential helpers are switched off so that git never
 * stores a token (e.g. `credential.helper=store` in the operator's ~/.gitconfig) nor answers with a stored one.
 */
export function remoteConfig(auth: GitAuth | undefined): string[] {
  const config = ['credential.helper='];
  if (!auth) config.push('core.askPass=');
  return config.flatMap((c) => ['-c', c]);
}

/** The environment of one fetch: with credentials, the askpass helper and the two variables it answers from. */
export function fetchEnv(base: NodeJS.ProcessEnv, askpass: string, auth: GitAuth | undefined): NodeJS.ProcessEnv {
  if (!auth) return base;
  return {
    ...base,
    GIT_ASKPASS: askpass,
    [ASKPASS_USERNAME_VARIABLE]: auth.username,
    [ASKPASS_PASSWORD_VARIABLE]: auth.password,
  };
}

/** Replaces every credential (and the Basic header built from it) in text meant for logs and error messages. */
export function redact(text: string, auth: GitAuth | undefined): string {
  if (!auth) return text;
  const basic = Buffer.from(`${auth.username}:${auth.password}`).toString('base64');
  let out = text;
  for (const secret of [basic, auth.password]) if (secret.length > 0) out = out.split(secret).join('***');
  return out;
}

/**
 * Runs git with an argument array (never a shell) and collects its output. Git runs in a process group of its own so
 * that a timeout also stops the helpers it spawns (`git-remote-https`, `index-pack`, `upload-pack`).
 */
export function runGit(args: string[], options: GitRunOptions): Promise<GitResult> {
  return new Promise((resolve, reject) => {
    const child = spawn('git', args, {
      env: options.env,
      cwd: options.cwd,
      stdio: 'pipe',
      detached: true,
    });
    // Closed at once without input (git then reads end-of-file). git may exit before reading it all (a bad
    // argument): that is its answer, not a reason to crash.
    child.stdin.on('error', () => undefined);
    child.stdin.end(options.input);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      if (child.pid !== undefined) signalGroup(child.pid, 'SIGKILL');
    }, options.timeoutMs);
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        code,
        timedOut,
      });
    });
  });
}

/** Why git failed, for a message: its `fatal:`/`error:` lines (on one line), or else the last lines of stderr. */
export function gitReason(stderr: string): string {
  const lines = stderr.trimEnd().split('\n');
  const reasons = lines.filter((line) => /^(fatal|error):/.test(line));
  return (reasons.length > 0 ? reasons : lines.slice(-3)).join(' ').trim();
}
