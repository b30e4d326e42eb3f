/** Bearer API keys, compared in constant time; the request carries the key's tenant name, never the key. */
import { timingSafeEqual } from 'node:crypto';
import type { NextFunction, Request, Response } from 'express';
import { keyDigest, KeyStore } from './api-keys.ts';
import type { RequestLocals } from './context.ts';
import { ApiError } from './errors.ts';

export const ANONYMOUS = 'anonymous';

/**
 * Middleware that resolves res.locals.tenant; with no keys configured every request is anonymous. Takes the
 * server's KeyStore, or plain keys (key → tenant name).
 */
export function authenticate(keys: KeyStore | Map<string, string> | undefined) {
  const store = keys instanceof KeyStore ? keys : new KeyStore(keys);
  return (req: Request, res: Response, next: NextFunction): void => {
    const locals = res.locals as RequestLocals;
    if (!store.enabled) {
      locals.tenant = ANONYMOUS;
      return next();
    }
    const match = /^Bearer\s+(\S+)\s*$/i.exec(req.get('authorization') ?? '');
    if (!match) {
      throw new ApiError(401, 'You didn\'t provide an API key. Send it as "Authorization: Bearer KEY".', 'invalid_request_error', null, 'invalid_api_key');
    }
    // Only the key's digest is compared, against every stored digest, so that neither the key's length nor
    // which entry was close shows in the time taken.
    const given = keyDigest(match[1]);
    let tenant: string | undefined;
    for (const k of store.entries()) if (timingSafeEqual(given, k.digest)) tenant ??= k.name;
    if (tenant === undefined) throw new ApiError(401, 'Incorrect API key provided.', 'invalid_request_error', null, 'invalid_api_key');
    locals.tenant = tenant;
    next();
  };
}
