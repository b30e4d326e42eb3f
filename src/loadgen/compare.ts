/**
 * Servers side by side: the same workload against each (`tally bench --url A --url B`), interleaved
 * load point by load point (A at c=1, B at c=1, A at c=4, …) so that a drift of the machine over the
 * run falls on both alike; or saved JSON reports put together (`tally bench compare A.json B.json`).
 * Each server is priced at its own device price; ratios are each server's figure over the first's.
 */
import { readFileSync } from 'node:fs';
import type { PointCost } from './cost.ts';
import { type BenchConfig, type BenchHooks, type BenchResult, type PointResult, prepareBench } from './run.ts';
import { percentileKey } from './stats.ts';

export interface CompareRow {
  label: string;
  /** Per server, in the order of `runs`; null where that server has no such load point. */
  servers: (null | {
    name: string;
    completed: number;
    failed: number;
    output_tokens_per_s: number;
    total_tokens_per_s: number;
    ttft_p50_ms: number | null;
    tpot_p50_ms: number | null;
    itl_p50_ms: number | null;
    e2e_p50_ms: number | null;
    usd_per_million: PointCost['usd_per_million'];
    /** This server's figure over the first server's at the same load point. */
    ratio: { output_tokens_per_s: number | null; ttft_p50: number | null; usd_per_million_blended: number | null } | null;
  })[];
}

export interface CompareResult {
  tool: 'tally bench compare';
  started_at: string;
  finished_at: string;
  /** 'interleaved': run here, load point by load point; 'reports': put together from saved reports. */
  source: 'interleaved' | 'reports';
  runs: BenchResult[];
  rows: CompareRow[];
  notes: string[];
}

export interface CompareHooks {
  onPointStart?: (server: string, label: string, index: number, count: number) => void;
  onProgress?: BenchHooks['onProgress'];
}

const p50 = (p: PointResult, m: 'ttft' | 'tpot' | 'itl' | 'e2e') => p.stats.latency_ms[m].percentiles[percentileKey(50)] ?? null;
const ratio = (a: number | null | undefined, b: number | null | undefined) => (a == null || b == null || !Number.isFinite(a) || !Number.isFinite(b) || b === 0 ? null : a / b);

/** The rows of a comparison: every load point label of any run, in first-seen order. */
export function compareRows(runs: BenchResult[]): CompareRow[] {
  const labels: string[] = [];
  for (const r of runs) for (const p of r.points) if (!labels.includes(p.label)) labels.push(p.label);
  return labels.map((label) => {
    const base = runs[0].points.find((p) => p.label === label);
    return {
      label,
      servers: runs.map((r, i) => {
        const p = r.points.find((q) => q.label === label);
        if (!p) return null;
        const s = p.stats;
        return {
          name: r.target.name,
          completed: s.requests.completed,
          failed: s.requests.failed,
          output_tokens_per_s: s.throughput.output_tokens_per_s,
          total_tokens_per_s: s.throughput.total_tokens_per_s,
          ttft_p50_ms: p50(p, 'ttft'),
          tpot_p50_ms: p50(p, 'tpot'),
          itl_p50_ms: p50(p, 'itl'),
          e2e_p50_ms: p50(p, 'e2e'),
          usd_per_million: p.cost.usd_per_million,
          ratio: i === 0 || !base ? null : {
            output_tokens_per_s: ratio(s.throughput.output_tokens_per_s, base.stats.throughput.output_tokens_per_s),
            ttft_p50: ratio(p50(p, 'ttft'), p50(base, 'ttft')),
            usd_per_million_blended: ratio(p.cost.usd_per_million.blended, base.cost.usd_per_million.blended),
          },
        };
      }),
    };
  });
}

/** Names made distinct (a second "127.0.0.1:8000" becomes "127.0.0.1:8000 #2"). */
function distinctNames(runs: BenchResult[]): void {
  const seen = new Map<string, number>();
  for (const r of runs) {
    r.target.name ??= new URL(r.target.url).host;
    const n = (seen.get(r.target.name) ?? 0) + 1;
    seen.set(r.target.name, n);
    if (n > 1) r.target.name = `${r.target.name} #${n}`;
  }
}

function sameWorkload(runs: BenchResult[]): string[] {
  const notes: string[] = [];
  const key = (r: BenchResult) => JSON.stringify({ points: r.config.points, requests: r.config.requests, duration: r.config.duration_s, input: r.config.input_len, output: r.config.output_len, dataset: r.config.dataset });
  for (const r of runs.slice(1)) {
    if (key(r) !== key(runs[0])) notes.push(`${r.target.name} ran a different workload from ${runs[0].target.name} (load points, lengths or dataset differ): compare with care.`);
  }
  for (const r of runs) {
    if (!r.server.exact_output) notes.push(`${r.target.name}: output lengths were not forced (ignore_eos/min_tokens refused or off), so its requests may be shorter; its figures use the tokens it sent.`);
  }
  return notes;
}

/** Runs every config's workload, interleaved load point by load point. All configs must have the same points. */
export async function runCompare(configs: BenchConfig[], hooks: CompareHooks = {}): Promise<CompareResult> {
  if (configs.length < 2) throw new Error('a comparison needs at least two servers');
  const count = configs[0].points.length;
  if (configs.some((c) => c.points.length !== count)) throw new Error('every server must run the same load points');
  const startedAt = new Date().toISOString();
  const sessions = [];
  for (const config of configs) {
    const name = config.name ?? new URL(config.url).host;
    sessions.push(await prepareBench(config, {
      onPointStart: (label, i, n) => hooks.onPointStart?.(name, label, i, n),
      onProgress: hooks.onProgress,
    }));
  }
  for (let i = 0; i < count; i++) {
    // Alternate which server goes first at each point, so that neither always runs on the other's heels.
    const order = sessions.map((_, k) => k);
    if (i % 2 === 1) order.reverse();
    for (const k of order) await sessions[k].runPoint(i);
  }
  const runs = sessions.map((s) => s.result());
  distinctNames(runs);
  return { tool: 'tally bench compare', started_at: startedAt, finished_at: new Date().toISOString(), source: 'interleaved', runs, rows: compareRows(runs), notes: sameWorkload(runs) };
}

/** Saved reports (a single run's JSON, or a comparison's) put side by side. */
export function compareReports(files: string[]): CompareResult {
  const runs: BenchResult[] = [];
  for (const file of files) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(readFileSync(file, 'utf8'));
    } catch (err) {
      throw new Error(`${file}: ${(err as Error).message}`);
    }
    const obj = parsed as { tool?: unknown; runs?: unknown };
    if (obj.tool === 'tally bench') runs.push(parsed as BenchResult);
    else if (obj.tool === 'tally bench compare' && Array.isArray(obj.runs)) runs.push(...(obj.runs as BenchResult[]));
    else throw new Error(`${file}: not a tally bench --json report`);
  }
  if (runs.length < 2) throw new Error('a comparison needs at least two runs (give two reports, or one comparison)');
  distinctNames(runs);
  const times = runs.flatMap((r) => [r.started_at, r.finished_at]).sort();
  return {
    tool: 'tally bench compare',
    started_at: times[0],
    finished_at: times[times.length - 1],
    source: 'reports',
    runs,
    rows: compareRows(runs),
    notes: ['Put together from saved reports: the runs were not interleaved, so a change of load on the machine between them shows as a difference.', ...sameWorkload(runs)],
  };
}
