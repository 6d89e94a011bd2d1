/**
 * The HTTP requests of a push (agent/nix/s3-push.ts): questions to the coordinator and uploads to presigned URLs, with
 * the error text each kind of server answers with.
 */
import { createReadStream } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { pipeline } from 'node:stream/promises';

/** Spooled NARs are read in 1 MiB chunks: fewer, larger writes to the socket. */
const READ_CHUNK = 1024 * 1024;

/** S3 error codes and messages are short; anything longer is not worth putting in an error. */
const MAX_ERROR_BODY = 2_000;

/** The longest answer read: `missing` for 1,000 paths is ≈100 KiB. */
const MAX_RESPONSE_BYTES = 4 * 1024 * 1024;

/** Whether a request that got this status may succeed when sent again (S3 or the coordinator busy). */
export function transient(status: number): boolean {
  return status >= 500 || status === 429;
}

/**
 * One HTTP request whose body is `body` (a string, or a file streamed from disk), answered with the status and up to
 * MAX_RESPONSE_BYTES of the response. node:http rather than fetch: for the 2,000 small requests of a push fetch cost
 * ≈1 ms of CPU each, and for a 512 MiB upload 2.5× (async-iterable body) to 8× (web stream) the CPU of a piped
 * request.
 */
export function send(
  url: string,
  method: 'POST' | 'PUT',
  headers: Record<string, string>,
  body: string | { file: string },
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const request = url.startsWith('https:') ? httpsRequest : httpRequest;
    const req = request(url, { method, headers }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (s: string) => {
        if (text.length < MAX_RESPONSE_BYTES) text += s;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (typeof body === 'string') req.end(body);
    else pipeline(createReadStream(body.file, { highWaterMark: READ_CHUNK }), req).catch(reject);
  });
}

/** ` Code: Message` from an S3 XML error body, or '' when there is none. */
export function s3ErrorText(answer: string): string {
  const body = answer.slice(0, MAX_ERROR_BODY);
  const code = /<Code>([^<]*)<\/Code>/.exec(body)?.[1];
  const message = /<Message>([^<]*)<\/Message>/.exec(body)?.[1];
  return code === undefined ? '' : ` ${code}${message ? `: ${message}` : ''}`;
}

/** The message of the coordinator's `{error: {message}}` answer, or its text. */
export function coordinatorErrorText(body: string): string {
  try {
    const message = (JSON.parse(body) as { error?: { message?: unknown } }).error?.message;
    if (typeof message === 'string') return message;
  } catch {
    // not JSON: quoted as it is
  }
  return body.slice(0, MAX_ERROR_BODY).trim();
}
