/**
 * Server-sent events as OpenAI streams them: `data: {json}\n\n` per chunk, then `data: [DONE]`.
 *
 * Backpressure: once the socket stops taking data (a write returns false), events are held in a queue of
 * at most `maxBufferedBytes` and written together on 'drain'. A client that does not read for
 * `stallTimeoutMs`, or lets the queue grow past its bound, gets `onStall` (the caller cancels the generation
 * and closes the connection), so a reader that never reads costs a bounded amount of memory.
 */
import type { Socket } from 'node:net';
import type { Response } from 'express';

export interface SseOptions {
  maxBufferedBytes: number;
  stallTimeoutMs: number;
  onStall: (reason: string, bufferedBytes: number) => void;
}

export class SseStream {
  private queue: string[] = [];
  private queuedBytes = 0;
  private blocked = false;
  private ending = false;
  private stalled = false;
  private stallTimer?: NodeJS.Timeout;
  /** Set while events go straight to the socket in chunks framed here (see open). */
  private socket?: Socket;
  /** Most bytes held at once, ours plus the socket's writable buffer. */
  peakBufferedBytes = 0;

  constructor(
    private readonly res: Response,
    private readonly options: SseOptions,
  ) {
    res.once('close', () => {
      clearTimeout(this.stallTimer);
      this.stallTimer = undefined;
    });
  }

  open(): void {
    this.res.status(200).set({
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache',
      Connection: 'keep-alive',
      'X-Accel-Buffering': 'no',
    });
    this.res.flushHeaders();
    // A chunked response's events go to the socket as whole chunks, one write each. Node's res.write corks the
    // socket and writes the chunk's size line, data and CRLF as a writev on the next tick, which costs the main
    // thread more per event. The last chunk and the terminator still go through res.end.
    if (this.res.chunkedEncoding && this.res.socket) this.socket = this.res.socket;
  }

  get closed(): boolean {
    return this.ending || this.stalled || this.res.writableEnded || this.res.destroyed || this.socket?.destroyed === true;
  }

  /** Bytes waiting: ours plus the socket's. */
  get bufferedBytes(): number {
    return this.queuedBytes + (this.socket ?? this.res).writableLength;
  }

  /** Writes one event now, or queues it while the client is not reading; nothing after the stream ended. */
  send(data: unknown): void {
    if (!this.closed) this.sendJson(JSON.stringify(data));
  }

  /** As send, for data already serialized. */
  sendJson(json: string): void {
    if (this.closed) return;
    this.write(`data: ${json}\n\n`);
  }

  private write(chunk: string): void {
    if (this.blocked) {
      this.queue.push(chunk);
      this.queuedBytes += Buffer.byteLength(chunk);
      this.track();
      if (this.queuedBytes > this.options.maxBufferedBytes) {
        this.stall(`the client is not reading: more than ${this.options.maxBufferedBytes} bytes of events are waiting`);
      }
      return;
    }
    const ok = this.put(chunk);
    this.track();
    if (!ok) this.block();
  }

  /** Writes a chunk of the body; false once the socket holds more than it wants. */
  private put(chunk: string): boolean {
    if (!this.socket) return this.res.write(chunk);
    return this.socket.write(`${Buffer.byteLength(chunk).toString(16)}\r\n${chunk}\r\n`);
  }

  private track(): void {
    this.peakBufferedBytes = Math.max(this.peakBufferedBytes, this.bufferedBytes);
  }

  private block(): void {
    this.blocked = true;
    (this.socket ?? this.res).once('drain', this.drained);
    this.stallTimer ??= setTimeout(
      () => this.stall(`the client read nothing for ${this.options.stallTimeoutMs} ms`),
      this.options.stallTimeoutMs,
    );
  }

  private readonly drained = (): void => {
    clearTimeout(this.stallTimer);
    this.stallTimer = undefined;
    this.blocked = false;
    if (this.res.destroyed) return;
    const pending = this.queue.join('');
    this.queue = [];
    this.queuedBytes = 0;
    if (this.ending) {
      this.res.end(pending);
      return;
    }
    if (pending && !this.put(pending)) this.block();
  };

  private stall(reason: string): void {
    const bytes = this.bufferedBytes;
    this.stalled = true;
    clearTimeout(this.stallTimer);
    this.stallTimer = undefined;
    (this.socket ?? this.res).off('drain', this.drained);
    this.queue = [];
    this.queuedBytes = 0;
    this.options.onStall(reason, bytes);
  }

  end(): void {
    if (this.closed) return;
    if (this.blocked) {
      // Written on 'drain'; the stall timer still runs.
      this.queue.push('data: [DONE]\n\n');
      this.ending = true;
      return;
    }
    this.ending = true;
    this.res.end('data: [DONE]\n\n');
  }
}
