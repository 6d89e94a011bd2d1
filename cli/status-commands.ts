import { UsageError } from '../common/errors.js';
import type { QueueLane } from '../coordinator/scheduler/build-manager.js';
import { type ClientOptions, CoordinatorClient, asCommand, drvHash } from './coordinator-client.js';

/** `ekaci status`, `ekaci agents [drain|resume NAME]` and `ekaci cancel DRV` against a running coordinator. */

interface Agent {
  id: string;
  hostname: string;
  systems: string[];
  maxJobs: number;
  connected: boolean;
  freeSlots: number;
  draining: boolean;
  drained: { at: number; by: string | null; reason: string | null } | null;
  lastSeen: number;
  leases: Array<{ drvPath: string; attempt: number }>;
}

const ago = (ms: number): string => {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 90 ? `${s} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${Math.round(s / 3600)} h`;
};

function agentLine(a: Agent): string {
  const state = !a.connected
    ? `disconnected (last seen ${ago(a.lastSeen)} ago)`
    : a.drained
      ? `drained by ${a.drained.by ?? '?'}${a.drained.reason ? ` (${a.drained.reason})` : ''}`
      : a.draining
        ? 'draining'
        : `${a.freeSlots} of ${a.maxJobs} slots free`;
  return `${a.id}  ${a.hostname}  ${a.systems.join(',')}  ${state}  ${a.leases.length} running`;
}

/**
 * What waits, what runs where, and who is connected. Exit status 0; 1 when the coordinator refuses (its message on
 * stderr).
 */
export function statusCommand(opts: ClientOptions & { json?: boolean }): Promise<number> {
  return asCommand('status', async () => {
    const client = new CoordinatorClient(opts);
    const [queues, { agents }] = await Promise.all([
      client.json<{ pending: number; lanes: QueueLane[] }>('/queues'),
      client.json<{ agents: Agent[] }>('/agents'),
    ]);
    if (opts.json) {
      process.stdout.write(`${JSON.stringify({ queues, agents }, null, 2)}\n`);
      return 0;
    }
    const running = agents.flatMap((a) => a.leases.map((l) => ({ ...l, agent: a.id })));
    const out: string[] = [`${queues.pending} unfinished, ${running.length} building`];
    if (queues.lanes.length > 0) out.push('', 'Waiting:');
    for (const l of queues.lanes) {
      const what = `${l.system}${l.features.length ? ` [${l.features.join(',')}]` : ''}${l.kind === 'fixed-output' ? ' (fixed-output)' : ''}${l.untrusted ? ' (untrusted)' : ''}`;
      const who = l.why ?? `served by ${l.agents.join(', ')}`;
      out.push(`  ${what}: ${l.buildable} buildable for ${ago(l.waitingSince)} — ${who}`);
    }
    if (running.length > 0) out.push('', 'Building:');
    for (const r of running) out.push(`  ${r.drvPath} (attempt ${r.attempt}) on ${r.agent}`);
    out.push(
      '',
      'Agents:',
      ...(agents.length === 0 ? ['  none has connected'] : agents.map((a) => `  ${agentLine(a)}`)),
    );
    process.stdout.write(`${out.join('\n')}\n`);
    return 0;
  });
}

/** Lists agents, or drains / resumes one (admins: `[web] admins`). */
export function agentsCommand(
  action: string | undefined,
  name: string | undefined,
  opts: ClientOptions & { json?: boolean; reason?: string },
): Promise<number> {
  if (action !== undefined && action !== 'drain' && action !== 'resume') {
    throw new UsageError(`"${action}" is not an action: ekaci agents [drain|resume NAME]`);
  }
  if (action !== undefined && !name) throw new UsageError(`ekaci agents ${action} needs the agent's name`);
  return asCommand('agents', async () => {
    const client = new CoordinatorClient(opts);
    if (action) {
      const path = `/agents/${encodeURIComponent(name!)}/${action}`;
      await client.json(path, { method: 'POST', ...(opts.reason ? { body: { reason: opts.reason } } : {}) });
      process.stdout.write(`${name!}: ${action === 'drain' ? 'drained: it takes no new work' : 'resumed'}\n`);
      return 0;
    }
    const { agents } = await client.json<{ agents: Agent[] }>('/agents');
    if (opts.json) process.stdout.write(`${JSON.stringify(agents, null, 2)}\n`);
    else process.stdout.write(agents.map((a) => `${agentLine(a)}\n`).join('') || 'no agent has connected\n');
    return 0;
  });
}

/** Cancels a queued or running build. */
export function cancelCommand(drv: string, opts: ClientOptions): Promise<number> {
  const hash = drvHash(drv);
  return asCommand('cancel', async () => {
    const client = new CoordinatorClient(opts);
    const r = await client.json<{ drvPath: string; state: string }>(`/derivations/${hash}/cancel`, { method: 'POST' });
    process.stdout.write(`${r.drvPath}: cancelled${r.state === 'building' ? ' (its agent stops it)' : ''}\n`);
    return 0;
  });
}
