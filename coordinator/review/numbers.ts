/** A count as reviews write it: with thousands separators, as a reader of a mass rebuild's figures expects. */
export function count(n: number): string {
  return n.toLocaleString('en-US');
}

/** `1 attribute`, `2 attributes`; `many` for an irregular plural. */
export function plural(n: number, one: string, many = `${one}s`): string {
  return `${count(n)} ${n === 1 ? one : many}`;
}
