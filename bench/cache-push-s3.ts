/**
 * bench/cache-push-s3: the S3 service of bench/cache-push (test/stand-ins/s3-server.ts: s3rver behind its SigV4
 * front), in a process of its own as S3 is a service of its own: its work is not the coordinator's. Driven over IPC.
 */
import { startS3StandIn, type S3StandIn } from '../test/stand-ins/s3-server.js';

export type S3Command = { type: 'start' } | { type: 'stop' };

export type S3Report =
  | { type: 'started'; endpoint: string; region: string; bucket: string; bucketUrl: string; key: S3StandIn['key'] }
  | { type: 'stopped'; cpuMs: number; maxRssMiB: number; requests: Record<string, number> }
  | { type: 'failed'; error: string };

const send = (m: S3Report): void => void process.send?.(m, undefined, {}, () => undefined);
let s3: S3StandIn | undefined;

process.on('message', (command: S3Command) => {
  void handle(command).catch((err: unknown) =>
    send({ type: 'failed', error: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
  );
});
process.on('disconnect', () => void s3?.close().finally(() => process.exit(0)));

async function handle(command: S3Command): Promise<void> {
  if (command.type === 'start') {
    s3 = await startS3StandIn();
    const { endpoint, region, bucket, bucketUrl, key } = s3;
    send({ type: 'started', endpoint, region, bucket, bucketUrl, key });
    return;
  }
  // Requests by method and kind of key (`PUT nar`, `HEAD narinfo`, …) and S3 error code when refused.
  const requests: Record<string, number> = {};
  for (const r of s3?.requests ?? []) {
    const kind = r.path.includes('/nar/') ? 'nar' : r.path.endsWith('.narinfo') ? 'narinfo' : 'other';
    const key = `${r.method} ${kind} ${r.code ?? r.status}`;
    requests[key] = (requests[key] ?? 0) + 1;
  }
  await s3?.close();
  const { user, system } = process.cpuUsage();
  send({ type: 'stopped', cpuMs: (user + system) / 1000, maxRssMiB: process.resourceUsage().maxRSS / 1024, requests });
  process.exit(0);
}
