/**
 * An AWS Secrets Manager stand-in: `POST /` in the JSON 1.1 protocol (`X-Amz-Target: secretsmanager.GetSecretValue`,
 * `Content-Type: application/x-amz-json-1.1`), every request's SigV4 signature recomputed (with `aws4`) from the
 * signed headers and the body, and refused as AWS refuses it: 400 with `__type` `UnrecognizedClientException`
 * (unknown access key id), `InvalidSignatureException` (a signature made with another secret, or more than 5 minutes
 * off), `ExpiredTokenException` (a session token that was revoked), `ResourceNotFoundException` (no such secret).
 */
import { randomUUID, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import aws4 from 'aws4';
import { closeServer, listenOnLoopback } from './loopback.js';

// AWS refuses requests whose X-Amz-Date is further than this from its clock.
const MAX_SKEW_MS = 5 * 60_000;

interface Key {
  secretAccessKey: string;
  sessionToken: string | undefined;
}

export interface SecretsManagerRequest {
  target: string | undefined;
  accessKeyId: string | undefined;
  /** What the stand-in answered: 200 or the `__type` of its refusal. */
  outcome: string;
}

export class SecretsManagerStandIn {
  readonly requests: SecretsManagerRequest[] = [];
  private readonly keys = new Map<string, Key>();
  private readonly secrets = new Map<string, { value: string; versionId: string; created: number }>();
  private server: Server | undefined;

  constructor(readonly region = 'us-east-1') {}

  async start(): Promise<string> {
    this.server = createServer((req, res) => {
      this.handle(req, res).catch((err: unknown) =>
        send(res, 500, { __type: 'InternalServiceError', message: String(err) }),
      );
    });
    return listenOnLoopback(this.server);
  }

  async stop(): Promise<void> {
    await closeServer(this.server);
    this.server = undefined;
  }

  /** An access key the stand-in knows (with a session token, as instance roles and STS hand out). */
  addKey(accessKeyId: string, secretAccessKey: string, sessionToken?: string): void {
    this.keys.set(accessKeyId, { secretAccessKey, sessionToken });
  }

  /** Ends a session: requests with its token are refused with ExpiredTokenException. */
  expireSession(accessKeyId: string): void {
    const k = this.keys.get(accessKeyId);
    if (k) k.sessionToken = `expired-${randomUUID()}`;
  }

  /** Creates the secret or rotates it: a new value under a new VersionId. */
  putSecret(name: string, value: string): string {
    const versionId = randomUUID();
    this.secrets.set(name, { value, versionId, created: Date.now() });
    return versionId;
  }

  deleteSecret(name: string): void {
    this.secrets.delete(name);
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const body = Buffer.concat(chunks).toString('utf8');
    const target = header(req, 'x-amz-target');
    const record = (outcome: string): void => {
      this.requests.push({ target, accessKeyId: credentialOf(req), outcome });
    };
    const refuse = (type: string, message: string): void => {
      record(type);
      send(res, 400, { __type: type, message });
    };
    const problem = this.verify(req, body);
    if (problem) return refuse(problem.type, problem.message);
    if (req.method !== 'POST' || target !== 'secretsmanager.GetSecretValue') {
      return refuse('UnknownOperationException', `unknown operation ${target ?? '(none)'}`);
    }
    if (header(req, 'content-type') !== 'application/x-amz-json-1.1') {
      return refuse('SerializationException', 'expected application/x-amz-json-1.1');
    }
    const { SecretId } = JSON.parse(body) as { SecretId?: string };
    const secret = SecretId === undefined ? undefined : this.secrets.get(SecretId);
    if (!secret) return refuse('ResourceNotFoundException', "Secrets Manager can't find the specified secret.");
    record('200');
    send(res, 200, {
      ARN: `arn:aws:secretsmanager:${this.region}:123456789012:secret:${SecretId}-AbCdEf`,
      Name: SecretId,
      VersionId: secret.versionId,
      SecretString: secret.value,
      VersionStages: ['AWSCURRENT'],
      CreatedDate: secret.created / 1000,
    });
  }

  /** Recomputes the request's SigV4 signature; a problem as AWS names it, or undefined when it is genuine. */
  private verify(req: IncomingMessage, body: string): { type: string; message: string } | undefined {
    const m =
      /^AWS4-HMAC-SHA256 Credential=([^/]+)\/(\d{8})\/([^/]+)\/([^/]+)\/aws4_request, ?SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})$/.exec(
        header(req, 'authorization') ?? '',
      );
    if (!m) return { type: 'IncompleteSignatureException', message: 'Authorization header missing or malformed' };
    const [, accessKeyId, , region, service, signedHeaders, signature] = m as unknown as string[];
    const key = this.keys.get(accessKeyId!);
    if (!key)
      return { type: 'UnrecognizedClientException', message: 'The security token included in the request is invalid.' };
    if (region !== this.region || service !== 'secretsmanager') {
      return {
        type: 'InvalidSignatureException',
        message: `credential scope ${region}/${service} is not this endpoint's`,
      };
    }
    const amzDate = header(req, 'x-amz-date') ?? '';
    const at = Date.parse(amzDate.replace(/^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/, '$1-$2-$3T$4:$5:$6Z'));
    if (!Number.isFinite(at) || Math.abs(Date.now() - at) > MAX_SKEW_MS) {
      return { type: 'InvalidSignatureException', message: 'Signature expired or X-Amz-Date missing' };
    }
    const headers: Record<string, string> = {};
    for (const name of signedHeaders!.split(';')) headers[name] = header(req, name) ?? '';
    if (!('host' in headers) || !('x-amz-date' in headers)) {
      return { type: 'InvalidSignatureException', message: 'host and x-amz-date must be signed' };
    }
    if (key.sessionToken !== undefined && header(req, 'x-amz-security-token') !== key.sessionToken) {
      return { type: 'ExpiredTokenException', message: 'The security token included in the request is expired' };
    }
    const signed = aws4.sign(
      { host: headers.host, method: req.method, path: req.url, service, region, body, headers: { ...headers } },
      { accessKeyId: accessKeyId!, secretAccessKey: key.secretAccessKey },
    );
    const expected = /Signature=([0-9a-f]{64})/.exec(String(signed.headers?.Authorization))?.[1] ?? '';
    if (expected.length !== signature!.length || !timingSafeEqual(Buffer.from(expected), Buffer.from(signature!))) {
      return {
        type: 'InvalidSignatureException',
        message: 'The request signature we calculated does not match the signature you provided.',
      };
    }
    return undefined;
  }
}

function credentialOf(req: IncomingMessage): string | undefined {
  return /Credential=([^/]+)\//.exec(header(req, 'authorization') ?? '')?.[1];
}

function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v.join(',') : v;
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/x-amz-json-1.1', 'x-amzn-requestid': randomUUID() });
  res.end(JSON.stringify(body));
}
