import { type AddressInfo, createConnection, createServer, type Server, type Socket } from 'node:net';

/**
 * A TCP proxy on loopback between a browser and a coordinator's HTTP port, for tests of what pages do when the network
 * breaks: `cut()` resets every connection through it (the coordinator stays up) and refuses new ones until
 * `restore()`. It records what went through it — each request's head, and the bytes answered after it — so that a test
 * can tell which requests a page made, in which order, and what the coordinator sent back.
 */

export interface ProxiedRequest {
  /** The connection it came on (numbered from 1 in the order they were accepted). */
  connection: number;
  /** Where its head completed in the order of everything that went through the proxy, both ways. */
  seq: number;
  method: string;
  /** As the browser sent it: path and query. */
  path: string;
  /** By lower-case name. */
  headers: Record<string, string>;
  /** Where its response begins in its connection's bytes from the server (HTTP/1.1 answers in order). */
  responseAt: number;
}

/** One Server-Sent Event as the proxy passed it on (complete events only). */
export interface PassedEvent {
  event: string;
  id: string | undefined;
  data: string;
  /** Where the event's last byte went through, in the proxy's order (see ProxiedRequest.seq). */
  seq: number;
}

interface Connection {
  id: number;
  client: Socket;
  upstream: Socket;
  /** Request bytes not yet parsed; a body still to skip. */
  pending: Buffer;
  bodyLeft: number;
  requests: ProxiedRequest[];
  /** What the server sent, as latin1 (one character per byte), and where each chunk of it started. */
  down: string;
  chunks: Array<{ at: number; seq: number }>;
}

export class CuttableProxy {
  readonly requests: ProxiedRequest[] = [];
  private readonly open = new Set<Connection>();
  private readonly connections = new Map<number, Connection>();
  private seq = 0;
  private nextConnection = 1;
  private cutOff = false;
  private badGateway = false;
  /** Whether `cut` was called. */
  wasCut = false;
  /** How many requests `answerBadGateway` answered. */
  badGatewayAnswers = 0;

  private constructor(
    private readonly server: Server,
    private readonly targetPort: number,
  ) {
    server.on('connection', (client) => this.accept(client));
  }

  /** A proxy to `127.0.0.1:targetPort` on a port of its own. */
  static async start(targetPort: number): Promise<CuttableProxy> {
    const server = createServer();
    const proxy = new CuttableProxy(server, targetPort);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return proxy;
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  url(path: string): string {
    return `http://127.0.0.1:${this.port}${path}`;
  }

  /** Resets every connection through the proxy, both sides, and refuses new ones until `restore`. */
  cut(): void {
    this.cutOff = true;
    this.wasCut = true;
    for (const c of this.open) {
      c.client.resetAndDestroy();
      c.upstream.resetAndDestroy();
    }
    this.open.clear();
  }

  restore(): void {
    this.cutOff = false;
    this.badGateway = false;
  }

  /**
   * Answers every new connection's request with `502 Bad Gateway`, as a reverse proxy does while the coordinator
   * behind it restarts, until `restore`.
   */
  answerBadGateway(): void {
    this.cutOff = false;
    this.badGateway = true;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }

  /** The requests whose path starts with `prefix`, in the order they came. */
  requestsTo(prefix: string): ProxiedRequest[] {
    return this.requests.filter((r) => r.path.startsWith(prefix));
  }

  /** The response to `request` as far as it went through the proxy, its status line and headers included. */
  responseTo(request: ProxiedRequest): string {
    const c = this.connections.get(request.connection)!;
    const next = c.requests[c.requests.indexOf(request) + 1];
    return c.down.slice(request.responseAt, next?.responseAt);
  }

  /** The complete Server-Sent Events of a `text/event-stream` response to `request` that went through the proxy. */
  eventsOf(request: ProxiedRequest): PassedEvent[] {
    const c = this.connections.get(request.connection)!;
    const raw = this.responseTo(request);
    const headEnd = raw.indexOf('\r\n\r\n');
    if (headEnd < 0) return [];
    const chunked = /^transfer-encoding:\s*chunked\s*$/im.test(raw.slice(0, headEnd));
    // The body, and for each of its characters where it was in the connection's bytes.
    let body = '';
    const positions: number[] = [];
    const take = (from: number, to: number): void => {
      body += raw.slice(from, to);
      for (let i = from; i < to; i++) positions.push(request.responseAt + i);
    };
    let i = headEnd + 4;
    if (!chunked) take(i, raw.length);
    else {
      for (;;) {
        const line = raw.indexOf('\r\n', i);
        if (line < 0) break;
        const size = parseInt(raw.slice(i, line), 16);
        if (!(size > 0)) break;
        const start = line + 2;
        take(start, Math.min(start + size, raw.length));
        if (start + size + 2 > raw.length) break;
        i = start + size + 2;
      }
    }
    const events: PassedEvent[] = [];
    let from = 0;
    let end: number;
    while ((end = body.indexOf('\n\n', from)) >= 0) {
      const block = body.slice(from, end);
      const lastByte = positions[end + 1]!;
      from = end + 2;
      const event: PassedEvent = { event: 'message', id: undefined, data: '', seq: this.seqAt(c, lastByte) };
      const data: string[] = [];
      for (const l of block.split('\n')) {
        const colon = l.indexOf(':');
        if (colon <= 0) continue;
        const value = l.slice(colon + 1).replace(/^ /, '');
        const field = l.slice(0, colon);
        if (field === 'event') event.event = value;
        else if (field === 'id') event.id = value;
        else if (field === 'data') data.push(value);
      }
      if (data.length === 0) continue;
      // Sent as UTF-8, kept here as latin1 (one character a byte).
      event.data = Buffer.from(data.join('\n'), 'latin1').toString('utf8');
      events.push(event);
    }
    return events;
  }

  private accept(client: Socket): void {
    if (this.cutOff) {
      client.resetAndDestroy();
      return;
    }
    if (this.badGateway) {
      client.once('data', () => {
        this.badGatewayAnswers++;
        const body = '<html><body>502 Bad Gateway</body></html>';
        client.end(
          `HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: ${body.length}\r\n` +
            `connection: close\r\n\r\n${body}`,
        );
      });
      client.on('error', () => client.destroy());
      return;
    }
    const upstream = createConnection({ host: '127.0.0.1', port: this.targetPort });
    const c: Connection = {
      id: this.nextConnection++,
      client,
      upstream,
      pending: Buffer.alloc(0),
      bodyLeft: 0,
      requests: [],
      down: '',
      chunks: [],
    };
    this.connections.set(c.id, c);
    this.open.add(c);
    client.on('data', (data: Buffer) => {
      this.seq++;
      this.parseRequests(c, data);
    });
    upstream.on('data', (data: Buffer) => {
      c.chunks.push({ at: c.down.length, seq: ++this.seq });
      c.down += data.toString('latin1');
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const end = (): void => {
      this.open.delete(c);
      client.destroy();
      upstream.destroy();
    };
    // A reset is what this proxy is for: the other side goes too, and nothing is thrown.
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  }

  private parseRequests(c: Connection, data: Buffer): void {
    c.pending = Buffer.concat([c.pending, data]);
    for (;;) {
      if (c.bodyLeft > 0) {
        const skip = Math.min(c.bodyLeft, c.pending.length);
        c.bodyLeft -= skip;
        c.pending = c.pending.subarray(skip);
        if (c.bodyLeft > 0) return;
      }
      const end = c.pending.indexOf('\r\n\r\n');
      if (end < 0) return;
      const [requestLine = '', ...lines] = c.pending.subarray(0, end).toString('latin1').split('\r\n');
      c.pending = c.pending.subarray(end + 4);
      const [method = '', path = ''] = requestLine.split(' ');
      const headers: Record<string, string> = {};
      for (const line of lines) {
        const colon = line.indexOf(':');
        if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
      }
      c.bodyLeft = Number(headers['content-length'] ?? 0) || 0;
      const request = { connection: c.id, seq: this.seq, method, path, headers, responseAt: c.down.length };
      c.requests.push(request);
      this.requests.push(request);
    }
  }

  /** The order number of the chunk from the server that carried byte `at` of connection `c`. */
  private seqAt(c: Connection, at: number): number {
    let seq = 0;
    for (const chunk of c.chunks) {
      if (chunk.at > at) break;
      seq = chunk.seq;
    }
    return seq;
  }
}

/**
 * Resolves with what `find` returns once it returns something (looking again every 50 ms). `what` names it for the
 * error when it has not come after `timeoutMs`: a guard against a hang, not a limit on how long anything may take.
 */
export async function eventually<T>(
  what: string,
  find: () => T | undefined | Promise<T | undefined>,
  timeoutMs = 90_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = await find();
    if (found !== undefined) return found;
    if (Date.now() > deadline) throw new Error(`never came: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
