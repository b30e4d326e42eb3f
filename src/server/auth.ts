/** Bearer API keys, compared in constant time; the request carries the key's tenant name, never the key. */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { NextFunction, Request, Response } from 'express';
import type { RequestLocals } from './context.ts';
import { ApiError } from './errors.ts';

export const ANONYMOUS = 'anonymous';

const digest = (key: string): Buffer => createHash('sha256').update(key, 'utf8').digest();

/** Middleware that resolves res.locals.tenant; with no keys configured every request is anonymous. */
export function authenticate(apiKeys: Map<string, string> | undefined) {
  const keys = [...(apiKeys ?? new Map<string, string>())].map(([key, tenant]) => ({ digest: digest(key), tenant }));
  return (req: Request, res: Response, next: NextFunction): void => {
    const locals = res.locals as RequestLocals;
    if (keys.length === 0) {
      locals.tenant = ANONYMOUS;
      return next();
    }
    const match = /^Bearer\s+(\S+)\s*$/i.exec(req.get('authorization') ?? '');
    if (!match) {
      throw new ApiError(401, 'You didn\'t provide an API key. Send it as "Authorization: Bearer KEY".', 'invalid_request_error', null, 'invalid_api_key');
    }
    const given = digest(match[1]);
    let tenant: string | undefined;
    // Every key is compared, so that the time taken does not tell which one was close.
    for (const k of keys) if (timingSafeEqual(given, k.digest)) tenant ??= k.tenant;
    if (tenant === undefined) throw new ApiError(401, 'Incorrect API key provided.', 'invalid_request_error', null, 'invalid_api_key');
    locals.tenant = tenant;
    next();
  };
}
