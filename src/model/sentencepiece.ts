import { PieceType, type SpVocab } from './types.js';

// ignoreBOM: a piece may be U+FEFF itself (Llama's vocab has one).
const utf8 = new TextDecoder('utf-8', { ignoreBOM: true });

/** Reads protobuf wire format; only what sentencepiece_model.proto needs. */
class ProtoReader {
  pos: number;
  private readonly view: DataView;

  constructor(
    private readonly buf: Uint8Array,
    start = 0,
    readonly end = buf.length,
  ) {
    this.pos = start;
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }

  /** The low 32 bits of a varint, as a signed int32 (negative int32s are sign-extended to 10 bytes). */
  varint(): number {
    let lo = 0;
    for (let shift = 0; ; shift += 7) {
      if (this.pos >= this.end) throw new Error('sentencepiece: truncated varint');
      const b = this.buf[this.pos++]!;
      if (shift < 32) lo |= (b & 0x7f) << shift;
      if (b < 0x80) return lo;
      if (shift >= 63) throw new Error('sentencepiece: varint too long');
    }
  }

  float32(): number {
    if (this.pos + 4 > this.end) throw new Error('sentencepiece: truncated float');
    const v = this.view.getFloat32(this.pos, true);
    this.pos += 4;
    return v;
  }

  bytes(): ProtoReader {
    const len = this.varint() >>> 0;
    if (this.pos + len > this.end) throw new Error('sentencepiece: truncated field');
    const sub = new ProtoReader(this.buf, this.pos, this.pos + len);
    this.pos += len;
    return sub;
  }

  string(): string {
    const sub = this.bytes();
    return utf8.decode(this.buf.subarray(sub.pos, sub.end));
  }

  skip(wireType: number): void {
    switch (wireType) {
      case 0:
        this.varint();
        break;
      case 1:
        this.pos += 8;
        break;
      case 2:
        this.bytes();
        break;
      case 5:
        this.pos += 4;
        break;
      default:
        throw new Error(`sentencepiece: unsupported wire type ${wireType}`);
    }
    if (this.pos > this.end) throw new Error('sentencepiece: truncated field');
  }

  /** Calls `field` for each (field number, wire type); `field` returns false to have it skipped. */
  fields(field: (num: number, wireType: number) => boolean): void {
    while (this.pos < this.end) {
      const key = this.varint() >>> 0;
      const num = key >>> 3;
      const wireType = key & 7;
      if (!field(num, wireType)) this.skip(wireType);
    }
  }
}

/** Parses a SentencePiece `tokenizer.model` (serialized ModelProto). */
export function parseSentencePieceModel(buf: Uint8Array): SpVocab {
  const vocab: SpVocab = { pieces: [], unkId: 0, bosId: 1, eosId: 2, addDummyPrefix: true };
  const model = new ProtoReader(buf);
  model.fields((num, wt) => {
    if (wt !== 2) return false;
    if (num === 1) {
      const r = model.bytes();
      const p = { piece: '', score: 0, type: PieceType.Normal };
      r.fields((n, w) => {
        if (n === 1 && w === 2) p.piece = r.string();
        else if (n === 2 && w === 5) p.score = r.float32();
        else if (n === 3 && w === 0) p.type = r.varint() as PieceType;
        else return false;
        return true;
      });
      vocab.pieces.push(p);
    } else if (num === 2) {
      const r = model.bytes();
      r.fields((n, w) => {
        if (w !== 0) return false;
        if (n === 40) vocab.unkId = r.varint();
        else if (n === 41) vocab.bosId = r.varint();
        else if (n === 42) vocab.eosId = r.varint();
        else return false;
        return true;
      });
    } else if (num === 3) {
      const r = model.bytes();
      r.fields((n, w) => {
        if (n !== 3 || w !== 0) return false;
        vocab.addDummyPrefix = r.varint() !== 0;
        return true;
      });
    } else {
      return false;
    }
    return true;
  });
  if (vocab.pieces.length === 0) throw new Error('sentencepiece: model has no pieces');
  return vocab;
}
