import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { pino, type Logger } from 'pino';
import { EngineClient } from '../engine/engine-client.ts';
import { DEFAULT_ENGINE_OPTIONS } from '../engine/engine-options.ts';
import { parseDevice, type AttentionMode, type DeviceSpec } from '../engine/session.ts';
import type { KvCacheDtype } from '../engine/paged-runner.ts';
import { EnginePool, type Engine } from '../engine/engine-pool.ts';
import { loadModelFolder } from '../model/folder.ts';
import { resolveModel } from '../model/resolve.ts';
import { TextTokenizer } from '../model/tokenizer.ts';
import { Ledger } from '../meter/ledger.ts';
import { CostMeter } from '../meter/meter.ts';
import type { RequestMeter } from '../meter/types.ts';
import { costRouter } from '../meter/cost-report.ts';
import { dashboardRouter } from '../dashboard/router.ts';
import { resolveDevicePrice } from '../meter/prices.ts';
import { Metrics, metricsHandler } from '../telemetry/metrics.ts';
import { DeviceTelemetry } from '../telemetry/device.ts';
import { createApp } from './app.ts';
import { KeyStore, loadApiKeys } from './api-keys.ts';
import { precisionOf } from '../model/quant.ts';
import { TenantLimiter } from './tenant-limits.ts';

export interface ServeOptions {
  model?: string;
  servedModelName?: string;
  host: string;
  port: number;
  device: string;
  /** One engine worker per device: a comma-separated list (see parseDeviceList). */
  devices?: string;
  threads?: number;
  spinWait?: boolean;
  maxNumSeqs?: number;
  maxNumBatchedTokens?: number;
  maxModelLen?: number;
  kvCacheTokens?: number;
  kvCacheGb?: number;
  kvCacheDtype?: KvCacheDtype;
  attention?: AttentionMode;
  maxQueue?: number;
  requestTimeoutSeconds?: number;
  apiKeys?: string[];
  /** Hashed keys with per-tenant limits (see api-keys.ts); also TALLY_API_KEYS_FILE. */
  apiKeysFile?: string;
  devicePrice?: string;
  powerPrice?: number;
  dataDir: string;
  logLevel: string;
  /** false: no cost meter, ledger or cost metrics (for measuring the meter's own overhead). */
  meter?: boolean;
  /** Seconds SIGTERM waits for requests in flight before cancelling them. */
  shutdownGraceSeconds?: number;
  /**
   * Seconds a connection may sit without progress (default 60): a request whose headers and body take longer
   * to arrive gets 408, a stream whose client reads nothing for this long is cancelled, and a socket with no
   * generation pending and no traffic is closed.
   */
  idleTimeoutSeconds?: number;
  /** Request bodies larger than this get 413 (default 4 MiB). */
  maxBodyBytes?: number;
  /** Connections beyond this are refused at accept (default 1024). */
  maxConnections?: number;
}

/**
 * `--devices`: one engine worker per entry, each a device (`cuda:1`, `cpu`) or a bare index of
 * --device's kind (`--device cuda --devices 0,1`); for the CPU, N entries are N CPU workers.
 */
export function parseDeviceList(device: string, devices: string | undefined): DeviceSpec[] {
  const base = parseDevice(device);
  if (!devices) return [base];
  return devices.split(',').map((item) => {
    const entry = item.trim();
    if (/^\d+$/.test(entry)) return base.kind === 'cuda' || base.kind === 'auto' ? parseDevice(`cuda:${entry}`) : base;
    return parseDevice(entry);
  });
}

export interface RunningServer {
  url: string;
  server: http.Server;
  engine: Engine;
  meter: CostMeter;
  logger: Logger;
  /** Stops admitting, lets requests in flight finish (up to the grace period), flushes the ledger. */
  shutdown(graceSeconds?: number): Promise<void>;
}

const UNMETERED: RequestMeter = {
  requestFinished: (r) => ({ device_seconds: { prefill: r.prefillSeconds, decode: r.decodeSeconds }, usd: { usage: 0, allocation: 0 }, device_price_usd_per_hour: 0 }),
  requestRejected: () => {},
};

export async function startServer(options: ServeOptions, logger: Logger = pino({ level: options.logLevel })): Promise<RunningServer> {
  const model = resolveModel(options.model, (msg) => logger.info(msg));
  const folder = loadModelFolder(model.dir);
  const modelName = options.servedModelName ?? model.name;
  const price = resolveDevicePrice(options.devicePrice);
  const apiKeys = loadApiKeys(options.apiKeys, process.env.TALLY_API_KEYS);
  const apiKeysFile = options.apiKeysFile ?? (process.env.TALLY_API_KEYS_FILE || undefined);
  const keys = new KeyStore(apiKeys, apiKeysFile, (err) => logger.error({ err: err.message }, 'the API keys file no longer parses; keeping the keys loaded before'));
  if (apiKeysFile) logger.info({ file: apiKeysFile, keys: keys.entries().length - apiKeys.size }, 'API keys file');
  const idleMs = (options.idleTimeoutSeconds ?? 60) * 1000;

  const devices = parseDeviceList(options.device, options.devices);
  const engineOptions = {
    modelDir: folder.dir,
    device: devices[0],
    threads: options.threads,
    spinWait: options.spinWait,
    maxNumSeqs: options.maxNumSeqs ?? DEFAULT_ENGINE_OPTIONS.maxNumSeqs,
    maxNumBatchedTokens: options.maxNumBatchedTokens ?? DEFAULT_ENGINE_OPTIONS.maxNumBatchedTokens,
    maxModelLen: options.maxModelLen,
    kvCacheTokens: options.kvCacheTokens,
    kvCacheBytes: options.kvCacheGb !== undefined ? options.kvCacheGb * 2 ** 30 : DEFAULT_ENGINE_OPTIONS.kvCacheBytes,
    kvCacheDtype: options.kvCacheDtype,
    attention: options.attention,
  };
  const engine: Engine = devices.length > 1 ? await EnginePool.start(engineOptions, devices) : await EngineClient.start(engineOptions);
  if (engine.info.deviceNote) logger.warn(engine.info.deviceNote);
  logger.info({ model: modelName, dir: folder.dir, device: engine.info.device, runner: engine.info.runner, threads: engine.info.threads, kvCacheDtype: engine.info.kvCacheDtype, limits: engine.info.limits }, 'model loaded');

  const ledger = new Ledger(options.dataDir);
  const metrics = new Metrics();
  const meter = new CostMeter({ devicePriceUsdPerHour: price.usdPerHour, devices: devices.length, devicesPerStep: 1, powerPriceUsdPerKwh: options.powerPrice, ledger, metrics, model: modelName, precision: precisionOf(folder.config) });
  const telemetry = new DeviceTelemetry({ engineDevice: engine.info.device });
  if (options.meter !== false) telemetry.onPower((watts) => meter.observePower(watts));
  const firstSample = await telemetry.start();
  metrics.setTelemetrySource(() => telemetry.latest());
  logger.info({ source: firstSample.source, devices: firstSample.devices.map((d) => d.name), notes: firstSample.notes }, 'device telemetry');
  const metering = options.meter !== false;
  if (metering) engine.on('step', (record) => meter.observeStep(record));
  engine.on('restart', (why) => logger.error({ why }, 'engine worker restarted'));
  // Budgets count what each tenant has spent so far, on the usage basis, from the ledger.
  const tenantLimiter = new TenantLimiter(
    (tenant) => keys.policy(tenant),
    ledger.query({ by: 'tenant' }).map((row) => [row.key, row.usdUsage] as [string, number]),
  );

  const app = createApp({
    engine,
    tokenizer: TextTokenizer.load(folder.dir),
    folder,
    modelName,
    meter: metering ? meter : UNMETERED,
    logger,
    apiKeys,
    keys,
    tenantLimiter,
    limits: {
      maxQueue: options.maxQueue ?? 256,
      requestTimeoutMs: (options.requestTimeoutSeconds ?? 600) * 1000,
      maxBodyBytes: options.maxBodyBytes ?? 4 * 2 ** 20,
      maxN: 16,
      maxStop: 16,
      maxLogprobs: 20,
      streamStallTimeoutMs: idleMs,
    },
    mount: (express) => {
      express.get('/metrics', metricsHandler(metrics));
      express.use(costRouter(meter, { telemetry: () => telemetry.latest() }));
      express.use(dashboardRouter({ meter, metrics, ledger, telemetry: () => telemetry.latest() }));
    },
  });

  const server = createHttpServer(app, { idleMs, maxConnections: options.maxConnections ?? 1024 });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${host}:${address.port}`;
  logger.info({ url, price_usd_per_hour: price.usdPerHour, price_preset: price.name }, 'serving');

  let closed = false;
  const shutdown = async (graceSeconds = options.shutdownGraceSeconds ?? 30) => {
    if (closed) return;
    closed = true;
    app.locals.setDraining?.(true);
    server.close();
    const waitIdle = async (ms: number) => {
      const deadline = Date.now() + ms;
      while (engine.inFlight > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    };
    await waitIdle(graceSeconds * 1000);
    if (engine.inFlight > 0) {
      logger.warn({ inFlight: engine.inFlight }, 'grace period over: cancelling requests in flight');
      // Cancelled at the engine's next step; each reaches the ledger as cancelled and its client gets a 503.
      engine.cancelAll();
      await waitIdle(5000);
    }
    // Whatever is still in flight ends with an error event (and its ledger row) here.
    await engine.close();
    // Let the responses just finished reach their sockets before the connections go.
    await new Promise((r) => setTimeout(r, 50));
    server.closeAllConnections();
    telemetry.stop();
    meter.flush();
    ledger.close();
    logger.info('stopped');
  };
  return { url, server, engine, meter, logger, shutdown };
}

/**
 * The HTTP server and its timeouts. Node's own: headers and body must arrive within `idleMs` (408 otherwise;
 * checked every second), idle keep-alive connections close after 65 s (more than the 60 s of common load
 * balancers), TCP keep-alive probes find half-open peers. Socket inactivity past `idleMs` closes the
 * connection unless a generation is still running on it (its own request timeout governs that; a stream whose
 * client stops reading is handled by SseStream).
 */
export function createHttpServer(app: http.RequestListener, opts: { idleMs: number; maxConnections: number }): http.Server {
  const server = http.createServer(
    { keepAlive: true, keepAliveInitialDelay: 30_000, connectionsCheckingInterval: Math.min(1000, opts.idleMs), requestTimeout: opts.idleMs, headersTimeout: opts.idleMs },
    app,
  );
  server.keepAliveTimeout = 65_000;
  server.maxConnections = opts.maxConnections;
  const responses = new WeakMap<object, http.ServerResponse>();
  server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => responses.set(req.socket, res));
  server.setTimeout(opts.idleMs, (socket) => {
    const res = responses.get(socket);
    if (res && !res.writableEnded && !res.destroyed) socket.setTimeout(opts.idleMs);
    else socket.destroy();
  });
  return server;
}

/** `tally serve`: runs until SIGTERM or SIGINT, then shuts down gracefully and exits 0. */
export async function runServer(options: ServeOptions): Promise<void> {
  const logger = pino({ level: options.logLevel });
  let running: RunningServer;
  try {
    running = await startServer(options, logger);
  } catch (err) {
    logger.fatal((err as Error).message);
    process.exit(1);
  }
  const stop = (signal: string) => {
    logger.info({ signal }, 'shutting down');
    running.shutdown().then(
      () => process.exit(0),
      (err) => {
        logger.error(err, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
}
