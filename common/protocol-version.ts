import type { ProtocolVersion } from './proto/ekaci/agent/v1/agent.js';

/**
 * The version of proto/ekaci/agent/v1/agent.proto. Bump `minor` for additions an older peer may ignore and
 * `major` for anything else; the coordinator refuses an agent with a different major version.
 */
export const PROTOCOL_VERSION: ProtocolVersion = { major: 1, minor: 7 };

/**
 * Since 1.6 the coordinator's cache takes a path's narinfo and NAR in one request (`X-Ekaci-Narinfo-Bytes`, see
 * agent.proto); an agent uses it only with a coordinator that says so in its Welcome.
 */
export const ONE_REQUEST_UPLOADS_SINCE: ProtocolVersion = { major: 1, minor: 6 };

export function formatVersion(v: ProtocolVersion | undefined): string {
  return v ? `${v.major}.${v.minor}` : 'none';
}
