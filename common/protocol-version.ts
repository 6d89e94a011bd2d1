import type { ProtocolVersion } from './proto/ekaci/agent/v1/agent.js';

/**
 * The version of proto/ekaci/agent/v1/agent.proto. Bump `minor` for additions an older peer may ignore and
 * `major` for anything else; the coordinator refuses an agent with a different major version.
 */
export const PROTOCOL_VERSION: ProtocolVersion = { major: 1, minor: 5 };

export function formatVersion(v: ProtocolVersion | undefined): string {
  return v ? `${v.major}.${v.minor}` : 'none';
}
