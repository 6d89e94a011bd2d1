/**
 * Terminal escapes in build logs, read as a stream: SGR colours and weights become CSS classes on plain text, every
 * other escape sequence and control character is dropped. Text is never markup: the page puts segments in text nodes.
 * No DOM here, so the parser is tested in Node too.
 */

export interface Segment {
  text: string;
  /** Space-separated classes: `fg-N`/`bg-N` (N = 0…15, the terminal palette), `b` bold, `d` dim, `i`, `u`. */
  classes: string;
}

interface Style {
  fg: number | undefined;
  bg: number | undefined;
  bold: boolean;
  dim: boolean;
  italic: boolean;
  underline: boolean;
}

const ESC = '\x1b';
// An escape sequence longer than this is not one a terminal would finish: it is shown as text, not held back forever.
const MAX_PENDING = 256;
// Control characters other than tab and newline, which a terminal would act on and a page cannot show.
const CONTROL = /[\x00-\x08\x0b-\x1f\x7f]/g;

const plain = (): Style => ({
  fg: undefined,
  bg: undefined,
  bold: false,
  dim: false,
  italic: false,
  underline: false,
});

export class AnsiParser {
  private readonly style = plain();
  private pending = '';

  /** The segments of `chunk`; an escape sequence or `\r\n` cut at its end waits for the next chunk. */
  push(chunk: string): Segment[] {
    const text = this.pending + chunk;
    this.pending = '';
    const out: Segment[] = [];
    let at = 0;
    let plainFrom = 0;
    const flush = (end: number): void => {
      if (end > plainFrom) this.emit(out, text.slice(plainFrom, end));
    };
    while (at < text.length) {
      const esc = text.indexOf(ESC, at);
      if (esc < 0) break;
      const end = sequenceEnd(text, esc);
      if (end === undefined) {
        // Unfinished: keep it for the next chunk (unless it can never finish).
        if (text.length - esc <= MAX_PENDING) {
          flush(esc);
          this.pending = text.slice(esc);
          return out;
        }
        at = esc + 1;
        continue;
      }
      flush(esc);
      if (text[esc + 1] === '[' && text[end - 1] === 'm') this.apply(text.slice(esc + 2, end - 1));
      at = plainFrom = end;
    }
    if (text.endsWith('\r')) {
      flush(text.length - 1);
      this.pending = '\r';
    } else flush(text.length);
    return out;
  }

  /** What is held back at the end of the stream, as text. */
  end(): Segment[] {
    const rest = this.pending;
    this.pending = '';
    const out: Segment[] = [];
    if (rest !== '') this.emit(out, rest);
    return out;
  }

  private emit(out: Segment[], raw: string): void {
    // A lone carriage return (a progress bar redrawing its line) starts a new line on a page.
    const text = raw.replace(/\r\n?/g, '\n').replace(CONTROL, '');
    if (text === '') return;
    const classes = this.classes();
    const last = out.at(-1);
    if (last && last.classes === classes) last.text += text;
    else out.push({ text, classes });
  }

  private classes(): string {
    const s = this.style;
    const list: string[] = [];
    if (s.fg !== undefined) list.push(`fg-${s.fg}`);
    if (s.bg !== undefined) list.push(`bg-${s.bg}`);
    if (s.bold) list.push('b');
    if (s.dim) list.push('d');
    if (s.italic) list.push('i');
    if (s.underline) list.push('u');
    return list.join(' ');
  }

  /** Select Graphic Rendition: `params` is what stands between `ESC [` and `m`. */
  private apply(params: string): void {
    const codes = params === '' ? [0] : params.split(/[;:]/).map((p) => (p === '' ? 0 : Number(p)));
    const s = this.style;
    for (let i = 0; i < codes.length; i++) {
      const code = codes[i]!;
      if (code === 0) Object.assign(s, plain());
      else if (code === 1) s.bold = true;
      else if (code === 2) s.dim = true;
      else if (code === 3) s.italic = true;
      else if (code === 4) s.underline = true;
      else if (code === 22) s.bold = s.dim = false;
      else if (code === 23) s.italic = false;
      else if (code === 24) s.underline = false;
      else if (code >= 30 && code <= 37) s.fg = code - 30;
      else if (code === 39) s.fg = undefined;
      else if (code >= 40 && code <= 47) s.bg = code - 40;
      else if (code === 49) s.bg = undefined;
      else if (code >= 90 && code <= 97) s.fg = code - 90 + 8;
      else if (code >= 100 && code <= 107) s.bg = code - 100 + 8;
      else if (code === 38 || code === 48) {
        // 256 colours (`5;N`: the first 16 are the palette, the rest are left plain) or true colour (`2;R;G;B`).
        const mode = codes[i + 1];
        const colour = mode === 5 ? codes[i + 2] : undefined;
        const palette = colour !== undefined && colour < 16 ? colour : undefined;
        if (code === 38) s.fg = palette;
        else s.bg = palette;
        i += mode === 5 ? 2 : mode === 2 ? 4 : 1;
      }
      // Anything else (blink, inverse, fonts…) has no place on a page.
    }
  }
}

/** The index after the escape sequence starting at `esc`, or undefined while it is unfinished. */
function sequenceEnd(text: string, esc: number): number | undefined {
  const kind = text[esc + 1];
  if (kind === undefined) return undefined;
  if (kind === '[') {
    // CSI: parameters and intermediates (0x20–0x3f), then one final byte (0x40–0x7e).
    for (let i = esc + 2; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c >= 0x40 && c <= 0x7e) return i + 1;
      if (c < 0x20 || c > 0x3f) return i; // malformed: drop what was read
    }
    return undefined;
  }
  if (kind === ']' || kind === 'P' || kind === '_' || kind === '^') {
    // OSC and other strings: end at BEL or ST (`ESC \`).
    for (let i = esc + 2; i < text.length; i++) {
      if (text[i] === '\x07') return i + 1;
      if (text[i] === ESC) return text[i + 1] === undefined ? undefined : i + (text[i + 1] === '\\' ? 2 : 0);
    }
    return undefined;
  }
  if (kind >= ' ' && kind <= '/') {
    // nF (`ESC ( B`, character sets): intermediates, then one final byte.
    for (let i = esc + 2; i < text.length; i++) if (text[i]! < ' ' || text[i]! > '/') return i + 1;
    return undefined;
  }
  return esc + 2;
}
