/** Types of format.js (plain JavaScript, loaded by the page as it is). */
export type FormatKind = 'usd' | 'int' | 'rate' | 'percent' | 'factor' | 'tokens' | 'seconds' | 'number' | 'time' | 'text';
export function format(kind: FormatKind | string, value: unknown): string;
export function pick(object: unknown, dotted: string): unknown;
