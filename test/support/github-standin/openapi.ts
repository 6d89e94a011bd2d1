/**
 * GitHub's published OpenAPI description (`@octokit/openapi`, all `$ref`s inlined) as a request validator: which
 * operation a method and path name, and whether its parameters and JSON body conform.
 *
 * The description is 73 MB; it is parsed once per process, on the first request, and only the schemas of operations
 * that tests actually call are compiled.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import formatsModule from 'ajv-formats';

const addFormats = formatsModule.default;
const require = createRequire(import.meta.url);
const SPEC_FILE = '@octokit/openapi/generated/api.github.com.deref.json';
const HTTP_METHODS = ['get', 'put', 'post', 'patch', 'delete', 'head'] as const;

type Schema = Record<string, unknown>;

interface Parameter {
  name: string;
  in: 'path' | 'query' | 'header' | 'cookie';
  required?: boolean;
  schema?: Schema;
}

interface Operation {
  operationId: string;
  parameters?: Parameter[];
  requestBody?: { required?: boolean; content: Record<string, { schema?: Schema }> };
  externalDocs?: { url: string };
}

interface Route {
  method: string;
  template: string;
  pattern: RegExp;
  paramNames: string[];
  /** Characters outside `{…}`: among templates matching a path, the most literal one wins (`issues/comments`). */
  literalLength: number;
  operation: Operation;
}

/** An operation that a request's method and path matched. */
export interface MatchedOperation {
  operationId: string;
  /** The path template, e.g. `/repos/{owner}/{repo}/check-runs/{check_run_id}`. */
  template: string;
  pathParams: Record<string, string>;
  documentationUrl: string;
}

export interface ValidationResult {
  /** undefined when no operation of the description has this method and path. */
  operation: MatchedOperation | undefined;
  /** Empty when the request conforms. */
  errors: string[];
}

interface CompiledOperation {
  path: ValidateFunction;
  query: ValidateFunction;
  body: ValidateFunction | undefined;
}

const GENERIC_DOCS = 'https://docs.github.com/rest';

let routes: Route[] | undefined;
const compiled = new Map<string, CompiledOperation>();
// Query and path values arrive as strings; coercion lets `{ type: integer }` check that `?page=2` is a number.
const paramAjv = new Ajv({ strict: false, allErrors: true, coerceTypes: 'array', logger: false });
const bodyAjv = new Ajv({ strict: false, allErrors: true, logger: false });
addFormats(paramAjv);
addFormats(bodyAjv);

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function loadRoutes(): Route[] {
  if (routes) return routes;
  const spec = JSON.parse(readFileSync(require.resolve(SPEC_FILE), 'utf8')) as {
    paths: Record<string, Partial<Record<string, Operation>>>;
  };
  const list: Route[] = [];
  for (const [template, item] of Object.entries(spec.paths)) {
    const paramNames: string[] = [];
    const source = template
      .split(/(\{[^}]+\})/)
      .map((part) => {
        const param = /^\{([^}]+)\}$/.exec(part);
        if (!param) return escapeRegExp(part);
        paramNames.push(param[1]!);
        return '([^/]+)';
      })
      .join('');
    const literalLength = template.replace(/\{[^}]+\}/g, '').length;
    for (const method of HTTP_METHODS) {
      const operation = item[method];
      if (!operation?.operationId) continue;
      const pattern = new RegExp(`^${source}$`);
      // Only what requests are checked against is kept; response schemas, most of the 73 MB, are left to the GC.
      const { operationId, parameters, requestBody, externalDocs } = operation;
      const kept = { operationId, parameters, requestBody, externalDocs };
      list.push({ method: method.toUpperCase(), template, pattern, paramNames, literalLength, operation: kept });
    }
  }
  routes = list.sort((a, b) => b.literalLength - a.literalLength);
  return routes;
}

/**
 * Rewrites OpenAPI 3.0 dialect into JSON Schema that ajv checks faithfully: `nullable` becomes a `null` type (ajv's
 * own support refuses `nullable` without `type`), and objects that list their properties refuse others. GitHub
 * silently ignores unknown fields, so without that a misspelt field (`detail_url`) would pass unnoticed. Inside
 * `allOf`/`anyOf`/`oneOf` objects stay open, since each branch describes only part of the value.
 */
function toJsonSchema(schema: unknown, inComposition = false): unknown {
  if (Array.isArray(schema)) return schema.map((s) => toJsonSchema(s, inComposition));
  if (schema === null || typeof schema !== 'object') return schema;
  const source = schema as Schema;
  const out: Schema = {};
  for (const [key, value] of Object.entries(source)) {
    if (key === 'nullable' || key === 'example' || key === 'examples') continue;
    if (key === 'properties' && value && typeof value === 'object') {
      out[key] = Object.fromEntries(Object.entries(value).map(([name, s]) => [name, toJsonSchema(s)]));
    } else if (key === 'allOf' || key === 'anyOf' || key === 'oneOf') {
      out[key] = toJsonSchema(value, true);
    } else if (key === 'items' || key === 'additionalProperties' || key === 'not') {
      out[key] = toJsonSchema(value);
    } else {
      out[key] = value;
    }
  }
  if (out.properties !== undefined && out.additionalProperties === undefined && !inComposition) {
    out.additionalProperties = false;
  }
  if (source.nullable !== true) return out;
  if (typeof out.type === 'string') {
    out.type = [out.type, 'null'];
    if (Array.isArray(out.enum) && !out.enum.includes(null)) out.enum = [...(out.enum as unknown[]), null];
    return out;
  }
  return { anyOf: [{ type: 'null' }, out] };
}

function paramsValidator(params: Parameter[], where: 'path' | 'query'): ValidateFunction {
  const mine = params.filter((p) => p.in === where);
  return paramAjv.compile({
    type: 'object',
    properties: Object.fromEntries(mine.map((p) => [p.name, toJsonSchema(p.schema ?? {})])),
    required: mine.filter((p) => p.required === true || where === 'path').map((p) => p.name),
    additionalProperties: false,
  });
}

function compile(operation: Operation): CompiledOperation {
  const cached = compiled.get(operation.operationId);
  if (cached) return cached;
  const params = operation.parameters ?? [];
  const bodySchema = operation.requestBody?.content['application/json']?.schema;
  const result: CompiledOperation = {
    path: paramsValidator(params, 'path'),
    query: paramsValidator(params, 'query'),
    body: bodySchema ? bodyAjv.compile(toJsonSchema(bodySchema) as Schema) : undefined,
  };
  compiled.set(operation.operationId, result);
  return result;
}

function describe(where: string, errors: ErrorObject[] | null | undefined): string[] {
  return (errors ?? []).map((e) => {
    const params = e.params as { additionalProperty?: string; allowedValues?: unknown[] };
    const detail =
      params.additionalProperty !== undefined
        ? ` (${params.additionalProperty})`
        : params.allowedValues
          ? ` (${params.allowedValues.map((v) => JSON.stringify(v)).join(', ')})`
          : '';
    return `${where}${e.instancePath} ${e.message ?? 'is invalid'}${detail}`;
  });
}

function findRoute(method: string, path: string): { route: Route; operation: MatchedOperation } | undefined {
  for (const route of loadRoutes()) {
    if (route.method !== method) continue;
    const m = route.pattern.exec(path);
    if (!m) continue;
    const pathParams = Object.fromEntries(route.paramNames.map((name, i) => [name, decodeURIComponent(m[i + 1]!)]));
    const operation = {
      operationId: route.operation.operationId,
      template: route.template,
      pathParams,
      documentationUrl: route.operation.externalDocs?.url ?? GENERIC_DOCS,
    };
    return { route, operation };
  }
  return undefined;
}

/** The operation that `method path` names, with its path parameters (percent-decoded). */
export function matchOperation(method: string, path: string): MatchedOperation | undefined {
  return findRoute(method, path)?.operation;
}

/**
 * Checks a request against the operation its method and path name: path and query parameters present and of the
 * declared types, no undeclared query parameters, and a JSON body that the operation's `application/json` schema
 * accepts (or no body where the operation takes none).
 */
export function validateRequest(
  method: string,
  path: string,
  query: Record<string, string>,
  body: unknown,
): ValidationResult {
  const found = findRoute(method, path);
  if (!found) return { operation: undefined, errors: [`no operation of GitHub's REST API is ${method} ${path}`] };
  const { route, operation } = found;
  const validators = compile(route.operation);
  const errors: string[] = [];
  if (!validators.path({ ...operation.pathParams })) errors.push(...describe('path', validators.path.errors));
  if (!validators.query({ ...query })) errors.push(...describe('query', validators.query.errors));
  if (body === undefined) {
    if (route.operation.requestBody?.required) errors.push('body is required');
  } else if (!validators.body) {
    errors.push(`body: ${operation.operationId} takes no JSON body`);
  } else if (!validators.body(body)) {
    errors.push(...describe('body', validators.body.errors));
  }
  return { operation, errors };
}
