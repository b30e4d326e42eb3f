/**
 * Per-tenant admission: token buckets for requests and tokens per minute, and an all-time USD budget.
 *
 * Buckets hold up to one minute's allowance and refill continuously. A generation takes 1 request and
 * prompt + Σ max_tokens tokens at admission; when it ends, the tokens it did not use (prompt + completion
 * is what it used) go back. Budget: the tenant's spend on the ledger's usage basis (busy device-seconds ×
 * price) at start-up, plus the usage cost of every request that ends since; once spend ≥ budget_usd the
 * tenant's generations are refused with 429 insufficient_quota. Requests admitted before the budget was
 * crossed run to the end, so the overshoot is at most what the tenant had in flight.
 */
import type { TenantPolicy } from './api-keys.ts';
import { ApiError } from './errors.ts';

class Bucket {
  level: number;
  constructor(
    readonly capacity: number,
    private last: number,
  ) {
    this.level = capacity;
  }

  refill(now: number): void {
    if (now > this.last) this.level = Math.min(this.capacity, this.level + ((now - this.last) / 60_000) * this.capacity);
    this.last = now;
  }

  /** ms until `n` is available (0 if it is). */
  waitMs(n: number): number {
    return this.level >= n ? 0 : ((n - this.level) / this.capacity) * 60_000;
  }
}

interface TenantState {
  requests?: Bucket;
  tokens?: Bucket;
  spentUsd: number;
}

export interface Reservation {
  tenant: string;
  tokens: number;
}

const retryAfter = (ms: number) => ({ 'Retry-After': String(Math.max(1, Math.ceil(ms / 1000))) });

export class TenantLimiter {
  private readonly tenants = new Map<string, TenantState>();

  constructor(
    private readonly policyOf: (tenant: string) => TenantPolicy | undefined,
    spentAtStart: Iterable<[string, number]> = [],
    private readonly clock: () => number = Date.now,
  ) {
    for (const [tenant, usd] of spentAtStart) this.state(tenant).spentUsd = usd;
  }

  private state(tenant: string): TenantState {
    let s = this.tenants.get(tenant);
    if (!s) this.tenants.set(tenant, (s = { spentUsd: 0 }));
    return s;
  }

  /** A bucket matching the policy's current rate (a changed limit starts a new bucket, no fuller than the old). */
  private bucket(s: TenantState, which: 'requests' | 'tokens', perMinute: number | undefined, now: number): Bucket | undefined {
    if (perMinute === undefined) return (s[which] = undefined);
    let b = s[which];
    if (!b || b.capacity !== perMinute) {
      const old = b;
      b = new Bucket(perMinute, now);
      if (old) b.level = Math.min(perMinute, old.level);
      s[which] = b;
    }
    b.refill(now);
    return b;
  }

  spentUsd(tenant: string): number {
    return this.tenants.get(tenant)?.spentUsd ?? 0;
  }

  /** Throws 429 if the tenant is over budget or out of requests or tokens; else takes them. */
  admit(tenant: string, tokens: number): Reservation {
    const policy = this.policyOf(tenant);
    if (!policy) return { tenant, tokens: 0 };
    const s = this.state(tenant);
    if (policy.budgetUsd !== undefined && s.spentUsd >= policy.budgetUsd) {
      throw new ApiError(
        429,
        `The budget of this API key (${policy.budgetUsd} USD) is spent: it has used ${s.spentUsd.toFixed(6)} USD. Ask the server's operator to raise budget_usd.`,
        'insufficient_quota',
        null,
        'budget_exceeded',
      );
    }
    const now = this.clock();
    const requests = this.bucket(s, 'requests', policy.rpm, now);
    const tokenBucket = this.bucket(s, 'tokens', policy.tpm, now);
    if (tokenBucket && tokens > tokenBucket.capacity) {
      throw new ApiError(
        429,
        `Request too large: it may use ${tokens} tokens (prompt + max_tokens) and this API key is limited to ${tokenBucket.capacity} tokens per minute. Lower max_tokens or shorten the prompt.`,
        'rate_limit_exceeded',
        null,
        'rate_limit_exceeded',
      );
    }
    const waitRequests = requests?.waitMs(1) ?? 0;
    const waitTokens = tokenBucket?.waitMs(tokens) ?? 0;
    if (waitRequests > 0) {
      throw new ApiError(429, `Rate limit reached: this API key is limited to ${policy.rpm} requests per minute.`, 'rate_limit_exceeded', null, 'rate_limit_exceeded', retryAfter(Math.max(waitRequests, waitTokens)));
    }
    if (waitTokens > 0) {
      throw new ApiError(
        429,
        `Rate limit reached: this API key is limited to ${policy.tpm} tokens per minute (this request reserves ${tokens}: prompt + max_tokens).`,
        'rate_limit_exceeded',
        null,
        'rate_limit_exceeded',
        retryAfter(waitTokens),
      );
    }
    if (requests) requests.level -= 1;
    if (tokenBucket) tokenBucket.level -= tokens;
    return { tenant, tokens: tokenBucket ? tokens : 0 };
  }

  /** The request ended: give back the tokens it did not use and add its cost to the tenant's spend. */
  settle(reservation: Reservation, usedTokens: number, usd: number): void {
    const s = this.state(reservation.tenant);
    if (Number.isFinite(usd) && usd > 0) s.spentUsd += usd;
    const b = s.tokens;
    if (b && reservation.tokens > 0) {
      b.refill(this.clock());
      b.level = Math.min(b.capacity, b.level + (reservation.tokens - usedTokens));
    }
  }
}
