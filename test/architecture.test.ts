/**
 * The layout's rules, checked on the source: no import cycles anywhere in src/, and each side of the worker
 * boundary reaches the other only through engine/protocol.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const SRC = path.resolve('src');

/** Every .ts file under src/ → the src/ files it imports (static, type-only and dynamic imports alike). */
function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  const walk = (dir: string): void => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(full);
      else if (/\.(ts|js)$/.test(entry.name) && !entry.name.endsWith('.d.ts') && !full.includes(`${path.sep}public${path.sep}`)) {
        const text = fs.readFileSync(full, 'utf8');
        const specs = [...text.matchAll(/(?:from|import)\s*\(?\s*'(\.{1,2}\/[^']+)'/g)].map((m) => m[1]);
        graph.set(
          path.relative(SRC, full),
          specs.map((s) => path.relative(SRC, path.resolve(path.dirname(full), s))).filter((s) => !s.startsWith('..')),
        );
      }
    }
  };
  walk(SRC);
  return graph;
}

/** One cycle per strongly connected group of files, as a path a → b → … → a. */
function cycles(graph: Map<string, string[]>): string[][] {
  const found: string[][] = [];
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (file: string): void => {
    state.set(file, 'open');
    stack.push(file);
    for (const next of graph.get(file) ?? []) {
      if (state.get(next) === 'open') found.push([...stack.slice(stack.indexOf(next)), next]);
      else if (!state.has(next)) visit(next);
    }
    stack.pop();
    state.set(file, 'done');
  };
  for (const file of graph.keys()) if (!state.has(file)) visit(file);
  return found;
}

describe('source layout', () => {
  const graph = importGraph();

  it('finds the imports it checks (the graph is not empty, and a planted cycle is found)', () => {
    expect(graph.get(path.join('engine', 'core', 'scheduler.ts'))).toContain(path.join('engine', 'protocol.ts'));
    const planted = new Map([['a.ts', ['b.ts']], ['b.ts', ['c.ts']], ['c.ts', ['a.ts']]]);
    expect(cycles(planted)).toEqual([['a.ts', 'b.ts', 'c.ts', 'a.ts']]);
  });

  it('has no import cycles in src/', () => {
    expect(cycles(graph).map((c) => c.join(' → '))).toEqual([]);
  });

  it('engine/protocol.ts, what crosses the worker boundary, imports nothing of its own', () => {
    expect(graph.get(path.join('engine', 'protocol.ts'))).toEqual([]);
  });

  it('main-thread code (server, meter, telemetry, dashboard, engine/client) reaches the engine only through protocol.ts and client/', () => {
    const offenders: string[] = [];
    for (const [file, deps] of graph) {
      if (!/^(server|meter|telemetry|dashboard|engine\/client|config|cli)\//.test(file)) continue;
      for (const dep of deps) {
        if (/^engine\/(core|runners)\//.test(dep)) offenders.push(`${file} → ${dep}`);
      }
    }
    expect(offenders).toEqual([]);
  });

  it('worker-side code (engine/core, engine/runners) never imports the main thread’s client or server', () => {
    const offenders: string[] = [];
    for (const [file, deps] of graph) {
      if (!/^engine\/(core|runners)\//.test(file)) continue;
      for (const dep of deps) if (/^(engine\/client|server|config|cli)\//.test(dep)) offenders.push(`${file} → ${dep}`);
    }
    expect(offenders).toEqual([]);
  });
});
