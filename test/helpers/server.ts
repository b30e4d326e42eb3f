/** Starts an engine and the API on 127.0.0.1 with an in-memory meter and captured logs, for tests. */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { BroadcastChannel } from 'node:worker_threads';
import pino, { type Logger } from 'pino';
import { resolveServeConfig, type ServeConfig } from '../../src/config/serve-config.ts';
import { EngineClient } from '../../src/engine/client/engine-client.ts';
import type { EngineOptions } from '../../src/engine/protocol.ts';
import { type RunningServer, startServer } from '../../src/server/start.ts';
import { FAULT_CHANNEL, type WorkerFault } from './fault-worker.ts';
import { loadModelFolder } from '../../src/model/folder.ts';
import { TextTokenizer } from '../../src/model/tokenizer.ts';
import type { CostReport, FinishedRequest, RequestMeter } from '../../src/meter/types.ts';
import { createApp, ServerLifecycle, type ServerLimits } from '../../src/server/app.ts';
import type { ServerContext } from '../../src/server/context.ts';

/** A stand-in for the real meter: device seconds at a fixed price, everything recorded. */
export class TestMeter implements RequestMeter {
  static readonly USD_PER_HOUR = 3.6;
  readonly finished: FinishedRequest[] = [];
  readonly rejected: { model: string; tenant: string; status: number }[] = [];

  requestFinished(request: FinishedRequest): CostReport {
    this.finished.push(request);
    const usd = ((request.prefillSeconds + request.decodeSeconds) * TestMeter.USD_PER_HOUR) / 3600;
    return {
      device_seconds: { prefill: request.prefillSeconds, decode: request.decodeSeconds },
      usd: { usage: usd, allocation: usd },
      device_price_usd_per_hour: TestMeter.USD_PER_HOUR,
    };
  }

  requestRejected(model: string, tenant: string, status: number): void {
    this.rejected.push({ model, tenant, status });
  }
}

export const TEST_LIMITS: ServerLimits = {
  maxQueue: 64,
  requestTimeoutMs: 60_000,
  maxBodyBytes: 1 << 20,
  maxN: 8,
  maxStop: 4,
  maxLogprobs: 20,
  streamStallTimeoutMs: 30_000,
};

export interface TestServer {
  url: string;
  engine: EngineClient;
  tokenizer: TextTokenizer;
  meter: TestMeter;
  /** Parsed pino lines. */
  logs: Record<string, unknown>[];
  modelName: string;
  setDraining(draining: boolean): void;
  close(): Promise<void>;
}

export async function startTestServer(opts: {
  modelDir: string;
  apiKeys?: Map<string, string>;
  limits?: Partial<ServerLimits>;
  engine?: Partial<EngineOptions>;
  /** What the app gets instead of the engine client (fault injection); the real one is still returned and closed. */
  wrapEngine?: (engine: EngineClient) => EngineClient;
  toolCallParser?: ServerContext['toolCallParser'];
}): Promise<TestServer> {
  const engine = await EngineClient.start({
    modelDir: opts.modelDir,
    device: { kind: 'cpu' },
    maxNumSeqs: 16,
    maxNumBatchedTokens: 512,
    kvCacheBytes: 256 * 2 ** 20,
    ...opts.engine,
  });
  const folder = loadModelFolder(opts.modelDir);
  const tokenizer = TextTokenizer.load(folder.dir);
  const meter = new TestMeter();
  const logs: Record<string, unknown>[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line)) });
  const lifecycle = new ServerLifecycle();
  const app = createApp({
    engine: opts.wrapEngine ? opts.wrapEngine(engine) : engine,
    tokenizer, folder, modelName: folder.name, meter, logger, apiKeys: opts.apiKeys, lifecycle, toolCallParser: opts.toolCallParser,
    limits: { ...TEST_LIMITS, ...opts.limits },
  });
  const server = http.createServer(app);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    engine,
    tokenizer,
    meter,
    logs,
    modelName: folder.name,
    setDraining: (draining) => {
      lifecycle.draining = draining;
    },
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await engine.close();
    },
  };
}

/** The engine worker entry that takes injected faults (see fault-worker.ts). */
export const FAULT_WORKER = new URL('./fault-worker-entry.js', import.meta.url);

/** Breaks the engine worker started from FAULT_WORKER (every such worker in this process). */
export function injectFault(fault: WorkerFault): void {
  const channel = new BroadcastChannel(FAULT_CHANNEL);
  channel.postMessage(fault);
  channel.close();
}

/** A real server (startServer) from configuration overrides, as `tally serve` with those flags would start it. */
export function startServerWith(overrides: Partial<ServeConfig>, logger?: Logger, engineWorker?: URL): Promise<RunningServer> {
  return startServer(resolveServeConfig({}, {}, overrides), { logger, engineWorker });
}
