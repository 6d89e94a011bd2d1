import { createServer } from 'node:net';

// Below Linux's ephemeral range (32768–60999): a port from that range may be taken, between the probe and the bind
// (or a restarted coordinator's bind), by any outgoing connection on the machine — an agent reconnecting, another
// test file's client.
const LISTEN_PORTS = { low: 20_000, high: 32_768 };

/**
 * A loopback port free right now, for a server whose address must be known before it starts (OAuth callbacks, a
 * coordinator restarted on the same ports).
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = LISTEN_PORTS.low + Math.floor(Math.random() * (LISTEN_PORTS.high - LISTEN_PORTS.low));
    if (await canListen(port)) return port;
  }
}

function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}
