/**
 * The paged cache's bookkeeping with automatic prefix caching (PageTable alone, pages of 4 positions): which
 * pages a prompt reuses, what is shared and what stays private, LRU eviction of pages no sequence holds, and
 * admission that counts shared pages once and cached pages nobody holds as free.
 */
import { describe, expect, it } from 'vitest';
import { PageTable } from '../src/engine/runners/page-table.ts';

const P = 4;
const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);

/** Opens `seq` with `prompt`, writes the uncached rest of it as one pass, and returns the positions reused. */
function prefill(t: PageTable, seq: number, prompt: number[]): number {
  t.open(seq);
  const cached = t.attach(seq, prompt);
  t.reserve(seq, prompt.length);
  t.advance(seq, prompt.length - cached, prompt.slice(cached));
  return cached;
}

describe('PageTable prefix caching', () => {
  it('a prompt reuses the full pages of its longest cached prefix, shared read-only; the partly filled page never', () => {
    const t = new PageTable(32, P, 8, { prefixCache: true });
    const prompt = range(100, 10); // two full pages and two positions
    expect(prefill(t, 1, prompt)).toBe(0);
    const a = [...t.reserve(1, 10)];
    expect(t.cachedPages).toBe(2);

    expect(t.plan(prompt).cachedTokens).toBe(8);
    expect(prefill(t, 2, prompt)).toBe(8);
    const b = t.reserve(2, 10);
    expect(b.slice(0, 2)).toEqual(a.slice(0, 2));
    expect(b[2]).not.toBe(a[2]);
    expect(t.length(2)).toBe(10);
    // Shared pages count once among the positions held.
    expect(t.heldTokens()).toBe(10 + 2);

    // Sharing the first five tokens: one page; a different first token: none.
    expect(prefill(t, 3, [...range(100, 5), 7, 7, 7, 7])).toBe(4);
    expect(t.reserve(3, 9)[0]).toBe(a[0]);
    expect(prefill(t, 4, [99, ...range(101, 9)])).toBe(0);
    // A page's key covers every token before it: the same second page after another first page is a miss.
    expect(t.plan([...range(200, 4), ...range(104, 4), 1]).cachedTokens).toBe(0);
  });

  it('a prompt cached whole recomputes its last token in a private copy of its last page (else its last page)', () => {
    const copies: [number, number][] = [];
    const t = new PageTable(32, P, 8, { prefixCache: true, copyPage: (from, to) => copies.push([from, to]) });
    const long = range(100, 10);
    prefill(t, 1, long);
    const a = t.reserve(1, 10);
    const whole = range(100, 8);
    expect(t.plan(whole).cachedTokens).toBe(7);
    t.open(2);
    expect(t.attach(2, whole)).toBe(7);
    const b = t.reserve(2, 8);
    expect(b[0]).toBe(a[0]);
    expect(copies).toEqual([[a[1], b[1]]]);
    expect(b[1]).not.toBe(a[1]);
    t.advance(2, 1, [107]);
    // Its copy stays private: the original keeps the key.
    t.close(1);
    t.close(2);
    expect(t.cachedPages).toBe(2);

    const plain = new PageTable(32, P, 8, { prefixCache: true });
    prefill(plain, 1, long);
    expect(plain.plan(whole).cachedTokens).toBe(4);
  });

  it('pages written past the prompt are cached too, when the runner says which tokens it wrote', () => {
    const t = new PageTable(32, P, 8, { prefixCache: true });
    const prompt = range(100, 6);
    prefill(t, 1, prompt);
    for (const token of [50, 51, 52]) {
      t.reserve(1, t.length(1) + 1);
      t.advance(1, 1, [token]);
    }
    // Positions 0-8 written: pages 0 and 1 full.
    expect(t.cachedPages).toBe(2);
    expect(t.plan([...prompt, 50, 51, 52, 9]).cachedTokens).toBe(8);
    expect(t.plan([...prompt, 50, 60, 52, 9]).cachedTokens).toBe(4);
  });

  it('pages no sequence holds stay cached until needed, then go least recently released first, later pages first', () => {
    const t = new PageTable(6, P, 8, { prefixCache: true });
    const x = range(100, 9); // pages x0 x1 (cached) + partial
    const y = range(300, 9);
    prefill(t, 1, x);
    t.close(1);
    prefill(t, 2, y);
    t.close(2);
    expect(t.cachedPages).toBe(4);
    // Four pages hold cached data (no sequence holds them) and two are free.
    expect(t.usedPages).toBe(4);
    expect(t.plan(x)).toEqual({ cachedTokens: 8, sharedTokens: 8, revivedTokens: 8 });
    // A new sequence of three pages takes the two free pages, then x's second page (x was released first).
    t.open(3);
    t.attach(3, range(700, 2));
    t.reserve(3, 12);
    expect(t.cachedPages).toBe(3);
    expect(t.plan(x).cachedTokens).toBe(4);
    expect(t.plan(y).cachedTokens).toBe(8);
    t.reserve(3, 16);
    // x's first page went next; y is whole.
    expect(t.plan(x).cachedTokens).toBe(0);
    expect(t.plan(y).cachedTokens).toBe(8);
    t.close(3);
    // Reusing y holds its pages again: they are no longer evictable.
    prefill(t, 4, y);
    t.open(5);
    t.attach(5, [1]);
    t.reserve(5, 12);
    expect(() => t.reserve(5, 16)).toThrow(/no free page/);
    expect(t.plan(y).cachedTokens).toBe(8);
  });

  it('for admission a page counts once: in its writer while it runs, then in inheritedTokens while others hold it', () => {
    const t = new PageTable(16, P, 8, { prefixCache: true });
    const prompt = range(100, 17); // four full pages + one position
    prefill(t, 1, prompt);
    expect(t.plan(prompt)).toEqual({ cachedTokens: 16, sharedTokens: 16, revivedTokens: 0 });
    prefill(t, 2, prompt);
    prefill(t, 3, prompt);
    expect(t.inheritedTokens()).toBe(0);
    expect(t.heldTokens()).toBe(16 + 3);
    // The writer leaves: its four shared pages are now held by sequences that did not write them.
    t.close(1);
    expect(t.inheritedTokens()).toBe(16);
    expect(t.heldTokens()).toBe(16 + 2);
    t.close(2);
    expect(t.inheritedTokens()).toBe(16);
    t.close(3);
    expect(t.inheritedTokens()).toBe(0);
    // Cached, held by no one: taking them again revives them.
    expect(t.plan(prompt)).toEqual({ cachedTokens: 16, sharedTokens: 16, revivedTokens: 16 });
    prefill(t, 4, prompt);
    expect(t.inheritedTokens()).toBe(16);
    expect(t.plan(prompt).revivedTokens).toBe(0);
  });

  it('with prefix caching off nothing is keyed or reused', () => {
    const t = new PageTable(16, P, 8);
    prefill(t, 1, range(100, 10));
    expect(t.cachedPages).toBe(0);
    expect(t.plan(range(100, 10)).cachedTokens).toBe(0);
    expect(prefill(t, 2, range(100, 10))).toBe(0);
    t.close(1);
    t.close(2);
    expect(t.usedPages).toBe(0);
  });
});
