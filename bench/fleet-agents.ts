/**
 * bench/fleet-agents: the protocol-level agents of bench/fleet, all in this one process (started by
 * bench/fleet-run.ts over an IPC channel), so that their work stays out of the coordinator's event loop.
 *
 * They are written against proto/ekaci/agent/v1/agent.proto loaded at run time with @grpc/proto-loader — not the
 * generated code in common/proto — and speak what any third-party agent has to: `Connect` with the token as a
 * bearer in the call metadata, Hello, Credit, Accepted / Started / Finished job events with increasing message
 * ids (each kept until its Ack), jittered Heartbeats listing the leases held, CancelAck. Each has its own channel
 * (its own HTTP/2 connection, as separate hosts would) and its own keep-alive HTTP connections to the cache.
 *
 * A build is no build: the agent reads the `.drv` (a real agent would have copied it from the cache), makes each
 * output a single small file — for a fixed-output source, the string its builder would write, so the declared hash
 * holds — serialises it as a NAR, uploads narinfo and NAR in one request to the coordinator's cache over HTTP
 * exactly as agent/nix/cache-upload.ts does (`X-Ekaci-Lease`, `X-Ekaci-Narinfo-Bytes`, the token as Basic password,
 * uncompressed NAR), and reports Finished with those outputs. Nothing of Nix runs.
 *
 * Measured here, on the realtime clock (`realtime()` of bench-env.ts, comparable across processes on one host):
 * when each Assign arrived, when each Finished went out and when its Ack came back, and for every slot that became
 * free (a Credit sent) when the next Assign for this agent arrived.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { nixBase32, serializeNarInfo } from '../common/nix/narinfo.js';
// The one thing a third-party agent cannot learn from agent.proto: the version it describes.
import { PROTOCOL_VERSION } from '../common/protocol-version.js';
import { seededRandom } from '../common/prng.js';
import { realtime } from './bench-env.js';

export interface FleetStart {
  type: 'start';
  target: string;
  tokens: string[];
  slots: number;
  system: string;
  /**
   * Each build holds its slot about this long before uploading (0: an immediate result): between half and one and
   * a half times as long, drawn from `seed`, so that builds that started together do not all end together.
   */
  buildMs: number;
  seed: number;
}

export interface FleetStop {
  type: 'stop';
}

/** [drv path, agent, Assign received, Finished sent, Finished acknowledged (-1: not yet), succeeded (1) or not (0)] */
export type LeaseRecord = [string, number, number, number, number, number];
/** [agent, slot freed (Credit sent), next Assign received (-1: none before the stop)] */
export type SlotRecord = [number, number, number];

export interface FleetReport {
  type: 'report';
  leases: LeaseRecord[];
  slots: SlotRecord[];
  /** Share of one core this process used, and its event loop's utilisation, from connect to stop. */
  cpuPercent: number;
  eventLoopUtilization: number;
  /** Assigns that arrived with no free slot: a coordinator that broke flow control. */
  overAssigned: number;
  uploadFailures: number;
  errors: string[];
  cancels: number;
  drains: number;
  /** Job events never acknowledged by the stop. */
  unacked: number;
}

export type FleetMessage = { type: 'connected'; at: number } | { type: 'failed'; error: string } | FleetReport;

// --- The contract, as agent.proto says it (proto-loader: camelCase fields, enums as names, oneofs named). ---

const PROTO = fileURLToPath(new URL('../proto/ekaci/agent/v1/agent.proto', import.meta.url));

interface Hello {
  agentId: string;
  protocolVersion: { major: number; minor: number };
  nixVersion: string;
  hostname: string;
  os: string;
  systems: string[];
  supportedFeatures: string[];
  mandatoryFeatures: string[];
  maxJobs: number;
  runningLeases: { leaseId: string; logBytes: number }[];
  sessionNonce: string;
  sandboxed: boolean;
}

interface BuiltOutput {
  name: string;
  path: string;
  narSize: number;
  closureSize: number;
}

type Event =
  | { accepted: Record<string, never> }
  | { started: { startedAtMs: number } }
  | {
      finished: {
        outcome: 'OUTCOME_SUCCEEDED' | 'OUTCOME_INFRA_ERROR';
        error: string;
        outputs: BuiltOutput[];
        finishedAtMs: number;
        logBytes: number;
      };
    };

type AgentMessage =
  | { hello: Hello }
  | { heartbeat: { leaseIds: string[] } }
  | { credit: { freeSlots: number; draining: boolean } }
  | { jobEvent: { messageId: number; leaseId: string } & Event }
  | { cancelAck: { leaseId: string } };

interface Assign {
  leaseId: string;
  drvPath: string;
  attempt: number;
  outputNames: string[];
}

type CoordinatorMessage =
  | {
      msg: 'welcome';
      welcome: {
        protocolVersion: { major: number; minor: number } | null;
        heartbeatIntervalMs: number;
        cacheUrl: string;
      };
    }
  | { msg: 'error'; error: { code: string; message: string } }
  | { msg: 'assign'; assign: Assign }
  | { msg: 'ack'; ack: { messageIds: number[] } }
  | { msg: 'cancel'; cancel: { leaseId: string } }
  | { msg: 'drain'; drain: { reason: string } }
  | { msg: 'logAck' | 'heartbeatAck' };

const definition = protoLoader.loadSync(PROTO, { longs: Number, enums: String, defaults: true, oneofs: true });
const services = grpc.loadPackageDefinition(definition) as unknown as {
  ekaci: { agent: { v1: { AgentService: grpc.ServiceClientConstructor } } };
};
const CONNECT = services.ekaci.agent.v1.AgentService.service.Connect as grpc.MethodDefinition<
  AgentMessage,
  CoordinatorMessage
>;

// Keep-alive as agent.proto asks for, and the message limit both sides set. A channel of its own per agent (no
// shared subchannel pool): a hundred hosts are a hundred HTTP/2 connections, not one multiplexed one.
const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.keepalive_time_ms': 20_000,
  'grpc.keepalive_timeout_ms': 10_000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.max_receive_message_length': 16 * 1024 * 1024,
  'grpc.use_local_subchannel_pool': 1,
  // A stream of hours: the retry buffer would copy every message sent.
  'grpc.enable_retries': 0,
};
// Heartbeats come every interval ± 20 %, so a hundred agents started together do not beat together.
const HEARTBEAT_JITTER = 0.2;

const now = realtime;

// --- What the fleet records. ---

const leases: LeaseRecord[] = [];
const slotRecords: SlotRecord[] = [];
const errors: string[] = [];
let overAssigned = 0;
let uploadFailures = 0;
let cancels = 0;
let drains = 0;
let stopping = false;
// Only the first few distinct errors are kept: a systematic failure repeats itself a hundred thousand times.
const MAX_ERRORS = 10;

function noteError(message: string): void {
  if (errors.length < MAX_ERRORS && !errors.includes(message)) errors.push(message);
}

/** One protocol agent: one token, one stream, `slots` build slots. */
class ProtocolAgent {
  private readonly client: grpc.Client;
  private call: grpc.ClientDuplexStream<AgentMessage, CoordinatorMessage> | null = null;
  private readonly http: http.Agent;
  private cacheUrl = '';
  private nextMessageId = 1;
  private running = 0;
  /** When each free slot became free, oldest first; an Assign takes the oldest. */
  private readonly freeSince: number[] = [];
  /** Leases held: assigned, Finished not yet acknowledged. */
  private readonly held = new Set<string>();
  /** Unacknowledged job events, by message id; a Finished carries its lease's record. */
  private readonly unacked = new Map<number, { leaseId: string; record: LeaseRecord | null }>();
  private heartbeat: NodeJS.Timeout | null = null;
  private draining = false;
  private readonly random: () => number;

  constructor(
    private readonly index: number,
    private readonly token: string,
    private readonly options: FleetStart,
  ) {
    this.client = new grpc.Client(options.target, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
    this.random = seededRandom(options.seed * 1_000 + index);
    // Keep-alive connections to the cache, at most one per slot (one upload each at a time).
    this.http = new http.Agent({ keepAlive: true, maxSockets: options.slots });
  }

  get unacknowledged(): number {
    return this.unacked.size;
  }

  /** Opens the stream; resolves at Welcome, rejects on a refusal or a stream that ends first. */
  connect(): Promise<void> {
    return new Promise((resolve, reject) => {
      const metadata = new grpc.Metadata();
      metadata.set('authorization', `Bearer ${this.token}`);
      const call = this.client.makeBidiStreamRequest(
        CONNECT.path,
        CONNECT.requestSerialize,
        CONNECT.responseDeserialize,
        metadata,
      );
      this.call = call;
      let welcomed = false;
      call.on('data', (m: CoordinatorMessage) => {
        if (m.msg === 'welcome') {
          if (m.welcome.protocolVersion?.major !== PROTOCOL_VERSION.major) {
            reject(new Error(`coordinator speaks protocol ${m.welcome.protocolVersion?.major ?? 'none'}.x`));
            return;
          }
          welcomed = true;
          this.welcome(m.welcome.cacheUrl, m.welcome.heartbeatIntervalMs);
          resolve();
        } else if (m.msg === 'error') {
          reject(new Error(`refused: ${m.error.code}: ${m.error.message}`));
        } else this.message(m);
      });
      call.on('error', () => {}); // 'status' says the same
      call.on('status', (s: grpc.StatusObject) => {
        if (!welcomed) reject(new Error(`stream ended before Welcome: ${grpc.status[s.code]}: ${s.details}`));
        else if (!stopping) fail(`agent ${this.index}: stream ended: ${grpc.status[s.code]}: ${s.details}`);
      });
      call.write({
        hello: {
          // The token names the agent; an empty id says "whatever my token is called".
          agentId: '',
          protocolVersion: PROTOCOL_VERSION,
          nixVersion: '2.8.0',
          hostname: `fleet-${this.index}`,
          os: 'linux',
          systems: [this.options.system],
          supportedFeatures: [],
          mandatoryFeatures: [],
          maxJobs: this.options.slots,
          runningLeases: [],
          sessionNonce: `fleet-${process.pid}-${this.index}`,
          sandboxed: true,
        },
      });
    });
  }

  /** Half-closes the stream; slots still free are recorded as never given work. */
  close(): void {
    for (const freedAt of this.freeSince.splice(0)) slotRecords.push([this.index, freedAt, -1]);
    if (this.heartbeat) clearTimeout(this.heartbeat);
    this.call?.end();
    this.http.destroy();
  }

  private welcome(cacheUrl: string, heartbeatIntervalMs: number): void {
    this.cacheUrl = cacheUrl.replace(/\/+$/, '');
    const beat = (): void => {
      this.send({ heartbeat: { leaseIds: [...this.held] } });
      this.heartbeat = setTimeout(beat, jitter(heartbeatIntervalMs));
    };
    this.heartbeat = setTimeout(beat, jitter(heartbeatIntervalMs));
    this.freeSlots(this.options.slots);
  }

  private message(m: CoordinatorMessage): void {
    switch (m.msg) {
      case 'assign':
        return this.assign(m.assign);
      case 'ack':
        for (const id of m.ack.messageIds) {
          const event = this.unacked.get(id);
          this.unacked.delete(id);
          if (event?.record) {
            event.record[4] = now();
            this.held.delete(event.leaseId);
          }
        }
        return;
      case 'cancel':
        // Builds here end at once; the result of one already reported stands, as for a real agent.
        cancels++;
        this.send({ cancelAck: { leaseId: m.cancel.leaseId } });
        return;
      case 'drain':
        drains++;
        this.draining = true;
        this.send({ credit: { freeSlots: 0, draining: true } });
        return;
      default:
        return;
    }
  }

  private assign(a: Assign): void {
    const at = now();
    const freedAt = this.freeSince.shift();
    if (freedAt === undefined) overAssigned++;
    else slotRecords.push([this.index, freedAt, at]);
    const record: LeaseRecord = [a.drvPath, this.index, at, -1, -1, 0];
    leases.push(record);
    this.held.add(a.leaseId);
    this.running++;
    // Accepted before any later Credit: the coordinator counts this Assign against the slots from then on.
    this.event(a.leaseId, { accepted: {} });
    this.event(a.leaseId, { started: { startedAtMs: Date.now() } });
    void this.build(a, record);
  }

  private async build(a: Assign, record: LeaseRecord): Promise<void> {
    if (this.options.buildMs > 0) {
      const ms = this.options.buildMs * (0.5 + this.random());
      await new Promise((resolve) => setTimeout(resolve, ms));
    }
    let outputs: BuiltOutput[] = [];
    let error = '';
    try {
      outputs = await this.upload(a);
    } catch (err) {
      uploadFailures++;
      error = err instanceof Error ? err.message : String(err);
      noteError(error);
    }
    if (stopping) return;
    const finished = {
      outcome: error === '' ? ('OUTCOME_SUCCEEDED' as const) : ('OUTCOME_INFRA_ERROR' as const),
      error,
      outputs,
      finishedAtMs: Date.now(),
      logBytes: 0,
    };
    record[3] = now();
    record[5] = error === '' ? 1 : 0;
    this.event(a.leaseId, { finished }, record);
    this.running--;
    this.freeSlots(1);
  }

  /** Makes and uploads the lease's outputs; returns them as Finished lists them. */
  private async upload(a: Assign): Promise<BuiltOutput[]> {
    const drv = await readFile(a.drvPath, 'utf8');
    const declared = drvOutputs(drv);
    const built: BuiltOutput[] = [];
    for (const name of a.outputNames) {
      const out = declared.get(name);
      if (out === undefined) throw new Error(`${a.drvPath} has no output ${name}`);
      const content = out.fixed ? drvEnv(drv, 'content') : `${out.path} built by fleet agent ${this.index}\n`;
      const nar = singleFileNar(Buffer.from(content));
      const narHash = `sha256:${nixBase32(createHash('sha256').update(nar).digest())}`;
      const url = `nar/${narHash.slice('sha256:'.length)}.nar`;
      const narinfo = serializeNarInfo({
        storePath: out.path,
        url,
        compression: 'none',
        fileHash: narHash,
        fileSize: nar.length,
        narHash,
        narSize: nar.length,
        references: [],
        deriver: a.drvPath,
        sigs: [],
      });
      // Narinfo and NAR in one request, as a coordinator of protocol 1.6 takes them (agent.proto, "Uploads").
      const info = Buffer.from(narinfo);
      const hashPart = out.path.slice('/nix/store/'.length, '/nix/store/'.length + 32);
      await put(
        this.http,
        `${this.cacheUrl}/${hashPart}.narinfo`,
        {
          authorization: `Basic ${Buffer.from(`ekaci:${this.token}`).toString('base64')}`,
          'x-ekaci-lease': a.leaseId,
          'x-ekaci-narinfo-bytes': String(info.length),
          'content-type': 'application/x-ekaci-narinfo-nar',
        },
        Buffer.concat([info, nar]),
      );
      built.push({ name, path: out.path, narSize: nar.length, closureSize: nar.length });
    }
    return built;
  }

  private freeSlots(count: number): void {
    if (this.draining) return;
    this.send({ credit: { freeSlots: this.options.slots - this.running, draining: false } });
    const at = now();
    for (let i = 0; i < count; i++) this.freeSince.push(at);
  }

  private event(leaseId: string, event: Event, record: LeaseRecord | null = null): void {
    const messageId = this.nextMessageId++;
    this.unacked.set(messageId, { leaseId, record });
    this.send({ jobEvent: { messageId, leaseId, ...event } });
  }

  private send(message: AgentMessage): void {
    // grpc-js buffers what the socket cannot take yet; a few hundred small messages in flight are harmless.
    this.call?.write(message);
  }
}

/** The outputs a `.drv` declares: name → path, and whether it is fixed-output (has a declared hash). */
function drvOutputs(drv: string): Map<string, { path: string; fixed: boolean }> {
  const list = /^Derive\(\[(.*?)\],\[/.exec(drv)?.[1] ?? '';
  const outputs = new Map<string, { path: string; fixed: boolean }>();
  for (const m of list.matchAll(/\("([^"]*)","([^"]*)","([^"]*)","([^"]*)"\)/g)) {
    outputs.set(m[1]!, { path: m[2]!, fixed: m[4] !== '' });
  }
  return outputs;
}

/** An environment variable of a `.drv` without escapes in its value (the bench's sources are plain words). */
function drvEnv(drv: string, name: string): string {
  const value = new RegExp(`\\("${name}","([^"\\\\]*)"\\)`).exec(drv)?.[1];
  if (value === undefined) throw new Error(`the .drv has no plain ${name} variable`);
  return value;
}

/** The NAR serialisation of a store path that is one regular file. */
function singleFileNar(contents: Buffer): Buffer {
  const parts: Buffer[] = [];
  const str = (b: Buffer): void => {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(b.length));
    parts.push(len, b, Buffer.alloc((8 - (b.length % 8)) % 8));
  };
  for (const word of ['nix-archive-1', '(', 'type', 'regular', 'contents']) str(Buffer.from(word));
  str(contents);
  str(Buffer.from(')'));
  return Buffer.concat(parts);
}

/**
 * One PUT on a keep-alive connection. A request on a reused connection that the server closed for idling meanwhile
 * fails with ECONNRESET: it is tried again (what Node's documentation advises, and what undici does for the real
 * agent's fetch). The pool may hand out another connection closed the same way — after a quiet stretch of the DAG
 * all of an agent's may be — so it is tried as long as it met a reused one, up to once per pooled connection.
 */
function put(
  agent: http.Agent,
  url: string,
  headers: Record<string, string>,
  body: Buffer,
  retries = (agent.maxSockets === Infinity ? 16 : agent.maxSockets) + 1,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      url,
      { method: 'PUT', agent, headers: { ...headers, 'content-length': String(body.length) } },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) resolve();
          else
            reject(
              new Error(`PUT ${new URL(url).pathname}: HTTP ${status} ${Buffer.concat(chunks).toString().trim()}`),
            );
        });
        res.on('error', reject);
      },
    );
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (retries > 0 && req.reusedSocket && err.code === 'ECONNRESET')
        put(agent, url, headers, body, retries - 1).then(resolve, reject);
      else reject(err);
    });
    req.end(body);
  });
}

function jitter(ms: number): number {
  return ms * (1 - HEARTBEAT_JITTER + 2 * HEARTBEAT_JITTER * Math.random());
}

function send(message: FleetMessage): Promise<void> {
  return new Promise((resolve) => process.send!(message, () => resolve()));
}

function fail(error: string): void {
  void send({ type: 'failed', error }).then(() => process.exit(1));
}

// --- The process: start on the first message, report and exit on the second. ---

let fleet: ProtocolAgent[] = [];
let cpuAtStart = process.cpuUsage();
let eluAtStart = performance.eventLoopUtilization();
let startedAt = 0;

process.on('disconnect', () => process.exit(0));
process.on('message', (m: FleetStart | FleetStop) => {
  if (m.type === 'start') {
    fleet = m.tokens.map((token, i) => new ProtocolAgent(i, token, m));
    cpuAtStart = process.cpuUsage();
    eluAtStart = performance.eventLoopUtilization();
    startedAt = now();
    Promise.all(fleet.map((a) => a.connect())).then(
      () => void send({ type: 'connected', at: now() }),
      (err: unknown) => fail(err instanceof Error ? err.message : String(err)),
    );
    return;
  }
  stopping = true;
  const cpu = process.cpuUsage(cpuAtStart);
  const elapsedMs = now() - startedAt;
  const elu = performance.eventLoopUtilization(eluAtStart).utilization;
  for (const a of fleet) a.close();
  void send({
    type: 'report',
    leases,
    slots: slotRecords,
    cpuPercent: ((cpu.user + cpu.system) / 1000 / elapsedMs) * 100,
    eventLoopUtilization: elu,
    overAssigned,
    uploadFailures,
    errors,
    cancels,
    drains,
    unacked: fleet.reduce((n, a) => n + a.unacknowledged, 0),
  }).then(() => process.exit(0));
});
