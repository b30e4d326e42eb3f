/** The terminal table of a run, and the progress bar shown while it runs. */
import { percentileKey, type Summary } from './stats.ts';
import type { BenchResult, PointResult } from './run.ts';
import type { ApiPoint } from './cost.ts';
import type { LoadProgress } from './load.ts';
import type { CompareResult } from './compare.ts';

/** 4 significant digits, no exponent below 1e9; "-" for missing. */
export function fmtNum(v: number | null | undefined, digits = 1): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return '-';
  return v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export function fmtUsd(v: number | null | undefined): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return '-';
  if (v === 0) return '$0';
  if (Math.abs(v) >= 100) return `$${v.toLocaleString('en-US', { maximumFractionDigits: 0 })}`;
  if (Math.abs(v) >= 1) return `$${v.toFixed(2)}`;
  return `$${v.toPrecision(3)}`;
}

/** 1.2K, 3.4M, 5.6B, 7.8T. */
export function fmtCount(v: number | null | undefined): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return '-';
  const units: [number, string][] = [[1e12, 'T'], [1e9, 'B'], [1e6, 'M'], [1e3, 'K']];
  for (const [scale, unit] of units) if (Math.abs(v) >= scale) return `${Number((v / scale).toPrecision(3))}${unit}`;
  return v.toFixed(0);
}

/** Columns padded to their widest cell; numbers right-aligned. */
export function table(header: string[], rows: string[][], leftAligned = 1): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]?.length ?? 0)));
  const line = (cells: string[]) => cells.map((c, i) => (i < leftAligned ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ').trimEnd();
  return [line(header), widths.map((w) => '─'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

const pct = (s: Summary, p: number) => s.percentiles[percentileKey(p)];

/** The prefix-cache table: per load point, cached and prompt tokens as the server's usage reported them, and the hit rate. */
export function prefixCacheRows(result: BenchResult): string[][] {
  return result.points.map((p) => {
    const t = p.stats.tokens;
    return [p.label, String(t.cached_input), String(t.input), t.prefix_cache_hit_rate === null ? 'not reported' : `${(t.prefix_cache_hit_rate * 100).toFixed(1)}%`];
  });
}

/** Each compared server's cheapest point, and per API model any of them was quoted against: name, blended $/M, API ÷ each server. */
export function compareApiRows(cmp: CompareResult): { refs: (PointResult | undefined)[]; rows: string[][] } {
  const refs = cmp.runs.map((r) => cheapestPoint(r));
  const apiIds = [...new Set(refs.flatMap((p) => p?.cost.api.map((a) => a.id) ?? []))];
  const rows = apiIds.map((id) => {
    const quotes = refs.map((p) => p?.cost.api.find((a) => a.id === id));
    const any = quotes.find((q) => q);
    return [any?.name ? `${id} (${any.name})` : id, fmtUsd(any?.blended_usd_per_million), ...quotes.map((q) => ratioText(q?.cost_ratio))];
  });
  return { refs, rows };
}

/** The cheapest load point (lowest blended $/M, wall basis), the reference for API comparisons. */
export function cheapestPoint(result: BenchResult): PointResult | undefined {
  let best: PointResult | undefined;
  for (const p of result.points) {
    const v = p.cost.usd_per_million.blended;
    if (v === null) continue;
    if (!best || v < best.cost.usd_per_million.blended!) best = p;
  }
  return best;
}

export function renderTable(result: BenchResult): string {
  const ps = result.config.percentiles;
  const lo = ps[0];
  const hi = ps[ps.length - 1];
  const pl = (p: number) => `p${p}`;
  const header = [
    'load', 'ok', 'err', 'req/s', 'in tok/s', 'out tok/s',
    `TTFT ${pl(lo)}`, `TTFT ${pl(hi)}`, `TPOT ${pl(lo)}`, `ITL ${pl(lo)}`, `ITL ${pl(hi)}`, `E2E ${pl(lo)}`, `E2E ${pl(hi)}`,
    '$/M in', '$/M out', '$/M blend',
  ];
  const rows = result.points.map((p) => {
    const s = p.stats;
    const l = s.latency_ms;
    return [
      p.label, String(s.requests.completed), String(s.requests.failed), fmtNum(s.throughput.requests_per_s, 2), fmtNum(s.throughput.input_tokens_per_s), fmtNum(s.throughput.output_tokens_per_s),
      fmtNum(pct(l.ttft, lo)), fmtNum(pct(l.ttft, hi)), fmtNum(pct(l.tpot, lo), 2), fmtNum(pct(l.itl, lo), 2), fmtNum(pct(l.itl, hi), 2), fmtNum(pct(l.e2e, lo)), fmtNum(pct(l.e2e, hi)),
      fmtUsd(p.cost.usd_per_million.input), fmtUsd(p.cost.usd_per_million.output), fmtUsd(p.cost.usd_per_million.blended),
    ];
  });
  const out: string[] = [];
  const pr = result.pricing;
  out.push(`tally bench — ${result.target.model} at ${result.target.url} (${result.target.endpoint}, prompts: ${result.server.prompt_format}${result.server.exact_output ? ', exact output lengths' : ''})`);
  out.push(`price: ${pr.devices} × ${fmtUsd(pr.usd_per_device_hour)}/h (${pr.device}); latencies in ms; $/M at the measured throughput, wall-clock basis, input share from ${[...new Set(result.points.map((p) => p.cost.input_share_from))].join('/') || '-'}`);
  out.push('');
  out.push(table(header, rows));

  const metered = result.points.filter((p) => p.cost.metered);
  if (metered.length > 0) {
    out.push('');
    out.push('server-metered (busy device time only, as the server reports it):');
    out.push(table(['load', 'busy tok/dev-s', '$/M in', '$/M out', '$/M blend'], metered.map((p) => [
      p.label, fmtNum(p.cost.metered!.tokens_per_busy_device_second), fmtUsd(p.cost.metered!.usd_per_million.input), fmtUsd(p.cost.metered!.usd_per_million.output), fmtUsd(p.cost.metered!.usd_per_million.blended),
    ])));
  }

  const cached = result.points.filter((p) => p.stats.tokens.prefix_cache_hit_rate !== null);
  const shared = result.config.shared_prefix;
  if (cached.length > 0 || shared) {
    out.push('');
    out.push(`prefix cache${shared ? ` (${shared.count} shared prefixes of ${shared.length} tokens)` : ''}: cached prompt tokens over prompt tokens, from the server's usage`);
    out.push(table(['load', 'cached tok', 'prompt tok', 'hit rate'], prefixCacheRows(result)));
  }

  const failed = result.points.filter((p) => p.stats.requests.failed > 0);
  if (failed.length > 0) {
    out.push('');
    out.push('errors:');
    for (const p of failed) {
      const kinds = Object.entries(p.stats.errors).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(', ');
      out.push(`  ${p.label}: ${kinds}`);
      for (const s of p.stats.error_samples.slice(0, 3)) out.push(`    ${s.count} × ${s.kind}: ${s.message}`);
    }
  }

  const asked = result.points.filter((p) => p.stats.asked && p.stats.asked.short > 0);
  if (asked.length > 0) {
    out.push('');
    out.push('output shorter than asked (the server ignored ignore_eos/min_tokens; figures use the tokens received):');
    for (const p of asked) out.push(`  ${p.label}: ${p.stats.asked!.short} of ${p.stats.asked!.requests} requests short, ${p.stats.asked!.received} of ${p.stats.asked!.output_tokens} tokens`);
  }

  out.push('');
  out.push(`client CPU (this process) per 1,000 output tokens: ${clientCpu(result)}`);

  const ref = cheapestPoint(result);
  if (ref) {
    out.push('');
    out.push(`against API prices (genai-prices), at ${ref.label}'s token mix and ${fmtUsd(ref.cost.usd_per_million.blended)}/M; a month is ${pr.hours_per_month} h, ${fmtUsd(ref.cost.monthly.fixed_usd)} for the devices, serving up to ${fmtCount(ref.cost.monthly.capacity_tokens)} tokens:`);
    out.push(apiTable(ref.cost.api));
  }
  if (result.notes.length > 0) {
    out.push('');
    for (const n of result.notes) out.push(`note: ${n}`);
  }
  return `${out.join('\n')}\n`;
}

export const ratioText = (v: number | null | undefined) => (v === null || v === undefined || !Number.isFinite(v) ? '-' : `${v >= 1000 ? v.toFixed(0) : v.toPrecision(3)}×`);

function clientCpu(result: BenchResult): string {
  return result.points.map((p) => `${p.label} ${p.client?.cpu_s_per_1k_tokens == null ? '-' : `${p.client.cpu_s_per_1k_tokens.toFixed(3)} s`}`).join(', ') || '-';
}

/** The side-by-side table of servers, with ratios to the first server. */
export function renderCompareTable(cmp: CompareResult): string {
  const out: string[] = [];
  const base = cmp.runs[0].target.name;
  out.push(`tally bench — ${cmp.runs.length} servers side by side (${cmp.source === 'interleaved' ? 'interleaved load point by load point' : 'from saved reports'}); ratios are over ${base}`);
  for (const r of cmp.runs) {
    out.push(`  ${r.target.name}: ${r.target.model} at ${r.target.url}, ${r.pricing.devices} × ${fmtUsd(r.pricing.usd_per_device_hour)}/h (${r.pricing.device})`);
  }
  out.push('');
  const header = ['load', 'server', 'ok', 'err', 'out tok/s', '× tok/s', 'TTFT p50', '× TTFT', 'TPOT p50', 'E2E p50', '$/M in', '$/M out', '$/M blend', '× $/M'];
  const rows: string[][] = [];
  for (const row of cmp.rows) {
    row.servers.forEach((s, i) => {
      const name = cmp.runs[i].target.name;
      if (!s) {
        rows.push([row.label, name, '-', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-']);
        return;
      }
      rows.push([
        row.label, name, String(s.completed), String(s.failed), fmtNum(s.output_tokens_per_s), ratioText(s.ratio?.output_tokens_per_s),
        fmtNum(s.ttft_p50_ms), ratioText(s.ratio?.ttft_p50), fmtNum(s.tpot_p50_ms, 2), fmtNum(s.e2e_p50_ms),
        fmtUsd(s.usd_per_million.input), fmtUsd(s.usd_per_million.output), fmtUsd(s.usd_per_million.blended), ratioText(s.ratio?.usd_per_million_blended),
      ]);
    });
  }
  out.push(table(header, rows, 2));

  const { refs, rows: apiRows } = compareApiRows(cmp);
  if (apiRows.length > 0) {
    out.push('');
    out.push(`against API prices, each server at its cheapest load point (${cmp.runs.map((r, i) => `${r.target.name}: ${refs[i]?.label ?? '-'} at ${fmtUsd(refs[i]?.cost.usd_per_million.blended)}/M`).join('; ')}):`);
    out.push(table(['API model', '$/M blend', ...cmp.runs.map((r) => `API ÷ ${r.target.name}`)], apiRows));
  }

  const failed = cmp.runs.flatMap((r) => r.points.filter((p) => p.stats.requests.failed > 0).map((p) => ({ r, p })));
  if (failed.length > 0) {
    out.push('');
    out.push('errors:');
    for (const { r, p } of failed) {
      out.push(`  ${r.target.name} ${p.label}: ${Object.entries(p.stats.errors).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(', ')}`);
      for (const s of p.stats.error_samples.slice(0, 2)) out.push(`    ${s.count} × ${s.kind}: ${s.message}`);
    }
  }
  out.push('');
  out.push('client CPU (this process) per 1,000 output tokens:');
  for (const r of cmp.runs) out.push(`  ${r.target.name}: ${clientCpu(r)}`);
  const notes = [...cmp.notes, ...cmp.runs.flatMap((r) => r.notes.map((n) => `${r.target.name}: ${n}`))];
  if (notes.length > 0) {
    out.push('');
    for (const n of notes) out.push(`note: ${n}`);
  }
  return `${out.join('\n')}\n`;
}

function apiTable(api: ApiPoint[]): string {
  return table(
    ['API model', '$/M in', '$/M out', '$/M blend', 'API ÷ ours', 'break-even tokens/month'],
    api.map((a) => [
      a.name ? `${a.id} (${a.name})` : a.id,
      fmtUsd(a.input_usd_per_million), fmtUsd(a.output_usd_per_million), fmtUsd(a.blended_usd_per_million),
      a.cost_ratio === null ? '-' : `${a.cost_ratio.toPrecision(3)}×`,
      a.error ? a.error : a.break_even ? `${fmtCount(a.break_even.tokens_per_month)} (${fmtUsd(a.break_even.api_usd_per_month)}/month)` : 'API cheaper',
    ]),
  );
}

/** A one-line progress bar on a TTY-like stream, redrawn in place. */
export class ProgressBar {
  private label = '';
  private lastDraw = 0;
  private drawn = false;

  constructor(
    private readonly stream: { write(s: string): unknown; isTTY?: boolean },
    private readonly bounds: { requests?: number; durationMs?: number },
    private readonly width = 30,
  ) {}

  start(label: string, index: number, count: number): void {
    this.finish();
    this.label = index < 0 ? 'warmup' : `[${index + 1}/${count}] ${label}`;
  }

  update(p: LoadProgress, total = this.bounds.requests): void {
    const now = performance.now();
    if (now - this.lastDraw < 100 && !(total !== undefined && p.done >= total)) return;
    this.lastDraw = now;
    const byCount = total !== undefined ? p.done / total : 0;
    const byTime = this.bounds.durationMs !== undefined ? p.elapsedMs / this.bounds.durationMs : 0;
    const f = Math.max(0, Math.min(1, Math.max(byCount, byTime)));
    const filled = Math.round(f * this.width);
    const bar = '█'.repeat(filled) + '░'.repeat(this.width - filled);
    const line = `${this.label.padEnd(16)} ${bar} ${p.done}${total !== undefined ? `/${total}` : ''} done, ${p.sent - p.done} in flight, ${p.failed} failed, ${(p.elapsedMs / 1000).toFixed(1)} s`;
    this.stream.write(`\r${line}\x1b[K`);
    this.drawn = true;
  }

  finish(): void {
    if (this.drawn) this.stream.write('\n');
    this.drawn = false;
  }
}
