import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { DerivationParseError } from '../errors.js';
import { nixBase32 } from './narinfo.js';
import { STORE_DIR, isDrvPath, storePathName } from './store-path.js';
import { turn } from '../turn.js';

/** One output of a derivation. `hashAlgo`/`hash` are empty for input-addressed outputs, as in the .drv file. */
export interface DerivationOutput {
  /** Empty for floating content-addressed outputs, whose path is only known after the build. */
  path: string;
  /** `sha256` for flat hashing, `r:sha256` for recursive (NAR) hashing, `text:sha256` for text. */
  hashAlgo: string;
  hash: string;
}

/** A parsed `.drv` file, field for field as `nix show-derivation` shows it. */
export interface Derivation {
  outputs: Record<string, DerivationOutput>;
  /** drv path -> names of the outputs used. */
  inputDrvs: Record<string, string[]>;
  inputSrcs: string[];
  system: string;
  builder: string;
  args: string[];
  env: Record<string, string>;
}

const QUOTE = 0x22;
const COMMA = 0x2c;
const OPEN_PAREN = 0x28;
const CLOSE_PAREN = 0x29;
const OPEN_BRACKET = 0x5b;
const CLOSE_BRACKET = 0x5d;

/** How many characters of the offending input an error message quotes. */
const ERROR_CONTEXT_CHARS = 24;

/**
 * A single pass over the text with index arithmetic and native `indexOf`, because the graph parses every .drv
 * of an evaluation (100,000 and more for nixpkgs) and a tokenizer or regex-per-token is several times slower.
 */
class Scanner {
  pos = 0;
  /** Index of the first backslash at or after the last string start; `text.length` when there is none. */
  private nextBackslash = -1;

  constructor(
    private readonly text: string,
    private readonly file: string,
  ) {}

  literal(s: string): void {
    if (!this.text.startsWith(s, this.pos)) {
      // A file cut short inside the literal is reported as truncated, like every other truncation.
      const rest = this.text.slice(this.pos);
      this.fail(`expected ${JSON.stringify(s)}`, s.startsWith(rest) ? this.text.length : this.pos);
    }
    this.pos += s.length;
  }

  char(code: number): void {
    if (this.text.charCodeAt(this.pos) !== code) this.fail(`expected '${String.fromCharCode(code)}'`);
    this.pos++;
  }

  /** Consumes `[` and returns whether the list has an element, consuming `]` if it has none. */
  openList(): boolean {
    this.char(OPEN_BRACKET);
    if (this.text.charCodeAt(this.pos) !== CLOSE_BRACKET) return true;
    this.pos++;
    return false;
  }

  /** After a list element: consumes `,` and returns true, or consumes `]` and returns false. */
  more(): boolean {
    const c = this.text.charCodeAt(this.pos++);
    if (c !== COMMA && c !== CLOSE_BRACKET) this.fail("expected ',' or ']'", this.pos - 1);
    return c === COMMA;
  }

  string(): string {
    const open = this.pos;
    this.char(QUOTE);
    const { text } = this;
    const end = text.indexOf('"', this.pos);
    if (end < 0) this.unterminated(open);
    if (this.nextBackslash < this.pos) {
      const b = text.indexOf('\\', this.pos);
      this.nextBackslash = b < 0 ? text.length : b;
    }
    // Almost every string in a .drv has no escape: return a slice without copying characters.
    if (end < this.nextBackslash) {
      const s = text.slice(this.pos, end);
      this.pos = end + 1;
      return s;
    }
    return this.escapedString(open);
  }

  /** Nix writes `\"`, `\\`, `\n`, `\r` and `\t`; like Nix's own parser, any other escaped character stands for itself. */
  private escapedString(open: number): string {
    const { text } = this;
    let out = '';
    let i = this.pos;
    let quote = text.indexOf('"', i);
    let backslash = this.nextBackslash;
    // Jump between backslashes and the closing quote with indexOf; each is searched again only once passed.
    while (quote >= 0) {
      if (backslash < i) backslash = text.indexOf('\\', i);
      if (backslash < 0 || quote < backslash) {
        this.pos = quote + 1;
        return out + text.slice(i, quote);
      }
      const e = text[backslash + 1];
      if (e === undefined) break;
      out += text.slice(i, backslash) + (e === 'n' ? '\n' : e === 'r' ? '\r' : e === 't' ? '\t' : e);
      i = backslash + 2;
      if (quote < i) quote = text.indexOf('"', i);
    }
    return this.unterminated(open);
  }

  /** A string and the separator after it: ',' between fields, ')' after the last field of a tuple. */
  stringThen(next: number): string {
    const s = this.string();
    this.char(next);
    return s;
  }

  stringList(): string[] {
    const list: string[] = [];
    if (this.openList()) {
      do list.push(this.string());
      while (this.more());
    }
    return list;
  }

  end(): void {
    // Nix writes no trailing newline, but a file that went through an editor or `echo` may have one.
    if (this.text.slice(this.pos).trim() !== '') this.fail('expected end of file after the closing parenthesis');
  }

  private unterminated(open: number): never {
    return this.fail(`expected the '"' closing the string at byte ${this.byteOffset(open)}`, this.text.length);
  }

  /** Positions are reported in bytes so that they match `head -c`, `xxd` and editors' byte offsets. */
  private byteOffset(at: number): number {
    return Buffer.byteLength(this.text.slice(0, at), 'utf8');
  }

  fail(expected: string, at = this.pos): never {
    const byte = this.byteOffset(at);
    const found =
      at >= this.text.length
        ? 'the end of the file (is it truncated?)'
        : JSON.stringify(this.text.slice(at, at + ERROR_CONTEXT_CHARS)) +
          (at + ERROR_CONTEXT_CHARS < this.text.length ? '…' : '');
    throw new DerivationParseError(`${this.file}: malformed derivation at byte ${byte}: ${expected}, found ${found}`);
  }
}

/** Dictionaries without a prototype, so that an environment variable called `__proto__` is kept as data. */
function dict<T>(): Record<string, T> {
  return Object.create(null) as Record<string, T>;
}

/**
 * Parses the ATerm text of a `.drv` file. Throws DerivationParseError naming `pathForErrors` and the byte position.
 */
export function parseDerivation(text: string, pathForErrors = '<derivation>'): Derivation {
  const s = new Scanner(text, pathForErrors);
  if (text.startsWith('DrvWithVersion(')) {
    // The versioned form carries dynamic-derivation input trees, which the scheduler cannot represent yet.
    s.fail(
      'expected a plain "Derive(" derivation (this one uses an experimental versioned format, e.g. dynamic derivations)',
    );
  }
  s.literal('Derive(');

  const outputs = dict<DerivationOutput>();
  if (s.openList()) {
    do {
      s.char(OPEN_PAREN);
      const name = s.stringThen(COMMA);
      const path = s.stringThen(COMMA);
      const hashAlgo = s.stringThen(COMMA);
      outputs[name] = { path, hashAlgo, hash: s.stringThen(CLOSE_PAREN) };
    } while (s.more());
  }
  s.char(COMMA);

  const inputDrvs = dict<string[]>();
  if (s.openList()) {
    do {
      s.char(OPEN_PAREN);
      const drv = s.stringThen(COMMA);
      inputDrvs[drv] = s.stringList();
      s.char(CLOSE_PAREN);
    } while (s.more());
  }
  s.char(COMMA);
  const inputSrcs = s.stringList();
  s.char(COMMA);
  const system = s.stringThen(COMMA);
  const builder = s.stringThen(COMMA);
  const args = s.stringList();
  s.char(COMMA);

  const env = dict<string>();
  if (s.openList()) {
    do {
      s.char(OPEN_PAREN);
      const key = s.stringThen(COMMA);
      env[key] = s.stringThen(CLOSE_PAREN);
    } while (s.more());
  }
  s.char(CLOSE_PAREN);
  s.end();
  return { outputs, inputDrvs, inputSrcs, system, builder, args, env };
}

/**
 * Whether the derivation is fixed-output (a fetcher): its result is known in advance, so it may use the network
 * and the scheduler gives it its own lane. Impure derivations also carry a hash algorithm but their hash field
 * reads `impure`; floating content-addressed ones have an empty hash. Neither is fixed-output.
 */
export function isFixedOutput(d: Derivation): boolean {
  const names = Object.keys(d.outputs);
  const hash = d.outputs.out?.hash;
  return names.length === 1 && hash !== undefined && hash !== '' && hash !== 'impure';
}

const structuredAttrsCache = new WeakMap<Derivation, Record<string, unknown>>();

/** With `__structuredAttrs = true`, Nix puts every attribute into one JSON string in `env.__json`. */
function structuredAttrs(d: Derivation): Record<string, unknown> | undefined {
  const json = d.env.__json;
  if (json === undefined) return undefined;
  let attrs = structuredAttrsCache.get(d);
  if (attrs === undefined) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(json);
    } catch (e) {
      throw new DerivationParseError(`structured attributes (env.__json) are not valid JSON: ${String(e)}`);
    }
    // Nix always writes an object here; `null` would otherwise fail as a TypeError at the first attribute read.
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
      throw new DerivationParseError(`structured attributes (env.__json) are not a JSON object: ${json.slice(0, 40)}`);
    }
    attrs = parsed as Record<string, unknown>;
    structuredAttrsCache.set(d, attrs);
  }
  return attrs;
}

/**
 * The system features an agent must offer to build `d`, without duplicates. Like Nix, a derivation whose output
 * paths are unknown before building (floating content-addressed) also needs `ca-derivations`.
 */
export function requiredSystemFeatures(d: Derivation): string[] {
  const attrs = structuredAttrs(d);
  let features: string[];
  if (attrs !== undefined) {
    const v = attrs.requiredSystemFeatures;
    features = Array.isArray(v) ? v.filter((f): f is string => typeof f === 'string') : [];
  } else {
    features = (d.env.requiredSystemFeatures ?? '').split(/\s+/).filter((f) => f !== '');
  }
  if (Object.values(d.outputs).some((o) => o.path === '')) features.push('ca-derivations');
  return [...new Set(features)];
}

/** Whether the derivation asks to be built where it was evaluated rather than on a remote builder (trivial builders). */
export function preferLocalBuild(d: Derivation): boolean {
  const attrs = structuredAttrs(d);
  return attrs !== undefined ? attrs.preferLocalBuild === true : d.env.preferLocalBuild === '1';
}

/**
 * A copy of `s` that does not keep alive the text it was cut from. Strings parsed from a `.drv` are slices of its
 * text (see `Scanner.string`), so one kept for long — a node of the scheduler's graph — would keep the whole file in
 * memory: at 100,000 derivations, 130 MiB of `.drv` texts stayed live through a build. Concatenating flattens the
 * string into a new one, and the slice of that holds one character more than `s`.
 */
export function detached(s: string): string {
  return (' ' + s).slice(1);
}

/** Output name -> store path. Floating content-addressed outputs are left out: their paths are not known yet. */
export function outputPaths(d: Derivation): Record<string, string> {
  const paths = dict<string>();
  for (const [name, o] of Object.entries(d.outputs)) if (o.path !== '') paths[name] = o.path;
  return paths;
}

/**
 * The store path Nix gives the `.drv` file `text` (parsed as `d`) named `name` (`hello-2.12.1.drv`): a text path
 * whose hash covers the contents and the references (input derivations and sources). Equal to the path the text
 * was fetched under, it proves the text is that derivation, whoever served it.
 */
export function derivationStorePath(text: string, d: Derivation, name: string): string {
  return textStorePath(createHash('sha256').update(text, 'utf8').digest('hex'), derivationReferences(d), name);
}

/** What a `.drv` file refers to as a store path: its input derivations and sources, sorted, each once. */
export function derivationReferences(d: Derivation): string[] {
  return [...new Set([...Object.keys(d.inputDrvs), ...d.inputSrcs])].sort();
}

/** The store path of a text file (`builtins.toFile`, a `.drv`) with this SHA-256 (hex) and these references. */
export function textStorePath(sha256Hex: string, references: readonly string[], name: string): string {
  return makeStorePath(['text', ...[...references].sort()].join(':'), sha256Hex, name);
}

/**
 * The store path of a recursive SHA-256 content-addressed path (`nix-store --add`, a source `./foo` of an
 * expression) whose NAR has this SHA-256 (hex), with these references (itself included, where it refers to itself).
 */
export function sourceStorePath(
  narSha256Hex: string,
  references: readonly string[],
  self: string,
  name: string,
): string {
  const others = references.filter((r) => r !== self).sort();
  const type = ['source', ...others, ...(references.includes(self) ? ['self'] : [])].join(':');
  return makeStorePath(type, narSha256Hex, name);
}

/** Nix's makeStorePath: the hash part from a path's type, content hash (hex SHA-256) and name. */
function makeStorePath(type: string, sha256Hex: string, name: string): string {
  const digest = createHash('sha256').update(`${type}:sha256:${sha256Hex}:${STORE_DIR}:${name}`, 'utf8').digest();
  // Nix's compressHash: the 32-byte digest folded into 20 by XOR.
  const compressed = new Uint8Array(20);
  digest.forEach((byte, i) => (compressed[i % 20] = (compressed[i % 20] as number) ^ byte));
  return `${STORE_DIR}/${nixBase32(compressed)}-${name}`;
}

/**
 * How many `.drv` files are read synchronously before the event loop gets a turn. Small synchronous reads are
 * several times faster than one promise per file through the thread pool (100k drvs: about 1 s against 7 s);
 * batching keeps the coordinator's heartbeats and streams served while a large closure loads.
 */
const CLOSURE_READ_BATCH = 500;

/**
 * Walks the `.drv` closure of `roots` breadth first, each path once. `visit` answers a path's input derivations, or
 * undefined to leave it out (neither it nor its inputs through it), and whether it read a file for that: after every
 * `readsPerTurn` reads the walk gives the event loop a turn (what a caller knew already costs no turn).
 */
export async function walkDerivations(
  roots: Iterable<string>,
  visit: (drvPath: string) => { inputs: Iterable<string>; read: boolean } | undefined,
  readsPerTurn = CLOSURE_READ_BATCH,
): Promise<void> {
  const queue = [...new Set(roots)];
  const queued = new Set(queue);
  let reads = 0;
  for (let head = 0; head < queue.length; head++) {
    const step = visit(queue[head]!);
    if (step === undefined) continue;
    for (const input of step.inputs) {
      if (queued.has(input)) continue;
      queued.add(input);
      queue.push(input);
    }
    if (step.read && ++reads % readsPerTurn === 0) await turn();
  }
}

/**
 * Walks the closure of `roots` breadth first, a level at a time, over the references `visit` answers for each path,
 * each path once. `held` answers, once per level, which of its paths the destination has already: those are neither
 * visited nor descended into (a store that holds a path holds its closure).
 */
export async function walkMissing(
  roots: Iterable<string>,
  held: (level: readonly string[]) => Promise<ReadonlySet<string>>,
  visit: (path: string) => Iterable<string> | Promise<Iterable<string>>,
): Promise<void> {
  let level = [...new Set(roots)];
  const seen = new Set(level);
  while (level.length > 0) {
    const present = await held(level);
    const next: string[] = [];
    for (const p of level) {
      if (present.has(p)) continue;
      for (const r of await visit(p)) {
        if (seen.has(r)) continue;
        seen.add(r);
        next.push(r);
      }
    }
    level = next;
  }
}

/**
 * Reads the `.drv` closure of `roots` from the local store, breadth first over `inputDrvs`. A path for which
 * `skip` returns true (already known to the caller) is neither read nor descended into. A read error (a drv
 * missing from the store) or a parse error rejects the whole load. `keep` turns each derivation, as it is read,
 * into what the caller keeps of it: a parsed derivation holds its whole text (see `detached`), and 100,000 of them
 * at once took 500 MiB, where what the coordinator keeps of them takes 50.
 */
export async function loadDerivationClosure(
  roots: string[],
  skip?: (drvPath: string) => boolean,
): Promise<Map<string, Derivation>>;
export async function loadDerivationClosure<T>(
  roots: string[],
  skip: (drvPath: string) => boolean,
  keep: (d: Derivation, drvPath: string) => T,
): Promise<Map<string, T>>;
export async function loadDerivationClosure<T>(
  roots: string[],
  skip: (drvPath: string) => boolean = () => false,
  keep: (d: Derivation, drvPath: string) => T = (d) => d as T,
): Promise<Map<string, T>> {
  for (const root of roots) {
    if (!isDrvPath(root)) throw new RangeError(`not a derivation path: ${JSON.stringify(root)}`);
  }
  const loaded = new Map<string, T>();
  await walkDerivations(roots, (p) => {
    if (skip(p)) return undefined;
    const d = readStoreDerivation(p);
    loaded.set(p, keep(d, p));
    return { inputs: Object.keys(d.inputDrvs), read: true };
  });
  return loaded;
}

/**
 * Stores besides the Nix store that `.drv` files are read from, by their root directory (`<root>/nix/store/…`): the
 * coordinator's evaluation store (coordinator/eval/eval-store.ts), which sandboxed evaluators write directly. What
 * they wrote is not trusted: a `.drv` read from one is checked against its path.
 */
const derivationStores = new Map<string, number>();

/**
 * Adds an evaluation store to those `readStoreDerivation` reads from; answers the function that removes it. Counted:
 * two owners of one store (`ekaci review` and its embedded coordinator) each add and remove it.
 */
export function addDerivationStore(root: string): () => void {
  derivationStores.set(root, (derivationStores.get(root) ?? 0) + 1);
  let removed = false;
  return () => {
    if (removed) return;
    removed = true;
    const left = (derivationStores.get(root) ?? 1) - 1;
    if (left > 0) derivationStores.set(root, left);
    else derivationStores.delete(root);
  };
}

/** Whether a store file exists in an evaluation store (see `addDerivationStore`) or the Nix store. */
export function storeFileExists(storePath: string): boolean {
  for (const root of derivationStores.keys()) if (existsSync(root + storePath)) return true;
  return existsSync(storePath);
}

/**
 * Reads and parses a `.drv` file from an evaluation store (see `addDerivationStore`), where its text must hash to
 * its path, or else from the Nix store. Evaluation stores first: they hold what evaluations made, while the Nix store
 * has only what was built, and a failed look-up in it costs as much as the check. Throws ENOENT when it is in
 * neither.
 */
export function readStoreDerivation(drvPath: string): Derivation {
  const { text, evaluationStore } = readDerivationText(drvPath);
  const d = parseDerivation(text, drvPath);
  if (evaluationStore !== undefined && derivationStorePath(text, d, storePathName(drvPath)) !== drvPath) {
    throw new DerivationParseError(
      `${drvPath} in the evaluation store ${evaluationStore}: its text does not match its path`,
    );
  }
  return d;
}

/**
 * The text of a `.drv` file, from the first evaluation store that holds it (named in the answer) or else from the
 * Nix store; not checked against its path. Throws ENOENT when it is in neither.
 */
export function readDerivationText(drvPath: string): { text: string; evaluationStore?: string } {
  for (const root of derivationStores.keys()) {
    try {
      return { text: readFileSync(root + drvPath, 'utf8'), evaluationStore: root };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }
  return { text: readFileSync(drvPath, 'utf8') };
}

/**
 * `paths` ordered so that each comes after those of its inputs (`inputsOf`) that are among them; iterative (chains of
 * derivations run deep). `inputsOf` answers undefined for a path not among them.
 */
export function inputsFirst(paths: Iterable<string>, inputsOf: (p: string) => readonly string[] | undefined): string[] {
  const order: string[] = [];
  const done = new Set<string>();
  for (const start of paths) {
    if (done.has(start)) continue;
    done.add(start);
    const stack: Array<{ path: string; inputs: readonly string[]; next: number }> = [
      { path: start, inputs: inputsOf(start) ?? [], next: 0 },
    ];
    while (stack.length > 0) {
      const top = stack[stack.length - 1]!;
      const input = top.inputs[top.next++];
      if (input === undefined) {
        stack.pop();
        order.push(top.path);
        continue;
      }
      if (done.has(input)) continue;
      const inputs = inputsOf(input);
      if (inputs === undefined) continue;
      done.add(input);
      stack.push({ path: input, inputs, next: 0 });
    }
  }
  return order;
}
