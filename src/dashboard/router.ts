/**
 * The operator's dashboard, served by Tally itself:
 *
 *   GET /, /dashboard           the page (public/index.html)
 *   GET /v1/dashboard           one DashboardSnapshot (JSON); the page polls it every second
 *   GET /dashboard/assets/NAME  the page's script, formatter and style sheet, and Chart.js's UMD
 *                               build from node_modules (nothing is fetched from another origin)
 *
 * The snapshot carries costs and tenant names, so it lives under /v1, behind the API's keys like
 * /v1/cost (the app authenticates /v1 before mounted routes); the page asks for a key when it is
 * answered 401. The page and its assets hold no data and are public.
 */
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Router, type NextFunction, type Request, type Response } from 'express';
import { SnapshotSource, type DashboardSources } from './snapshot.ts';

export type DashboardOptions = DashboardSources;

/** Where the page finds its data. */
export const SNAPSHOT_PATH = '/v1/dashboard';

const PUBLIC = fileURLToPath(new URL('./public/', import.meta.url));
const CHART_JS = path.join(path.dirname(createRequire(import.meta.url).resolve('chart.js')), 'chart.umd.min.js');

/** The only files served under /dashboard/assets/. */
const ASSETS: Record<string, { file: string; type: string }> = {
  'app.js': { file: path.join(PUBLIC, 'app.js'), type: 'text/javascript; charset=utf-8' },
  'format.js': { file: path.join(PUBLIC, 'format.js'), type: 'text/javascript; charset=utf-8' },
  'dashboard.css': { file: path.join(PUBLIC, 'dashboard.css'), type: 'text/css; charset=utf-8' },
  'chart.umd.min.js': { file: CHART_JS, type: 'text/javascript; charset=utf-8' },
};

/** Same-origin everything: the page works offline and nothing it shows can be sent elsewhere. */
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

export function dashboardRouter(options: DashboardOptions): Router {
  const router = Router();
  const source = new SnapshotSource(options);

  const page = (_req: Request, res: Response, next: NextFunction) => {
    res.set({ 'Content-Security-Policy': CSP, 'Cache-Control': 'no-cache', 'X-Content-Type-Options': 'nosniff', 'Referrer-Policy': 'no-referrer' });
    res.type('html').sendFile(path.join(PUBLIC, 'index.html'), (err) => err && next(err));
  };
  router.get('/', page);
  router.get('/dashboard', page);

  router.get('/dashboard/assets/:name', (req: Request, res: Response, next: NextFunction) => {
    const asset = Object.hasOwn(ASSETS, req.params.name as string) ? ASSETS[req.params.name as string] : undefined;
    if (!asset) return next();
    res.set({ 'Content-Type': asset.type, 'Cache-Control': 'no-cache', 'X-Content-Type-Options': 'nosniff' });
    res.sendFile(asset.file, (err) => err && next(err));
  });

  router.get(SNAPSHOT_PATH, async (_req: Request, res: Response) => {
    res.set('Cache-Control', 'no-store');
    res.json(await source.snapshot());
  });
  return router;
}
