/** Token strings and bytes for logprobs, and the two OpenAI logprobs shapes. */
import type { GeneratedToken } from '../engine/protocol.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';

/** GPT-2's byte-level alphabet, inverted: vocabulary character → byte. */
function byteLevelDecoder(): Map<string, number> {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const map = new Map<string, number>();
  let extra = 0;
  for (let b = 0; b < 256; b++) map.set(String.fromCharCode(printable(b) ? b : 256 + extra++), b);
  return map;
}

/**
 * The text a token adds in context (a SentencePiece "▁named" is " named", not the "named" a lone
 * decode gives): decode(anchor + [id]) minus decode(anchor). Cached per id.
 */
export class TokenText {
  private readonly texts = new Map<number, string>();
  private readonly anchor: number[];
  private readonly anchorText: string;
  private readonly byteLevel?: Map<string, number>;

  constructor(private readonly tokenizer: TextTokenizer) {
    this.anchor = tokenizer.encode('a', { addSpecialTokens: false });
    this.anchorText = tokenizer.decode(this.anchor, { skipSpecialTokens: false });
    const spaceA = tokenizer.encode(' a', { addSpecialTokens: false }).map((id) => tokenizer.idToToken(id) ?? '').join('');
    if (spaceA.includes('Ġ')) this.byteLevel = byteLevelDecoder();
  }

  text(id: number): string {
    let text = this.texts.get(id);
    if (text === undefined) {
      const both = this.tokenizer.decode([...this.anchor, id], { skipSpecialTokens: false });
      text = both.startsWith(this.anchorText) ? both.slice(this.anchorText.length) : this.tokenizer.decode([id], { skipSpecialTokens: false });
      this.texts.set(id, text);
    }
    return text;
  }

  /** The token's raw bytes where the vocabulary tells them (byte-level BPE, `<0xNN>` pieces), else its text's UTF-8. */
  bytes(id: number): number[] {
    const piece = this.tokenizer.idToToken(id);
    if (piece !== undefined && !this.tokenizer.isSpecial(id)) {
      const hex = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
      if (hex) return [parseInt(hex[1], 16)];
      if (this.byteLevel && [...piece].every((c) => this.byteLevel!.has(c))) return [...piece].map((c) => this.byteLevel!.get(c)!);
    }
    return [...Buffer.from(this.text(id), 'utf8')];
  }
}

/** JSON has no -Infinity. */
const finite = (x: number | undefined): number | null => (x === undefined || !Number.isFinite(x) ? null : x);

export interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: (number | null)[];
  top_logprobs: Record<string, number>[] | null;
  text_offset: number[];
}

/** Completions' logprobs for `tokens`, whose text starts at `offset` in the choice's text. */
export function completionLogprobs(tt: TokenText, tokens: GeneratedToken[], offset: number, withTop: boolean): CompletionLogprobs {
  const out: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: withTop ? [] : null, text_offset: [] };
  for (const t of tokens) {
    const text = tt.text(t.id);
    out.tokens.push(text);
    out.token_logprobs.push(finite(t.logprob));
    out.text_offset.push(offset);
    offset += text.length;
    if (withTop) {
      const top: Record<string, number> = {};
      for (const alt of t.topLogprobs ?? []) {
        const key = tt.text(alt.token);
        if (!(key in top)) top[key] = alt.logprob;
      }
      out.top_logprobs!.push(top);
    }
  }
  return out;
}

/** Prompt tokens echoed in completions' logprobs: the engine does not score prompts, so their logprobs are null. */
export function echoLogprobs(tt: TokenText, promptIds: number[], withTop: boolean): CompletionLogprobs {
  const out: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: withTop ? [] : null, text_offset: [] };
  let offset = 0;
  for (const id of promptIds) {
    const text = tt.text(id);
    out.tokens.push(text);
    out.token_logprobs.push(null);
    out.text_offset.push(offset);
    out.top_logprobs?.push({});
    offset += text.length;
  }
  return out;
}

export function concatLogprobs(a: CompletionLogprobs, b: CompletionLogprobs): CompletionLogprobs {
  return {
    tokens: [...a.tokens, ...b.tokens],
    token_logprobs: [...a.token_logprobs, ...b.token_logprobs],
    top_logprobs: a.top_logprobs && b.top_logprobs ? [...a.top_logprobs, ...b.top_logprobs] : null,
    text_offset: [...a.text_offset, ...b.text_offset],
  };
}

export interface ChatTokenLogprob {
  token: string;
  logprob: number | null;
  bytes: number[];
  top_logprobs: { token: string; logprob: number | null; bytes: number[] }[];
}

export function chatLogprobs(tt: TokenText, tokens: GeneratedToken[]): { content: ChatTokenLogprob[]; refusal: null } {
  return {
    content: tokens.map((t) => ({
      token: tt.text(t.id),
      logprob: finite(t.logprob),
      bytes: tt.bytes(t.id),
      top_logprobs: (t.topLogprobs ?? []).map((alt) => ({ token: tt.text(alt.token), logprob: finite(alt.logprob), bytes: tt.bytes(alt.token) })),
    })),
    refusal: null,
  };
}
