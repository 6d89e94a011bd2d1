/**
 * The `credentials` table's schema: exactly one source key (see credentials.ts for each source's meaning).
 */
import { z } from 'zod';

export const envVar = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'an environment variable name');
const refreshSeconds = z.number().positive().max(86_400, 'at most a day').optional();
const httpUrl = z
  .string()
  .url()
  .refine((u) => /^https?:\/\//.test(u), 'an http(s) URL');

const sources = {
  env: z.object({ vars: z.array(envVar).min(1, 'at least one variable') }).strict(),
  file: z.object({ path: z.string().min(1) }).strict(),
  'systemd-credential': z.object({ name: z.string().min(1) }).strict(),
  'github-app-key-file': z.object({ app_id_env: envVar, key_file: z.string().min(1) }).strict(),
  vault: z
    .object({
      address: httpUrl,
      secret_path: z
        .string()
        .min(1)
        .refine((p) => !p.split('/').includes('..'), 'no ".." segments'),
      token_env: envVar.optional(),
      token_file: z.string().min(1).optional(),
      namespace: z.string().min(1).optional(),
      refresh_seconds: refreshSeconds,
    })
    .strict()
    .refine((v) => v.token_env === undefined || v.token_file === undefined, {
      message: 'give token_env or token_file, not both',
    }),
  'aws-secrets-manager': z
    .object({
      secret_name: z.string().min(1),
      region: z.string().min(1).optional(),
      endpoint: httpUrl.optional(),
      profile: z.string().min(1).optional(),
      refresh_seconds: refreshSeconds,
    })
    .strict(),
  'instance-metadata': z
    .object({
      provider: z.enum(['aws', 'gcp', 'azure']).default('aws'),
      endpoint: httpUrl.optional(),
      role: z.string().min(1).optional(),
      service_account: z.string().min(1).optional(),
      resource: z.string().min(1).optional(),
    })
    .strict(),
  'aws-profile': z.object({ profile: z.string().min(1) }).strict(),
  'cachix-token': z.object({ env_var: envVar }).strict(),
  none: z.object({}).strict(),
};

const SOURCE_KEYS = Object.keys(sources) as (keyof typeof sources)[];

/**
 * The `credentials` table with `env` replaced (GitHub Apps give `vars` a positional meaning and a default) and the
 * message for a table that names no source or two. The strings `"instance-metadata"` and `"none"` stand for their
 * empty tables, as upstream eka-ci allows.
 */
export function credentialsTable<E extends z.ZodType>(env: E, oneOfMessage: string) {
  return z.preprocess(
    (raw) => (raw === 'instance-metadata' || raw === 'none' ? { [raw]: {} } : raw),
    z
      .object({ ...sources, env })
      .partial()
      .strict()
      .refine((c) => Object.values(c).filter((v) => v !== undefined).length === 1, { message: oneOfMessage }),
  );
}

/** The `credentials` table of a cache, hook or OAuth client: exactly one source key. */
export const credentialsSchema = credentialsTable(
  sources.env,
  `exactly one of ${SOURCE_KEYS.slice(0, -1).join(', ')} or ${SOURCE_KEYS.at(-1)}`,
);
export type CredentialsSpec = z.infer<typeof credentialsSchema>;

export type VaultSpec = z.infer<(typeof sources)['vault']>;
export type SecretsManagerSpec = z.infer<(typeof sources)['aws-secrets-manager']>;
export type InstanceMetadataSpec = z.infer<(typeof sources)['instance-metadata']>;
