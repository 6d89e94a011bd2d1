import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, EkaciError } from '../../common/errors.js';
import { compileCoordinatorConfig, loadCoordinatorConfig } from '../config.js';
import { HOOK_VARIABLES, type HookVariable, expandCommand, expandTemplate } from './hook-config.js';

const dir = mkdtempSync(join(tmpdir(), 'ekaci-hook-config-'));

const hook = (extra: Record<string, unknown> = {}) => ({
  id: 'notify',
  command: ['/bin/true'],
  permissions: { allow_all: true },
  ...extra,
});

function startupError(raw: unknown, env: NodeJS.ProcessEnv = {}): EkaciError {
  try {
    compileCoordinatorConfig(raw, 'test.toml', env, dir);
  } catch (err) {
    expect(err).toBeInstanceOf(EkaciError);
    return err as EkaciError;
  }
  throw new Error('the configuration compiled');
}

describe('hook configuration', () => {
  it("loads upstream's [security] hook keys, which used to be unknown keys, and defaults them", () => {
    const file = join(dir, 'upstream.toml');
    writeFileSync(file, '[security]\nmax_hook_timeout_seconds = 300\naudit_hooks = false\n');
    expect(loadCoordinatorConfig(file, {}).hooks).toEqual({ hooks: [], maxTimeoutSeconds: 300, audit: false });
    expect(compileCoordinatorConfig({}, 'empty', {}, dir).hooks).toEqual({
      hooks: [],
      maxTimeoutSeconds: 3_600,
      audit: true,
    });
  });

  it('compiles a hook from TOML: argv, env, credentials, timeout, results and permissions', () => {
    const file = join(dir, 'hooks.toml');
    writeFileSync(
      file,
      `
      [security]
      max_hook_timeout_seconds = 900

      [[hooks]]
      id = "push-outputs"
      command = ["/usr/bin/nix", "copy", "--to", "file:///srv/cache", "$OUT_PATHS"]
      env = { WHERE = "\${REPO}@$BRANCH", PRICE = "$$5" }
      credentials = { env = { vars = ["CACHE_TOKEN"] } }
      timeout_seconds = 900
      on = ["success", "failure"]
      permissions = { allowed_repos = ["my-org/*"], allowed_branches = ["main"] }

      [[hooks]]
      id = "page-someone"
      command = ["/bin/sh", "-c", "echo \\"$ATTR failed on $BRANCH\\""]
      on = "failure"
      permissions = { allow_all = true }
      `,
    );
    const o = loadCoordinatorConfig(file, { CACHE_TOKEN: 'tok-123456789' }).hooks;
    const [push, page] = o.hooks;
    expect(push).toMatchObject({
      id: 'push-outputs',
      command: ['/usr/bin/nix', 'copy', '--to', 'file:///srv/cache', '$OUT_PATHS'],
      env: { WHERE: '${REPO}@$BRANCH', PRICE: '$$5' },
      timeoutSeconds: 900,
      on: new Set(['success', 'failure']),
      permissions: { allowAll: false, allowedRepos: ['my-org/*'], allowedBranches: ['main'] },
    });
    expect(push?.credentials?.description).toContain('CACHE_TOKEN');
    // Without timeout_seconds: five minutes, and never more than the cap.
    expect(page).toMatchObject({ timeoutSeconds: 300, on: new Set(['failure']), credentials: undefined });
    const capped = compileCoordinatorConfig(
      { security: { max_hook_timeout_seconds: 60 }, hooks: [hook()] },
      't',
      {},
      dir,
    );
    expect(capped.hooks.hooks[0]?.timeoutSeconds).toBe(60);
    expect(capped.hooks.hooks[0]?.on).toEqual(new Set(['success']));
  });

  it('refuses a timeout above [security] max_hook_timeout_seconds at startup, naming both keys', () => {
    const e = startupError({ security: { max_hook_timeout_seconds: 120 }, hooks: [hook({ timeout_seconds: 121 })] });
    expect(e).toBeInstanceOf(ConfigError);
    expect(e.message).toBe(
      'test.toml: hooks.notify.timeout_seconds: 121 is more than security.max_hook_timeout_seconds (120): ' +
        'shorten the hook, or raise the cap',
    );
    // Without a cap of its own, the default hour caps it.
    expect(startupError({ hooks: [hook({ timeout_seconds: 3_601 })] }).message).toContain('(3600)');
  });

  it('refuses a $NAME that is no hook variable, as a whole argument or in env, but leaves scripts alone', () => {
    const arg = startupError({ hooks: [hook({ command: ['/usr/bin/cachix', 'push', '$CACHIX_TOKEN'] })] });
    expect(arg.message).toMatch(/^test\.toml: hooks\.notify\.command\[2\]: \$CACHIX_TOKEN is not a hook variable/);
    expect(arg.message).toContain('a credential reaches the hook as an environment variable of its own name');
    const env = startupError({ hooks: [hook({ env: { URL: 'https://x/${REPOSITORY}' } })] });
    expect(env.message).toMatch(/^test\.toml: hooks\.notify\.env\.URL: \$REPOSITORY is not a hook variable/);
    // A shell script reads its variables from the environment: `$HOME` there is the script's business.
    const ok = compileCoordinatorConfig(
      { hooks: [hook({ command: ['/bin/sh', '-c', 'echo "$HOME $DRV_PATH"'], env: { COST: '$$HOME' } })] },
      't',
      {},
      dir,
    );
    expect(ok.hooks.hooks).toHaveLength(1);
  });

  it('refuses an env that would replace a hook variable, a hook that serves nothing, two hooks with one id', () => {
    expect(startupError({ hooks: [hook({ env: { ATTR: 'x' } })] }).message).toBe(
      'test.toml: hooks.notify.env.ATTR: set by eka-ci for every run; pick another name',
    );
    expect(startupError({ hooks: [hook({ permissions: undefined })] }).message).toMatch(
      /hooks\.0\.permissions: allows no repository/,
    );
    expect(startupError({ hooks: [hook(), hook()] }).message).toMatch(/hooks: two hooks share an id/);
    expect(startupError({ hooks: [hook({ command: [] })] }).message).toMatch(/hooks\.0\.command: an argv/);
    expect(startupError({ hooks: [hook({ on: [] })] }).message).toMatch(/hooks\.0\.on/);
    expect(startupError({ hooks: [hook({ shell: 'sh' })] }).message).toMatch(/hooks\.0\.shell: Unrecognized key/);
  });

  it('puts whole-argument variables into the argv, $OUT_PATHS as one argument per path, and $NAMEs into env', () => {
    const vars = Object.fromEntries(HOOK_VARIABLES.map((v) => [v, `<${v.toLowerCase()}>`])) as Record<
      HookVariable,
      string
    >;
    expect(
      expandCommand(['/bin/push', '$OUT_PATHS', '${DRV_PATH}', '--attr=$ATTR', '$RESULT', 'echo "$REPO"'], vars, [
        '/nix/store/a-out',
        '/nix/store/b-dev',
      ]),
    ).toEqual([
      '/bin/push',
      '/nix/store/a-out',
      '/nix/store/b-dev',
      '<drv_path>',
      '--attr=$ATTR',
      '<result>',
      'echo "$REPO"',
    ]);
    expect(expandCommand(['/bin/push', '$OUT_PATHS'], vars, [])).toEqual(['/bin/push']);
    expect(expandTemplate('${REPO}@$BRANCH costs $$5, $ alone, $$$ATTR', vars)).toBe(
      '<repo>@<branch> costs $5, $ alone, $<attr>',
    );
  });
});
