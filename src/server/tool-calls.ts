/**
 * Tool calls: the formats chat templates teach their models (Hermes/Qwen `<tool_call>{...}</tool_call>`,
 * Llama 3.x JSON `{"name", "parameters"}`, Mistral `[TOOL_CALLS][...]`), parsed out of the generated text as
 * it streams, and the grammar that forces a call for `tool_choice` "required" or a named function.
 */
import { randomBytes } from 'node:crypto';
import type { OutputConstraint } from '../engine/protocol.ts';
import { badRequest } from './errors.ts';
import type { Tool } from './schemas.ts';
import { GrammarBuilder } from './structured-output.ts';

export const TOOL_CALL_PARSERS = ['hermes', 'llama3_json', 'mistral'] as const;
export type ToolCallParserName = (typeof TOOL_CALL_PARSERS)[number];

/** The parser a chat template's own tool-call format needs; Hermes when the template says nothing. */
export function parserForTemplate(template: string | undefined): ToolCallParserName {
  if (!template) return 'hermes';
  if (template.includes('[TOOL_CALLS]')) return 'mistral';
  if (template.includes('<tool_call>')) return 'hermes';
  if (template.includes('<|python_tag|>') || template.includes('"parameters"') || template.includes('ipython')) return 'llama3_json';
  return 'hermes';
}

interface Format {
  /** What opens the calls: a marker, or (llama3_json) a JSON object at the start of the output. */
  start: string | null;
  argsKey: 'arguments' | 'parameters';
  /** The text of one forced call around its `{"name": ..., "<argsKey>": ...}` object. */
  before: string;
  after: string;
}

const FORMATS: Record<ToolCallParserName, Format> = {
  hermes: { start: '<tool_call>', argsKey: 'arguments', before: '<tool_call>\n', after: '\n</tool_call>' },
  llama3_json: { start: null, argsKey: 'parameters', before: '', after: '' },
  mistral: { start: '[TOOL_CALLS]', argsKey: 'arguments', before: '[TOOL_CALLS][', after: ']' },
};

export type ToolChoice = 'none' | 'auto' | 'required' | { type: 'function'; function: { name: string } };

/** Checks tool_choice against the tools; returns it resolved ("auto" when tools are given, else "none"). */
export function resolveToolChoice(choice: unknown, tools: Tool[] | null | undefined): ToolChoice {
  const has = (tools?.length ?? 0) > 0;
  if (choice === undefined || choice === null) return has ? 'auto' : 'none';
  if (choice === 'none' || choice === 'auto') return choice;
  if (choice === 'required') {
    if (!has) throw badRequest('tool_choice "required" needs tools.', 'tool_choice', 'invalid_tool_choice');
    return choice;
  }
  const named = choice as { type?: unknown; function?: { name?: unknown } };
  if (typeof choice === 'object' && named.type === 'function' && typeof named.function?.name === 'string') {
    const name = named.function.name;
    if (!tools?.some((t) => t.function.name === name)) {
      throw badRequest(`tool_choice names function ${JSON.stringify(name)}, which is not in tools.`, 'tool_choice', 'invalid_tool_choice');
    }
    return { type: 'function', function: { name } };
  }
  throw badRequest('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.', 'tool_choice', 'invalid_tool_choice');
}

/** The grammar of one call to one of `tools` (tool_choice "required") or to the named one. */
export function toolCallConstraint(parser: ToolCallParserName, tools: Tool[], choice: ToolChoice): OutputConstraint | undefined {
  if (choice === 'none' || choice === 'auto') return undefined;
  const f = FORMATS[parser];
  const b = new GrammarBuilder();
  const chosen = typeof choice === 'object' ? tools.filter((t) => t.function.name === choice.function.name) : tools;
  const options = chosen.map((t) => {
    const i = tools.indexOf(t);
    const params = t.function.parameters ?? { type: 'object', properties: {} };
    const args = b.schema(params, `tools[${i}].function.parameters`);
    const head = b.literal(`${f.before}{"name": ${JSON.stringify(t.function.name)}, "${f.argsKey}": `);
    return b.add({ kind: 'seq', items: [head, args, b.literal(`}${f.after}`)] });
  });
  const root = options.length === 1 ? options[0] : b.add({ kind: 'anyOf', options });
  return { nodes: b.nodes, root };
}

export interface ToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

/** A piece of a streamed tool call, as OpenAI's `delta.tool_calls[]`. */
export interface ToolCallDelta {
  index: number;
  id?: string;
  type?: 'function';
  function: { name?: string; arguments: string };
}

export const newCallId = (): string => `call_${randomBytes(12).toString('hex')}`;

const PYTHON_TAG = '<|python_tag|>';
const HEAD = /^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)/;
/** Past this many characters of a call's head without its name and arguments key, it is not a call. */
const MAX_HEAD = 1024;

/**
 * Splits generated text into content and tool calls as it arrives: content streams until a call opens (a
 * possible opening is held back), then each call's name goes out once known and its arguments piece by
 * piece, as they are written.
 */
export class ToolCallParser {
  private mode: 'content' | 'wait' | 'head' | 'args' | 'tail' = 'content';
  private buf = '';
  /** Nothing but whitespace has been written yet (llama3_json calls open the output). */
  private atStart = true;
  readonly calls: ToolCall[] = [];
  private scan = new JsonValueScanner();
  /** Depth of the call object's braces after its arguments ended. */
  private tailDepth = 0;
  private failedHead = false;
  /** Text between the opening marker and the call's '{', given back if it is not a call. */
  private pendingBefore = '';
  /** The marker that opened the calls ('' for a bare JSON opening). */
  private opener = '';

  constructor(private readonly parser: ToolCallParserName) {}

  get format(): Format {
    return FORMATS[this.parser];
  }

  /** Whether any call has started. */
  get sawCalls(): boolean {
    return this.calls.length > 0;
  }

  /** Whether every call started has its arguments complete. */
  get complete(): boolean {
    return this.mode === 'content' || this.mode === 'wait' || this.mode === 'tail';
  }

  push(text: string): { content: string; deltas: ToolCallDelta[] } {
    const deltas: ToolCallDelta[] = [];
    let content = '';
    this.buf += text;
    for (let guard = 0; guard < 1_000_000; guard++) {
      const [length, mode] = [this.buf.length, this.mode];
      content += this.advance(deltas, false);
      if (this.buf.length === length && this.mode === mode) break;
    }
    return { content, deltas };
  }

  /** The end of the output: what was held back goes out as content (an opening that never became a call). */
  finish(): { content: string; deltas: ToolCallDelta[] } {
    const deltas: ToolCallDelta[] = [];
    let content = this.advance(deltas, true);
    if (this.mode === 'content' || (this.mode === 'head' && !this.sawCalls)) {
      content += this.buf;
      this.buf = '';
    }
    return { content, deltas };
  }

  /** What was held back since an opening marker was not a call after all: content. */
  private notACall(): string {
    this.failedHead = true;
    this.mode = 'content';
    this.atStart = false;
    const out = this.opener + this.pendingBefore + this.buf;
    this.buf = '';
    this.pendingBefore = '';
    return out;
  }

  /** One move of the state machine over `buf`; returns content to send. */
  private advance(deltas: ToolCallDelta[], final: boolean): string {
    const f = this.format;
    switch (this.mode) {
      case 'content': {
        if (f.start === null) {
          if (!this.atStart || this.failedHead) {
            const out = this.buf;
            this.buf = '';
            return out;
          }
          const trimmed = this.buf.replace(/^\s+/, '').replace(/^<\|python_tag\|>/, '');
          if (trimmed === '' || (!final && PYTHON_TAG.startsWith(trimmed))) return '';
          this.atStart = false;
          if (trimmed.startsWith('{')) {
            this.mode = 'head';
            this.buf = trimmed;
            return '';
          }
          const out = this.buf;
          this.buf = '';
          return out;
        }
        if (this.parser === 'mistral' && this.atStart && !this.failedHead) {
          // [TOOL_CALLS] is a special token in Mistral's tokenizers, dropped from the text: a call list may open the output bare.
          const trimmed = this.buf.trimStart();
          if (trimmed === '' || (trimmed === '[' && !final)) return '';
          this.atStart = false;
          if (trimmed.startsWith('[{')) {
            this.buf = trimmed.slice(1);
            this.pendingBefore = '[';
            this.mode = 'wait';
            return '';
          }
        }
        const at = this.buf.indexOf(f.start);
        if (at >= 0) {
          const out = this.buf.slice(0, at);
          this.buf = this.buf.slice(at + f.start.length);
          this.opener = f.start;
          this.mode = 'wait';
          return out;
        }
        if (final) return '';
        const hold = heldBack(this.buf, f.start);
        const out = this.buf.slice(0, this.buf.length - hold);
        this.buf = this.buf.slice(this.buf.length - hold);
        return out;
      }
      case 'wait': {
        // Between calls: separators, closing and opening markers; a call opens at '{'.
        const at = this.buf.indexOf('{');
        if (at < 0) {
          if (this.sawCalls) this.buf = '';
          else if (final || this.buf.length > MAX_HEAD) return this.notACall();
          return '';
        }
        if (!this.sawCalls) this.pendingBefore += this.buf.slice(0, at);
        this.buf = this.buf.slice(at);
        this.mode = 'head';
        return '';
      }
      case 'head': {
        const m = HEAD.exec(this.buf);
        if (!m) {
          if (this.buf.length > MAX_HEAD || final) {
            if (!this.sawCalls) return this.notACall();
            this.buf = '';
            this.mode = 'wait';
          }
          return '';
        }
        let name: string;
        try {
          name = JSON.parse(`"${m[1]}"`) as string;
        } catch {
          name = m[1];
        }
        const index = this.calls.length;
        const call: ToolCall = { id: newCallId(), type: 'function', function: { name, arguments: '' } };
        this.calls.push(call);
        deltas.push({ index, id: call.id, type: 'function', function: { name, arguments: '' } });
        this.buf = this.buf.slice(m[0].length);
        this.scan = new JsonValueScanner();
        this.mode = 'args';
        return '';
      }
      case 'args': {
        const end = this.scan.feed(this.buf);
        const piece = end < 0 ? this.buf : this.buf.slice(0, end);
        if (piece !== '') {
          this.calls[this.calls.length - 1].function.arguments += piece;
          deltas.push({ index: this.calls.length - 1, function: { arguments: piece } });
        }
        this.buf = end < 0 ? '' : this.buf.slice(end);
        if (end >= 0) {
          this.mode = 'tail';
          this.tailDepth = 1;
        }
        return '';
      }
      case 'tail': {
        // The rest of the call object (its closing brace), then back to waiting for the next call.
        let i = 0;
        for (; i < this.buf.length && this.tailDepth > 0; i++) {
          if (this.buf[i] === '}') this.tailDepth--;
          else if (this.buf[i] === '{') this.tailDepth++;
        }
        this.buf = this.buf.slice(i);
        if (this.tailDepth === 0) this.mode = 'wait';
        return '';
      }
    }
  }
}

/** Length of the longest suffix of `text` that is a proper prefix of `marker`. */
function heldBack(text: string, marker: string): number {
  for (let k = Math.min(marker.length - 1, text.length); k > 0; k--) if (text.endsWith(marker.slice(0, k))) return k;
  return 0;
}

/** Finds where one JSON value ends in text fed in pieces. */
class JsonValueScanner {
  private started = false;
  private depth = 0;
  private inString = false;
  private escaped = false;
  private scalar = false;

  /** Index in `text` just past the value's end, or -1 when it has not ended in `text`. */
  feed(text: string): number {
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (!this.started) {
        if (/\s/.test(c)) continue;
        this.started = true;
        if (c === '{' || c === '[') this.depth = 1;
        else if (c === '"') this.inString = true;
        else this.scalar = true;
        continue;
      }
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === '\\') this.escaped = true;
        else if (c === '"') {
          this.inString = false;
          if (this.depth === 0) return i + 1;
        }
        continue;
      }
      if (this.scalar) {
        if (c === ',' || c === '}' || c === ']' || /\s/.test(c)) return i;
        continue;
      }
      if (c === '"') this.inString = true;
      else if (c === '{' || c === '[') this.depth++;
      else if (c === '}' || c === ']') {
        if (--this.depth === 0) return i + 1;
      }
    }
    return -1;
  }
}

/** The whole text at once: its content (null when empty) and calls, or no calls when one is incomplete. */
export function parseToolCalls(parser: ToolCallParserName, text: string): { content: string | null; calls: ToolCall[] } {
  const p = new ToolCallParser(parser);
  const a = p.push(text);
  const b = p.finish();
  if (!p.sawCalls || !p.complete) return { content: text, calls: [] };
  const content = (a.content + b.content).trim();
  return { content: content === '' ? null : content, calls: p.calls };
}
