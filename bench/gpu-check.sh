#!/usr/bin/env bash
# Tally on one NVIDIA GPU, in one go and without network (issue #20): reports the GPU, finds a CUDA-enabled
# ONNX Runtime that is there, converts a 1 B-class random-weight fp16 model, serves it with --device cuda and
# prints c=1 / c=32 tokens/s and TTFT (tally bench), GPU utilization and power (NVML through nvidia-smi, sampled
# during the load), and /v1/cost's $/M at h100-sxm. Meant to finish in under 8 minutes.
#   bench/gpu-check.sh [OUT_DIR]          (run from anywhere; GPU index from GPU, default 0)
#   TALLY_GPU_CHECK_CPU=1 bench/gpu-check.sh   checks the script's CPU-side parts on a machine without a GPU: a
#                                          small random model (2 layers) served on the CPU, a short load
# Environment: TALLY_GPU_CHECK_LIKE (a model folder whose config.json gives the architecture; default
# ../shared/models/TinyLlama-1.1B-Chat-v1.0), TALLY_ORT_LIBRARY (a CUDA-enabled libonnxruntime.so to use).
#
# What serves, one after the other: (1) onnxruntime-node with its CUDA provider (attention inside the fp16 graph,
# the KV cache crossing PCIe every step), where that provider is installed; (2) --runner gqa: the whole model on
# GroupQueryAttention through native/ort and the CUDA library found, its KV cache in device memory.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-$(mktemp -d /tmp/tally-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
GPU="${GPU:-0}"
CPU_DRY="${TALLY_GPU_CHECK_CPU:-}"
LIKE="${TALLY_GPU_CHECK_LIKE:-}"
if [ -z "$LIKE" ]; then
  for d in "$ROOT/../shared/models/TinyLlama-1.1B-Chat-v1.0" /work/shared/models/TinyLlama-1.1B-Chat-v1.0; do
    [ -f "$d/config.json" ] && LIKE="$d" && break
  done
fi
START=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$1" "$(( $(date +%s) - START ))"; }
fail() { echo "gpu-check: $*" >&2; exit 1; }

step "GPU"
if [ -n "$CPU_DRY" ]; then
  echo "TALLY_GPU_CHECK_CPU: no GPU; the CPU-side parts only"
  nvidia-smi() { :; }
fi
[ -n "$CPU_DRY" ] || command -v nvidia-smi >/dev/null || fail "nvidia-smi is not on PATH: no NVIDIA driver here"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,power.limit --format=csv -i "$GPU" || fail "nvidia-smi cannot read GPU $GPU"
node --version || fail "node is not on PATH"

step "ONNX Runtime with CUDA"
ORT_NODE_DIR="$(node -e "const p=require('path');console.log(p.join(p.dirname(require.resolve('onnxruntime-node/package.json')),'bin/napi-v6',process.platform,process.arch))")"
ORT_NODE_VERSION="$(node -p "require('onnxruntime-node/package.json').version")"
echo "onnxruntime-node $ORT_NODE_VERSION in $ORT_NODE_DIR"
NODE_CUDA=no
[ -f "$ORT_NODE_DIR/libonnxruntime_providers_cuda.so" ] && NODE_CUDA=yes
echo "onnxruntime-node's CUDA provider installed: $NODE_CUDA"
PY_LIB=""
PY_VERSION=""
if command -v python3 >/dev/null; then
  PY_DIR="$(python3 -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' 2>/dev/null || true)"
  if [ -n "$PY_DIR" ] && ls "$PY_DIR"/libonnxruntime_providers_cuda.so >/dev/null 2>&1; then
    PY_LIB="$(ls "$PY_DIR"/libonnxruntime.so* 2>/dev/null | head -1)"
    PY_VERSION="$(python3 -c 'import onnxruntime; print(onnxruntime.__version__)')"
    echo "Python onnxruntime-gpu $PY_VERSION: $PY_LIB"
  fi
fi
CUDA_LIB="${TALLY_ORT_LIBRARY:-}"
[ -z "$CUDA_LIB" ] && [ "$NODE_CUDA" = yes ] && CUDA_LIB="$ORT_NODE_DIR/libonnxruntime.so.1"
[ -z "$CUDA_LIB" ] && CUDA_LIB="$PY_LIB"
[ -n "$CUDA_LIB" ] || [ -n "$CPU_DRY" ] || fail "no CUDA-enabled ONNX Runtime here: neither onnxruntime-node's CUDA provider (npm run install-cuda, needs network) nor Python's onnxruntime-gpu"
# A Python wheel of onnxruntime-node's own version can lend onnxruntime-node its CUDA provider libraries.
if [ "$NODE_CUDA" = no ] && [ -n "$PY_LIB" ] && [ "$PY_VERSION" = "$ORT_NODE_VERSION" ]; then
  for f in libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so; do
    ln -sf "$(dirname "$PY_LIB")/$f" "$ORT_NODE_DIR/$f" && echo "linked $f from the Python wheel into onnxruntime-node"
  done
  NODE_CUDA=yes
fi
[ -n "$CPU_DRY" ] && [ -z "$CUDA_LIB" ] && CUDA_LIB="$ORT_NODE_DIR/libonnxruntime.so.1"
[ -f native/ort/build/Release/ort.node ] || node scripts/build-native.js ort
if [ -f native/ort/build/Release/ort.node ]; then
  echo "native/ort against $CUDA_LIB:"
  timeout 120 node --import tsx bench/gpu-check-ort.ts "$CUDA_LIB" "$GPU" || echo "(the native addon's CUDA probe failed; serving goes on)"
fi
[ "$NODE_CUDA" = yes ] || echo "onnxruntime-node's own path needs its CUDA provider of version $ORT_NODE_VERSION (Python's is ${PY_VERSION:-absent}); only --runner gqa will serve"

step "1 B-class random-weight fp16 model"
[ -n "$LIKE" ] || fail "no TinyLlama-1.1B-Chat-v1.0 folder (set TALLY_GPU_CHECK_LIKE to a model folder)"
MODEL="$OUT/model-fp16"
DEVICE="cuda:$GPU"
SHRINK=()
if [ -n "$CPU_DRY" ]; then
  DEVICE=cpu
  MODEL="$OUT/model-fp16-small"
  SHRINK=(--set num_hidden_layers=2 --set hidden_size=256 --set intermediate_size=512 --set num_attention_heads=4 --set num_key_value_heads=2)
fi
if [ ! -f "$MODEL/onnx/model_fp16.onnx" ]; then
  timeout 300 node bin/tally.js convert --random --like "$LIKE" --dtype fp16 "${SHRINK[@]}" "$MODEL" || fail "convert failed"
fi
du -sh "$MODEL/onnx"

# serve_and_measure NAME [serve flags...]: a server, the load at c=1 and c=32, NVML during it, /v1/cost after.
serve_and_measure() {
  local name="$1"; shift
  local dir="$OUT/$name"
  mkdir -p "$dir"
  step "$name: tally serve --device $DEVICE $*"
  PORT=$(node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")
  node bin/tally.js serve --model "$MODEL" --device "$DEVICE" --device-price h100-sxm --port "$PORT" --max-num-seqs 32 \
    --data-dir "$dir/data" --log-level warn "$@" > "$dir/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 240); do
    curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || break
    sleep 0.5
  done
  if ! curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
    cat "$dir/serve.log"; echo "gpu-check: $name: tally serve did not start"; kill $SERVER 2>/dev/null; return 1
  fi
  curl -fsS "http://127.0.0.1:$PORT/v1/models" | head -c 300; echo

  step "$name: load at c=1 and c=32, 128 prompt + 128 output tokens"
  if [ -n "$CPU_DRY" ]; then echo "0, 0, 0, 0" > "$dir/nvml.csv"; sleep 600 & else
    nvidia-smi --query-gpu=timestamp,utilization.gpu,power.draw,memory.used --format=csv,noheader,nounits -i "$GPU" -lms 500 > "$dir/nvml.csv" &
  fi
  SMI=$!
  timeout 200 node bin/tally.js bench --url "http://127.0.0.1:$PORT" --concurrency 1,32 --requests "$REQUESTS" --duration 30s \
    --input-len 128 --output-len 128 --device-price h100-sxm --json "$dir/bench.json" --no-progress | tee "$dir/bench.txt"
  kill $SMI 2>/dev/null

  step "$name: results"
  node -e '
const fs = require("fs");
const out = process.argv[1];
const b = JSON.parse(fs.readFileSync(out + "/bench.json", "utf8"));
for (const p of b.points) {
  const s = p.stats, l = s.latency_ms;
  const f = (x, d = 1) => (x == null ? "-" : x.toFixed(d));
  console.log(`${p.label}: ${f(s.throughput.output_tokens_per_s)} output tokens/s, TTFT p50 ${f(l.ttft.percentiles.p50)} ms, TPOT p50 ${f(l.tpot.percentiles.p50, 2)} ms, ${s.requests.completed} ok / ${s.requests.failed} failed`);
}
const rows = fs.readFileSync(out + "/nvml.csv", "utf8").trim().split("\n").map((l) => l.split(",").map((x) => x.trim()));
const busy = rows.filter((r) => Number(r[1]) > 0);
const avg = (xs) => xs.reduce((a, x) => a + x, 0) / Math.max(1, xs.length);
console.log(`NVML during the load (${rows.length} samples, ${busy.length} busy): utilization ${avg(rows.map((r) => Number(r[1]))).toFixed(0)} % mean, power ${avg(rows.map((r) => Number(r[2]))).toFixed(0)} W mean, ${Math.max(...rows.map((r) => Number(r[2]))).toFixed(0)} W peak, memory ${Math.max(...rows.map((r) => Number(r[3])))} MiB peak`);
' "$dir" || echo "(see $dir/bench.txt for the bench figures)"
  curl -fsS "http://127.0.0.1:$PORT/v1/cost?window=15m" > "$dir/cost.json"
  node -e '
const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
console.log(`/v1/cost at ${r.device_price_usd_per_hour} USD/h (h100-sxm): $/M tokens ${JSON.stringify(r.usd_per_million_tokens)}`);
console.log(`energy: ${JSON.stringify(r.energy)}`);
console.log(`device telemetry: ${JSON.stringify(r.device_telemetry)}`);
' "$dir/cost.json"
  kill $SERVER 2>/dev/null
  wait $SERVER 2>/dev/null
}

REQUESTS=64
[ -n "$CPU_DRY" ] && REQUESTS=4
trap 'kill $SERVER 2>/dev/null; kill $SMI 2>/dev/null' EXIT
if [ "$NODE_CUDA" = yes ] || [ -n "$CPU_DRY" ]; then
  serve_and_measure onnxruntime-node
else
  echo "onnxruntime-node has no CUDA provider here: its path is skipped"
fi
[ -n "$CUDA_LIB" ] && serve_and_measure gqa --runner gqa --ort-library "$CUDA_LIB"
echo "files in $OUT; total $(( $(date +%s) - START )) s"
