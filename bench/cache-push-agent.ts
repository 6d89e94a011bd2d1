/**
 * bench/cache-push-agent: the agent's side of bench/cache-push — `pushToS3` over its own `nix-daemon --stdio`
 * connection, as a build's outputs are pushed — in a process of its own, so that its peak RSS is the pusher's alone.
 * Driven over IPC by bench/cache-push.ts.
 */
import { pushToS3, type S3PushResult } from '../agent/nix/s3-push.js';
import { NixDaemonConnection } from '../common/nix/daemon-client.js';
import type { NarCompression } from '../common/nix/nar.js';

export type AgentCommand =
  | {
      type: 'push';
      coordinatorUrl: string;
      token: string;
      leaseId: string;
      cacheId: string;
      outputs: string[];
      compression: NarCompression;
      spoolDir: string;
    }
  | { type: 'stop' };

export type AgentReport =
  | { type: 'pushed'; ms: number; result: S3PushResult; rssMiB: number; maxRssMiB: number; cpuMs: number }
  | { type: 'stopped' }
  | { type: 'failed'; error: string };

const send = (m: AgentReport): void => void process.send?.(m, undefined, {}, () => undefined);
const MiB = 1024 * 1024;

let conn: NixDaemonConnection | undefined;

process.on('message', (command: AgentCommand) => {
  void handle(command).catch((err: unknown) =>
    send({ type: 'failed', error: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
  );
});
process.on('disconnect', () => void stop().finally(() => process.exit(0)));

async function handle(command: AgentCommand): Promise<void> {
  switch (command.type) {
    case 'push': {
      conn ??= await NixDaemonConnection.open({ nixOptions: { substituters: '' } });
      const cpu = process.cpuUsage();
      const started = performance.now();
      const result = await pushToS3({ ...command, conn, stopped: () => false });
      const ms = performance.now() - started;
      const { user, system } = process.cpuUsage(cpu);
      send({
        type: 'pushed',
        ms,
        result,
        rssMiB: process.memoryUsage().rss / MiB,
        // KiB, over the process's whole life: the peak of every push so far.
        maxRssMiB: process.resourceUsage().maxRSS / 1024,
        cpuMs: (user + system) / 1000,
      });
      return;
    }
    case 'stop':
      await stop();
      send({ type: 'stopped' });
      process.exit(0);
  }
}

async function stop(): Promise<void> {
  await conn?.close();
  conn = undefined;
}
