import { EkaciError } from '../common/errors.js';

/**
 * The coordinator answered with an `ErrorReply` that reconnecting would only repeat (a protocol major mismatch, a
 * refused agent). `replyCode` and `replyMessage` are the coordinator's own words; fix what they name, then restart.
 */
export class CoordinatorRefusedError extends EkaciError {
  constructor(
    readonly replyCode: string,
    readonly replyMessage: string,
  ) {
    super('EKACI_ERR_COORDINATOR_REFUSED', `coordinator refused the agent: ${replyCode}: ${replyMessage}`);
  }
}

/**
 * The coordinator ended the stream with a gRPC status that retrying cannot fix (other than a refused token), for
 * example UNIMPLEMENTED from something that is not an eka-ci coordinator. Check `--coordinator`.
 */
export class StreamRejectedError extends EkaciError {
  constructor(
    readonly grpcCode: number,
    readonly details: string,
  ) {
    super('EKACI_ERR_STREAM_REJECTED', `coordinator ended the stream with gRPC status ${grpcCode}: ${details}`);
  }
}

/** The agent was stopped before the coordinator's first `Welcome`, so `start()` cannot complete. */
export class AgentStoppedError extends EkaciError {
  constructor() {
    super('EKACI_ERR_AGENT_STOPPED', 'the agent was stopped before the coordinator welcomed it');
  }
}
