/**
 * Constrained decoding: a byte-level pushdown automaton over an OutputConstraint's grammar (JSON values by
 * schema, literal text), and the token masks it allows, found by walking a trie of the vocabulary's byte
 * strings. A state is a set of persistent stacks of frames (more than one only while anyOf branches or enum
 * literals are undecided); stepping never mutates a frame, so a trie walk shares states between siblings.
 *
 * Every stack knows the fewest bytes that close it (`min`); a token is allowed only when what it leaves can
 * still be closed in the tokens left (one byte per token at worst, since every byte is a token), so a
 * constrained output always ends complete within max_tokens.
 */
import type { TextTokenizer } from '../../model/tokenizer.ts';
import { byteOf, unicodeToByte } from '../../model/stream-decoder.ts';
import type { GrammarNode, OutputConstraint } from '../protocol.ts';

const enum F { Value, Lit, Str, Num, ObjFirst, ObjKeyStart, Key, ObjAfter, ArrFirst, ArrAfter, Space }

type Frame =
  | { k: F.Value; node: number }
  | { k: F.Lit; alts: Uint8Array[]; pos: number }
  | { k: F.Str; node: number; count: number; esc: number; utf: number }
  | { k: F.Num; integer: boolean; phase: number; digits: number }
  | { k: F.ObjFirst | F.ObjKeyStart | F.ObjAfter; node: number; from: number }
  | { k: F.Key; node: number; cands: number[]; pos: number }
  | { k: F.ArrFirst; node: number }
  | { k: F.ArrAfter; node: number; count: number }
  | { k: F.Space };

interface Stack { f: Frame; next: Stack | null; min: number }
/** null: everything closed. */
type State = Stack | null;

const SPACE: Frame = { k: F.Space };
const MAX_INT_DIGITS = 15;
const MAX_FRAC_DIGITS = 15;
const enc = new TextEncoder();

// Number phases: start, after '-', a leading 0, integer digits, after '.', fraction digits.
const N_START = 0, N_MINUS = 1, N_ZERO = 2, N_INT = 3, N_DOT = 4, N_FRAC = 5;
const numTerminal = (phase: number): boolean => phase === N_ZERO || phase === N_INT || phase === N_FRAC;

// UTF-8 inside strings: 0 = between characters; else which continuation bytes the next byte may be.
const U_NONE = 0, U_ONE = 1, U_TWO = 2, U_THREE = 3, U_E0 = 4, U_ED = 5, U_F0 = 6, U_F4 = 7;
const utfPending = [0, 1, 2, 3, 2, 2, 3, 3];

/** The state after a continuation byte `b`, or -1. */
function utfStep(u: number, b: number): number {
  const lo = u === U_E0 ? 0xa0 : u === U_F0 ? 0x90 : 0x80;
  const hi = u === U_ED ? 0x9f : u === U_F4 ? 0x8f : 0xbf;
  if (b < lo || b > hi) return -1;
  switch (u) {
    case U_ONE: return U_NONE;
    case U_TWO: case U_E0: case U_ED: return U_ONE;
    default: return U_TWO; // U_THREE, U_F0, U_F4
  }
}

/** The state after a lead byte ≥ 0x80, or -1. */
function utfLead(b: number): number {
  if (b >= 0xc2 && b <= 0xdf) return U_ONE;
  if (b === 0xe0) return U_E0;
  if (b === 0xed) return U_ED;
  if (b >= 0xe1 && b <= 0xef) return U_TWO;
  if (b === 0xf0) return U_F0;
  if (b >= 0xf1 && b <= 0xf3) return U_THREE;
  if (b === 0xf4) return U_F4;
  return -1;
}

const isDigit = (b: number): boolean => b >= 0x30 && b <= 0x39;
const isHex = (b: number): boolean => isDigit(b) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66);
const ESCAPES = new Set([...'"\\/bfnrt'].map((c) => c.charCodeAt(0)));

/** A constraint made ready to run: its nodes with what the automaton needs precomputed (shared by every matcher of a request). */
export class CompiledGrammar {
  readonly nodes: GrammarNode[];
  readonly root: number;
  /** The fewest bytes of a value of each node. */
  readonly minLen: number[];
  readonly litBytes = new Map<number, Uint8Array[]>();
  /** Object nodes: each property's key as written after the opening quote (escaped content and the closing quote). */
  readonly keyBytes = new Map<number, Uint8Array[]>();
  /** Object nodes: required properties at or after each index, and the fewest bytes they take with their commas. */
  readonly reqCount = new Map<number, number[]>();
  readonly reqCost = new Map<number, number[]>();
  /** Free object keys: any string. */
  readonly keyString: number;

  constructor(constraint: OutputConstraint, readonly table: TokenTable) {
    const nodes = constraint.nodes.map((n) => n);
    const add = (n: GrammarNode): number => nodes.push(n) - 1;
    // `any` is the anyOf of these; a free object's values and a free array's items are `any` again.
    const anyId = add({ kind: 'anyOf', options: [] });
    this.keyString = add({ kind: 'string', minLength: 0, maxLength: null });
    const anyOptions = [
      this.keyString,
      add({ kind: 'number', integer: false }),
      add({ kind: 'object', properties: [], additional: anyId }),
      add({ kind: 'array', items: anyId, minItems: 0, maxItems: null }),
      add({ kind: 'literal', values: ['true', 'false', 'null'] }),
    ];
    nodes[anyId] = { kind: 'anyOf', options: anyOptions };
    for (let i = 0; i < nodes.length; i++) if (nodes[i].kind === 'any') nodes[i] = nodes[anyId];
    this.nodes = nodes;
    this.root = constraint.root;
    for (let i = 0; i < nodes.length; i++) {
      const n = nodes[i];
      if (n.kind === 'literal') this.litBytes.set(i, n.values.map((v) => enc.encode(v)).filter((b) => b.length > 0));
      if (n.kind === 'object') this.keyBytes.set(i, n.properties.map((p) => enc.encode(JSON.stringify(p.name).slice(1))));
    }
    // Fewest bytes per node: a fixpoint, since references may be recursive.
    const minLen = new Array<number>(nodes.length).fill(Infinity);
    for (let round = 0, changed = true; changed && round < 1000; round++) {
      changed = false;
      for (let i = 0; i < nodes.length; i++) {
        const v = this.nodeMin(i, minLen);
        if (v < minLen[i]) {
          minLen[i] = v;
          changed = true;
        }
      }
    }
    this.minLen = minLen;
    for (let i = 0; i < nodes.length; i++) {
      const n = nodes[i];
      if (n.kind !== 'object') continue;
      const count = new Array<number>(n.properties.length + 1).fill(0);
      const cost = new Array<number>(n.properties.length + 1).fill(0);
      const keys = this.keyBytes.get(i)!;
      for (let j = n.properties.length - 1; j >= 0; j--) {
        const p = n.properties[j];
        count[j] = count[j + 1] + (p.required ? 1 : 0);
        // `"key":value`, and a comma before the next required one.
        cost[j] = cost[j + 1] + (p.required ? 2 + keys[j].length + minLen[p.value] + (count[j + 1] > 0 ? 1 : 0) : 0);
      }
      this.reqCount.set(i, count);
      this.reqCost.set(i, cost);
    }
    if (!Number.isFinite(minLen[this.root])) throw new Error('the grammar has no finite value (a schema that only refers to itself)');
  }

  private nodeMin(i: number, m: number[]): number {
    const n = this.nodes[i];
    switch (n.kind) {
      case 'any': return 1;
      case 'literal': return Math.min(...this.litBytes.get(i)!.map((b) => this.table.spelling(b)[0]));
      case 'string': return 2 + n.minLength;
      case 'number': return 1;
      case 'object': {
        const keys = n.properties.map((p) => enc.encode(JSON.stringify(p.name)).length);
        const req = n.properties.map((p, j) => (p.required ? keys[j] + 1 + m[p.value] : -1)).filter((x) => x >= 0);
        return 2 + req.reduce((a, b) => a + b, 0) + Math.max(0, req.length - 1);
      }
      case 'array': return 2 + n.minItems * m[n.items] + Math.max(0, n.minItems - 1);
      case 'anyOf': return Math.min(...n.options.map((o) => m[o]));
      case 'seq': return n.items.reduce((a, o) => a + m[o], 0);
    }
  }

  /** The fewest bytes that close frame `f` itself. */
  frameMin(f: Frame): number {
    switch (f.k) {
      case F.Value: return this.minLen[f.node];
      case F.Lit: {
        let best = Infinity;
        for (const a of f.alts) best = Math.min(best, this.table.spelling(a)[f.pos]);
        return best;
      }
      case F.Str: {
        const n = this.nodes[f.node] as Extract<GrammarNode, { kind: 'string' }>;
        const pendingChar = f.utf !== U_NONE || f.esc !== 0 ? 1 : 0;
        const escLeft = f.esc === 0 ? 0 : f.esc === 1 ? 1 : f.esc === 6 ? 3 : 6 - f.esc; // esc 2..5: hex digits left 4..1; 6: three after a "d"
        return utfPending[f.utf] + escLeft + Math.max(0, n.minLength - f.count - pendingChar) + 1;
      }
      case F.Num: return numTerminal(f.phase) ? 0 : 1;
      case F.ObjFirst: {
        const count = this.reqCount.get(f.node)!;
        return count[0] === 0 ? 1 : this.reqCost.get(f.node)![0] + 1;
      }
      case F.ObjKeyStart: {
        const n = this.nodes[f.node] as Extract<GrammarNode, { kind: 'object' }>;
        if (n.properties.length === 0) return 4 + this.minLen[n.additional ?? this.keyString];
        const count = this.reqCount.get(f.node)!;
        if (count[f.from] > 0) return this.reqCost.get(f.node)![f.from] + 1;
        let best = Infinity;
        for (const j of this.candidates(f.node, f.from)) best = Math.min(best, 1 + this.keyRest(f.node, j, 0));
        return best;
      }
      case F.Key: {
        let best = Infinity;
        for (const j of f.cands) best = Math.min(best, this.keyRest(f.node, j, f.pos));
        return best;
      }
      case F.ObjAfter: {
        const count = this.reqCount.get(f.node)!;
        return count[f.from] === 0 ? 1 : 2 + this.reqCost.get(f.node)![f.from];
      }
      case F.ArrFirst: {
        const n = this.nodes[f.node] as Extract<GrammarNode, { kind: 'array' }>;
        return n.minItems === 0 ? 1 : n.minItems * this.minLen[n.items] + n.minItems;
      }
      case F.ArrAfter: {
        const n = this.nodes[f.node] as Extract<GrammarNode, { kind: 'array' }>;
        return f.count >= n.minItems ? 1 : (n.minItems - f.count) * (1 + this.minLen[n.items]) + 1;
      }
      case F.Space: return 0;
    }
  }

  /** Bytes from position `pos` of property j's key to the end of its object: key rest, colon, value, the rest. */
  private keyRest(node: number, j: number, pos: number): number {
    const n = this.nodes[node] as Extract<GrammarNode, { kind: 'object' }>;
    const key = this.keyBytes.get(node)![j];
    return key.length - pos + 1 + this.minLen[n.properties[j].value] + this.frameMin({ k: F.ObjAfter, node, from: j + 1 });
  }

  /** Properties that may come next from index `from`: up to and including the first required one. */
  candidates(node: number, from: number): number[] {
    const n = this.nodes[node] as Extract<GrammarNode, { kind: 'object' }>;
    const out: number[] = [];
    for (let j = from; j < n.properties.length; j++) {
      out.push(j);
      if (n.properties[j].required) break;
    }
    return out;
  }
}

/** Byte strings of a tokenizer's tokens and a trie over them, built once per tokenizer. */
export class TokenTable {
  /** Each token's bytes; null for special tokens (never allowed in a constrained output, EOS aside). */
  readonly bytes: (Uint8Array | null)[];
  // Trie in flat arrays: node 0 is the root.
  readonly firstChild: Int32Array;
  readonly nextSibling: Int32Array;
  readonly byte: Uint8Array;
  /** First token whose bytes end at a node; tokenNext chains tokens with the same bytes. */
  readonly tokenHead: Int32Array;
  readonly tokenNext: Int32Array;
  readonly nodeCount: number;

  private static readonly cache = new WeakMap<TextTokenizer, TokenTable>();
  private stringSets?: { safe: Uint8Array; safeMask: Uint8Array; chars: Uint16Array; quoted: Int32Array };

  /**
   * Inside a JSON string, between characters: `safe` marks the tokens that stay inside it (no quote, backslash or
   * control byte, UTF-8 that goes on from a character boundary), as 1 + the bytes of a character they leave
   * pending (safeMask: 1), and `chars` the characters they complete; `quoted` lists those with a quote or backslash, which
   * must be stepped through one by one. Every other token is refused there.
   */
  get stringTokens(): { safe: Uint8Array; safeMask: Uint8Array; chars: Uint16Array; quoted: Int32Array } {
    if (this.stringSets) return this.stringSets;
    const safe = new Uint8Array(this.bytes.length);
    const chars = new Uint16Array(this.bytes.length);
    const quoted: number[] = [];
    for (let id = 0; id < this.bytes.length; id++) {
      const b = this.bytes[id];
      if (!b || b.length === 0) continue;
      if (b.includes(0x22) || b.includes(0x5c)) {
        quoted.push(id);
        continue;
      }
      let u = U_NONE;
      let ok = true;
      let n = 0;
      for (let i = 0; i < b.length && ok; i++) {
        const x = b[i];
        if (u !== U_NONE) {
          u = utfStep(u, x);
          if (u === U_NONE) n++;
        } else if (x < 0x20) ok = false;
        else if (x >= 0x80) u = utfLead(x);
        else n++;
        if (u < 0) ok = false;
      }
      if (ok) {
        safe[id] = 1 + utfPending[u];
        chars[id] = Math.min(n, 0xffff);
      }
    }
    return (this.stringSets = { safe, safeMask: safe.map((x) => (x > 0 ? 1 : 0)), chars, quoted: Int32Array.from(quoted) });
  }
  private readonly spellings = new WeakMap<Uint8Array, Int32Array>();

  /**
   * For each position of `text`, the fewest tokens that write the rest of it (its length where some byte has no
   * token): a literal's share of a stack's minimum, in tokens rather than bytes.
   */
  spelling(text: Uint8Array): Int32Array {
    let dp = this.spellings.get(text);
    if (dp) return dp;
    const n = text.length;
    dp = new Int32Array(n + 1);
    for (let i = n - 1; i >= 0; i--) {
      let best = n - i + dp[n] + 1_000_000;
      let node = 0;
      for (let j = i; j < n; j++) {
        let c = this.firstChild[node];
        while (c >= 0 && this.byte[c] !== text[j]) c = this.nextSibling[c];
        if (c < 0) break;
        node = c;
        if (this.tokenHead[c] >= 0) best = Math.min(best, 1 + dp[j + 1]);
      }
      dp[i] = best;
    }
    this.spellings.set(text, dp);
    return dp;
  }

  static of(tokenizer: TextTokenizer, vocabSize: number): TokenTable {
    let t = TokenTable.cache.get(tokenizer);
    if (!t) TokenTable.cache.set(tokenizer, (t = new TokenTable(tokenBytes(tokenizer, vocabSize))));
    return t;
  }

  constructor(bytes: (Uint8Array | null)[]) {
    this.bytes = bytes;
    let total = 1;
    for (const b of bytes) if (b) total += b.length;
    const firstChild = new Int32Array(total).fill(-1);
    const nextSibling = new Int32Array(total).fill(-1);
    const byte = new Uint8Array(total);
    const tokenHead = new Int32Array(total).fill(-1);
    const tokenNext = new Int32Array(bytes.length).fill(-1);
    let count = 1;
    for (let id = 0; id < bytes.length; id++) {
      const b = bytes[id];
      if (!b || b.length === 0) continue;
      let node = 0;
      for (let i = 0; i < b.length; i++) {
        let c = firstChild[node];
        while (c >= 0 && byte[c] !== b[i]) c = nextSibling[c];
        if (c < 0) {
          c = count++;
          byte[c] = b[i];
          nextSibling[c] = firstChild[node];
          firstChild[node] = c;
        }
        node = c;
      }
      tokenNext[id] = tokenHead[node];
      tokenHead[node] = id;
    }
    this.firstChild = firstChild.slice(0, count);
    this.nextSibling = nextSibling.slice(0, count);
    this.byte = byte.slice(0, count);
    this.tokenHead = tokenHead.slice(0, count);
    this.tokenNext = tokenNext;
    this.nodeCount = count;
  }
}

/** The bytes each token adds to the output, as the stream decoder writes them. */
export function tokenBytes(tokenizer: TextTokenizer, vocabSize: number): (Uint8Array | null)[] {
  const kind = tokenizer.streamDecoding;
  const table = unicodeToByte();
  const out: (Uint8Array | null)[] = new Array(vocabSize).fill(null);
  for (let id = 0; id < vocabSize; id++) {
    if (tokenizer.isSpecial(id)) continue;
    const piece = tokenizer.idToToken(id);
    if (piece === undefined) continue;
    if (kind === 'bytelevel') {
      const bytes: number[] = [];
      let ok = true;
      for (const c of piece) {
        const b = table.get(c);
        if (b === undefined) { ok = false; break; }
        bytes.push(b);
      }
      // Added tokens are written as they are (their content need not be in the byte alphabet).
      out[id] = ok ? Uint8Array.from(bytes) : enc.encode(piece);
    } else if (kind === 'sentencepiece') {
      const text = piece.replaceAll('\u2581', ' ');
      const byte = byteOf(text);
      out[id] = byte !== undefined ? Uint8Array.of(byte) : enc.encode(text);
    } else {
      out[id] = enc.encode(tokenizer.decode([id], { skipSpecialTokens: false }));
    }
  }
  return out;
}

/** No token can continue the output within the tokens left. */
export class NoTokenAllowed extends Error {
  constructor() {
    super('no token keeps the output valid within max_tokens');
    this.name = 'NoTokenAllowed';
  }
}

/**
 * One request's position in its grammar. The scheduler sets `budget` (tokens left after the next one) before
 * each sample; the sampler asks `allows` for the token it drew and calls `apply` (the full mask) only when
 * that token is not allowed.
 */
export class GrammarMatcher {
  private states: State[];
  budget = Infinity;

  private readonly table: TokenTable;
  /** apply()'s mask, reused from token to token. */
  private scratch?: Uint8Array;

  constructor(private readonly g: CompiledGrammar, private readonly eosIds: readonly number[]) {
    this.table = g.table;
    this.states = [this.push({ k: F.Value, node: g.root }, null)];
  }

  private push(f: Frame, next: State): Stack {
    return { f, next, min: this.g.frameMin(f) + (next?.min ?? 0) };
  }

  /**
   * Outside strings (structure, keys, numbers, literals) few tokens are allowed and the mask is cheap, so the
   * sampler masks before drawing; inside a string most tokens are allowed and a free draw usually stands.
   */
  get maskFirst(): boolean {
    const s = this.states.length === 1 ? this.states[0] : null;
    return s === null || s.f.k !== F.Str;
  }

  /** Every byte written so far closes the grammar: nothing more may follow. */
  get closed(): boolean {
    return this.states.every((s) => s === null);
  }

  /** The output so far is a complete value (EOS may follow). */
  get complete(): boolean {
    return this.states.some((s) => canEnd(s));
  }

  allows(token: number): boolean {
    if (this.eosIds.includes(token)) return this.complete;
    const bytes = this.table.bytes[token];
    if (!bytes || bytes.length === 0) return false;
    let states = this.states;
    for (let i = 0; i < bytes.length && states.length > 0; i++) states = this.stepAll(states, bytes[i]);
    return states.length > 0 && minOf(states) <= this.budget;
  }

  /** Sets the logits of every token not allowed to -Infinity; throws NoTokenAllowed when none is. */
  apply(row: Float32Array): void {
    this.scratch ??= new Uint8Array(this.table.bytes.length);
    const allowed = this.mask(this.scratch);
    let any = false;
    for (let i = 0; i < allowed.length; i++) {
      if (allowed[i]) any = true;
      else row[i] = -Infinity;
    }
    if (!any) throw new NoTokenAllowed();
  }

  /** 1 for each allowed token (the vocabulary of the token table), into `out` when given. */
  mask(out?: Uint8Array): Uint8Array {
    return this.stringMask(out) ?? this.walkMask(out);
  }

  /** The mask by walking the whole trie (what mask() gives everywhere, also where it takes a shortcut). */
  walkMask(out?: Uint8Array): Uint8Array {
    const t = this.table;
    const allowed = out ? out.fill(0) : new Uint8Array(t.bytes.length);
    if (this.complete) for (const e of this.eosIds) if (e < allowed.length) allowed[e] = 1;
    const budget = this.budget;
    const walk = (node: number, states: State[]): void => {
      for (let c = t.firstChild[node]; c >= 0; c = t.nextSibling[c]) {
        const next = this.stepAll(states, t.byte[c]);
        if (next.length === 0) continue;
        if (t.tokenHead[c] >= 0 && minOf(next) <= budget) for (let id = t.tokenHead[c]; id >= 0; id = t.tokenNext[id]) allowed[id] = 1;
        if (t.firstChild[c] >= 0) walk(c, next);
      }
    };
    walk(0, this.states);
    return allowed;
  }

  /**
   * The mask inside a string, between characters, from the table's string sets, without walking the trie;
   * undefined elsewhere.
   */
  private stringMask(out?: Uint8Array): Uint8Array | undefined {
    if (this.states.length !== 1) return undefined;
    const s = this.states[0];
    if (s === null || s.f.k !== F.Str || s.f.utf !== U_NONE || s.f.esc !== 0) return undefined;
    // A safe token moves the close no further than the bytes of a character it leaves pending (at most three).
    const { safe, safeMask, chars, quoted } = this.table.stringTokens;
    const { minLength, maxLength } = this.g.nodes[s.f.node] as Extract<GrammarNode, { kind: 'string' }>;
    let allowed: Uint8Array;
    if (s.min + 3 <= this.budget && maxLength === null) {
      allowed = out ? (out.set(safeMask), out) : safeMask.slice();
    } else {
      // What closes after the token: the rest of the stack, the pending bytes, the characters still short of minLength, the quote.
      const below = s.min - this.g.frameMin(s.f);
      const count = s.f.count;
      const max = maxLength ?? Infinity;
      allowed = out ? out.fill(0) : new Uint8Array(safe.length);
      for (let i = 0; i < safe.length; i++) {
        if (safe[i] === 0) continue;
        const pending = safe[i] - 1;
        const written = count + chars[i] + (pending > 0 ? 1 : 0);
        if (written <= max && below + pending + Math.max(0, minLength - written) + 1 <= this.budget) allowed[i] = 1;
      }
    }
    for (let i = 0; i < quoted.length; i++) if (this.allows(quoted[i])) allowed[quoted[i]] = 1;
    return allowed;
  }

  accept(token: number): void {
    if (this.eosIds.includes(token)) {
      this.states = [null];
      return;
    }
    const bytes = this.table.bytes[token];
    if (!bytes) throw new Error(`token ${token} is not allowed here`);
    let states = this.states;
    for (let i = 0; i < bytes.length; i++) states = this.stepAll(states, bytes[i]);
    if (states.length === 0) throw new Error(`token ${token} is not allowed here`);
    this.states = states;
  }

  /** Feeds text (for tests and forced prefixes); false when it leaves the grammar. */
  acceptText(text: string): boolean {
    let states = this.states;
    for (const b of enc.encode(text)) {
      states = this.stepAll(states, b);
      if (states.length === 0) return false;
    }
    this.states = states;
    return true;
  }

  private stepAll(states: State[], b: number): State[] {
    const out: State[] = [];
    for (const s of states) if (s !== null) this.step(s, b, out);
    return out;
  }

  /** Every state after byte `b` from stack `s`, appended to `out`. */
  private step(s: Stack, b: number, out: State[]): void {
    const f = s.f;
    const rest = s.next;
    const g = this.g;
    switch (f.k) {
      case F.Value: return this.expand(f.node, rest, b, out);
      case F.Space: {
        if (b === 0x20) out.push(rest);
        else if (rest !== null) this.step(rest, b, out);
        return;
      }
      case F.Lit: {
        const pos = f.pos;
        let longer: Uint8Array[] | undefined;
        let done = false;
        for (const a of f.alts) {
          if (a[pos] !== b) continue;
          if (a.length === pos + 1) done = true;
          else (longer ??= []).push(a);
        }
        if (done) out.push(rest);
        if (longer) out.push(this.push({ k: F.Lit, alts: longer, pos: pos + 1 }, rest));
        return;
      }
      case F.Str: {
        const n = g.nodes[f.node] as Extract<GrammarNode, { kind: 'string' }>;
        const max = n.maxLength ?? Infinity;
        if (f.utf !== U_NONE) {
          const u = utfStep(f.utf, b);
          if (u < 0) return;
          out.push(this.push({ k: F.Str, node: f.node, count: u === U_NONE ? f.count + 1 : f.count, esc: 0, utf: u }, rest));
          return;
        }
        if (f.esc === 1) {
          if (ESCAPES.has(b)) out.push(this.push({ k: F.Str, node: f.node, count: f.count + 1, esc: 0, utf: 0 }, rest));
          else if (b === 0x75) out.push(this.push({ k: F.Str, node: f.node, count: f.count, esc: 2, utf: 0 }, rest));
          return;
        }
        if (f.esc >= 2) {
          if (!isHex(b)) return;
          // No surrogates (\uD800-\uDFFF): a character is then exactly one escape, so lengths count true.
          if (f.esc === 6 && !(b >= 0x30 && b <= 0x37)) return;
          const esc = f.esc === 2 ? (b === 0x44 || b === 0x64 ? 6 : 3) : f.esc === 6 ? 4 : f.esc === 5 ? 0 : f.esc + 1;
          out.push(this.push({ k: F.Str, node: f.node, count: esc === 0 ? f.count + 1 : f.count, esc, utf: 0 }, rest));
          return;
        }
        if (b === 0x22) {
          if (f.count >= n.minLength) out.push(rest);
          return;
        }
        if (f.count >= max || b < 0x20) return;
        if (b === 0x5c) {
          out.push(this.push({ k: F.Str, node: f.node, count: f.count, esc: 1, utf: 0 }, rest));
          return;
        }
        if (b < 0x80) {
          out.push(this.push({ k: F.Str, node: f.node, count: f.count + 1, esc: 0, utf: 0 }, rest));
          return;
        }
        const u = utfLead(b);
        if (u >= 0) out.push(this.push({ k: F.Str, node: f.node, count: f.count, esc: 0, utf: u }, rest));
        return;
      }
      case F.Num: {
        const p = f.phase;
        const num = (phase: number, digits: number): void => void out.push(this.push({ k: F.Num, integer: f.integer, phase, digits }, rest));
        if (p === N_START && b === 0x2d) return num(N_MINUS, 0);
        if (p === N_START || p === N_MINUS) {
          if (b === 0x30) return num(N_ZERO, 1);
          if (isDigit(b)) return num(N_INT, 1);
          return;
        }
        if (p === N_DOT) return isDigit(b) ? num(N_FRAC, 1) : undefined;
        if (p === N_INT && isDigit(b)) return f.digits < MAX_INT_DIGITS ? num(N_INT, f.digits + 1) : undefined;
        if (p === N_FRAC && isDigit(b)) return f.digits < MAX_FRAC_DIGITS ? num(N_FRAC, f.digits + 1) : undefined;
        if ((p === N_ZERO || p === N_INT) && b === 0x2e && !f.integer) return num(N_DOT, 0);
        // A byte the number does not take ends it (when it may end) and goes to what follows.
        if (numTerminal(p) && rest !== null) this.step(rest, b, out);
        return;
      }
      case F.ObjFirst: case F.ObjKeyStart: {
        const n = g.nodes[f.node] as Extract<GrammarNode, { kind: 'object' }>;
        if (b === 0x7d && f.k === F.ObjFirst && g.reqCount.get(f.node)![0] === 0) {
          out.push(rest);
          return;
        }
        if (b !== 0x22) return;
        if (n.properties.length === 0) {
          // A free key: any string, then the value schema of free keys.
          const after = this.push({ k: F.ObjAfter, node: f.node, from: 0 }, rest);
          const value = this.push({ k: F.Value, node: n.additional ?? g.keyString }, after);
          const colon = this.push({ k: F.Lit, alts: [COLON], pos: 0 }, this.push(SPACE, value));
          out.push(this.push({ k: F.Str, node: g.keyString, count: 0, esc: 0, utf: 0 }, colon));
          return;
        }
        const cands = g.candidates(f.node, f.from);
        if (cands.length > 0) out.push(this.push({ k: F.Key, node: f.node, cands, pos: 0 }, rest));
        return;
      }
      case F.Key: {
        const keys = g.keyBytes.get(f.node)!;
        const pos = f.pos;
        const still: number[] = [];
        for (const j of f.cands) {
          const key = keys[j];
          if (key[pos] !== b) continue;
          if (key.length === pos + 1) {
            // The closing quote: unique, since a key's content has no raw quote.
            const n = g.nodes[f.node] as Extract<GrammarNode, { kind: 'object' }>;
            const after = this.push({ k: F.ObjAfter, node: f.node, from: j + 1 }, rest);
            const value = this.push({ k: F.Value, node: n.properties[j].value }, after);
            out.push(this.push({ k: F.Lit, alts: [COLON], pos: 0 }, this.push(SPACE, value)));
          } else {
            still.push(j);
          }
        }
        if (still.length > 0) out.push(this.push({ k: F.Key, node: f.node, cands: still, pos: pos + 1 }, rest));
        return;
      }
      case F.ObjAfter: {
        const n = g.nodes[f.node] as Extract<GrammarNode, { kind: 'object' }>;
        if (b === 0x7d) {
          if (g.reqCount.get(f.node)![f.from] === 0) out.push(rest);
          return;
        }
        if (b !== 0x2c) return;
        if (n.properties.length > 0 && f.from >= n.properties.length) return;
        out.push(this.push(SPACE, this.push({ k: F.ObjKeyStart, node: f.node, from: f.from }, rest)));
        return;
      }
      case F.ArrFirst: {
        const n = g.nodes[f.node] as Extract<GrammarNode, { kind: 'array' }>;
        if (b === 0x5d) {
          if (n.minItems === 0) out.push(rest);
          return;
        }
        if (n.maxItems === 0) return;
        this.expand(n.items, this.push({ k: F.ArrAfter, node: f.node, count: 1 }, rest), b, out);
        return;
      }
      case F.ArrAfter: {
        const n = g.nodes[f.node] as Extract<GrammarNode, { kind: 'array' }>;
        if (b === 0x5d) {
          if (f.count >= n.minItems) out.push(rest);
          return;
        }
        if (b !== 0x2c || (n.maxItems !== null && f.count >= n.maxItems)) return;
        const after = this.push({ k: F.ArrAfter, node: f.node, count: f.count + 1 }, rest);
        out.push(this.push(SPACE, this.push({ k: F.Value, node: n.items }, after)));
        return;
      }
    }
  }

  /** The states after `b` opens a value of `node`, followed by `rest`. */
  private expand(node: number, rest: State, b: number, out: State[]): void {
    const g = this.g;
    const n = g.nodes[node];
    switch (n.kind) {
      case 'any': return; // replaced by its anyOf when compiled
      case 'anyOf':
        for (const o of n.options) this.expand(o, rest, b, out);
        return;
      case 'seq': {
        let s: State = rest;
        for (let i = n.items.length - 1; i >= 1; i--) s = this.push({ k: F.Value, node: n.items[i] }, s);
        return this.expand(n.items[0], s, b, out);
      }
      case 'literal': {
        const lit = this.push({ k: F.Lit, alts: g.litBytes.get(node)!, pos: 0 }, rest);
        return this.step(lit, b, out);
      }
      case 'string':
        if (b === 0x22) out.push(this.push({ k: F.Str, node, count: 0, esc: 0, utf: 0 }, rest));
        return;
      case 'number':
        if (b === 0x2d || isDigit(b)) this.step(this.push({ k: F.Num, integer: n.integer, phase: N_START, digits: 0 }, rest), b, out);
        return;
      case 'object':
        if (b === 0x7b) out.push(this.push({ k: F.ObjFirst, node, from: 0 }, rest));
        return;
      case 'array':
        if (b === 0x5b) out.push(this.push({ k: F.ArrFirst, node }, rest));
        return;
    }
  }
}

const COLON = Uint8Array.of(0x3a);

function canEnd(s: State): boolean {
  for (let t = s; t !== null; t = t.next) {
    if (t.f.k === F.Num ? !numTerminal(t.f.phase) : t.f.k !== F.Space) return false;
  }
  return true;
}

function minOf(states: State[]): number {
  let best = Infinity;
  for (const s of states) best = Math.min(best, s?.min ?? 0);
  return best;
}
