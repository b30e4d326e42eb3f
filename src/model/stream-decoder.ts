/**
 * Streaming detokenizers: each push returns the text the new token completes, so that all pushes plus flush,
 * joined, equal the tokenizer's full decode of the same ids. Decoders whose tokenizer.json decoder Tally
 * recognises keep a little state per stream (a byte buffer); any other decoder goes through WindowDecoder,
 * which decodes a short window of ids twice per token with the library.
 */

export interface StreamDecoder {
  push(id: number): string;
  /** The held-back tail (an incomplete UTF-8 sequence decodes as U+FFFD). */
  flush(): string;
}

/** What a stream decoder needs of the tokenizer. */
export interface DecodeSource {
  /** The vocabulary entry of an id (the unknown token's for an id outside it). */
  piece(id: number): string | undefined;
  decode(ids: number[]): string;
}

/**
 * Any decoder, through the library: `window[0, emitted)` holds the tokens of the last emitted piece, decoded
 * again so that start-dependent decoding (a leading-space strip, byte-level merging) treats both decodes alike,
 * and the difference is the new text. Text ending in U+FFFD is held back until the UTF-8 sequence split over
 * byte tokens completes.
 */
export class WindowDecoder implements StreamDecoder {
  private window: number[];
  private emitted: number;

  constructor(private readonly source: DecodeSource, context: number[]) {
    this.window = [...context];
    this.emitted = context.length;
  }

  push(id: number): string {
    this.window.push(id);
    const [prefix, text] = this.decodeWindow();
    if (text.length <= prefix.length || text.endsWith('\uFFFD')) return '';
    this.advance();
    return text.slice(prefix.length);
  }

  flush(): string {
    if (this.emitted === this.window.length) return '';
    const [prefix, text] = this.decodeWindow();
    this.advance();
    return text.slice(prefix.length);
  }

  private decodeWindow(): [string, string] {
    return [this.source.decode(this.window.slice(0, this.emitted)), this.source.decode(this.window)];
  }

  private advance(): void {
    this.window = this.window.slice(this.emitted);
    this.emitted = this.window.length;
  }
}

/** Llama / SentencePiece: Replace(▁ → space), ByteFallback, Fuse, Strip(leading spaces). */
export interface SentencePieceDecoding {
  kind: 'sentencepiece';
  stripLeading: number;
}

/** GPT-2 style byte-level BPE; added tokens are written as they are. */
export interface ByteLevelDecoding {
  kind: 'bytelevel';
  addedContents: Set<string>;
}

export type KnownDecoding = SentencePieceDecoding | ByteLevelDecoding;

type DecoderConfig = { type?: string; decoders?: DecoderConfig[]; pattern?: { String?: string }; content?: string; start?: number; stop?: number } | null | undefined;

/** The decoding of a tokenizer.json that a stream decoder here reproduces, or undefined. */
export function knownDecoding(tokenizerJson: { decoder?: DecoderConfig; model?: { end_of_word_suffix?: string | null }; added_tokens?: { content: string }[] }): KnownDecoding | undefined {
  const d = tokenizerJson.decoder;
  if (!d || tokenizerJson.model?.end_of_word_suffix) return undefined;
  if (d.type === 'ByteLevel') return { kind: 'bytelevel', addedContents: new Set((tokenizerJson.added_tokens ?? []).map((t) => t.content)) };
  const steps = d.type === 'Sequence' ? d.decoders ?? [] : [];
  const [replace, fallback, fuse, strip] = steps;
  if (
    steps.length === 4 &&
    replace?.type === 'Replace' && replace.pattern?.String === '\u2581' && replace.content === ' ' &&
    fallback?.type === 'ByteFallback' && fuse?.type === 'Fuse' &&
    strip?.type === 'Strip' && strip.content === ' ' && (strip.stop ?? 0) === 0
  ) {
    return { kind: 'sentencepiece', stripLeading: strip.start ?? 0 };
  }
  return undefined;
}

/** The library's test for a byte token, parseInt's leniency included. */
export function byteOf(piece: string): number | undefined {
  if (piece.length !== 6 || !piece.startsWith('<0x') || !piece.endsWith('>')) return undefined;
  const byte = parseInt(piece.slice(3, 5), 16);
  return Number.isNaN(byte) ? undefined : byte;
}

/**
 * As the library decodes: runs of byte tokens (<0xNN>) are decoded together as UTF-8 (lossily, a new run at
 * every other token), other tokens have ▁ replaced by spaces, and the first `stripLeading` spaces of the whole
 * text are dropped.
 */
export class SentencePieceStreamDecoder implements StreamDecoder {
  private readonly bytes = new TextDecoder();
  private inRun = false;
  private toStrip: number;
  private started = false;

  constructor(private readonly source: DecodeSource, decoding: SentencePieceDecoding, context: number[]) {
    this.toStrip = decoding.stripLeading;
    for (const id of context) this.push(id);
  }

  push(id: number): string {
    const piece = (this.source.piece(id) ?? '').replaceAll('\u2581', ' ');
    const byte = byteOf(piece);
    let text: string;
    if (byte !== undefined) {
      text = this.bytes.decode(Uint8Array.of(byte), { stream: true });
      this.inRun = true;
    } else {
      text = this.endRun() + piece;
    }
    return this.strip(text);
  }

  flush(): string {
    return this.strip(this.endRun());
  }

  private endRun(): string {
    if (!this.inRun) return '';
    this.inRun = false;
    return this.bytes.decode();
  }

  private strip(text: string): string {
    if (this.started || text === '') return text;
    let cut = 0;
    while (cut < text.length && this.toStrip > 0 && text[cut] === ' ') {
      cut++;
      this.toStrip--;
    }
    if (cut < text.length || this.toStrip === 0) this.started = true;
    return text.slice(cut);
  }
}

let UNICODE_TO_BYTE: Map<string, number> | undefined;

/** GPT-2's bytes_to_unicode, inverted. */
export function unicodeToByte(): Map<string, number> {
  if (!UNICODE_TO_BYTE) {
    const printable: number[] = [];
    for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
    for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
    for (let b = 0xae; b <= 0xff; b++) printable.push(b);
    UNICODE_TO_BYTE = new Map();
    const set = new Set(printable);
    for (const b of printable) UNICODE_TO_BYTE.set(String.fromCodePoint(b), b);
    let n = 0;
    for (let b = 0; b < 256; b++) if (!set.has(b)) UNICODE_TO_BYTE.set(String.fromCodePoint(256 + n++), b);
  }
  return UNICODE_TO_BYTE;
}

/** As the library decodes byte-level BPE: the tokens' bytes decoded together as UTF-8, added tokens as written. */
export class ByteLevelStreamDecoder implements StreamDecoder {
  private readonly bytes = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });
  private static readonly cache = new WeakMap<DecodeSource, Map<number, Uint8Array>>();
  private readonly pieces: Map<number, Uint8Array>;

  constructor(private readonly source: DecodeSource, private readonly decoding: ByteLevelDecoding, context: number[]) {
    let pieces = ByteLevelStreamDecoder.cache.get(source);
    if (!pieces) ByteLevelStreamDecoder.cache.set(source, (pieces = new Map()));
    this.pieces = pieces;
    for (const id of context) this.push(id);
  }

  push(id: number): string {
    const piece = this.source.piece(id) ?? '';
    if (this.decoding.addedContents.has(piece)) return this.bytes.decode() + piece;
    return this.bytes.decode(this.bytesOf(id, piece), { stream: true });
  }

  flush(): string {
    return this.bytes.decode();
  }

  private bytesOf(id: number, piece: string): Uint8Array {
    let bytes = this.pieces.get(id);
    if (!bytes) {
      const table = unicodeToByte();
      // A character outside the byte alphabet becomes 0, as in the library.
      bytes = Uint8Array.from([...piece], (c) => table.get(c) ?? 0);
      this.pieces.set(id, bytes);
    }
    return bytes;
  }
}
