import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { Progress } from './progress.js';

/** A stream that says it is (or is not) a terminal, collecting what is written to it. */
function terminal(isTTY: boolean): { out: NodeJS.WriteStream; text: () => string } {
  const stream = new PassThrough();
  let text = '';
  stream.on('data', (b: Buffer) => (text += b.toString('utf8')));
  Object.assign(stream, { isTTY, columns: 60 });
  return { out: stream as unknown as NodeJS.WriteStream, text: () => text };
}

async function until(condition: () => boolean): Promise<void> {
  while (!condition()) await new Promise((resolve) => setTimeout(resolve, 20));
}

describe('Progress', () => {
  it('on a terminal, redraws an evaluation count in place, and leaves only the lines that stay', async () => {
    const t = terminal(true);
    const p = new Progress(t.out);
    p.line('evaluating head HEAD…');
    const counter = p.evaluating('head HEAD');
    counter.attr(false);
    counter.attr(true);
    counter.attr(false);
    await until(() => t.text().includes('head HEAD: 3 attributes, 1 evaluation errors'));
    // Each redraw moves up over the block and erases it first.
    expect(t.text()).toContain('\x1b[1F\x1b[J');
    counter.end();
    p.line('  head abc: 3 attributes, 1 evaluation errors (0.1 s)');
    expect(t.text().startsWith('evaluating head HEAD…\n')).toBe(true);
    expect(t.text().endsWith('\x1b[1F\x1b[J  head abc: 3 attributes, 1 evaluation errors (0.1 s)\n')).toBe(true);
  });

  it('without a terminal, writes plain lines and no escape codes', async () => {
    const t = terminal(false);
    const p = new Progress(t.out);
    p.line('evaluating base main…');
    const counter = p.evaluating('base main');
    counter.attr(false);
    await new Promise((resolve) => setTimeout(resolve, 300));
    counter.end();
    p.line('done');
    expect(t.text()).toBe('evaluating base main…\ndone\n');
  });
});
