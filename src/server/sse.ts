/** Server-sent events as OpenAI streams them: `data: {json}\n\n` per chunk, then `data: [DONE]`. */
import type { Response } from 'express';

export class SseStream {
  constructor(private readonly res: Response) {}

  open(): void {
    this.res.status(200).set({
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache',
      Connection: 'keep-alive',
      'X-Accel-Buffering': 'no',
    });
    this.res.flushHeaders();
  }

  get closed(): boolean {
    return this.res.writableEnded || this.res.destroyed;
  }

  /** Writes one event now (no buffering, no compression), unless the stream has ended. */
  send(data: unknown): void {
    if (!this.closed) this.res.write(`data: ${JSON.stringify(data)}\n\n`);
  }

  end(): void {
    if (this.closed) return;
    this.res.write('data: [DONE]\n\n');
    this.res.end();
  }
}
