import fs from 'node:fs';
import { bfloat16ToFloat32, f32ToBf16, f32ToF16, float16ToFloat32 } from './half.ts';

/**
 * The safetensors format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
 * `{ dtype, shape, data_offsets: [begin, end] }` (offsets relative to the end of the header; `__metadata__`
 * holds string metadata), then the tensors' bytes, little-endian, row-major.
 */
export type SafetensorsDtype = 'F32' | 'F16' | 'BF16';

const BYTES: Record<string, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1, F8_E4M3: 1, F8_E5M2: 1 };

export interface SafetensorsEntry {
  name: string;
  dtype: string;
  shape: number[];
  /** Absolute byte offsets in the file. */
  begin: number;
  end: number;
}

export interface SafetensorsFile {
  path: string;
  metadata: Record<string, string>;
  tensors: Map<string, SafetensorsEntry>;
}

/** Reads only the header; tensor bytes are read on demand by readTensorF32. */
export function readSafetensorsHeader(path: string): SafetensorsFile {
  const fd = fs.openSync(path, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const fail = (msg: string): never => {
      throw new Error(`${path}: ${msg}`);
    };
    if (size < 8) fail(`not a safetensors file (${size} bytes)`);
    const lenBuf = Buffer.alloc(8);
    fs.readSync(fd, lenBuf, 0, 8, 0);
    const headerLen = Number(lenBuf.readBigUInt64LE(0));
    if (headerLen > 100_000_000 || 8 + headerLen > size) fail(`not a safetensors file (header length ${headerLen}, file ${size} bytes)`);
    const headerBuf = Buffer.alloc(headerLen);
    fs.readSync(fd, headerBuf, 0, headerLen, 8);
    let header: Record<string, unknown>;
    try {
      header = JSON.parse(headerBuf.toString('utf8'));
    } catch (err) {
      return fail(`not a safetensors file (header is not JSON: ${(err as Error).message})`);
    }
    const base = 8 + headerLen;
    const tensors = new Map<string, SafetensorsEntry>();
    for (const [name, v] of Object.entries(header)) {
      if (name === '__metadata__') continue;
      const { dtype, shape, data_offsets: offsets } = v as { dtype: string; shape: number[]; data_offsets: [number, number] };
      if (typeof dtype !== 'string' || !Array.isArray(shape) || !Array.isArray(offsets) || offsets.length !== 2) fail(`bad header entry for ${name}`);
      const elems = shape.reduce((a, b) => a * b, 1);
      const width = BYTES[dtype];
      if (width !== undefined && offsets[1] - offsets[0] !== elems * width) fail(`${name}: ${offsets[1] - offsets[0]} bytes for ${dtype}[${shape}]`);
      if (base + offsets[1] > size) fail(`truncated file: ${name} needs bytes up to ${base + offsets[1]}, file is ${size} bytes`);
      tensors.set(name, { name, dtype, shape, begin: base + offsets[0], end: base + offsets[1] });
    }
    return { path, metadata: (header.__metadata__ as Record<string, string> | undefined) ?? {}, tensors };
  } finally {
    fs.closeSync(fd);
  }
}

/** One tensor's values as float32 (from F32, F16 or BF16), read from the file now. */
export function readTensorF32(file: SafetensorsFile, name: string): Float32Array {
  const t = file.tensors.get(name);
  if (!t) throw new Error(`${file.path}: no tensor ${name}`);
  const n = t.shape.reduce((a, b) => a * b, 1);
  if (t.dtype !== 'F32' && t.dtype !== 'F16' && t.dtype !== 'BF16') {
    throw new Error(`${file.path}: ${name} is ${t.dtype}; Tally reads F32, F16 and BF16 checkpoints (quantized safetensors are not supported)`);
  }
  const out = new Float32Array(n);
  const fd = fs.openSync(file.path, 'r');
  try {
    if (t.dtype === 'F32') {
      readFully(fd, new Uint8Array(out.buffer), t.begin);
    } else {
      const bits = new Uint16Array(n);
      readFully(fd, new Uint8Array(bits.buffer), t.begin);
      if (t.dtype === 'F16') float16ToFloat32(bits, out);
      else bfloat16ToFloat32(bits, out);
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}

function readFully(fd: number, into: Uint8Array, position: number): void {
  for (let done = 0; done < into.length; ) {
    const n = fs.readSync(fd, into, done, Math.min(into.length - done, 1 << 30), position + done);
    if (n === 0) throw new Error(`unexpected end of file at ${position + done}`);
    done += n;
  }
}

export interface SafetensorsTensorSpec {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** The values, or a function that makes them when the tensor is written (so that one is in memory at a time). */
  data: Float32Array | (() => Float32Array);
}

/** Writes a safetensors file, tensor by tensor. */
export function writeSafetensors(path: string, tensors: SafetensorsTensorSpec[], metadata: Record<string, string> = {}): void {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of tensors) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * BYTES[t.dtype];
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  const fd = fs.openSync(path, 'w');
  try {
    fs.writeSync(fd, len);
    fs.writeSync(fd, json);
    for (const t of tensors) {
      const data = typeof t.data === 'function' ? t.data() : t.data;
      const n = t.shape.reduce((a, b) => a * b, 1);
      if (data.length !== n) throw new Error(`writeSafetensors: ${t.name} has ${data.length} values, shape [${t.shape}] needs ${n}`);
      fs.writeSync(fd, encode(t.dtype, data));
    }
  } finally {
    fs.closeSync(fd);
  }
}


function encode(dtype: SafetensorsDtype, data: Float32Array): Uint8Array {
  if (dtype === 'F32') return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const bits = new Uint16Array(data.length), conv = dtype === 'F16' ? f32ToF16 : f32ToBf16;
  for (let i = 0; i < data.length; i++) bits[i] = conv(data[i]);
  return new Uint8Array(bits.buffer);
}
