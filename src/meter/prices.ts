import { calcPrice } from '@pydantic/genai-prices';

/** A named device price: on-demand rental of one device, USD per hour, and where the figure comes from. */
export interface DevicePreset {
  usdPerHour: number;
  description: string;
  source: string;
}

/**
 * On-demand, single-device rental prices (USD per device-hour) as listed in 2026. Prices move;
 * pass --device-price with your own figure when you know it.
 */
export const DEVICE_PRESETS: Record<string, DevicePreset> = {
  h200: { usdPerHour: 3.59, description: 'NVIDIA H200 SXM 141 GB', source: 'RunPod, GPU Cloud pricing page, H200 SXM pod (March 2026)' },
  'h100-sxm': { usdPerHour: 3.78, description: 'NVIDIA H100 SXM 80 GB', source: 'Lambda, Instances pricing page, 1x H100 SXM on-demand (May 2026)' },
  'h100-pcie': { usdPerHour: 2.86, description: 'NVIDIA H100 PCIe 80 GB', source: 'Lambda, Instances pricing page, 1x H100 PCIe on-demand (May 2026)' },
  'a100-80gb': { usdPerHour: 1.39, description: 'NVIDIA A100 SXM 80 GB', source: 'RunPod, GPU Cloud pricing page, A100 SXM 80 GB pod (March 2026)' },
  l4: { usdPerHour: 0.7068, description: 'NVIDIA L4 24 GB (g2-standard-4: 1 L4, 4 vCPU, 16 GB)', source: 'Google Cloud, Compute Engine VM instance pricing, g2-standard-4 on-demand, us-central1' },
  'cpu-2core': { usdPerHour: 0.08925, description: '2 vCPU, 4 GiB (c7i.large)', source: 'AWS, Amazon EC2 On-Demand Pricing, c7i.large Linux, us-east-1' },
};

export const DEFAULT_DEVICE_PRESET = 'cpu-2core';

export interface DevicePrice {
  /** The preset's name, or 'custom' for a number. */
  name: string;
  usdPerHour: number;
  source?: string;
}

/** `--device-price`: a USD-per-hour number or a preset name ('cpu' is 'cpu-2core'); undefined gives the CPU preset. */
export function resolveDevicePrice(spec: string | undefined): DevicePrice {
  const key = spec === undefined || spec === 'cpu' ? DEFAULT_DEVICE_PRESET : spec.toLowerCase();
  const preset = DEVICE_PRESETS[key];
  if (preset) return { name: key, usdPerHour: preset.usdPerHour, source: preset.source };
  const n = Number(spec);
  if (spec !== undefined && spec.trim() !== '' && Number.isFinite(n) && n >= 0) return { name: 'custom', usdPerHour: n };
  throw new Error(`--device-price must be USD per hour or one of ${Object.keys(DEVICE_PRESETS).join(', ')} (got "${spec}")`);
}

/** API models to compare against, as "provider:model" ids of @pydantic/genai-prices: flagship and small models of each vendor. */
export const DEFAULT_API_MODELS = [
  'openai:gpt-6-sol',
  'openai:gpt-6-luna',
  'anthropic:claude-opus-5-5',
  'anthropic:claude-sonnet-5',
  'anthropic:claude-haiku-4-5',
  'google:gemini-3.1-pro-preview',
  'google:gemini-3.5-flash-lite',
];

/** What one API model would charge for a token mix. */
export interface ApiQuote {
  /** The id as asked, "provider:model". */
  id: string;
  provider: string;
  model: string;
  /** Display name from genai-prices; absent when the model is unknown. */
  name?: string;
  input_usd_per_million: number | null;
  /** Cached input (a prompt prefix the API has cached: its cache-read price; the input price where it has none). */
  cached_input_usd_per_million: number | null;
  output_usd_per_million: number | null;
  /** USD per million tokens of the mix (input and output together, cached input at its own price). */
  blended_usd_per_million: number | null;
  /** What the mix's requests would have cost on this API. */
  cost_usd: number | null;
  error?: string;
}

export interface TokenMix {
  requests: number;
  promptTokens: number;
  /** Of the prompt tokens, those a prefix cache held (priced as cache reads). */
  cachedTokens?: number;
  completionTokens: number;
}

/** A fallback request shape when nothing has been measured yet: 1000 tokens in, 250 out. */
const FALLBACK_MIX = { prompt: 1000, completion: 250 };

/**
 * Prices `mix` on an API model with genai-prices' calcPrice. Prices can be tiered by the size of a
 * single request's prompt, so the API is priced per average request (mean prompt and completion
 * tokens) and scaled by the number of requests; $/M input is that request's input price over its
 * prompt tokens, $/M output likewise. Cached prompt tokens are priced as the API prices reads of its own prompt
 * cache, so that a mix with prefix-cache hits is compared like with like. `at` picks date-dependent prices.
 */
export function quoteApi(id: string, mix: TokenMix, at: Date = new Date()): ApiQuote {
  const colon = id.indexOf(':');
  const provider = colon > 0 ? id.slice(0, colon) : '';
  const model = colon > 0 ? id.slice(colon + 1) : id;
  const empty = { id, provider, model, input_usd_per_million: null, cached_input_usd_per_million: null, output_usd_per_million: null, blended_usd_per_million: null, cost_usd: null };
  const measured = mix.requests > 0 && mix.promptTokens + mix.completionTokens > 0;
  const prompt = measured ? mix.promptTokens / mix.requests : FALLBACK_MIX.prompt;
  const completion = measured ? mix.completionTokens / mix.requests : FALLBACK_MIX.completion;
  const cached = measured ? Math.min(prompt, (mix.cachedTokens ?? 0) / mix.requests) : 0;
  const options = { ...(provider ? { providerId: provider } : {}), timestamp: at };
  let price, allCached, withCache;
  try {
    price = calcPrice({ input_tokens: prompt, output_tokens: completion }, model, options);
    allCached = calcPrice({ input_tokens: prompt, cache_read_tokens: prompt, output_tokens: 0 }, model, options);
    withCache = cached > 0 ? calcPrice({ input_tokens: prompt, cache_read_tokens: cached, output_tokens: completion }, model, options) : price;
  } catch (err) {
    return { ...empty, error: `genai-prices: ${(err as Error).message}` };
  }
  if (!price || !withCache) return { ...empty, error: 'no price found in @pydantic/genai-prices' };
  const perRequest = withCache.total_price;
  return {
    id,
    provider: price.provider.id,
    model: price.model.id,
    name: price.model.name,
    input_usd_per_million: prompt > 0 ? (price.input_price / prompt) * 1e6 : null,
    cached_input_usd_per_million: prompt > 0 && allCached ? (allCached.input_price / prompt) * 1e6 : null,
    output_usd_per_million: completion > 0 ? (price.output_price / completion) * 1e6 : null,
    blended_usd_per_million: (perRequest / (prompt + completion)) * 1e6,
    cost_usd: measured ? perRequest * mix.requests : null,
  };
}
