import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';

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

  private constructor(private readonly tok: Tokenizer, config: Record<string, unknown>) {
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
  }

  static fromFiles(tokenizerJson: object, tokenizerConfig: object): TextTokenizer {
    return new TextTokenizer(new Tokenizer(tokenizerJson, tokenizerConfig), tokenizerConfig as Record<string, unknown>);
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

  /** `context`: ids that precede the stream (the prompt), so that its first token decodes as it would mid-text. */
  decodeStream(opts: { skipSpecialTokens?: boolean; context?: number[] } = {}): IncrementalDecoder {
    const skip = opts.skipSpecialTokens ?? true;
    const context = (opts.context ?? []).filter((id) => !(skip && this.isSpecial(id))).slice(-4);
    return new IncrementalDecoder(this, skip, context);
  }
}

/**
 * Streaming detokenizer: each push returns the text the new token completes, so that all pushes plus flush,
 * joined, equal `decode(allIds)`. Each step decodes only a short window: `window[0, emitted)` holds the tokens of
 * the last emitted piece, decoded again so that start-dependent decoding (SentencePiece's leading-space strip,
 * byte-level merging) treats both decodes alike, and the difference is the new text. Text ending in U+FFFD is
 * held back until the UTF-8 sequence split over byte tokens completes.
 */
export class IncrementalDecoder {
  private window: number[];
  private emitted: number;

  constructor(
    private readonly tokenizer: TextTokenizer,
    private readonly skipSpecialTokens: boolean,
    context: number[] = [],
  ) {
    this.window = [...context];
    this.emitted = context.length;
  }

  push(id: number): string {
    // Dropped here rather than in decode, so that a window never starts with a skipped token.
    if (this.skipSpecialTokens && this.tokenizer.isSpecial(id)) return '';
    this.window.push(id);
    const [prefix, text] = this.decodeWindow();
    if (text.length <= prefix.length || text.endsWith('\uFFFD')) return '';
    this.advance();
    return text.slice(prefix.length);
  }

  /** The held-back tail (an incomplete UTF-8 sequence decodes as U+FFFD). */
  flush(): string {
    if (this.emitted === this.window.length) return '';
    const [prefix, text] = this.decodeWindow();
    this.advance();
    return text.slice(prefix.length);
  }

  private decodeWindow(): [string, string] {
    const opts = { skipSpecialTokens: false };
    return [this.tokenizer.decode(this.window.slice(0, this.emitted), opts), this.tokenizer.decode(this.window, opts)];
  }

  private advance(): void {
    this.window = this.window.slice(this.emitted);
    this.emitted = this.window.length;
  }
}
