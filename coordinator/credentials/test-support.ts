import { expect } from 'vitest';
import { CredentialsError } from './errors.js';

/**
 * The message of the CredentialsError `p` rejects with, after checking that it contains none of `secrets`: an error
 * names the source and the problem, never a value.
 */
export async function credentialsFailure(p: Promise<unknown>, secrets: readonly string[]): Promise<string> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(CredentialsError);
  const message = (err as Error).message;
  for (const secret of secrets) expect(message).not.toContain(secret);
  return message;
}
