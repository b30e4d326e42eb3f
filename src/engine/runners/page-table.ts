/**
 * The paged KV cache's bookkeeping, apart from what the pages hold: which pages are free and which pages each
 * sequence holds, in order. Runners that keep a paged cache (wherever its memory lives) hand these page lists to
 * their attention kernels; nothing here touches cache memory.
 */
export class PageTable {
  private readonly free: number[] = [];
  private readonly seqs = new Map<number, { length: number; pages: number[] }>();

  constructor(
    readonly totalPages: number,
    readonly pagePositions: number,
    private readonly maxSeqs: number,
  ) {
    // Freed pages are reused first (they are already touched, so already backed by memory).
    for (let p = totalPages - 1; p >= 0; p--) this.free.push(p);
  }

  get usedPages(): number {
    return this.totalPages - this.free.length;
  }

  open(seq: number): void {
    if (this.seqs.has(seq)) throw new Error(`sequence ${seq} is already open`);
    if (this.seqs.size >= this.maxSeqs) throw new Error(`no free KV slot (max ${this.maxSeqs})`);
    this.seqs.set(seq, { length: 0, pages: [] });
  }

  close(seq: number): void {
    const s = this.seqs.get(seq);
    if (!s) return;
    for (let i = s.pages.length - 1; i >= 0; i--) this.free.push(s.pages[i]);
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
    while (s.pages.length < needed) {
      const page = this.free.pop();
      if (page === undefined) throw new Error('the KV cache has no free page');
      s.pages.push(page);
    }
    return s.pages;
  }

  /** Records that `seq` now caches `n` more positions (after a forward pass wrote them). */
  advance(seq: number, n: number): void {
    this.get(seq).length += n;
  }

  private get(seq: number): { length: number; pages: number[] } {
    const s = this.seqs.get(seq);
    if (!s) throw new Error(`sequence ${seq} is not open`);
    return s;
  }
}
