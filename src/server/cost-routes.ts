import { Router, type Request, type Response } from 'express';
import { type CostReportOptions, meterCostReport, parseDuration } from '../meter/cost-report.ts';
import { type CostMeter, RING_SECONDS } from '../meter/meter.ts';
import { badRequest } from './errors.ts';

/** GET /v1/cost?window=15m[&models=provider:model,...][&target_tokens_per_month=N] */
export function costRouter(meter: CostMeter, options: CostReportOptions = {}): Router {
  const router = Router();
  router.get('/v1/cost', (req: Request, res: Response) => {
    const q = req.query as Record<string, unknown>;
    const windowText = q.window ?? '15m';
    const windowMs = typeof windowText === 'string' ? parseDuration(windowText) : undefined;
    if (windowMs === undefined) throw badRequest(`Invalid window "${String(windowText)}": use a number and a unit s, m, h or d, e.g. 15m.`, 'window', 'invalid_window');
    if (windowMs > RING_SECONDS * 1000) throw badRequest('The window may be at most 24h; `tally cost` reports longer periods from the ledger.', 'window', 'invalid_window');
    let apiModels = options.apiModels;
    if (q.models !== undefined) {
      if (typeof q.models !== 'string' || q.models.trim() === '') throw badRequest('models must be a comma-separated list of provider:model ids.', 'models', 'invalid_value');
      apiModels = q.models.split(',').map((s) => s.trim()).filter(Boolean);
    }
    let target = options.targetTokensPerMonth;
    if (q.target_tokens_per_month !== undefined) {
      target = Number(q.target_tokens_per_month);
      if (typeof q.target_tokens_per_month !== 'string' || !Number.isFinite(target) || target < 0) {
        throw badRequest('target_tokens_per_month must be a non-negative number.', 'target_tokens_per_month', 'invalid_value');
      }
    }
    res.json(meterCostReport(meter, windowMs, { apiModels, targetTokensPerMonth: target, telemetry: options.telemetry }));
  });
  return router;
}
