/**
 * JSON Schema → the engine's output grammar (protocol.ts GrammarNode), for response_format and forced tool
 * calls. Objects are written with their declared properties in order (required ones always, optional ones
 * maybe, no others); keywords that cannot be enforced are refused with a 400 that names them.
 */
import type { GrammarNode, OutputConstraint } from '../engine/protocol.ts';
import { badRequest } from './errors.ts';

/** Keywords that only describe. */
const ANNOTATIONS = new Set(['title', 'description', 'default', 'examples', '$schema', '$id', '$comment', 'deprecated', 'readOnly', 'writeOnly', 'strict']);
const SUPPORTED = new Set([
  'type', 'properties', 'required', 'additionalProperties', 'items', 'minItems', 'maxItems', 'enum', 'const',
  'anyOf', 'oneOf', '$ref', '$defs', 'definitions', 'minLength', 'maxLength', 'nullable',
]);
const TYPES = new Set(['object', 'array', 'string', 'number', 'integer', 'boolean', 'null']);
const MAX_NODES = 10_000;

type Schema = Record<string, unknown> | boolean;

/** Builds grammar nodes into one array; a schema compiled twice (a $ref) is one node. */
export class GrammarBuilder {
  readonly nodes: GrammarNode[] = [];
  private readonly refs = new Map<string, number>();
  private root: Schema = true;
  private param = '';

  add(node: GrammarNode): number {
    if (this.nodes.length >= MAX_NODES) throw badRequest(`The schema is too large (more than ${MAX_NODES} parts).`, this.param, 'invalid_schema');
    return this.nodes.push(node) - 1;
  }

  literal(...values: string[]): number {
    return this.add({ kind: 'literal', values });
  }

  /** A node for `schema`; `param` names the request field in errors. */
  schema(schema: unknown, param: string): number {
    this.root = schema as Schema;
    this.param = param;
    this.refs.clear();
    return this.compile(schema, '#');
  }

  private fail(message: string): never {
    throw badRequest(message, this.param, 'invalid_schema');
  }

  private compile(s: unknown, path: string): number {
    if (s === true || (typeof s === 'object' && s !== null && !Array.isArray(s) && Object.keys(s).every((k) => ANNOTATIONS.has(k)))) {
      return this.add({ kind: 'any' });
    }
    if (s === false) this.fail(`The schema at ${path} is false: no value can match it.`);
    if (typeof s !== 'object' || s === null || Array.isArray(s)) this.fail(`The schema at ${path} must be an object or a boolean.`);
    const o = s as Record<string, unknown>;
    const unsupported = Object.keys(o).filter((k) => !SUPPORTED.has(k) && !ANNOTATIONS.has(k));
    if (unsupported.length > 0) {
      this.fail(`Unsupported JSON Schema keyword${unsupported.length > 1 ? 's' : ''} at ${path}: ${unsupported.join(', ')}. Supported: ${[...SUPPORTED].join(', ')}.`);
    }
    if (o.$ref !== undefined) return this.ref(o.$ref, path);
    if (o.const !== undefined) return this.literal(JSON.stringify(o.const));
    if (o.enum !== undefined) {
      if (!Array.isArray(o.enum) || o.enum.length === 0) this.fail(`enum at ${path} must be a non-empty array.`);
      return this.literal(...o.enum.map((v) => JSON.stringify(v)));
    }
    const alternatives = o.anyOf ?? o.oneOf;
    if (alternatives !== undefined) {
      if (!Array.isArray(alternatives) || alternatives.length === 0) this.fail(`anyOf/oneOf at ${path} must be a non-empty array.`);
      const { anyOf: _a, oneOf: _o, ...base } = o;
      const hasBase = Object.keys(base).some((k) => !ANNOTATIONS.has(k) && k !== '$defs' && k !== 'definitions');
      if (hasBase) this.fail(`anyOf/oneOf at ${path} next to other keywords is not supported; put them in each branch.`);
      return this.add({ kind: 'anyOf', options: alternatives.map((a, i) => this.compile(a, `${path}/anyOf/${i}`)) });
    }
    let types: string[];
    if (o.type === undefined) {
      types = o.properties !== undefined ? ['object'] : o.items !== undefined ? ['array'] : [];
      if (types.length === 0) return this.add({ kind: 'any' });
    } else {
      types = Array.isArray(o.type) ? (o.type as string[]) : [o.type as string];
    }
    if (o.nullable === true && !types.includes('null')) types = [...types, 'null'];
    for (const t of types) if (!TYPES.has(t)) this.fail(`Unknown type ${JSON.stringify(t)} at ${path}.`);
    const options = types.map((t) => this.typed(t, o, path));
    return options.length === 1 ? options[0] : this.add({ kind: 'anyOf', options });
  }

  private typed(type: string, o: Record<string, unknown>, path: string): number {
    const count = (key: string): number | null => {
      const v = o[key];
      if (v === undefined) return null;
      if (!Number.isInteger(v) || (v as number) < 0) this.fail(`${key} at ${path} must be a non-negative integer.`);
      return v as number;
    };
    switch (type) {
      case 'null': return this.literal('null');
      case 'boolean': return this.literal('true', 'false');
      case 'number': case 'integer': return this.add({ kind: 'number', integer: type === 'integer' });
      case 'string': {
        const minLength = count('minLength') ?? 0;
        const maxLength = count('maxLength');
        if (maxLength !== null && maxLength < minLength) this.fail(`maxLength at ${path} is below minLength.`);
        return this.add({ kind: 'string', minLength, maxLength });
      }
      case 'array': {
        const minItems = count('minItems') ?? 0;
        const maxItems = count('maxItems');
        if (maxItems !== null && maxItems < minItems) this.fail(`maxItems at ${path} is below minItems.`);
        if (Array.isArray(o.items)) this.fail(`items at ${path} must be one schema (tuples are not supported).`);
        const at = this.add({ kind: 'array', items: -1, minItems, maxItems });
        const items = this.compile(o.items ?? true, `${path}/items`);
        this.nodes[at] = { kind: 'array', items, minItems, maxItems };
        return at;
      }
      case 'object': {
        const props = (o.properties ?? {}) as Record<string, unknown>;
        if (typeof props !== 'object' || props === null || Array.isArray(props)) this.fail(`properties at ${path} must be an object.`);
        const required = (o.required ?? []) as unknown[];
        if (!Array.isArray(required) || required.some((r) => typeof r !== 'string')) this.fail(`required at ${path} must be an array of property names.`);
        const missing = required.filter((r) => !Object.hasOwn(props, r as string));
        if (missing.length > 0) this.fail(`required at ${path} names ${missing.join(', ')}, which ${missing.length > 1 ? 'are' : 'is'} not in properties.`);
        const names = Object.keys(props);
        // No property may appear: only {}.
        if (names.length === 0 && o.additionalProperties === false) return this.literal('{}');
        const at = this.add({ kind: 'object', properties: [], additional: null });
        if (names.length === 0) {
          const extra = o.additionalProperties;
          const additional = this.compile(extra === undefined ? true : extra, `${path}/additionalProperties`);
          this.nodes[at] = { kind: 'object', properties: [], additional };
          return at;
        }
        const properties = names.map((name) => ({ name, value: this.compile(props[name], `${path}/properties/${name}`), required: required.includes(name) }));
        this.nodes[at] = { kind: 'object', properties, additional: null };
        return at;
      }
    }
    return this.fail(`Unknown type at ${path}.`);
  }

  private ref(ref: unknown, path: string): number {
    if (typeof ref !== 'string' || !ref.startsWith('#')) this.fail(`Only local $ref ("#/...") is supported (at ${path}).`);
    const known = this.refs.get(ref);
    if (known !== undefined) return known;
    let target: unknown = this.root;
    for (const part of ref.slice(1).split('/').filter((p) => p !== '')) {
      const key = part.replaceAll('~1', '/').replaceAll('~0', '~');
      if (typeof target !== 'object' || target === null || !Object.hasOwn(target, key)) this.fail(`$ref ${ref} at ${path} points nowhere.`);
      target = (target as Record<string, unknown>)[key];
    }
    // Reserve the node first, so that a recursive reference finds it.
    const at = this.add({ kind: 'anyOf', options: [] });
    this.refs.set(ref, at);
    const body = this.compile(target, ref);
    this.nodes[at] = { kind: 'anyOf', options: [body] };
    return at;
  }
}

/** The constraint of `response_format`, or undefined for text. */
export function responseFormatConstraint(format: { type: string; json_schema?: { schema?: unknown } | null } | null | undefined): OutputConstraint | undefined {
  if (!format || format.type === 'text') return undefined;
  const b = new GrammarBuilder();
  if (format.type === 'json_object') {
    const root = b.schema({ type: 'object' }, 'response_format');
    return { nodes: b.nodes, root };
  }
  const schema = format.json_schema?.schema ?? {};
  const root = b.schema(schema, 'response_format.json_schema.schema');
  return { nodes: b.nodes, root };
}
