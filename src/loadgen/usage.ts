/** Figures of an OpenAI usage object that the bench reads beyond the token counts. */

/** usage.prompt_tokens_details.cached_tokens (OpenAI, vLLM, Tally: prompt tokens served from a prefix cache); undefined when absent. */
export function cachedTokensOf(usage: Record<string, unknown>): number | undefined {
  const details = usage.prompt_tokens_details as { cached_tokens?: unknown } | null | undefined;
  const n = details?.cached_tokens;
  return typeof n === 'number' && Number.isFinite(n) && n >= 0 ? n : undefined;
}
