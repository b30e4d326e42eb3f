/**
 * A small writer for the parts of onnx.proto that a decoder graph needs: ModelProto, GraphProto,
 * NodeProto, AttributeProto, TensorProto (inline or external data) and ValueInfoProto.
 */

export enum DataType {
  FLOAT = 1,
  UINT8 = 2,
  INT8 = 3,
  INT32 = 6,
  INT64 = 7,
  BOOL = 9,
  FLOAT16 = 10,
}

class ProtoWriter {
  private buf = new Uint8Array(1024);
  private len = 0;

  private ensure(n: number): void {
    if (this.len + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  varint(value: number | bigint): void {
    let v = BigInt.asUintN(64, BigInt(value));
    this.ensure(10);
    while (v >= 0x80n) {
      this.buf[this.len++] = Number(v & 0x7fn) | 0x80;
      v >>= 7n;
    }
    this.buf[this.len++] = Number(v);
  }

  tag(field: number, wire: 0 | 1 | 2 | 5): void {
    this.varint((field << 3) | wire);
  }

  bytes(field: number, data: Uint8Array): void {
    this.tag(field, 2);
    this.varint(data.length);
    this.ensure(data.length);
    this.buf.set(data, this.len);
    this.len += data.length;
  }

  string(field: number, s: string): void {
    this.bytes(field, new TextEncoder().encode(s));
  }

  int(field: number, v: number | bigint): void {
    this.tag(field, 0);
    this.varint(v);
  }

  float(field: number, v: number): void {
    this.tag(field, 5);
    this.ensure(4);
    new DataView(this.buf.buffer).setFloat32(this.len, v, true);
    this.len += 4;
  }

  message(field: number, write: (w: ProtoWriter) => void): void {
    const inner = new ProtoWriter();
    write(inner);
    this.bytes(field, inner.finish());
  }

  packedInts(field: number, values: readonly (number | bigint)[]): void {
    const inner = new ProtoWriter();
    for (const v of values) inner.varint(v);
    this.bytes(field, inner.finish());
  }

  packedFloats(field: number, values: readonly number[]): void {
    this.bytes(field, new Uint8Array(Float32Array.from(values).buffer));
  }

  finish(): Uint8Array {
    return this.buf.subarray(0, this.len);
  }
}

export type AttributeValue = number | string | number[] | string[] | { float: number } | { floats: number[] };

export interface NodeSpec {
  opType: string;
  inputs: string[];
  outputs: string[];
  name: string;
  domain?: string;
  attributes?: Record<string, AttributeValue>;
}

export interface ValueInfo {
  name: string;
  type: DataType;
  dims: (number | string)[];
}

export interface TensorSpec {
  name: string;
  type: DataType;
  dims: number[];
  /** Little-endian element bytes (empty when `external` says where they are). */
  raw: Uint8Array;
  /** Bytes already in an external data file (a graph that shares another graph's weights). */
  external?: ExternalRef;
  /** Bytes made only when the tensor is written (raw is then empty), so that a converter holds one at a time. */
  lazy?: LazyBytes;
}

export interface LazyBytes {
  length: number;
  read: () => Uint8Array;
}

export interface ExternalRef {
  location: string;
  offset: number;
  length: number;
}

export interface ModelSpec {
  graphName: string;
  nodes: NodeSpec[];
  inputs: ValueInfo[];
  outputs: ValueInfo[];
  initializers: TensorSpec[];
  opsets: { domain: string; version: number }[];
  metadata: Record<string, string>;
  /** Where initializers at or above this many bytes go; the caller writes the returned chunks there. */
  externalDataFile?: string;
  externalThresholdBytes?: number;
}

function writeAttribute(w: ProtoWriter, name: string, value: AttributeValue): void {
  w.string(1, name);
  if (typeof value === 'number') {
    if (!Number.isInteger(value)) throw new Error(`attribute ${name}: use { float } for non-integers`);
    w.int(3, value);
    w.int(20, 2);
  } else if (typeof value === 'string') {
    w.string(4, value);
    w.int(20, 3);
  } else if (Array.isArray(value)) {
    if (value.length > 0 && typeof value[0] === 'string') {
      for (const s of value as string[]) w.string(9, s);
      w.int(20, 8);
    } else {
      w.packedInts(8, value as number[]);
      w.int(20, 7);
    }
  } else if ('float' in value) {
    w.float(2, value.float);
    w.int(20, 1);
  } else {
    w.packedFloats(7, value.floats);
    w.int(20, 6);
  }
}

function writeValueInfo(w: ProtoWriter, v: ValueInfo): void {
  w.string(1, v.name);
  w.message(2, (type) =>
    type.message(1, (tensor) => {
      tensor.int(1, v.type);
      tensor.message(2, (shape) => {
        for (const d of v.dims) {
          shape.message(1, (dim) => (typeof d === 'number' ? dim.int(1, d) : dim.string(2, d)));
        }
      });
    }),
  );
}

/**
 * Serialises a model. Returns the .onnx bytes and, when externalDataFile is set, the chunks of
 * that file in order (each 64-byte aligned, as ONNX Runtime can then map them); a lazy tensor's chunk is
 * its LazyBytes, to be read when written.
 */
export function encodeModel(spec: ModelSpec): { model: Uint8Array; external: (Uint8Array | LazyBytes)[] } {
  const external: (Uint8Array | LazyBytes)[] = [];
  let externalOffset = 0;
  const threshold = spec.externalThresholdBytes ?? 1024;
  const w = new ProtoWriter();
  w.int(1, 10); // IR version 10 (ONNX 1.16+)
  w.string(2, 'tally');
  w.string(3, '0.1');
  w.message(7, (g) => {
    for (const n of spec.nodes) {
      g.message(1, (node) => {
        for (const i of n.inputs) node.string(1, i);
        for (const o of n.outputs) node.string(2, o);
        node.string(3, n.name);
        node.string(4, n.opType);
        for (const [k, v] of Object.entries(n.attributes ?? {})) node.message(5, (a) => writeAttribute(a, k, v));
        if (n.domain) node.string(7, n.domain);
      });
    }
    g.string(2, spec.graphName);
    for (const t of spec.initializers) {
      g.message(5, (tensor) => {
        tensor.packedInts(1, t.dims);
        tensor.int(2, t.type);
        tensor.string(8, t.name);
        const entry = (key: string, value: string) =>
          tensor.message(13, (kv) => {
            kv.string(1, key);
            kv.string(2, value);
          });
        if (t.external) {
          entry('location', t.external.location);
          entry('offset', String(t.external.offset));
          entry('length', String(t.external.length));
          tensor.int(14, 1);
        } else if (spec.externalDataFile && (t.lazy?.length ?? t.raw.length) >= threshold) {
          const length = t.lazy?.length ?? t.raw.length;
          const pad = (64 - (externalOffset % 64)) % 64;
          if (pad) external.push(new Uint8Array(pad));
          externalOffset += pad;
          entry('location', spec.externalDataFile);
          entry('offset', String(externalOffset));
          entry('length', String(length));
          tensor.int(14, 1);
          external.push(t.lazy ?? t.raw);
          externalOffset += length;
        } else {
          tensor.bytes(9, t.lazy ? readLazy(t.lazy, t.name) : t.raw);
        }
      });
    }
    for (const v of spec.inputs) g.message(11, (vi) => writeValueInfo(vi, v));
    for (const v of spec.outputs) g.message(12, (vi) => writeValueInfo(vi, v));
  });
  for (const o of spec.opsets) {
    w.message(8, (op) => {
      if (o.domain) op.string(1, o.domain);
      op.int(2, o.version);
    });
  }
  for (const [k, v] of Object.entries(spec.metadata)) {
    w.message(14, (kv) => {
      kv.string(1, k);
      kv.string(2, v);
    });
  }
  return { model: w.finish(), external };
}

/** A lazy tensor's bytes, checked against the length it promised. */
export function readLazy(lazy: LazyBytes, name = 'tensor'): Uint8Array {
  const bytes = lazy.read();
  if (bytes.length !== lazy.length) throw new Error(`${name}: ${bytes.length} bytes where ${lazy.length} were declared`);
  return bytes;
}

export function rawBytes(data: Float32Array | Int32Array | BigInt64Array | Uint16Array | Uint8Array): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** Reads a protobuf varint at `at`; returns [value, next offset]. */
function readVarint(buf: Uint8Array, at: number): [number, number] {
  let value = 0;
  let scale = 1;
  for (;;) {
    if (at >= buf.length) throw new Error('truncated ONNX file');
    const b = buf[at++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, at];
    scale *= 128;
  }
}

/** Calls `visit(field, wire, value)` for each field of a message; length-delimited values come as subarrays. */
function readFields(buf: Uint8Array, visit: (field: number, wire: number, value: number | Uint8Array) => void): void {
  let at = 0;
  while (at < buf.length) {
    const [key, next] = readVarint(buf, at);
    at = next;
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) {
      const [v, n] = readVarint(buf, at);
      at = n;
      visit(field, wire, v);
    } else if (wire === 2) {
      const [len, n] = readVarint(buf, at);
      visit(field, wire, buf.subarray(n, n + len));
      at = n + len;
    } else if (wire === 1) {
      at += 8;
    } else if (wire === 5) {
      at += 4;
    } else {
      throw new Error(`unsupported protobuf wire type ${wire}`);
    }
  }
}

/** A StringStringEntryProto: [key, value]. */
function readEntry(entry: Uint8Array): [string, string] {
  const text = new TextDecoder();
  let key = '';
  let value = '';
  readFields(entry, (f, _w, v) => {
    if (f === 1) key = text.decode(v as Uint8Array);
    if (f === 2) value = text.decode(v as Uint8Array);
  });
  return [key, value];
}

/**
 * The initializers of a serialised model: name, type, dims and either inline bytes or where in an
 * external data file they are (those bytes are not read).
 */
export function readInitializers(model: Uint8Array): Map<string, TensorSpec> {
  const out = new Map<string, TensorSpec>();
  const text = new TextDecoder();
  readFields(model, (field, wire, graph) => {
    if (field !== 7 || wire !== 2) return;
    readFields(graph as Uint8Array, (gField, gWire, tensor) => {
      if (gField !== 5 || gWire !== 2) return;
      const spec: TensorSpec = { name: '', type: DataType.FLOAT, dims: [], raw: new Uint8Array(0) };
      const ext: Record<string, string> = {};
      readFields(tensor as Uint8Array, (f, w, v) => {
        if (f === 1 && w === 0) spec.dims.push(v as number);
        else if (f === 1 && w === 2) {
          const packed = v as Uint8Array;
          for (let at = 0; at < packed.length; ) {
            const [d, n] = readVarint(packed, at);
            spec.dims.push(d);
            at = n;
          }
        } else if (f === 2) spec.type = v as DataType;
        else if (f === 8) spec.name = text.decode(v as Uint8Array);
        else if (f === 9) spec.raw = v as Uint8Array;
        else if (f === 13) {
          const [key, value] = readEntry(v as Uint8Array);
          ext[key] = value;
        }
      });
      if (ext.location) spec.external = { location: ext.location, offset: Number(ext.offset ?? 0), length: Number(ext.length ?? 0) };
      out.set(spec.name, spec);
    });
  });
  return out;
}

/** A serialised model's metadata_props. */
export function readModelMetadata(model: Uint8Array): Record<string, string> {
  const out: Record<string, string> = {};
  readFields(model, (field, wire, entry) => {
    if (field !== 14 || wire !== 2) return;
    const [key, value] = readEntry(entry as Uint8Array);
    out[key] = value;
  });
  return out;
}
