/**
 * The dashboard page: polls GET /v1/dashboard and shows the snapshot's figures as they are. Nothing
 * is computed here but layout; every number comes from the snapshot, written by format.js.
 * ?interval=MS sets the polling period (default 1000 ms, at least 250).
 */
import { format, pick } from './format.js';

const params = new URLSearchParams(location.search);
const INTERVAL_MS = Math.max(250, Number(params.get('interval')) || 1000);
const KEY = 'tally.apiKey';

/** Generated tables (table[data-rows][data-columns]): [title, field of a row, format]; the first column is the row's name. */
const COLUMNS = {
  ledger: [
    ['requests', 'requests', 'int'],
    ['tokens in', 'prompt_tokens', 'tokens'],
    ['cached in', 'cached_prompt_tokens', 'tokens'],
    ['hit rate', 'prefix_cache_hit_rate', 'percent'],
    ['tokens out', 'completion_tokens', 'tokens'],
    ['USD usage', 'usd.usage', 'usd'],
    ['USD alloc.', 'usd.allocation', 'usd'],
    ['$/M usage', 'usd_per_million_tokens.usage', 'usd'],
    ['$/M alloc.', 'usd_per_million_tokens.allocation', 'usd'],
  ],
  api: [
    ['$/M in', 'input_usd_per_million', 'usd'],
    ['$/M cache', 'cached_input_usd_per_million', 'usd'],
    ['$/M (mix)', 'blended_usd_per_million', 'usd'],
    ['break-even', 'break_even.tokens_per_month', 'tokens'],
  ],
};

const TALLY = { usage: '#1b9e77', allocation: '#0b5d45' };
const API_COLORS = ['#d95f02', '#7570b3', '#e7298a', '#66a61e', '#e6ab02', '#a6761d', '#1f78b4', '#b15928', '#666666'];
const apiColor = (i) => API_COLORS[i % API_COLORS.length];

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Rebuilds a generated table's rows; their cells are data-field elements like the rest of the page. */
function renderRows(table, snap) {
  const path = table.dataset.rows;
  const columns = COLUMNS[table.dataset.columns];
  const rows = pick(snap, path) ?? [];
  const head = el('tr');
  head.append(el('th', {}, table.dataset.keyTitle));
  for (const [title] of columns) head.append(el('th', {}, title));
  const body = el('tbody');
  if (rows.length === 0) {
    const tr = el('tr');
    tr.append(el('td', { colspan: String(columns.length + 1), class: 'empty' }, table.dataset.empty ?? 'none'));
    body.append(tr);
  }
  rows.forEach((_, i) => {
    const tr = el('tr');
    tr.append(el('th', { 'data-field': `${path}.${i}.${table.dataset.keyField ?? 'key'}`, 'data-format': 'text' }));
    for (const [, field, kind] of columns) tr.append(el('td', { 'data-field': `${path}.${i}.${field}`, 'data-format': kind }));
    body.append(tr);
  });
  const thead = el('thead');
  thead.append(head);
  table.replaceChildren(thead, body);
}

const logTicks = (kind) => ({
  callback(value) {
    const exp = Math.log10(value);
    return Math.abs(exp - Math.round(exp)) < 1e-9 ? format(kind, value) : '';
  },
  font: { size: 11 },
  maxRotation: 0,
  autoSkip: true,
});

function pricesChart(canvas) {
  return new Chart(canvas, {
    type: 'bar',
    data: { labels: [], datasets: [
      { label: 'input $/M', data: [], backgroundColor: [], borderWidth: 0 },
      { label: 'output $/M', data: [], backgroundColor: [], borderWidth: 0 },
    ] },
    options: {
      indexAxis: 'y',
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      scales: {
        x: { type: 'logarithmic', ticks: logTicks('usd'), title: { display: true, text: 'USD per million tokens' } },
        y: { ticks: { font: { size: 11 }, autoSkip: false } },
      },
      plugins: {
        legend: { position: 'bottom', labels: { boxWidth: 12, font: { size: 11 } } },
        tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${format('usd', c.raw)}` } },
      },
    },
  });
}

function updatePrices(chart, prices) {
  chart.data.labels = prices.labels;
  const tally = (id) => id.startsWith('tally:');
  const [input, output] = chart.data.datasets;
  input.data = prices.input;
  output.data = prices.output;
  input.backgroundColor = prices.ids.map((id) => (tally(id) ? '#7fd1b9' : '#b9c3cf'));
  output.backgroundColor = prices.ids.map((id) => (tally(id) ? TALLY[id.slice(6)] : '#5b6b7f'));
  chart.update('none');
}

function breakEvenChart(canvas) {
  return new Chart(canvas, {
    type: 'scatter',
    data: { datasets: [] },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      scales: {
        x: { type: 'logarithmic', ticks: logTicks('tokens'), title: { display: true, text: 'tokens per month' } },
        y: { type: 'logarithmic', ticks: logTicks('usd'), title: { display: true, text: 'USD per month' } },
      },
      plugins: {
        legend: { position: 'right', maxWidth: 190, labels: { boxWidth: 10, font: { size: 11 } } },
        tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${format('tokens', c.raw.x)} tokens → ${format('usd', c.raw.y)}` } },
      },
    },
  });
}

function updateBreakEven(chart, plot) {
  if (!plot) {
    chart.data.datasets = [];
    chart.update('none');
    return;
  }
  const xy = ([x, y]) => ({ x, y });
  const crossings = plot.apis.map((a, i) => [a, i]).filter(([a]) => a.crossing !== null);
  chart.data.datasets = [
    { label: 'Self-hosted', data: plot.self_hosted.map(xy), showLine: true, borderColor: TALLY.usage, backgroundColor: TALLY.usage, borderWidth: 3, pointRadius: 0 },
    ...plot.apis.map((a, i) => ({ label: a.label, data: a.line.map(xy), showLine: true, borderColor: apiColor(i), backgroundColor: apiColor(i), borderWidth: 1.5, pointRadius: 0 })),
    {
      label: 'break-even',
      data: crossings.map(([a]) => ({ x: a.crossing.tokens_per_month, y: a.crossing.usd_per_month })),
      pointStyle: 'circle',
      pointRadius: 5,
      pointBackgroundColor: crossings.map(([, i]) => apiColor(i)),
      pointBorderColor: '#000',
      backgroundColor: '#fff',
      borderColor: '#000',
    },
    ...(plot.current
      ? [{ label: 'now', data: [{ x: plot.current.tokens_per_month, y: plot.current.usd_per_month }], pointStyle: 'triangle', pointRadius: 7, backgroundColor: '#111', borderColor: '#111' }]
      : []),
  ];
  chart.options.scales.x.min = plot.x_min;
  chart.options.scales.x.max = plot.x_max;
  chart.update('none');
}

let charts;

function render(snap) {
  for (const table of document.querySelectorAll('table[data-rows]')) renderRows(table, snap);
  for (const node of document.querySelectorAll('[data-field]')) {
    const value = pick(snap, node.dataset.field);
    node.textContent = format(node.dataset.format ?? 'number', value);
    node.dataset.value = JSON.stringify(value ?? null);
  }
  if (window.Chart) {
    charts ??= { prices: pricesChart(document.getElementById('prices-chart')), breakEven: breakEvenChart(document.getElementById('break-even-chart')) };
    updatePrices(charts.prices, snap.charts.prices);
    updateBreakEven(charts.breakEven, snap.charts.break_even);
  }
  document.body.dataset.seq = String(snap.seq);
  document.body.dataset.generatedAt = snap.generated_at;
  window.tallySnapshot = snap;
}

function setStatus(text, state) {
  const s = document.getElementById('status');
  s.textContent = text;
  s.dataset.state = state;
}

const form = document.getElementById('key-form');
form.addEventListener('submit', (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById('key-input').value.trim());
  form.hidden = true;
  poll();
});

let timer;
async function poll() {
  clearTimeout(timer);
  try {
    const key = sessionStorage.getItem(KEY);
    const res = await fetch('/v1/dashboard', { cache: 'no-store', headers: key ? { authorization: `Bearer ${key}` } : {} });
    if (res.status === 401) {
      setStatus('API key needed', 'warn');
      form.hidden = false;
      return; // until a key is given
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    render(await res.json());
    setStatus('live', 'ok');
  } catch (err) {
    setStatus(`disconnected (${err.message})`, 'error');
  }
  timer = setTimeout(poll, INTERVAL_MS);
}

poll();
