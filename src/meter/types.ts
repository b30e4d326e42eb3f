/** What the server tells the meter when a request (all of its choices) has ended. */
export interface FinishedRequest {
  id: string;
  model: string;
  /** API-key name, never the key; "anonymous" when keys are off. */
  tenant: string;
  /** 'completed' | 'cancelled' | 'error' */
  status: 'completed' | 'cancelled' | 'error';
  promptTokens: number;
  /** Of the prompt tokens, those taken from the prefix cache (no prefill computed them). */
  cachedTokens?: number;
  completionTokens: number;
  prefillSeconds: number;
  decodeSeconds: number;
  /** Wall-clock timestamps (ms since epoch). */
  arrivalMs: number;
  endMs: number;
  /** Seconds from arrival to the first token; undefined if none came. */
  ttftSeconds?: number;
  /** Gaps between successive tokens of the request's first choice, seconds. */
  interTokenSeconds: number[];
}

/** The prices a cost report is computed at. */
export interface Pricing {
  devices: number;
  devicePriceUsdPerHour: number;
  /** Device price plus measured power, per device-hour. */
  usdPerDeviceHour: number;
}

/** The `usage.cost` object of a response. */
export interface CostReport {
  device_seconds: { prefill: number; decode: number };
  usd: { usage: number; allocation: number };
  device_price_usd_per_hour: number;
  [extra: string]: unknown;
}

/** The cost meter as the server sees it: it observes, and never blocks the request path. */
export interface RequestMeter {
  /** Records a finished request (ledger, metrics) and returns its cost for the response. */
  requestFinished(request: FinishedRequest): CostReport;
  /** Counts a request that was refused before reaching the engine (4xx/5xx), for metrics. */
  requestRejected(model: string, tenant: string, status: number): void;
}
