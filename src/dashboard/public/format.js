/**
 * How the dashboard writes numbers: deterministic and locale-free, so that a test can format a
 * snapshot's figures the same way and compare them with the page's text. null is "—".
 */

const DASH = '—';

/** Thousands separated by commas: "1234567" → "1,234,567". */
function group(digits) {
  return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

/** A fixed-point string with grouped thousands. */
function fixed(v, decimals) {
  const s = Math.abs(v).toFixed(decimals);
  const [int, frac] = s.split('.');
  return (v < 0 && Number(s) !== 0 ? '-' : '') + group(int) + (frac ? '.' + frac : '');
}

/** Three significant digits without an exponent down to 1e-9 (then with one). */
function sig3(v) {
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a < 1e-9) return v.toExponential(2);
  const rounded = Number(v.toPrecision(3));
  const decimals = Math.max(0, 2 - Math.floor(Math.log10(Math.abs(rounded))));
  return fixed(rounded, decimals);
}

/** 15234567 → "15.2M"; below 1,000 as an integer. */
function compact(v) {
  const a = Math.abs(Number(v.toPrecision(3)));
  for (const [unit, size] of [['T', 1e12], ['B', 1e9], ['M', 1e6], ['k', 1e3]]) {
    if (a >= size) return sig3(v / size) + unit;
  }
  return fixed(v, 0);
}

/**
 * kinds:
 *   usd      dollars: "$65,153" from 100 up, "$65.15" from 1 up (as rounded), else 3 significant digits "$0.0267"
 *   int      grouped integer "12,345"
 *   rate     per second: one decimal below 100, else grouped integer
 *   percent  a 0..1 share as "63.1%"
 *   factor   "158×" (3 significant digits)
 *   tokens   compact "15.2M"
 *   seconds  "12.3 s" (3 significant digits)
 *   number   3 significant digits
 *   time     an ISO timestamp's time of day, "22:50:29 UTC"
 *   text     as it is
 */
export function format(kind, value) {
  if (value === null || value === undefined || (typeof value === 'number' && !Number.isFinite(value))) return DASH;
  if (kind === 'time') return typeof value === 'string' && /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d/.test(value) ? value.slice(11, 19) + ' UTC' : String(value);
  if (typeof value !== 'number') return String(value);
  switch (kind) {
    case 'usd': {
      const a = Math.abs(value);
      const body = a >= 99.995 ? fixed(value, 0) : a >= 0.9995 ? fixed(value, 2) : sig3(value);
      return body.startsWith('-') ? '-$' + body.slice(1) : '$' + body;
    }
    case 'int':
      return fixed(value, 0);
    case 'rate':
      return Math.abs(value) < 100 ? fixed(value, 1) : fixed(value, 0);
    case 'percent':
      return fixed(value * 100, 1) + '%';
    case 'factor':
      return sig3(value) + '×';
    case 'tokens':
      return compact(value);
    case 'seconds':
      return sig3(value) + ' s';
    default:
      return sig3(value);
  }
}

/** The value at a dotted path ("cost.usd_per_million_tokens.usage.input", "ledger.by_tenant.0.key"). */
export function pick(object, dotted) {
  let v = object;
  for (const part of dotted.split('.')) {
    if (v === null || v === undefined) return undefined;
    v = v[part];
  }
  return v;
}
