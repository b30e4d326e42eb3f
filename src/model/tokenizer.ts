import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { ByteLevelStreamDecoder, type DecodeSource, type KnownDecoding, SentencePieceStreamDecoder, type StreamDecoder, WindowDecoder, knownDecoding } from './stream-decoder.ts';

type TokenSpec = string | { content: string } | null | undefined;

function tokenContent(spec: TokenSpec): string | undefined {
  if (typeof spec === 'string') return spec;
  return spec?.content;
}

/** Text ⇄ token ids for one model, over Hugging Face `tokenizer.json` + `tokenizer_config.json`. */
export class TextTokenizer {
  readonly vocabSize: number;
  readonly bosId: number | undefined;
  /** Only tokenizer_config's eos_token; generation_config may name more. */
  readonly eosIds: number[];
  readonly addBosToken: boolean;
  private readonly specialContents: Set<string>;
  /** How decodeStream follows the decoder: a recognised decoding, else a window of ids through the library. */
  private readonly decoding: KnownDecoding | undefined;
  private readonly decodeSource: DecodeSource;

  private constructor(private readonly tok: Tokenizer, config: Record<string, unknown>, tokenizerJson: object) {
    let maxId = -1;
    for (const id of tok.get_vocab(true).values()) maxId = Math.max(maxId, id);
    this.vocabSize = maxId + 1;

    const idOf = (spec: unknown): number | undefined => {
      const content = tokenContent(spec as TokenSpec);
      return content === undefined ? undefined : tok.token_to_id(content);
    };
    this.bosId = idOf(config.bos_token);
    const eos = idOf(config.eos_token);
    this.eosIds = eos === undefined ? [] : [eos];
    this.addBosToken = this.bosId !== undefined && tok.encode('').ids[0] === this.bosId;

    // What Tokenizer.decode skips: special added tokens and config.additional_special_tokens, matched by content.
    this.specialContents = new Set();
    for (const added of tok.get_added_tokens_decoder().values()) if (added.special) this.specialContents.add(added.content);
    for (const spec of (config.additional_special_tokens as TokenSpec[] | undefined) ?? []) {
      const content = tokenContent(spec);
      if (content !== undefined) this.specialContents.add(content);
    }
    this.decoding = knownDecoding(tokenizerJson);
    this.decodeSource = {
      piece: (id) => tok.id_to_token(id) ?? tok.model?.unk_token ?? undefined,
      decode: (ids) => this.decode(ids, { skipSpecialTokens: false }),
    };
  }

  static fromFiles(tokenizerJson: object, tokenizerConfig: object): TextTokenizer {
    return new TextTokenizer(new Tokenizer(tokenizerJson, tokenizerConfig), tokenizerConfig as Record<string, unknown>, tokenizerJson);
  }

  static load(dir: string): TextTokenizer {
    const read = (name: string): object => JSON.parse(readFileSync(join(dir, name), 'utf8')) as object;
    return TextTokenizer.fromFiles(read('tokenizer.json'), read('tokenizer_config.json'));
  }

  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    return this.tok.encode(text, { add_special_tokens: opts.addSpecialTokens ?? true }).ids;
  }

  /** Never applies clean_up_tokenization_spaces: it is lossy and would break incremental decoding. */
  decode(ids: number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    if (ids.length === 0) return '';
    return this.tok.decode(ids, {
      skip_special_tokens: opts.skipSpecialTokens ?? true,
      clean_up_tokenization_spaces: false,
    });
  }

  idToToken(id: number): string | undefined {
    return this.tok.id_to_token(id);
  }

  /** Whether decode with skipSpecialTokens drops this id (an id outside the vocabulary decodes as unk). */
  isSpecial(id: number): boolean {
    const content = this.tok.id_to_token(id) ?? this.tok.model?.unk_token;
    return content !== undefined && this.specialContents.has(content);
  }

  /** How decodeStream decodes: state over bytes for a recognised decoder, else a window of ids through the library. */
  get streamDecoding(): 'sentencepiece' | 'bytelevel' | 'window' {
    return this.decoding?.kind ?? 'window';
  }

  /**
   * `context`: ids that precede the stream (the prompt), so that its first token decodes as it would mid-text.
   * `window`: decode through the library even where the decoder is recognised (for comparisons).
   */
  decodeStream(opts: { skipSpecialTokens?: boolean; context?: number[]; window?: boolean } = {}): IncrementalDecoder {
    const skip = opts.skipSpecialTokens ?? true;
    const context = (opts.context ?? []).filter((id) => !(skip && this.isSpecial(id))).slice(-4);
    const source = this.decodeSource;
    const decoding = opts.window ? undefined : this.decoding;
    const inner =
      decoding?.kind === 'sentencepiece' ? new SentencePieceStreamDecoder(source, decoding, context)
      : decoding?.kind === 'bytelevel' ? new ByteLevelStreamDecoder(source, decoding, context)
      : new WindowDecoder(source, context);
    return new IncrementalDecoder(this, skip, inner);
  }
}

/** A stream decoder that drops special tokens first when asked to (as decode does with skipSpecialTokens). */
export class IncrementalDecoder {
  constructor(
    private readonly tokenizer: TextTokenizer,
    private readonly skipSpecialTokens: boolean,
    private readonly inner: StreamDecoder,
  ) {}

  push(id: number): string {
    // Dropped here rather than in decode, so that a window never starts with a skipped token.
    if (this.skipSpecialTokens && this.tokenizer.isSpecial(id)) return '';
    return this.inner.push(id);
  }

  flush(): string {
    return this.inner.flush();
  }
}
