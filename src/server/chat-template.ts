/**
 * The model's chat template (tokenizer_config.json `chat_template`), rendered with @huggingface/jinja
 * the way transformers' apply_chat_template does, and encoded to prompt ids.
 */
import { Template } from '@huggingface/jinja';
import type { ModelFolder } from '../model/folder.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';
import { badRequest } from './errors.ts';
import type { ChatMessage, Tool } from './schemas.ts';

export const NO_TEMPLATE_MESSAGE = 'This model has no chat template; use /v1/completions or convert it with --chat-template.';

type TemplateSource = string | { name: string; template: string }[] | undefined;

function tokenString(spec: unknown): string | undefined {
  if (typeof spec === 'string') return spec;
  if (spec && typeof spec === 'object' && typeof (spec as { content?: unknown }).content === 'string') return (spec as { content: string }).content;
  return undefined;
}

/** A message as templates expect it: content a string, developer as system, tool-call arguments parsed. */
function templateMessage(m: ChatMessage): Record<string, unknown> {
  const content = typeof m.content === 'string' ? m.content : (m.content ?? []).map((p) => p.text).join('\n');
  const out: Record<string, unknown> = { ...m, role: m.role === 'developer' ? 'system' : m.role, content };
  if (m.role === 'assistant' && m.tool_calls) {
    out.tool_calls = m.tool_calls.map((c) => ({ ...c, function: { name: c.function.name, arguments: parseArguments(c.function.arguments) } }));
  }
  for (const k of Object.keys(out)) if (out[k] === null || out[k] === undefined) delete out[k];
  return out;
}

function parseArguments(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

export class ChatTemplate {
  private readonly templates = new Map<string, Template>();
  private readonly bosToken?: string;
  private readonly eosToken?: string;

  constructor(
    private readonly sources: Map<string, string>,
    private readonly tokenizer: TextTokenizer,
    tokenizerConfig: Record<string, unknown>,
  ) {
    this.bosToken = tokenString(tokenizerConfig.bos_token);
    this.eosToken = tokenString(tokenizerConfig.eos_token);
  }

  /** The folder's template, or undefined when it has none. Throws when the template does not parse. */
  static fromFolder(folder: ModelFolder, tokenizer: TextTokenizer): ChatTemplate | undefined {
    const source = folder.tokenizerConfig.chat_template as TemplateSource;
    const sources = new Map<string, string>();
    if (typeof source === 'string') sources.set('default', source);
    else if (Array.isArray(source)) for (const t of source) sources.set(t.name, t.template);
    if (!sources.has('default')) return undefined;
    const template = new ChatTemplate(sources, tokenizer, folder.tokenizerConfig);
    template.compiled('default');
    return template;
  }

  /** The template's text (the tool-use one where the folder has both). */
  get source(): string {
    return this.sources.get('tool_use') ?? this.sources.get('default')!;
  }

  private compiled(name: string): Template {
    let t = this.templates.get(name);
    if (!t) {
      t = new Template(this.sources.get(name)!);
      this.templates.set(name, t);
    }
    return t;
  }

  render(messages: ChatMessage[], opts: { addGenerationPrompt?: boolean; tools?: Tool[] | null } = {}): string {
    const tools = opts.tools?.length ? opts.tools : undefined;
    const name = tools && this.sources.has('tool_use') ? 'tool_use' : 'default';
    try {
      return this.compiled(name).render({
        messages: messages.map(templateMessage),
        add_generation_prompt: opts.addGenerationPrompt ?? true,
        bos_token: this.bosToken ?? '',
        eos_token: this.eosToken ?? '',
        tools,
      });
    } catch (err) {
      throw badRequest(`The chat template failed on these messages: ${(err as Error).message}`, 'messages', 'chat_template_error');
    }
  }

  /**
   * Ids of a rendered conversation. Special tokens (BOS) are added only when the template did not
   * already put the BOS at the start, so that it never appears twice; `addSpecialTokens` overrides.
   */
  encode(text: string, addSpecialTokens?: boolean): number[] {
    const add = addSpecialTokens ?? !(this.bosToken && text.startsWith(this.bosToken));
    return this.tokenizer.encode(text, { addSpecialTokens: add });
  }
}
