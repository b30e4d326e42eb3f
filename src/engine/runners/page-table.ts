import { createHash } from 'node:crypto';
import type { PrefixCache, PrefixPlan } from './runner.ts';

interface SeqPages {
  length: number;
  pages: number[];
  /** Leading pages shared from the cache (the rest it took itself). */
  shared: number;
  /** Tokens at its positions, known so far (the prompt, then what advance() reports); undefined: not keyed. */
  tokens?: number[];
  /** Leading pages already looked up or entered in the prefix index. */
  keyed: number;
  /** Chain key of page `keyed - 1` ('' before the first). */
  lastKey: string;
}

export interface PageTableOptions {
  /** Key full pages by their tokens and everything before them, and let later sequences reuse them. */
  prefixCache?: boolean;
  /**
   * Copies page `from`'s contents into page `to` (every layer). Given, a prompt cached whole reuses all of
   * its pages and recomputes only its last token, in a private copy of its last page; without it that page is
   * recomputed.
   */
  copyPage?: (from: number, to: number) => void;
}

/**
 * The paged KV cache's bookkeeping, apart from what the pages hold: which pages are free and which pages each
 * sequence holds, in order. Runners that keep a paged cache (wherever its memory lives) hand these page lists to
 * their attention kernels; nothing here touches cache memory (except through options.copyPage).
 *
 * With the prefix cache on, every full page a sequence writes is keyed by a hash of its tokens and of all the
 * tokens before it (a chain, as vLLM keys its blocks); a sequence opened with attach() takes the pages of its
 * prompt's longest cached prefix, shared read-only, and computes only the rest. A sequence's last, partly filled
 * page is never shared. Pages no open sequence holds stay cached until their memory is needed: free pages are
 * used first, then cached ones, least recently released first (a sequence's later pages before its earlier ones).
 */
export class PageTable implements PrefixCache {
  private readonly free: number[] = [];
  private readonly seqs = new Map<number, SeqPages>();
  private readonly refs: Int32Array;
  /** Cached pages: key → page and page → key. */
  private readonly index = new Map<string, number>();
  private readonly keyOf = new Map<number, string>();
  /** Cached pages that no sequence holds, least recently released first. */
  private readonly evictable = new Set<number>();
  /** Pages held only by sequences that did not write them. */
  private readonly inherited = new Set<number>();
  /** Σ over pages of (holders − 1): positions counted more than once in the sequences' lengths, in pages. */
  private sharedRefs = 0;
  private readonly promptKeys = new WeakMap<readonly number[], string[]>();
  readonly prefixCaching: boolean;
  private readonly copyPage?: (from: number, to: number) => void;

  constructor(
    readonly totalPages: number,
    readonly pagePositions: number,
    private readonly maxSeqs: number,
    options: PageTableOptions = {},
  ) {
    // Freed pages are reused first (they are already touched, so already backed by memory).
    for (let p = totalPages - 1; p >= 0; p--) this.free.push(p);
    this.refs = new Int32Array(totalPages);
    this.prefixCaching = options.prefixCache ?? false;
    this.copyPage = options.copyPage;
  }

  /** Pages that hold data: held by a sequence or cached. */
  get usedPages(): number {
    return this.totalPages - this.free.length;
  }

  /** Pages in the prefix index (held or not). */
  get cachedPages(): number {
    return this.index.size;
  }

  open(seq: number): void {
    if (this.seqs.has(seq)) throw new Error(`sequence ${seq} is already open`);
    if (this.seqs.size >= this.maxSeqs) throw new Error(`no free KV slot (max ${this.maxSeqs})`);
    this.seqs.set(seq, { length: 0, pages: [], shared: 0, keyed: 0, lastKey: '' });
  }

  close(seq: number): void {
    const s = this.seqs.get(seq);
    if (!s) return;
    for (let i = s.pages.length - 1; i >= 0; i--) {
      const page = s.pages[i];
      this.unref(page);
      if (i >= s.shared && this.refs[page] > 0) this.inherited.add(page);
    }
    this.seqs.delete(seq);
  }

  /** Positions cached for `seq`. */
  length(seq: number): number {
    return this.get(seq).length;
  }

  /** The pages of `seq`, in position order, grown to hold `end` positions. */
  reserve(seq: number, end: number): readonly number[] {
    const s = this.get(seq);
    const needed = Math.ceil(end / this.pagePositions);
    while (s.pages.length < needed) s.pages.push(this.take());
    return s.pages;
  }

  /**
   * Reserves each row's pages for its new tokens and describes the rows as native/attention takes them: `info`
   * [new, cached, first page in table] per row, the rows' page lists one after another in `table` (both grown
   * when short, so the caller may keep them for the next pass). Throws before reserving anything when a row
   * would pass maxLen.
   */
  layout(rows: readonly { seq: number; tokens: readonly number[] }[], maxLen: number, buffers: { info: Int32Array; table: Int32Array }): { info: Int32Array; table: Int32Array; tokens: number; widest: number } {
    let tokens = 0;
    let widest = 0;
    let tablePages = 0;
    for (const r of rows) {
      const end = this.length(r.seq) + r.tokens.length;
      if (end > maxLen) throw new Error(`sequence ${r.seq} would exceed the model length ${maxLen}`);
      tokens += r.tokens.length;
      widest = Math.max(widest, r.tokens.length);
      tablePages += Math.ceil(end / this.pagePositions);
    }
    let { info, table } = buffers;
    if (info.length < 3 * rows.length) info = new Int32Array(Math.max(3 * rows.length, 2 * info.length));
    if (table.length < tablePages) table = new Int32Array(Math.max(tablePages, 2 * table.length));
    let at = 0;
    rows.forEach((r, b) => {
      const length = this.length(r.seq);
      const pages = this.reserve(r.seq, length + r.tokens.length);
      info[3 * b] = r.tokens.length;
      info[3 * b + 1] = length;
      info[3 * b + 2] = at;
      for (let i = 0; i < pages.length; i++) table[at++] = pages[i];
    });
    return { info, table, tokens, widest };
  }

  /**
   * Records that `seq` now caches `n` more positions (after a forward pass wrote them). `tokens`, the tokens
   * written, let pages past the prompt be cached too.
   */
  advance(seq: number, n: number, tokens?: readonly number[]): void {
    const s = this.get(seq);
    const start = s.length;
    s.length += n;
    if (!s.tokens) return;
    if (tokens && start <= s.tokens.length) for (let i = s.tokens.length - start; i < n; i++) s.tokens.push(tokens[i]);
    this.enter(s);
  }

  /** The prompt's cached prefix as attach() would take it now: the pages, and whether the last is to be copied. */
  private lookup(prompt: readonly number[]): { pages: number[]; copyLast: boolean } {
    if (!this.prefixCaching) return { pages: [], copyLast: false };
    const keys = this.keysOf(prompt);
    const pages: number[] = [];
    for (const key of keys) {
      const page = this.index.get(key);
      if (page === undefined) break;
      pages.push(page);
    }
    // There must be a token left to compute, for the logits to sample from.
    if (pages.length * this.pagePositions < prompt.length) return { pages, copyLast: false };
    return { pages, copyLast: this.copyPage !== undefined };
  }

  plan(prompt: readonly number[]): PrefixPlan {
    const { pages, copyLast } = this.lookup(prompt);
    const shared = pages.length * this.pagePositions >= prompt.length ? pages.length - 1 : pages.length;
    let unheld = 0;
    for (let i = 0; i < shared; i++) if (this.refs[pages[i]] === 0) unheld++;
    const sharedTokens = shared * this.pagePositions;
    return { cachedTokens: copyLast ? prompt.length - 1 : sharedTokens, sharedTokens, revivedTokens: unheld * this.pagePositions };
  }

  attach(seq: number, prompt: readonly number[]): number {
    const s = this.get(seq);
    if (s.length > 0 || s.pages.length > 0) throw new Error(`sequence ${seq} already holds positions`);
    if (!this.prefixCaching) return 0;
    const { pages, copyLast } = this.lookup(prompt);
    const shared = pages.length * this.pagePositions >= prompt.length ? pages.length - 1 : pages.length;
    for (let i = 0; i < shared; i++) this.ref(pages[i]);
    s.pages.push(...pages.slice(0, shared));
    s.shared = shared;
    s.length = shared * this.pagePositions;
    s.keyed = shared;
    s.lastKey = shared > 0 ? this.keysOf(prompt)[shared - 1] : '';
    if (copyLast) {
      const from = pages[shared];
      // Held while its copy is taken, so that taking a page cannot evict it.
      this.ref(from);
      const to = this.take();
      this.copyPage!(from, to);
      this.unref(from);
      s.pages.push(to);
      s.length = prompt.length - 1;
    }
    s.tokens = prompt.slice();
    return s.length;
  }

  heldTokens(): number {
    let positions = 0;
    for (const s of this.seqs.values()) positions += s.length;
    return positions - this.sharedRefs * this.pagePositions;
  }

  inheritedTokens(): number {
    return this.inherited.size * this.pagePositions;
  }

  /** Enters the full pages `s` has written into the prefix index (a page whose key is there already stays private). */
  private enter(s: SeqPages): void {
    const full = Math.floor(Math.min(s.length, s.tokens!.length) / this.pagePositions);
    const P = this.pagePositions;
    for (let i = s.keyed; i < full; i++) {
      const key = chainKey(s.lastKey, s.tokens!, i * P, (i + 1) * P);
      const page = s.pages[i];
      if (!this.index.has(key) && !this.keyOf.has(page)) {
        this.index.set(key, page);
        this.keyOf.set(page, key);
      }
      s.lastKey = key;
      s.keyed = i + 1;
    }
  }

  /** Chain keys of the prompt's full pages (memoized per prompt array: admission asks again each step it waits). */
  private keysOf(prompt: readonly number[]): string[] {
    let keys = this.promptKeys.get(prompt);
    if (!keys) {
      keys = [];
      for (let i = 0, prev = ''; (i + 1) * this.pagePositions <= prompt.length; i++) {
        prev = chainKey(prev, prompt, i * this.pagePositions, (i + 1) * this.pagePositions);
        keys.push(prev);
      }
      this.promptKeys.set(prompt, keys);
    }
    return keys;
  }

  /** A page for a sequence to write: a free one, else the least recently released cached one. */
  private take(): number {
    let page = this.free.pop();
    if (page === undefined) {
      const oldest = this.evictable.values().next();
      if (oldest.done) throw new Error('the KV cache has no free page');
      page = oldest.value;
      this.evictable.delete(page);
      this.index.delete(this.keyOf.get(page)!);
      this.keyOf.delete(page);
    }
    this.refs[page] = 1;
    return page;
  }

  private ref(page: number): void {
    if (this.refs[page] > 0) {
      this.sharedRefs++;
    } else {
      // Its writer has closed: whoever holds it now inherits it.
      this.evictable.delete(page);
      this.inherited.add(page);
    }
    this.refs[page]++;
  }

  private unref(page: number): void {
    this.refs[page]--;
    if (this.refs[page] > 0) {
      this.sharedRefs--;
      return;
    }
    this.inherited.delete(page);
    if (this.keyOf.has(page)) this.evictable.add(page);
    else this.free.push(page);
  }

  private get(seq: number): SeqPages {
    const s = this.seqs.get(seq);
    if (!s) throw new Error(`sequence ${seq} is not open`);
    return s;
  }
}

/** The key of tokens[from, to) after the page keyed `prev`. */
function chainKey(prev: string, tokens: readonly number[], from: number, to: number): string {
  const ids = new Int32Array(to - from);
  for (let i = from; i < to; i++) ids[i - from] = tokens[i];
  return createHash('sha256').update(prev).update(new Uint8Array(ids.buffer)).digest('base64');
}
