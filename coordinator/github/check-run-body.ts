import { CheckRunSpecError } from './errors.js';

/**
 * A check run's content as GitHub takes it: the spec callers give, validated against GitHub's limits and clipped
 * where clipping is harmless, the stored state it becomes, and the request body sent for it.
 */

export type CheckStatus = 'queued' | 'in_progress' | 'completed';
export type CheckConclusion =
  'success' | 'failure' | 'neutral' | 'cancelled' | 'timed_out' | 'action_required' | 'skipped';

export interface CheckRunAction {
  label: string;
  description: string;
  identifier: string;
}

export interface CheckRunSpec {
  name: string;
  status: CheckStatus;
  /** Required when, and only when, `status` is `completed`. */
  conclusion?: CheckConclusion;
  title: string;
  summary: string;
  text?: string;
  detailsUrl?: string;
  actions?: CheckRunAction[];
  externalId?: string;
}

// GitHub's limits on output.summary and output.text (OpenAPI `maxLength: 65535`). GitHub enforces them in UTF-8
// bytes, not the characters its reference says (github/docs#35252), so clipping by bytes satisfies both readings.
const MAX_OUTPUT_BYTES = 65_535;
// The OpenAPI description sets no limit on output.title, which the checks UI shows on one line. 255 is the limit
// GitHub documents for annotation titles; keeping to it never risks a 422 on a limit GitHub does not publish.
const MAX_TITLE_BYTES = 255;
// Actions: OpenAPI `maxItems: 3`, and `maxLength` 20 (label), 40 (description), 20 (identifier).
const MAX_ACTIONS = 3;
const MAX_ACTION_LABEL_BYTES = 20;
const MAX_ACTION_DESCRIPTION_BYTES = 40;
const MAX_ACTION_IDENTIFIER_BYTES = 20;
export /** What `check_runs.desired_json` and `sent_json` hold; field order is fixed so equal states serialise equally. */
interface Desired {
  name: string;
  status: CheckStatus;
  conclusion: CheckConclusion | null;
  title: string;
  summary: string;
  text: string | null;
  detailsUrl: string | null;
  actions: CheckRunAction[];
  externalId: string | null;
  startedAt: string | null;
  completedAt: string | null;
}

export function validate(spec: CheckRunSpec): void {
  if ((spec.status === 'completed') !== (spec.conclusion !== undefined)) {
    throw new CheckRunSpecError(`check run ${spec.name}: a conclusion goes with status completed, and only with it`);
  }
  const actions = spec.actions ?? [];
  if (actions.length > MAX_ACTIONS) {
    throw new CheckRunSpecError(
      `check run ${spec.name}: ${actions.length} actions; GitHub takes at most ${MAX_ACTIONS}`,
    );
  }
  for (const a of actions) {
    if (Buffer.byteLength(a.identifier) > MAX_ACTION_IDENTIFIER_BYTES) {
      throw new CheckRunSpecError(
        `check run ${spec.name}: action identifier ${a.identifier} is over GitHub's ${MAX_ACTION_IDENTIFIER_BYTES} characters`,
      );
    }
  }
}

/** The stored form of a spec. Timestamps carry over while the status stays, so an unchanged set compares equal. */
export function desiredState(spec: CheckRunSpec, prev: Desired | undefined, nowIso: string): Desired {
  let startedAt: string | null = null;
  if (spec.status === 'in_progress') startedAt = prev?.status === 'in_progress' ? prev.startedAt : nowIso;
  else if (spec.status === 'completed' && prev !== undefined && prev.status !== 'queued') startedAt = prev.startedAt;
  const clipped = (text: string): string =>
    clip(text, MAX_OUTPUT_BYTES, `\n\n… (clipped to GitHub's ${MAX_OUTPUT_BYTES} bytes)`);
  return {
    name: spec.name,
    status: spec.status,
    conclusion: spec.conclusion ?? null,
    title: clip(spec.title, MAX_TITLE_BYTES, '…'),
    summary: clipped(spec.summary),
    text: spec.text === undefined ? null : clipped(spec.text),
    detailsUrl: spec.detailsUrl ?? null,
    actions: (spec.actions ?? []).map((a) => ({
      label: clip(a.label, MAX_ACTION_LABEL_BYTES, '…'),
      description: clip(a.description, MAX_ACTION_DESCRIPTION_BYTES, '…'),
      identifier: a.identifier,
    })),
    externalId: spec.externalId ?? null,
    startedAt,
    completedAt: spec.status !== 'completed' ? null : prev?.status === 'completed' ? prev.completedAt : nowIso,
  };
}

/** The body of a create or update: the whole state each time, so resending after a lost answer is harmless. */
export function requestBody(d: Desired, sent: Desired | undefined) {
  // GitHub keeps fields an update leaves out: text and actions that went away are cleared explicitly.
  const text = d.text ?? (sent?.text ? '' : undefined);
  return {
    name: d.name,
    status: d.status,
    ...(d.status === 'completed' && d.conclusion !== null && d.completedAt !== null
      ? { conclusion: d.conclusion, completed_at: d.completedAt }
      : {}),
    ...(d.startedAt !== null ? { started_at: d.startedAt } : {}),
    output: { title: d.title, summary: d.summary, ...(text !== undefined ? { text } : {}) },
    ...(d.detailsUrl !== null ? { details_url: d.detailsUrl } : {}),
    ...(d.externalId !== null ? { external_id: d.externalId } : {}),
    ...(d.actions.length > 0 || (sent?.actions.length ?? 0) > 0 ? { actions: d.actions } : {}),
  };
}

/** `text` cut to `maxBytes` of UTF-8 with `note` at the end, never inside a character. */
export function clip(text: string, maxBytes: number, note: string): string {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= maxBytes) return text;
  let end = maxBytes - Buffer.byteLength(note);
  while (end > 0 && ((bytes[end] ?? 0) & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end).toString('utf8') + note;
}
