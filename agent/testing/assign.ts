import type { Assign } from '../../common/proto/ekaci/agent/v1/agent.js';

/** An Assign as a coordinator sends it for a one-output derivation with no limits, changed by `extra`. */
export function testAssign(leaseId: string, drvPath: string, extra: Partial<Assign> = {}): Assign {
  return {
    leaseId,
    drvPath,
    attempt: 1,
    maxSilentSeconds: 0,
    timeoutSeconds: 0,
    outputNames: ['out'],
    maxLogBytes: 0,
    ...extra,
    inputOutputs: extra.inputOutputs ?? [],
    check: extra.check,
    pushes: extra.pushes ?? [],
  };
}
