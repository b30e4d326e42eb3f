import { PieceType, type SpVocab } from './types.js';

const BYTE_PIECE = /^<0x[0-9A-F]{2}>$/;

/**
 * Parses llama2.c's `tokenizer.bin`: int32 max_token_length, then per token float32 score, int32 byte length,
 * UTF-8 bytes. The file holds no token count, no types and no special ids: llama2.c fixes unk/BOS/EOS at 0/1/2
 * (exported as "\n<s>\n" and "\n</s>\n") and writes '▁' as ' '.
 */
export function parseLlama2cTokenizer(buf: Uint8Array, vocabSize: number): SpVocab {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
  const pieces: SpVocab['pieces'] = [];
  let pos = 4;
  for (let id = 0; id < vocabSize; id++) {
    if (pos + 8 > buf.length) throw new Error(`tokenizer.bin: truncated at token ${id} of ${vocabSize}`);
    const score = view.getFloat32(pos, true);
    const len = view.getInt32(pos + 4, true);
    pos += 8;
    if (len < 0 || pos + len > buf.length) throw new Error(`tokenizer.bin: bad length ${len} at token ${id}`);
    const raw = utf8.decode(buf.subarray(pos, pos + len));
    pos += len;
    let piece: string;
    let type: PieceType;
    if (id === 0) {
      piece = raw;
      type = PieceType.Unknown;
    } else if (id === 1 || id === 2) {
      piece = raw.trim();
      type = PieceType.Control;
    } else {
      piece = raw.replaceAll(' ', '\u2581');
      type = BYTE_PIECE.test(piece) ? PieceType.Byte : PieceType.Normal;
    }
    pieces.push({ piece, score, type });
  }
  return { pieces, unkId: 0, bosId: 1, eosId: 2, addDummyPrefix: true };
}
