/**
 * The HTML report: one self-contained file (inline CSS and SVG, no script, no network), with plots of
 * throughput and latency percentiles against load, $/M tokens against API prices, and monthly cost
 * against monthly volume for the devices and for each API, marking where the lines cross.
 *
 * Every plot is an <svg data-plot="NAME">; its data points are <circle class="pt">, its bars
 * <rect class="bar">, its lines <path class="line">, and break-even crossings <circle class="cross">.
 */
import { percentileKey } from './stats.ts';
import { cheapestPoint, compareApiRows, fmtCount, fmtNum, fmtUsd, prefixCacheRows, ratioText } from './report-text.ts';
import type { BenchResult, PointResult } from './run.ts';
import { selfHostedMonthly } from './cost.ts';
import type { CompareResult } from './compare.ts';

const esc = (s: string) => s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
const n2 = (v: number) => (Math.round(v * 100) / 100).toString();

const PALETTE = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#be185d', '#4d7c0f', '#a16207', '#475569'];

const W = 640;
const H = 360;
const M = { left: 72, right: 16, top: 36, bottom: 64 };

interface Scale {
  map(v: number): number;
  ticks: number[];
  fmt(v: number): string;
}

function tickFmt(v: number): string {
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e3) return fmtCount(v);
  if (a >= 1) return String(Math.round(v * 100) / 100);
  return String(Number(v.toPrecision(2)));
}

function linearScale(lo: number, hi: number, r0: number, r1: number): Scale {
  if (!(hi > lo)) hi = lo + 1;
  const span = hi - lo;
  const raw = span / 5;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((k) => k * mag).find((s) => span / s <= 6) ?? 10 * mag;
  const start = Math.floor(lo / step) * step;
  const end = Math.ceil(hi / step) * step;
  const ticks: number[] = [];
  for (let t = start; t <= end + step / 2; t += step) ticks.push(Number(t.toPrecision(12)));
  const a = ticks[0];
  const b = ticks[ticks.length - 1];
  return { map: (v) => r0 + ((v - a) / (b - a)) * (r1 - r0), ticks, fmt: tickFmt };
}

function logScale(lo: number, hi: number, r0: number, r1: number): Scale {
  const a = Math.floor(Math.log10(lo));
  let b = Math.ceil(Math.log10(hi));
  if (b <= a) b = a + 1;
  const ticks: number[] = [];
  const every = Math.max(1, Math.ceil((b - a) / 8));
  for (let e = a; e <= b; e += every) ticks.push(10 ** e);
  const hiE = ticks.length > 1 ? Math.log10(ticks[ticks.length - 1]) : b;
  return { map: (v) => r0 + ((Math.log10(v) - a) / (hiE - a)) * (r1 - r0), ticks, fmt: tickFmt };
}

/** Log when all values are positive and span more than `ratio`. */
function autoScale(values: number[], r0: number, r1: number, ratio = 50, zeroBased = true): Scale {
  const finite = values.filter((v) => Number.isFinite(v));
  if (finite.length === 0) return linearScale(0, 1, r0, r1);
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  if (lo > 0 && hi / lo > ratio) return logScale(lo, hi, r0, r1);
  return linearScale(zeroBased ? Math.min(0, lo) : lo, hi === lo ? hi + Math.abs(hi || 1) : hi, r0, r1);
}

/** Legend items flowed left to right, wrapping at the plot's width; returns the markup and the rows used. */
function legendRows(legend: { name: string; color: string }[], x0: number, y0: number, xMax: number): { svg: string; rows: number } {
  let x = x0;
  let row = 0;
  let svg = '';
  for (const l of legend) {
    const w = 14 + l.name.length * 6.2 + 18;
    if (x > x0 && x + w > xMax) {
      x = x0;
      row++;
    }
    const y = y0 + row * 15;
    svg += `<g class="legend"><rect x="${n2(x)}" y="${y - 9}" width="10" height="10" fill="${l.color}"/><text x="${n2(x + 14)}" y="${y}">${esc(l.name)}</text></g>`;
    x += w;
  }
  return { svg, rows: legend.length === 0 ? 0 : row + 1 };
}

function frame(name: string, title: string, body: string, legend: { name: string; color: string }[], xLabel: string, yLabel: string): string {
  const items = legendRows(legend, M.left, H - 14, W - M.right);
  const height = H + Math.max(0, items.rows - 1) * 15;
  return `<figure><svg data-plot="${esc(name)}" viewBox="0 0 ${W} ${height}" width="${W}" height="${height}" role="img" aria-label="${esc(title)}" xmlns="http://www.w3.org/2000/svg">
<text class="title" x="${W / 2}" y="20" text-anchor="middle">${esc(title)}</text>
<text class="axis-label" x="${M.left + (W - M.left - M.right) / 2}" y="${H - M.bottom + 32}" text-anchor="middle">${esc(xLabel)}</text>
<text class="axis-label" transform="translate(14 ${M.top + (H - M.top - M.bottom) / 2}) rotate(-90)" text-anchor="middle">${esc(yLabel)}</text>
${body}${items.svg}</svg></figure>`;
}

function yAxis(y: Scale): string {
  return y.ticks
    .map((t) => {
      const py = n2(y.map(t));
      return `<line class="grid" x1="${M.left}" x2="${W - M.right}" y1="${py}" y2="${py}"/><text class="tick" x="${M.left - 6}" y="${py}" dy="4" text-anchor="end">${esc(y.fmt(t))}</text>`;
    })
    .join('');
}

export interface Series {
  name: string;
  values: (number | null)[];
}

/** A line chart over categories (load points), one polyline and a circle per value per series. */
export function lineChart(name: string, title: string, categories: string[], series: Series[], xLabel: string, yLabel: string): string {
  const all = series.flatMap((s) => s.values.filter((v): v is number => v !== null && Number.isFinite(v)));
  const y = autoScale(all, H - M.bottom, M.top);
  const plotW = W - M.left - M.right;
  const x = (i: number) => M.left + (categories.length === 1 ? plotW / 2 : 24 + (i * (plotW - 48)) / (categories.length - 1));
  let body = yAxis(y);
  body += `<line class="axis" x1="${M.left}" x2="${W - M.right}" y1="${H - M.bottom}" y2="${H - M.bottom}"/>`;
  body += categories.map((c, i) => `<text class="tick" x="${n2(x(i))}" y="${H - M.bottom + 16}" text-anchor="middle">${esc(c)}</text>`).join('');
  const legend: { name: string; color: string }[] = [];
  series.forEach((s, si) => {
    const color = PALETTE[si % PALETTE.length];
    legend.push({ name: s.name, color });
    const segments: string[][] = [[]];
    s.values.forEach((v, i) => {
      if (v === null || !Number.isFinite(v)) segments.push([]);
      else segments[segments.length - 1].push(`${n2(x(i))},${n2(y.map(v))}`);
    });
    for (const seg of segments) if (seg.length > 1) body += `<path class="line" data-series="${esc(s.name)}" d="M${seg.join('L')}" stroke="${color}" fill="none"/>`;
    s.values.forEach((v, i) => {
      if (v === null || !Number.isFinite(v)) return;
      body += `<circle class="pt" data-series="${esc(s.name)}" data-x="${esc(categories[i])}" data-y="${v}" cx="${n2(x(i))}" cy="${n2(y.map(v))}" r="4" fill="${color}"><title>${esc(`${s.name} at ${categories[i]}: ${fmtNum(v, 2)}`)}</title></circle>`;
    });
  });
  return frame(name, title, body, legend, xLabel, yLabel);
}

export interface Bar {
  label: string;
  value: number;
  group: 'self-hosted' | 'server-metered' | 'API';
}

/** Horizontal bars, log-scaled when the values span more than 50×. */
export function barChart(name: string, title: string, bars: Bar[], xLabel: string): string {
  const rowH = 20;
  const height = M.top + bars.length * rowH + 60;
  const left = 230;
  const right = W - 70;
  const values = bars.map((b) => b.value).filter((v) => v > 0);
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const log = values.length > 0 && hi / lo > 50;
  const x: Scale = values.length === 0 ? linearScale(0, 1, left, right) : log ? logScale(lo / 2, hi, left, right) : linearScale(0, hi, left, right);
  const groups = [...new Set(bars.map((b) => b.group))];
  const color = (g: Bar['group']) => ({ 'self-hosted': '#2563eb', 'server-metered': '#16a34a', API: '#9ca3af' })[g];
  let body = x.ticks
    .map((t) => `<line class="grid" x1="${n2(x.map(t))}" x2="${n2(x.map(t))}" y1="${M.top}" y2="${M.top + bars.length * rowH}"/><text class="tick" x="${n2(x.map(t))}" y="${M.top + bars.length * rowH + 14}" text-anchor="middle">${esc(`$${Number(t.toPrecision(3))}`)}</text>`)
    .join('');
  const base = log ? x.map(x.ticks[0]) : x.map(0);
  bars.forEach((b, i) => {
    const y = M.top + i * rowH;
    const end = b.value > 0 ? x.map(b.value) : base;
    const w = Math.max(1, end - base);
    body += `<text class="tick" x="${left - 6}" y="${y + 14}" text-anchor="end">${esc(b.label)}</text>`;
    body += `<rect class="bar" data-group="${b.group}" data-label="${esc(b.label)}" data-value="${b.value}" x="${n2(base)}" y="${y + 3}" width="${n2(w)}" height="${rowH - 6}" fill="${color(b.group)}"><title>${esc(`${b.label}: ${fmtUsd(b.value)}/M tokens`)}</title></rect>`;
    body += `<text class="tick" x="${n2(base + w + 4)}" y="${y + 14}">${esc(fmtUsd(b.value))}</text>`;
  });
  const legend = groups.map((g, i) => `<g class="legend"><rect x="${left + i * 150}" y="${height - 26}" width="10" height="10" fill="${color(g)}"/><text x="${left + i * 150 + 14}" y="${height - 17}">${esc(g)}</text></g>`).join('');
  return `<figure><svg data-plot="${esc(name)}" viewBox="0 0 ${W} ${height}" width="${W}" height="${height}" role="img" aria-label="${esc(title)}" xmlns="http://www.w3.org/2000/svg">
<text class="title" x="${W / 2}" y="20" text-anchor="middle">${esc(title)}</text>
<text class="axis-label" x="${(left + right) / 2}" y="${height - 34}" text-anchor="middle">${esc(xLabel)}${log ? ' (log scale)' : ''}</text>
${body}${legend}</svg></figure>`;
}

export interface MonthlyApi {
  label: string;
  usdPerMillion: number;
  breakEven: number | null;
}

/**
 * Monthly cost against monthly token volume, log-log: the devices as a staircase (whole deployments of
 * `capacity` tokens a month at `fixedUsd` each) and each API as a straight line; a circle where an API's
 * line crosses the first step (its break-even volume).
 */
export function monthlyChart(name: string, title: string, fixedUsd: number, capacity: number, apis: MonthlyApi[]): string {
  const crossings = apis.map((a) => a.breakEven).filter((v): v is number => v !== null);
  const perToken = apis.map((a) => a.usdPerMillion / 1e6).filter((v) => v > 0);
  const xLo = Math.min(capacity / 100, ...crossings.map((c) => c / 10), ...perToken.map((p) => fixedUsd / p / 10));
  const xHi = capacity * 10;
  const cost = (v: number) => selfHostedMonthly(v, fixedUsd, capacity);
  const ys = [fixedUsd, cost(xHi), ...perToken.flatMap((p) => [p * xLo, p * xHi])].filter((v) => v > 0);
  const x = logScale(xLo, xHi, M.left, W - M.right);
  const y = logScale(Math.min(...ys), Math.max(...ys), H - M.bottom, M.top);
  let body = yAxis(y);
  body += x.ticks.map((t) => `<line class="grid" x1="${n2(x.map(t))}" x2="${n2(x.map(t))}" y1="${M.top}" y2="${H - M.bottom}"/><text class="tick" x="${n2(x.map(t))}" y="${H - M.bottom + 16}" text-anchor="middle">${esc(fmtCount(t))}</text>`).join('');
  const clampY = (v: number) => Math.min(H - M.bottom, Math.max(M.top, y.map(v)));
  const xMax = x.ticks[x.ticks.length - 1];
  const xMin = x.ticks[0];
  // Staircase: 1 deployment up to capacity, then 2, ...
  const steps: string[] = [`${n2(x.map(xMin))},${n2(clampY(fixedUsd))}`];
  for (let k = 1; k * capacity < xMax && k < 1000; k++) {
    const at = x.map(k * capacity);
    steps.push(`${n2(at)},${n2(clampY(k * fixedUsd))}`, `${n2(at)},${n2(clampY((k + 1) * fixedUsd))}`);
  }
  steps.push(`${n2(x.map(xMax))},${n2(clampY(cost(xMax)))}`);
  const legend = [{ name: `devices (${fmtUsd(fixedUsd)}/month per ${fmtCount(capacity)} tokens)`, color: '#111827' }];
  body += `<path class="line" data-series="self-hosted" d="M${steps.join('L')}" stroke="#111827" stroke-width="2.5" fill="none"/>`;
  apis.forEach((a, i) => {
    const color = PALETTE[(i + 1) % PALETTE.length];
    legend.push({ name: a.label, color });
    const p = a.usdPerMillion / 1e6;
    // Clip the API line to the plot: from where it enters the y range to where it leaves it.
    const yLo = y.ticks[0];
    const yHi = y.ticks[y.ticks.length - 1];
    const from = Math.max(xMin, yLo / p);
    const to = Math.min(xMax, yHi / p);
    if (from < to) body += `<path class="line" data-series="${esc(a.label)}" d="M${n2(x.map(from))},${n2(y.map(p * from))}L${n2(x.map(to))},${n2(y.map(p * to))}" stroke="${color}" stroke-width="1.5" fill="none"/>`;
    if (a.breakEven !== null) {
      body += `<circle class="cross" data-series="${esc(a.label)}" data-x="${a.breakEven}" cx="${n2(x.map(a.breakEven))}" cy="${n2(y.map(fixedUsd))}" r="5" fill="#fff" stroke="${color}" stroke-width="2"><title>${esc(`${a.label}: break-even at ${fmtCount(a.breakEven)} tokens/month (${fmtUsd(fixedUsd)}/month)`)}</title></circle>`;
    }
  });
  return frame(name, title, body, legend, 'tokens per month (log scale)', 'USD per month (log scale)');
}

const pctValue = (p: PointResult, metric: 'ttft' | 'itl' | 'tpot' | 'e2e', q: number) => p.stats.latency_ms[metric].percentiles[percentileKey(q)];

/** The plots of a result, by name. */
export function plots(result: BenchResult): { name: string; svg: string }[] {
  const out: { name: string; svg: string }[] = [];
  const ps = result.config.percentiles;
  for (const mode of ['concurrency', 'rate'] as const) {
    const pts = result.points.filter((p) => p.mode === mode);
    if (pts.length === 0) continue;
    const cats = pts.map((p) => (p.value === 'inf' ? '∞' : String(p.value)));
    const xLabel = mode === 'concurrency' ? 'concurrency (requests in flight)' : 'request rate (requests/s, Poisson)';
    out.push({
      name: `throughput-${mode}`,
      svg: lineChart(`throughput-${mode}`, `Throughput vs ${mode}`, cats, [
        { name: 'output tokens/s', values: pts.map((p) => p.stats.throughput.output_tokens_per_s) },
        { name: 'total tokens/s', values: pts.map((p) => p.stats.throughput.total_tokens_per_s) },
      ], xLabel, 'tokens per second'),
    });
    out.push({
      name: `ttft-${mode}`,
      svg: lineChart(`ttft-${mode}`, `Time to first token vs ${mode}`, cats, ps.map((q) => ({ name: `TTFT p${q}`, values: pts.map((p) => pctValue(p, 'ttft', q)) })), xLabel, 'ms'),
    });
    out.push({
      name: `itl-${mode}`,
      svg: lineChart(`itl-${mode}`, `Inter-token latency vs ${mode}`, cats, ps.map((q) => ({ name: `ITL p${q}`, values: pts.map((p) => pctValue(p, 'itl', q)) })), xLabel, 'ms'),
    });
  }
  const ref = cheapestPoint(result);
  const bars: Bar[] = [];
  for (const p of result.points) if (p.cost.usd_per_million.blended !== null) bars.push({ label: `self-hosted ${p.label}`, value: p.cost.usd_per_million.blended, group: 'self-hosted' });
  for (const p of result.points) if (p.cost.metered?.usd_per_million.blended != null) bars.push({ label: `metered ${p.label}`, value: p.cost.metered.usd_per_million.blended, group: 'server-metered' });
  for (const a of ref?.cost.api ?? []) if (a.blended_usd_per_million !== null) bars.push({ label: a.name ?? a.id, value: a.blended_usd_per_million, group: 'API' });
  if (bars.length > 0) out.push({ name: 'cost', svg: barChart('cost', 'Blended $ per million tokens: self-hosted vs APIs', bars, 'USD per million tokens (input + output)') });
  if (ref && ref.cost.monthly.capacity_tokens && ref.cost.monthly.capacity_tokens > 0 && ref.cost.monthly.fixed_usd > 0) {
    const apis = ref.cost.api.filter((a) => a.blended_usd_per_million !== null && a.blended_usd_per_million > 0).map((a) => ({ label: a.name ?? a.id, usdPerMillion: a.blended_usd_per_million!, breakEven: a.break_even?.tokens_per_month ?? null }));
    out.push({ name: 'monthly', svg: monthlyChart('monthly', `Monthly cost vs volume (devices at ${ref.label}'s throughput)`, ref.cost.monthly.fixed_usd, ref.cost.monthly.capacity_tokens, apis) });
  }
  return out;
}

const CSS = `body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1340px;padding:0 16px;color:#111827}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.meta{color:#4b5563}table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}th,td{padding:3px 9px;border-bottom:1px solid #e5e7eb;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f9fafb;font-weight:600}.plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #e5e7eb;border-radius:6px;padding:4px;background:#fff}
svg text{font:11px system-ui,sans-serif;fill:#374151}svg .title{font-size:13px;font-weight:600;fill:#111827}svg .grid{stroke:#e5e7eb}svg .axis{stroke:#9ca3af}svg .line{stroke-width:2}
.note{color:#92400e}pre{background:#f9fafb;padding:8px;overflow:auto;font-size:12px}.err{color:#b91c1c}`;

function htmlTable(header: string[], rows: string[][]): string {
  return `<table><thead><tr>${header.map((h) => `<th>${esc(h)}</th>`).join('')}</tr></thead><tbody>${rows.map((r) => `<tr>${r.map((c) => `<td>${esc(c)}</td>`).join('')}</tr>`).join('')}</tbody></table>`;
}

export function renderHtml(result: BenchResult): string {
  const ps = result.config.percentiles;
  const pr = result.pricing;
  const lat = (p: PointResult, m: 'ttft' | 'itl' | 'tpot' | 'e2e') => ps.map((q) => fmtNum(pctValue(p, m, q), m === 'itl' || m === 'tpot' ? 2 : 1));
  const summary = htmlTable(
    ['load', 'ok', 'failed', 'duration s', 'req/s', 'in tok/s', 'out tok/s', ...ps.map((q) => `TTFT p${q} ms`), ...ps.map((q) => `TPOT p${q} ms`), ...ps.map((q) => `ITL p${q} ms`), ...ps.map((q) => `E2E p${q} ms`), '$/M in', '$/M out', '$/M blended', 'input share', 'client CPU s / 1k tok'],
    result.points.map((p) => [
      p.label, String(p.stats.requests.completed), String(p.stats.requests.failed), fmtNum(p.stats.duration_s, 2), fmtNum(p.stats.throughput.requests_per_s, 2),
      fmtNum(p.stats.throughput.input_tokens_per_s), fmtNum(p.stats.throughput.output_tokens_per_s), ...lat(p, 'ttft'), ...lat(p, 'tpot'), ...lat(p, 'itl'), ...lat(p, 'e2e'),
      fmtUsd(p.cost.usd_per_million.input), fmtUsd(p.cost.usd_per_million.output), fmtUsd(p.cost.usd_per_million.blended), `${(p.cost.input_share * 100).toFixed(1)}% (${p.cost.input_share_from})`,
      p.client?.cpu_s_per_1k_tokens == null ? '-' : p.client.cpu_s_per_1k_tokens.toFixed(3),
    ]),
  );
  const meteredPts = result.points.filter((p) => p.cost.metered);
  const metered = meteredPts.length === 0 ? '' : `<h2>Server-metered cost</h2><p>Busy device time as the server reported it per request (device-seconds of prefill and decode), at ${fmtUsd(pr.usd_per_device_hour)}/device-hour.</p>` +
    htmlTable(['load', 'prefill s', 'decode s', 'busy tokens/device-s', '$/M in', '$/M out', '$/M blended'], meteredPts.map((p) => [
      p.label, fmtNum(p.stats.server!.prefill_s, 3), fmtNum(p.stats.server!.decode_s, 3), fmtNum(p.cost.metered!.tokens_per_busy_device_second), fmtUsd(p.cost.metered!.usd_per_million.input), fmtUsd(p.cost.metered!.usd_per_million.output), fmtUsd(p.cost.metered!.usd_per_million.blended),
    ]));
  const shared = result.config.shared_prefix;
  const prefix = !shared && !result.points.some((p) => p.stats.tokens.prefix_cache_hit_rate !== null) ? '' :
    `<h2>Prefix cache</h2><p>${shared ? `${shared.count} shared prefixes of ${shared.length} tokens. ` : ''}Cached prompt tokens over prompt tokens, from the server's usage.prompt_tokens_details.cached_tokens.</p>` +
    htmlTable(['load', 'cached tokens', 'prompt tokens', 'hit rate'], prefixCacheRows(result));
  const ref = cheapestPoint(result);
  const api = !ref ? '<p>No load point completed a request, so there is nothing to compare.</p>' :
    `<p>At ${esc(ref.label)}'s token mix (${fmtNum(ref.stats.tokens.input / Math.max(1, ref.stats.requests.completed), 0)} in / ${fmtNum(ref.stats.tokens.output / Math.max(1, ref.stats.requests.completed), 0)} out per request) and cost, the cheapest point. A month is ${pr.hours_per_month} h: ${fmtUsd(ref.cost.monthly.fixed_usd)} for ${pr.devices} device(s), serving up to ${fmtCount(ref.cost.monthly.capacity_tokens)} tokens.</p>` +
    htmlTable(['API model', '$/M in', '$/M out', '$/M blended', 'API ÷ ours', 'break-even tokens/month'], ref.cost.api.map((a) => [
      a.name ? `${a.id} (${a.name})` : a.id, fmtUsd(a.input_usd_per_million), fmtUsd(a.output_usd_per_million), fmtUsd(a.blended_usd_per_million),
      a.cost_ratio === null ? '-' : `${a.cost_ratio.toPrecision(3)}×`, a.error ?? (a.break_even ? `${fmtCount(a.break_even.tokens_per_month)} (${fmtUsd(a.break_even.api_usd_per_month)}/month)` : 'API cheaper'),
    ]));
  const failed = result.points.filter((p) => p.stats.requests.failed > 0);
  const errors = failed.length === 0 ? '<p>No request failed.</p>' :
    htmlTable(['load', 'kind', 'count', 'message'], failed.flatMap((p) => p.stats.error_samples.map((s) => [p.label, s.kind, String(s.count), s.message])));
  const notes = result.notes.map((n) => `<li class="note">${esc(n)}</li>`).join('');
  const config = { target: result.target, server: result.server, config: result.config, pricing: result.pricing, totals: { requests: result.totals.requests, tokens: result.totals.tokens } };
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tally bench — ${esc(result.target.model)}</title><style>${CSS}</style></head>
<body>
<h1>tally bench — ${esc(result.target.model)}</h1>
<p class="meta">${esc(result.target.url)} · ${esc(result.target.endpoint)} · prompts: ${esc(result.server.prompt_format)}${result.server.exact_output ? ' (exact output lengths)' : ''} · ${esc(result.started_at)} → ${esc(result.finished_at)}<br>
Price: ${pr.devices} × ${fmtUsd(pr.usd_per_device_hour)}/device-hour (${esc(pr.device)}${pr.source ? `: ${esc(pr.source)}` : ''}). $/M tokens are the devices' wall-clock cost over each load point's duration, divided by its tokens; input and output share it by the input share shown.</p>
${notes ? `<ul>${notes}</ul>` : ''}
<h2>Results</h2>${summary}
${metered}
${prefix}
<h2>Plots</h2><div class="plots">${plots(result).map((p) => p.svg).join('\n')}</div>
<h2>Against API prices</h2>${api}
<h2>Errors</h2>${errors}
<h2>Run</h2><details><summary>settings and totals (the full result is the --json file)</summary><pre>${esc(JSON.stringify(config, null, 2))}</pre></details>
</body></html>
`;
}

/** The plots of a comparison: one series per server. */
export function comparePlots(cmp: CompareResult): { name: string; svg: string }[] {
  const out: { name: string; svg: string }[] = [];
  for (const mode of ['concurrency', 'rate'] as const) {
    const labels = cmp.rows.map((r) => r.label).filter((l) => cmp.runs.some((run) => run.points.some((p) => p.label === l && p.mode === mode)));
    if (labels.length === 0) continue;
    const cats = labels.map((l) => {
      const p = cmp.runs.flatMap((r) => r.points).find((q) => q.label === l)!;
      return p.value === 'inf' ? '∞' : String(p.value);
    });
    const xLabel = mode === 'concurrency' ? 'concurrency (requests in flight)' : 'request rate (requests/s, Poisson)';
    const series = (f: (p: PointResult) => number | null) => cmp.runs.map((r) => ({ name: r.target.name, values: labels.map((l) => {
      const p = r.points.find((q) => q.label === l);
      return p ? f(p) : null;
    }) }));
    out.push({ name: `throughput-${mode}`, svg: lineChart(`throughput-${mode}`, `Output tokens/s vs ${mode}`, cats, series((p) => p.stats.throughput.output_tokens_per_s), xLabel, 'output tokens per second') });
    out.push({ name: `ttft-${mode}`, svg: lineChart(`ttft-${mode}`, `TTFT p50 vs ${mode}`, cats, series((p) => pctValue(p, 'ttft', 50)), xLabel, 'ms') });
    out.push({ name: `usd-${mode}`, svg: lineChart(`usd-${mode}`, `Blended $/M tokens vs ${mode} (each at its own device price)`, cats, series((p) => p.cost.usd_per_million.blended), xLabel, 'USD per million tokens') });
  }
  const bars: Bar[] = [];
  const refs = cmp.runs.map((r) => cheapestPoint(r));
  cmp.runs.forEach((r, i) => {
    const v = refs[i]?.cost.usd_per_million.blended;
    if (v != null && v > 0) bars.push({ label: `${r.target.name} (${refs[i]!.label})`, value: v, group: 'self-hosted' });
  });
  const seen = new Set<string>();
  for (const ref of refs) for (const a of ref?.cost.api ?? []) {
    if (a.blended_usd_per_million === null || seen.has(a.id)) continue;
    seen.add(a.id);
    bars.push({ label: a.name ?? a.id, value: a.blended_usd_per_million, group: 'API' });
  }
  if (bars.length > 0) out.push({ name: 'cost', svg: barChart('cost', 'Blended $/M tokens: each server at its cheapest load point, and APIs', bars, 'USD per million tokens (input + output)') });
  return out;
}

export function renderCompareHtml(cmp: CompareResult): string {
  const base = cmp.runs[0].target.name;
  const servers = htmlTable(['server', 'model', 'URL', 'device price', 'prompts', 'output tokens from', 'client CPU s / 1k tokens'], cmp.runs.map((r) => [
    r.target.name, r.target.model, r.target.url, `${r.pricing.devices} × ${fmtUsd(r.pricing.usd_per_device_hour)}/h (${r.pricing.device})`,
    `${r.server.prompt_format}${r.server.exact_output ? ', exact output' : ''}`, r.server.output_tokens_from ?? '-',
    r.points.map((p) => `${p.label} ${p.client?.cpu_s_per_1k_tokens == null ? '-' : p.client.cpu_s_per_1k_tokens.toFixed(3)}`).join(', '),
  ]));
  const rows: string[][] = [];
  for (const row of cmp.rows) {
    row.servers.forEach((s, i) => {
      if (!s) return;
      rows.push([row.label, cmp.runs[i].target.name, String(s.completed), String(s.failed), fmtNum(s.output_tokens_per_s), ratioText(s.ratio?.output_tokens_per_s), fmtNum(s.ttft_p50_ms), ratioText(s.ratio?.ttft_p50), fmtNum(s.tpot_p50_ms, 2), fmtNum(s.itl_p50_ms, 2), fmtNum(s.e2e_p50_ms), fmtUsd(s.usd_per_million.input), fmtUsd(s.usd_per_million.output), fmtUsd(s.usd_per_million.blended), ratioText(s.ratio?.usd_per_million_blended)]);
    });
  }
  const table = htmlTable(['load', 'server', 'ok', 'failed', 'out tok/s', `× ${base}`, 'TTFT p50 ms', `× ${base}`, 'TPOT p50 ms', 'ITL p50 ms', 'E2E p50 ms', '$/M in', '$/M out', '$/M blended', `× ${base}`], rows);
  const { refs, rows: apiRows } = compareApiRows(cmp);
  const api = apiRows.length === 0 ? '<p>No API prices.</p>' : htmlTable(['API model', '$/M blended', ...cmp.runs.map((r, i) => `API ÷ ${r.target.name} (${refs[i]?.label ?? '-'})`)], apiRows);
  const errors = cmp.runs.flatMap((r) => r.points.flatMap((p) => p.stats.error_samples.map((s) => [r.target.name, p.label, s.kind, String(s.count), s.message])));
  const notes = [...cmp.notes, ...cmp.runs.flatMap((r) => r.notes.map((n) => `${r.target.name}: ${n}`))].map((n) => `<li class="note">${esc(n)}</li>`).join('');
  const title = `tally bench — ${cmp.runs.map((r) => r.target.name).join(' vs ')}`;
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)}</title><style>${CSS}</style></head>
<body>
<h1>${esc(title)}</h1>
<p class="meta">${cmp.source === 'interleaved' ? 'The same workload against each server, interleaved load point by load point' : 'Saved reports put side by side'} · ${esc(cmp.started_at)} → ${esc(cmp.finished_at)}<br>
Each server's $/M tokens are its devices' wall-clock cost at its own price over each load point's duration, divided by its tokens; ratios are each server's figure over ${esc(base)}'s.</p>
${notes ? `<ul>${notes}</ul>` : ''}
<h2>Servers</h2>${servers}
<h2>Side by side</h2>${table}
<h2>Plots</h2><div class="plots">${comparePlots(cmp).map((p) => p.svg).join('\n')}</div>
<h2>Against API prices</h2><p>API ÷ server above 1: the server's tokens cost less than the API's.</p>${api}
<h2>Errors</h2>${errors.length === 0 ? '<p>No request failed.</p>' : htmlTable(['server', 'load', 'kind', 'count', 'message'], errors)}
</body></html>
`;
}
