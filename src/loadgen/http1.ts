/**
 * The bench's HTTP/1.1 client: keep-alive connections over raw sockets (net, or tls for https), one
 * request at a time each, rather than node:http, whose client spends more CPU per streamed token
 * (its IncomingMessage stream machinery per chunk; bench/loadgen-client.ts measures the client) on a
 * machine the bench may share with the server it measures. Responses are framed by chunked encoding, Content-Length, or the connection's end (HTTP/1.0
 * and bodies with neither); a connection is kept only when its response was framed and neither side said
 * `Connection: close`. A pool that sees its server close kept-alive connections (idle, or under a new
 * request before any answer) twice before a single reused connection has answered stops reusing them:
 * against a server that closes after every response (llama.cpp's), a request on a reused connection
 * would otherwise pay a round trip for the reset before going out on a fresh one.
 */
import net from 'node:net';
import tls from 'node:tls';

export interface ResponseHead {
  status: number;
  /** Lower-case names; repeated headers joined with ", ". */
  headers: Record<string, string>;
}

export interface Exchange {
  onHead(head: ResponseHead): void;
  onBody(data: Buffer): void;
  /** The response ended as framed (or, for a close-delimited body, with the connection). */
  onEnd(): void;
  /**
   * The connection failed or closed before the response ended. `silent`: not a byte of the response
   * had arrived; `reused`: the connection had carried an earlier request.
   */
  onError(err: Error & { code?: string }, info: { silent: boolean; reused: boolean }): void;
}

const CRLF = Buffer.from('\r\n\r\n');
const LF = 0x0a;

/** One connection: writes a request, parses its response, and is given back to its pool when reusable. */
class Connection {
  readonly socket: net.Socket;
  served = 0;
  private exchange: Exchange | undefined;
  private bytes = 0;
  private head: Buffer | undefined;
  private inBody = false;
  private framing: 'chunked' | 'length' | 'close' = 'close';
  private keepAlive = false;
  private remaining = 0;
  private part: 'size' | 'data' | 'data-end' | 'trailer' = 'size';
  private line = '';
  closed = false;

  constructor(url: URL, private readonly pool: ConnectionPool) {
    const port = Number(url.port || (url.protocol === 'https:' ? 443 : 80));
    const host = url.hostname.replace(/^\[|\]$/g, '');
    this.socket = url.protocol === 'https:'
      ? tls.connect({ host, port, servername: net.isIP(host) ? undefined : host, ALPNProtocols: ['http/1.1'] })
      : net.connect({ host, port });
    this.socket.setNoDelay(true);
    this.socket.on('data', (data: Buffer) => this.onData(data));
    this.socket.on('error', (err) => this.onClose(err));
    this.socket.on('close', () => this.onClose());
    // A close-delimited body ends with the server's FIN; answer it with ours.
    this.socket.on('end', () => this.onClose());
  }

  send(request: Buffer, exchange: Exchange): void {
    this.exchange = exchange;
    this.bytes = 0;
    this.head = undefined;
    this.inBody = false;
    this.socket.write(request);
  }

  destroy(): void {
    this.closed = true;
    this.socket.destroy();
  }

  private onClose(err?: Error): void {
    const wasClosed = this.closed;
    this.closed = true;
    this.pool.forget(this);
    const ex = this.exchange;
    if (!ex) {
      if (!wasClosed) {
        if (this.served > 0) this.pool.serverClosed();
        this.socket.destroy();
      }
      return;
    }
    this.exchange = undefined;
    this.socket.destroy();
    // A close-delimited body ends with the server's orderly close; an error or our own abort cuts it short.
    if (this.inBody && this.framing === 'close' && !err && !wasClosed) return ex.onEnd();
    if (!wasClosed && this.bytes === 0 && this.served > 0) this.pool.serverClosed();
    const e: Error & { code?: string } = err ?? Object.assign(new Error(this.bytes === 0 ? 'socket hang up' : 'the connection closed mid-response'), { code: 'ECONNRESET' });
    ex.onError(e, { silent: this.bytes === 0, reused: this.served > 0 });
  }

  private onData(data: Buffer): void {
    if (!this.exchange) {
      // Bytes with no request outstanding: the connection is out of step; drop it.
      this.destroy();
      return;
    }
    this.bytes += data.length;
    let at = 0;
    while (at < data.length && this.exchange) {
      if (!this.inBody) at = this.readHead(data, at);
      else if (this.framing === 'chunked') at = this.readChunked(data, at);
      else if (this.framing === 'length') at = this.readFixed(data, at);
      else {
        this.exchange.onBody(at === 0 ? data : data.subarray(at));
        at = data.length;
      }
    }
  }

  private readHead(data: Buffer, at: number): number {
    const prev = this.head?.length ?? 0;
    const buf = prev ? Buffer.concat([this.head!, data.subarray(at)]) : data.subarray(at);
    const end = buf.indexOf(CRLF, Math.max(0, prev - 3));
    if (end < 0) {
      if (buf.length > 65536) return this.fail('response headers over 64 KiB');
      this.head = Buffer.from(buf);
      return data.length;
    }
    this.head = undefined;
    const lines = buf.toString('latin1', 0, end).split('\r\n');
    const m = /^HTTP\/1\.([01]) (\d{3})/.exec(lines[0]);
    if (!m) return this.fail(`not an HTTP/1.x response: ${JSON.stringify(lines[0].slice(0, 80))}`);
    const status = Number(m[2]);
    const headers: Record<string, string> = {};
    for (const l of lines.slice(1)) {
      const colon = l.indexOf(':');
      if (colon <= 0) continue;
      const name = l.slice(0, colon).trim().toLowerCase();
      const value = l.slice(colon + 1).trim();
      headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
    }
    const consumed = at + end + 4 - prev;
    if (status >= 100 && status < 200) return consumed;
    const connection = (headers.connection ?? '').toLowerCase();
    const http11 = m[1] === '1';
    this.keepAlive = http11 ? !connection.includes('close') : connection.includes('keep-alive');
    if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
      this.framing = 'chunked';
      this.part = 'size';
      this.line = '';
    } else if (headers['content-length'] !== undefined && /^\d+$/.test(headers['content-length'])) {
      this.framing = 'length';
      this.remaining = Number(headers['content-length']);
    } else {
      this.framing = 'close';
      this.keepAlive = false;
    }
    this.inBody = true;
    this.exchange!.onHead({ status, headers });
    if (this.framing === 'length' && this.remaining === 0) this.finish();
    return consumed;
  }

  private readFixed(data: Buffer, at: number): number {
    const n = Math.min(this.remaining, data.length - at);
    if (n > 0) this.exchange!.onBody(data.subarray(at, at + n));
    this.remaining -= n;
    if (this.remaining === 0) this.finish();
    return at + n;
  }

  private readChunked(data: Buffer, at: number): number {
    if (this.part === 'data') {
      const n = Math.min(this.remaining, data.length - at);
      this.exchange!.onBody(data.subarray(at, at + n));
      this.remaining -= n;
      if (this.remaining === 0) this.part = 'data-end';
      return at + n;
    }
    const nl = data.indexOf(LF, at);
    const stop = nl < 0 ? data.length : nl + 1;
    this.line += data.toString('latin1', at, stop);
    if (nl < 0) {
      if (this.line.length > 4096) return this.fail('a chunk-size line over 4 KiB');
      return stop;
    }
    const line = this.line.trimEnd();
    this.line = '';
    if (this.part === 'size') {
      const size = parseInt(line, 16);
      if (!Number.isFinite(size) || size < 0) return this.fail(`bad chunk-size line ${JSON.stringify(line.slice(0, 40))}`);
      this.remaining = size;
      this.part = size === 0 ? 'trailer' : 'data';
    } else if (this.part === 'data-end') {
      this.part = 'size';
    } else if (line === '') {
      this.finish();
    }
    return stop;
  }

  private fail(message: string): number {
    const ex = this.exchange;
    this.exchange = undefined;
    this.closed = true;
    this.pool.forget(this);
    this.socket.destroy();
    ex?.onError(Object.assign(new Error(message), { code: 'HPE_INVALID' }), { silent: false, reused: this.served > 0 });
    return Number.MAX_SAFE_INTEGER;
  }

  private finish(): void {
    const ex = this.exchange!;
    this.exchange = undefined;
    this.inBody = false;
    this.served++;
    if (this.served > 1) this.pool.reusedOk++;
    if (this.keepAlive && !this.closed) this.pool.release(this);
    else this.destroy();
    ex.onEnd();
  }
}

/** Keep-alive connections to one origin. */
export class ConnectionPool {
  private readonly idle: Connection[] = [];
  private readonly all = new Set<Connection>();
  private destroyed = false;
  /** Connections opened, and requests sent on a kept-alive one. */
  opened = 0;
  reused = 0;
  /** Responses that came back on a reused connection. */
  reusedOk = 0;
  /** Kept-alive connections the server closed: while idle, or under a request before any answer. */
  closedByServer = 0;
  /** False once the server has shown it does not keep connections: every request then opens one. */
  keepAlive = true;

  serverClosed(): void {
    this.closedByServer++;
    if (this.reusedOk === 0 && this.closedByServer >= 2) this.keepAlive = false;
  }

  private readonly url: URL;

  constructor(readonly origin: string) {
    this.url = new URL(origin);
  }

  /**
   * Sends a request: on an idle connection (most recently used first) unless `fresh`, else on a new one.
   * Returns a function that aborts it (destroys its connection).
   */
  request(path: string, method: string, headers: Record<string, string | number>, body: string | undefined, exchange: Exchange, fresh = false): () => void {
    let conn: Connection | undefined;
    if (!this.keepAlive) fresh = true;
    while (!fresh && !conn && this.idle.length > 0) {
      const c = this.idle.pop()!;
      if (!c.closed && !c.socket.destroyed && !c.socket.readableEnded) conn = c;
      else c.destroy();
    }
    if (!conn) {
      conn = new Connection(this.url, this);
      this.all.add(conn);
      this.opened++;
    } else this.reused++;
    const payload = body === undefined ? undefined : Buffer.from(body);
    let head = `${method} ${path} HTTP/1.1\r\nHost: ${this.url.host}\r\nConnection: keep-alive\r\n`;
    for (const [k, v] of Object.entries(headers)) head += `${k}: ${v}\r\n`;
    if (payload && !('content-length' in headers)) head += `content-length: ${payload.length}\r\n`;
    head += '\r\n';
    conn.send(payload ? Buffer.concat([Buffer.from(head, 'latin1'), payload]) : Buffer.from(head, 'latin1'), exchange);
    const c = conn;
    return () => c.destroy();
  }

  release(conn: Connection): void {
    if (this.destroyed || !this.keepAlive) conn.destroy();
    else this.idle.push(conn);
  }

  forget(conn: Connection): void {
    this.all.delete(conn);
    const i = this.idle.indexOf(conn);
    if (i >= 0) this.idle.splice(i, 1);
  }

  /** Closes every connection, idle or busy. */
  destroy(): void {
    this.destroyed = true;
    for (const c of [...this.all]) c.destroy();
    this.idle.length = 0;
  }
}
