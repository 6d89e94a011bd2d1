import { Ajv2020 } from 'ajv/dist/2020.js';
import { OPENAPI_DOCUMENT } from '../../coordinator/http/openapi.js';

/**
 * The API's OpenAPI document as a checker: every response a test gets from `/api/v1` goes through `checkedFetch`,
 * which fails the test when the status, the content type or the body is not what the document says.
 */

type Operation = { responses: Record<string, { content?: Record<string, { schema: unknown }> }> };
const paths = OPENAPI_DOCUMENT.paths as unknown as Record<string, Record<string, Operation>>;

const ajv = new Ajv2020({ strict: false, allErrors: true });
ajv.addSchema({ $id: 'openapi', components: OPENAPI_DOCUMENT.components });
const refs = (schema: unknown): unknown =>
  JSON.parse(JSON.stringify(schema).replaceAll('"#/components/', '"openapi#/components/')) as unknown;

/** The document's path template that `path` (under /api/v1, without its query) matches, or undefined. */
export function templateOf(path: string): string | undefined {
  return Object.keys(paths).find((template) => {
    const pattern = template.replace(/[.]/g, '\\.').replace(/\{[^}]+\}/g, '[^/]+');
    return new RegExp(`^${pattern}$`).test(path);
  });
}

/** Throws, naming what differs, when a response does not keep the contract. */
export function checkResponse(method: string, url: string, status: number, contentType: string, body: string): void {
  const { pathname } = new URL(url);
  const path = pathname.replace(/^\/api\/v1/, '');
  const template = templateOf(path);
  if (!template) throw new Error(`${method} ${pathname}: no such path in the OpenAPI document`);
  const operation = paths[template]![method.toLowerCase()];
  if (!operation) throw new Error(`${method} ${template}: no such operation in the OpenAPI document`);
  const response = operation.responses[String(status)];
  if (!response) throw new Error(`${method} ${template}: status ${status} is not in the OpenAPI document`);
  const mediaType = contentType.split(';')[0]!.trim();
  const content = response.content?.[mediaType];
  if (!content) throw new Error(`${method} ${template} ${status}: content type "${mediaType}" is not documented`);
  if (mediaType !== 'application/json') return;
  const validate = ajv.compile(refs(content.schema) as object);
  if (!validate(JSON.parse(body))) {
    throw new Error(`${method} ${template} ${status}: body breaks the contract: ${ajv.errorsText(validate.errors)}`);
  }
}

export interface CheckedResponse {
  status: number;
  headers: Headers;
  text: string;
  json<T>(): T;
}

/** `fetch` of an `/api/v1` URL whose whole answer is read and checked against the OpenAPI document. */
export async function checkedFetch(url: string, init: RequestInit = {}): Promise<CheckedResponse> {
  const r = await fetch(url, init);
  const text = await r.text();
  checkResponse(init.method ?? 'GET', url, r.status, r.headers.get('content-type') ?? '', text);
  return { status: r.status, headers: r.headers, text, json: <T>() => JSON.parse(text) as T };
}
