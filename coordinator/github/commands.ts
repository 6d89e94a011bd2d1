/**
 * Commands written to eka-ci in pull-request comments. A command is a line that starts (after optional
 * whitespace) with a mention of the bot, then a verb and its arguments:
 *
 *     @eka-ci build hello python3Packages.requests
 *     @eka-ci rebuild                 (the attributes that failed)
 *     @eka-ci merge [merge|squash|rebase]
 *     @eka-ci merge cancel
 *     @eka-ci approve [SHA]           (lets an untrusted author's pull request be built: the head commit of the
 *                                     moment the comment was written, or the commit SHA names)
 *
 * Mention and verbs are case-insensitive, attribute paths are not. A mention anywhere else in a line is
 * conversation, not a command. Lines inside fenced code blocks or block quotes are never commands: quoting a
 * comment in a reply must not run its commands a second time.
 *
 * Parsing never fails: a line addressed to the bot that is not a valid command becomes `invalid` with a reason
 * meant to be shown to its author. Whether the author may run a command is decided elsewhere (`authorize`).
 */
import { codeSpan } from '../review/markdown.js';

export const DEFAULT_BOT_NAME = 'eka-ci';

export const MERGE_METHODS = ['merge', 'squash', 'rebase'] as const;
export type MergeMethod = (typeof MERGE_METHODS)[number];

/** Every variant carries the command line as written (trimmed), so a reply can quote what it answers. */
export type PrCommand =
  | { kind: 'build'; line: string; attrs: string[] }
  | { kind: 'rebuild'; line: string }
  | { kind: 'merge'; line: string; method: MergeMethod }
  | { kind: 'merge-cancel'; line: string }
  | { kind: 'approve'; line: string; sha?: string }
  | { kind: 'invalid'; line: string; reason: string };

const ATTR_PATH = /^[A-Za-z0-9_'-]+(?:\.[A-Za-z0-9_'-]+)*$/;

/**
 * A dotted Nix attribute path whose components use only letters, digits, `_`, `-` and `'`, none empty. Narrower
 * than what Nix accepts quoted, but it covers package attributes and keeps every accepted path safe to show in
 * Markdown and to pass on.
 */
export function isAttrPath(s: string): boolean {
  return ATTR_PATH.test(s);
}

/** The commands in a comment body, in the order written. */
export function parseCommands(body: string, botName: string = DEFAULT_BOT_NAME): PrCommand[] {
  const mention = mentionPattern(botName);
  const commands: PrCommand[] = [];
  let fence: string | undefined;
  for (const raw of body.split(/\r\n|\r|\n/)) {
    const opening = FENCE.exec(raw)?.[1];
    if (fence !== undefined) {
      // Only the opening character, repeated at least as often and with nothing after it, closes a fence.
      if (opening !== undefined && opening[0] === fence[0] && opening.length >= fence.length && isBareFence(raw)) {
        fence = undefined;
      }
      continue;
    }
    if (opening !== undefined) {
      fence = opening;
      continue;
    }
    if (QUOTE.test(raw)) continue;
    const m = mention.exec(raw);
    if (m) commands.push(parseCommand(raw.trim(), m[1]!.trim()));
  }
  return commands;
}

// A fence is three or more backticks or tildes. CommonMark allows at most three spaces of indentation, more
// inside list items; any indentation is accepted so that a fence in a list item still hides its commands. A
// fence that is never closed runs to the end of the comment, so everything after it is code.
const FENCE = /^\s*(`{3,}|~{3,})/;
const QUOTE = /^\s*>/;

function isBareFence(line: string): boolean {
  return /^\s*(`{3,}|~{3,})\s*$/.test(line);
}

/** Matches a command line; group 1 is what follows the mention. `@eka-ci-bot` is another user, not eka-ci. */
function mentionPattern(botName: string): RegExp {
  const name = botName.replace(/^@/, '').replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return new RegExp(`^\\s*@${name}(?![A-Za-z0-9_-])[:,]?(.*)$`, 'i');
}

function parseCommand(line: string, rest: string): PrCommand {
  const invalid = (reason: string): PrCommand => ({ kind: 'invalid', line, reason });
  const [verb, ...args] = rest.split(/\s+/).filter((w) => w !== '');
  if (verb === undefined) return invalid(`no command given; ${USAGE}`);
  switch (verb.toLowerCase()) {
    case 'build': {
      if (args.length === 0) return invalid('`build` needs at least one attribute, e.g. `build hello`');
      const bad = args.filter((a) => !isAttrPath(a));
      const what = bad.length === 1 ? 'an attribute path' : 'attribute paths';
      if (bad.length > 0) return invalid(`not ${what}: ${quoted(bad)}`);
      return { kind: 'build', line, attrs: [...new Set(args)] };
    }
    case 'rebuild':
      if (args.length > 0) return invalid('`rebuild` takes no arguments: it rebuilds what failed; use `build <attr>`');
      return { kind: 'rebuild', line };
    case 'approve':
      if (args.length > 1 || (args[0] !== undefined && !/^[0-9a-f]{7,40}$/i.test(args[0]))) {
        return invalid('`approve` takes at most one argument: the commit to approve (7 to 40 hex digits)');
      }
      return args[0] === undefined ? { kind: 'approve', line } : { kind: 'approve', line, sha: args[0].toLowerCase() };
    case 'merge':
      return parseMerge(line, args, invalid);
    default:
      return invalid(`unknown command ${quoted([verb])}; ${USAGE}`);
  }
}

function parseMerge(line: string, args: string[], invalid: (reason: string) => PrCommand): PrCommand {
  if (args.length > 1) return invalid('`merge` takes at most one argument: merge, squash, rebase or cancel');
  const arg = args[0]?.toLowerCase();
  if (arg === undefined) return { kind: 'merge', line, method: 'merge' };
  if (arg === 'cancel') return { kind: 'merge-cancel', line };
  const method = MERGE_METHODS.find((m) => m === arg);
  if (method === undefined) return invalid(`unknown merge method ${quoted(args)}; use merge, squash or rebase`);
  return { kind: 'merge', line, method };
}

const USAGE =
  'commands are `build <attr>…`, `rebuild`, `merge [merge|squash|rebase]`, `merge cancel` and `approve [SHA]`';

/** The commenter's words as code, shown as written: a backtick in one cannot end its span (codeSpan). */
function quoted(words: readonly string[]): string {
  return words.map(codeSpan).join(', ');
}
