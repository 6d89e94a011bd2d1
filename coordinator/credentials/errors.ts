import { EkaciError } from '../../common/errors.js';

/**
 * A credential source cannot give its values: an environment variable is unset, a file is unreadable or malformed,
 * Vault or AWS refused the request or does not have the secret, the metadata service does not answer. The message is
 * `WHERE: SOURCE: PROBLEM` — where in the configuration, which source (address, path, variable names) and what went
 * wrong (an HTTP status, "secret not found", a hint) — and never contains a secret value.
 */
export class CredentialsError extends EkaciError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EKACI_ERR_CREDENTIALS', message, options);
  }
}
