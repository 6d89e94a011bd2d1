/**
 * A stream's whole content in one Buffer. `stream/consumers`' buffer() goes through a Blob, whose making (a
 * transferable object, a copy of every chunk) cost a busy coordinator more than the upload's own file write.
 */
export async function readAll(source: AsyncIterable<Buffer>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of source) chunks.push(chunk);
  return chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
}
