/**
 * Starting and stopping a whole server: resolves the model, starts the engine worker(s), the meter, the ledger
 * and telemetry, mounts them on the HTTP API (app.ts) and listens; shuts it all down gracefully on SIGTERM.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { deviceList, engineOptionsOf, explainEngineError, type ServeConfig } from '../config/serve-config.ts';
import { ENGINE_WORKER, EngineClient } from '../engine/client/engine-client.ts';
import type { EngineHandle } from '../engine/client/engine-handle.ts';
import { EnginePool } from '../engine/client/engine-pool.ts';
import { loadModelFolder } from '../model/folder.ts';
import { resolveModelOrPull } from '../model/resolve.ts';
import { TextTokenizer } from '../model/tokenizer.ts';
import { Ledger } from '../meter/ledger.ts';
import { CostMeter } from '../meter/meter.ts';
import type { RequestMeter } from '../meter/types.ts';
import { resolveDevicePrice } from '../meter/prices.ts';
import { dashboardRouter } from '../dashboard/router.ts';
import { Metrics, metricsHandler } from '../telemetry/metrics.ts';
import { DeviceTelemetry } from '../telemetry/device.ts';
import { createApp, ServerLifecycle } from './app.ts';
import { KeyStore, loadApiKeys } from './api-keys.ts';
import { costRouter } from './cost-routes.ts';
import { createLogger } from './logger.ts';
import { precisionOf } from '../model/quant.ts';
import { TenantLimiter } from './tenant-limits.ts';

/** What a server is started with besides its configuration. */
export interface ServerDeps {
  logger?: Logger;
  /** The engine worker's entry module (tests run one that can inject faults). */
  engineWorker?: URL;
}

export interface RunningServer {
  url: string;
  server: http.Server;
  engine: EngineHandle;
  meter: CostMeter;
  logger: Logger;
  /** Stops admitting, lets requests in flight finish (up to the grace period), flushes the ledger. */
  shutdown(graceSeconds?: number): Promise<void>;
}

const UNMETERED: RequestMeter = {
  requestFinished: (r) => ({ device_seconds: { prefill: r.prefillSeconds, decode: r.decodeSeconds }, usd: { usage: 0, allocation: 0 }, device_price_usd_per_hour: 0 }),
  requestRejected: () => {},
};

export async function startServer(config: ServeConfig, deps: ServerDeps = {}): Promise<RunningServer> {
  const logger = deps.logger ?? createLogger(config.logLevel, config.logFormat);
  const model = await resolveModelOrPull(config.model, (msg) => logger.info(msg));
  const folder = loadModelFolder(model.dir);
  const modelName = config.servedModelName ?? model.name;
  const price = resolveDevicePrice(config.devicePrice);
  const apiKeys = loadApiKeys(config.apiKeys);
  const keys = new KeyStore(apiKeys, config.apiKeysFile, (err) => logger.error({ err: err.message }, 'the API keys file no longer parses; keeping the keys loaded before'));
  if (config.apiKeysFile) logger.info({ file: config.apiKeysFile, keys: keys.entries().length - apiKeys.size }, 'API keys file');
  const idleMs = config.idleTimeoutSeconds * 1000;

  const devices = deviceList(config);
  const engineOptions = engineOptionsOf(config, folder.dir, devices[0]);
  const worker = deps.engineWorker ?? ENGINE_WORKER;
  let engine: EngineHandle;
  try {
    engine = devices.length > 1 ? await EnginePool.start(engineOptions, devices, worker) : await EngineClient.start(engineOptions, worker);
  } catch (err) {
    throw explainEngineError(err);
  }
  if (engine.info.deviceNote) logger.warn(engine.info.deviceNote);
  logger.info({ model: modelName, dir: folder.dir, device: engine.info.device, runner: engine.info.runner, threads: engine.info.threads, kvCacheDtype: engine.info.kvCacheDtype, prefixCache: engine.info.prefixCache, limits: engine.info.limits }, 'model loaded');

  const ledger = new Ledger(config.dataDir);
  const metrics = new Metrics();
  const meter = new CostMeter({ devicePriceUsdPerHour: price.usdPerHour, devices: devices.length, devicesPerStep: 1, powerPriceUsdPerKwh: config.powerPrice, ledger, metrics, model: modelName, precision: precisionOf(folder.config) });
  const telemetry = new DeviceTelemetry({ engineDevice: engine.info.device });
  const metering = !config.noMeter;
  if (metering) telemetry.onPower((watts) => meter.observePower(watts));
  const firstSample = await telemetry.start();
  metrics.setTelemetrySource(() => telemetry.latest());
  logger.info({ source: firstSample.source, devices: firstSample.devices.map((d) => d.name), notes: firstSample.notes }, 'device telemetry');
  if (metering) engine.on('step', (record) => meter.observeStep(record));
  engine.on('restart', (why) => logger.error({ why }, 'engine worker restarted'));
  // Budgets count what each tenant has spent so far, on the usage basis, from the ledger.
  const tenantLimiter = new TenantLimiter(
    (tenant) => keys.policy(tenant),
    ledger.query({ by: 'tenant' }).map((row) => [row.key, row.usdUsage] as [string, number]),
  );

  const lifecycle = new ServerLifecycle();
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
    lifecycle,
    toolCallParser: config.toolCallParser,
    limits: {
      maxQueue: config.maxQueue,
      requestTimeoutMs: config.requestTimeoutSeconds * 1000,
      maxBodyBytes: config.maxBodyBytes,
      streamStallTimeoutMs: idleMs,
    },
    mount: (express) => {
      express.get('/metrics', metricsHandler(metrics));
      express.use(costRouter(meter, { telemetry: () => telemetry.latest() }));
      express.use(dashboardRouter({ meter, metrics, ledger, telemetry: () => telemetry.latest() }));
    },
  });

  const server = createHttpServer(app, { idleMs, maxConnections: config.maxConnections });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.port, config.host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${host}:${address.port}`;
  logger.info({ url, price_usd_per_hour: price.usdPerHour, price_preset: price.name }, 'serving');

  let closed = false;
  const shutdown = async (graceSeconds = config.shutdownGraceSeconds) => {
    if (closed) return;
    closed = true;
    lifecycle.draining = true;
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

/**
 * `tally serve`: runs until SIGTERM or SIGINT, then shuts down gracefully and exits 0. A start that fails (no
 * model, CUDA missing, an option the model cannot take) is one line on stderr and exit code 1.
 */
export async function runServer(config: ServeConfig): Promise<void> {
  const logger = createLogger(config.logLevel, config.logFormat);
  let running: RunningServer;
  try {
    running = await startServer(config, { logger });
  } catch (err) {
    logger.flush();
    process.stderr.write(`tally serve: ${(err as Error).message}\n`);
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
