#!/usr/bin/env bash
# The GPU acceptance run for the cuda engine, in one script (CI has no GPU).
#
#   cargo build --release            # on any x86-64 machine; no CUDA needed to build
#   bash deploy/gpu-check.sh          # on the GPU machine, next to target/release/reflex
# or, where only 64 MiB can be carried: `bash deploy/gpu-prep.sh` here, then carry
# target/gpu-carry and target/baseline-wheels and run `bash deploy/gpu-check.sh` there.
#
# Needs: an NVIDIA driver (libcuda.so.1) and the CUDA 13 libcublas/libnvrtc, found through
# LD_LIBRARY_PATH (default below: /usr/local/cuda-13.0). It checks, and exits non-zero when
# any check fails:
#  1. `reflex bench engines --require-gpu` (without a GPU it would measure cpu alone and
#     exit 0; here a missing GPU must fail): cuda vs cpu actions on the same requests and seeds
#     (cos ≥ 0.9999, max_abs ≤ 1e-3 for every request), repeated runs bit-identical,
#     graphs on = off bit for bit; prints engine-only / Policy::act / Unix-socket Act
#     p50/p99 for cpu, cuda + graphs and cuda without graphs.
#  2. A trace recorded on cpu (`reflex demo`) replayed against `reflex serve --engine cuda`
#     with `--fail-on actions`.
#  3. The cuda server's own trace header carries the GPU, driver and CUDA versions.
#  4. `--engine auto` picks cuda here.
#  5. Every real-export fixture kind (pi0.5 baked and per-step, the monolithic pi0.5/pi0/
#     SmolVLA, SmolVLA four-graph): `reflex inspect` says RUNS, and `reflex bench engines
#     --export DIR --export-engine cuda --precision f32,f16,bf16` checks parity with tract
#     per request and prefix tensor (f32: cos >= 0.9999, max |d| <= 1e-3 of scale; f16/bf16:
#     cos >= 0.999), bit-identical repeats and graphs on = off in each precision.
#  6. A trace of the per-step pi0.5 export recorded on cpu, replayed against `reflex serve
#     --engine cuda` with `--fail-on actions`; the prefix cache's logged worst case is in
#     device memory (the KV cache stays on the GPU between prefix and expert).
#  7. (FULL=1, the default) the full-scale pi0.5-shaped exports, written here by the
#     carried binary (`export-demo --scale smolvla-size|pi05-widths`), through the same
#     bench in f32 and bf16: parity with tract and p50/p99 of prefix, denoise and Act, with
#     the baseline's figures and our speed-up over its best mode printed beside (8.).
#  8. The PyTorch baseline, run just before each bench of step 7 (deploy/torch_baseline.py: the same ONNX graphs converted by
#     onnx2torch, run by the machine's PyTorch, TORCH_PYTHON, default /opt/torch/.venv) on
#     step 7's exports (FULL=0: the tiny pi05 fixtures), eager and with CUDA graphs: p50/p99
#     of prefix, denoise and Act into $OUT/baseline-*.json. Needs target/baseline-wheels
#     (deploy/baseline-wheels.sh) carried for what that venv lacks; reported, not required
#     (REQUIRE_BASELINE=1 requires it). Its parity Act: onnxruntime's cpu when it imports,
#     else the same graphs in torch on the cpu (BASELINE_PARITY=none skips it: at full
#     scale it costs a cpu Act). ENGINE=cpu: the tiny pi05 fixture on the cpu when torch
#     imports, else a line saying why not.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${REFLEX_BIN:-$PWD/target/release/reflex}
# What deploy/gpu-prep.sh carries: the stripped binary, xz-compressed (unpacked with Python's
# lzma, which every Python has).
if [ ! -x "$BIN" ] && [ -f target/gpu-carry/reflex.xz ]; then
  BIN=$PWD/target/gpu-carry/reflex
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    target/gpu-carry/reflex.xz "$BIN"
  chmod +x "$BIN"
fi
CUDA_LIB=${CUDA_LIB:-/usr/local/cuda-13.0/targets/x86_64-linux/lib}
export LD_LIBRARY_PATH="$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
# ENGINE=cpu runs the same steps without a GPU (to try the script itself).
ENGINE=${ENGINE:-cuda}
BENCH_FLAGS="--require-gpu"; [ "$ENGINE" = cpu ] && BENCH_FLAGS="--cpu-only"
W=$(mktemp -d)
# A fresh kernel cache: the first cuda load of each export compiles (NVRTC), later ones read
# it back, so bench engines' "load s" shows both cold starts side by side.
export REFLEX_KERNEL_CACHE="$W/kernels"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
log() { printf '\n== %s\n' "$*"; }
wait_socket() { for _ in $(seq 1 600); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1"; return 1; }

log "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$BIN" --version

log "1. bench engines (checks + latency)"
"$BIN" bench engines --calls "${CALLS:-300}" $BENCH_FLAGS 2>&1 | tee "$OUT/bench-engines.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "FAIL: bench engines"; exit 1; }

log "2. a cpu trace replayed against a cuda server"
"$BIN" export-demo "$W/export" >/dev/null
"$BIN" demo --model "$W/export" --trace-dir "$W/cpu-traces" --calls 60 >"$OUT/demo.txt" 2>&1 \
  || { cat "$OUT/demo.txt"; exit 1; }
tail -5 "$OUT/demo.txt"
TRACE=$(ls "$W"/cpu-traces/*.jsonl.gz | head -1)
RUST_LOG=info "$BIN" serve "$W/export" --engine "$ENGINE" --listen "unix://$W/cuda.sock" \
  --trace-dir "$W/cuda-traces" 2>"$OUT/serve-cuda.log" &
SERVE=$!
wait_socket "$W/cuda.sock"
"$BIN" replay "$TRACE" --target "unix://$W/cuda.sock" --diff actions --fail-on actions \
  --output "$OUT/replay-report.json" >"$OUT/replay.txt" 2>&1 && RC=0 || RC=$?
tail -8 "$OUT/replay.txt"
echo "replay exit: $RC"
[ "$RC" = 0 ] || { echo "FAIL: replay of the cpu trace on $ENGINE"; exit 1; }

log "3. the cuda trace header"
kill -TERM "$SERVE"; wait "$SERVE" || true
CT=$(ls "$W"/cuda-traces/*.jsonl.gz | head -1)
zcat "$CT" >"$W/cuda-trace.jsonl"
head -3 "$W/cuda-trace.jsonl" >"$OUT/cuda-trace-head.jsonl"
head -1 "$W/cuda-trace.jsonl" | grep -o '"hardware":{[^}]*}'
KEYS='"gpu": "nvidia_driver": "cuda_driver_api": "mode":"cuda"'
[ "$ENGINE" = cpu ] && KEYS='"cpus": "mode":"cpu"'
for key in $KEYS; do
  grep -q "$key" "$OUT/cuda-trace-head.jsonl" || { echo "FAIL: $key missing from the cuda trace"; exit 1; }
done
echo "header: PASS"

if [ "$ENGINE" = cpu ]; then
  echo "ENGINE=cpu: skipping the auto check"
else
  log "4. --engine auto"
  RUST_LOG=info "$BIN" serve "$W/export" --engine auto --listen "unix://$W/auto.sock" 2>"$OUT/serve-auto.log" &
  AUTO=$!
  wait_socket "$W/auto.sock"
  kill -TERM "$AUTO"; wait "$AUTO" || true
  if grep -q "running on cpu" "$OUT/serve-auto.log"; then echo "FAIL: auto fell back"; cat "$OUT/serve-auto.log"; exit 1; fi
  grep -m1 -o 'mode="\?cuda"\?' "$OUT/serve-auto.log" || grep -m1 "cuda" "$OUT/serve-auto.log"
  echo "auto: PASS"
fi

log "baseline set-up: the PyTorch baseline on the same graphs (onnx2torch; eager and CUDA graphs)"
# deploy/torch_baseline.py runs the export's ONNX graphs converted by onnx2torch in the
# machine's own PyTorch (TORCH_PYTHON), per Act as the runtime does (prefix, then the expert's
# loop), and writes $OUT/baseline-*.json for `reflex bench engines`. The wheels PyTorch's venv
# lacks (onnx, onnx2torch, ...) come from target/baseline-wheels (deploy/baseline-wheels.sh,
# carried with the run) and are unpacked into $W/pylib. A baseline that cannot run is a
# FAIL line here but not a failed acceptance (REQUIRE_BASELINE=1 makes it one).
BASELINE_STATUS=passed
baseline_fail() {
  echo "FAIL: baseline: $*"
  BASELINE_STATUS="FAILED ($*)"
  [ "${REQUIRE_BASELINE:-0}" = 1 ] && exit 1
  return 0
}
if [ -z "${TORCH_PYTHON:-}" ]; then
  TORCH_PYTHON=/opt/torch/.venv/bin/python
  [ "$ENGINE" = cpu ] && [ ! -x "$TORCH_PYTHON" ] && TORCH_PYTHON=$(command -v python3 || echo python3)
fi
WHEELS=${BASELINE_WHEELS:-$PWD/target/baseline-wheels}
BASELINE_SKIP=""
if ! TORCH_V=$("$TORCH_PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>"$W/torch-import.txt"); then
  BASELINE_SKIP="torch does not import in $TORCH_PYTHON ($(tail -1 "$W/torch-import.txt"); set TORCH_PYTHON)"
else
  echo "torch: $TORCH_V ($TORCH_PYTHON)"
  # The modules this Python lacks, each with the carried wheel that brings it and fits this
  # Python (cpXY-cpXY: that version; cpXY-abi3: XY and later; py3-none: any), or "-".
  NEEDED=$(WHEELS="$WHEELS" "$TORCH_PYTHON" - <<'PY'
import glob, importlib.util, os, re, sys
here = sys.version_info[:2]
def fits(path):
    m = re.search(r"-(py3|cp(\d)(\d+))-(none|abi3|cp\d+)-", os.path.basename(path))
    if not m:
        return False
    if m.group(1) == "py3":
        return True
    tag = (int(m.group(2)), int(m.group(3)))
    return tag <= here if m.group(4) == "abi3" else tag == here
for module, wheel in [("numpy", "numpy"), ("google.protobuf", "protobuf"), ("ml_dtypes", "ml_dtypes"), ("onnx", "onnx"), ("onnx2torch", "onnx2torch")]:
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        ok = [w for w in sorted(glob.glob(os.path.join(os.environ["WHEELS"], wheel + "-[0-9]*.whl"))) if fits(w)]
        print(wheel, ok[0] if ok else "-", "%d.%d" % here)
PY
)
  mkdir -p "$W/pylib"
  while read -r wheel whl pyv; do
    [ -n "$wheel" ] || continue
    if [ "$whl" = - ]; then
      BASELINE_SKIP="$TORCH_PYTHON (Python $pyv) lacks $wheel and $WHEELS has no wheel of it for Python $pyv (PY_VERSION=$pyv bash deploy/baseline-wheels.sh, and carry target/baseline-wheels)"
      break
    fi
    # A wheel is a zip of the package's files: unpacked, it imports (no pip needed).
    "$TORCH_PYTHON" -m zipfile -e "$whl" "$W/pylib"
    echo "unpacked $(basename "$whl")"
  done <<<"$NEEDED"
fi
if [ -n "$BASELINE_SKIP" ]; then
  echo "baseline: SKIPPED: $BASELINE_SKIP"
  BASELINE_STATUS="skipped ($BASELINE_SKIP)"
  [ "$ENGINE" != cpu ] && [ "${REQUIRE_BASELINE:-0}" = 1 ] && { echo "FAIL: baseline required"; exit 1; }
fi
BASELINE_ARGS="--device cuda --modes eager,graphs"; [ "$ENGINE" = cpu ] && BASELINE_ARGS="--device cpu --modes eager"
# run_baseline NAME DIR: the baseline on one export into $OUT/baseline-NAME.json; prints
# `--baseline-json FILE` for bench engines when it produced one.
run_baseline() {
  local name=$1 dir=$2 rc
  [ -z "$BASELINE_SKIP" ] || return 0
  PYTHONPATH="$W/pylib${PYTHONPATH:+:$PYTHONPATH}" "$TORCH_PYTHON" deploy/torch_baseline.py \
    --export "$dir" $BASELINE_ARGS --calls "${BASELINE_CALLS:-20}" --warmup "${BASELINE_WARMUP:-3}" \
    --parity-vs "${BASELINE_PARITY:-auto}" \
    --json "$OUT/baseline-$name.json" >"$OUT/baseline-$name.txt" 2>&1 && rc=0 || rc=$?
  grep -E "^(torch_baseline|parity|pytorch|placement|note: (parity|device syncs))" "$OUT/baseline-$name.txt" | sed "s/^/$name: /" >&2
  if [ "$rc" != 0 ]; then
    tail -5 "$OUT/baseline-$name.txt" >&2
    baseline_fail "$name exited $rc (see $OUT/baseline-$name.txt)" >&2
  elif grep -q '"error"' "$OUT/baseline-$name.json"; then
    baseline_fail "$name: a mode failed (see $OUT/baseline-$name.json)" >&2
  fi
  [ -s "$OUT/baseline-$name.json" ] && echo "--baseline-json $OUT/baseline-$name.json"
  return 0
}

log "5. every real-export fixture kind on the cuda engine's programs (issue 14)"
# Per kind: `reflex inspect` says RUNS, then `bench engines --export-engine cuda`: tract vs
# cuda (graphs on, graphs off) on 4 requests, every prefix tensor and action within
# cos >= 0.9999 and max |d| <= 1e-3 of scale, repeats bit-identical, graphs on = off.
# ENGINE=cpu runs the same programs on the CPU reference executor instead.
PROG_ENGINE=cuda; [ "$ENGINE" = cpu ] && PROG_ENGINE=reference
for kind in pi05 pi05-per-step pi05-monolithic pi0 smolvla smolvla-four-graph; do
  "$BIN" export-demo --kind "$kind" "$W/$kind" >/dev/null
  "$BIN" inspect "$W/$kind" --engine cuda >"$OUT/inspect-$kind.txt" 2>&1 \
    || { cat "$OUT/inspect-$kind.txt"; echo "FAIL: inspect $kind"; exit 1; }
  sed -n 2p "$OUT/inspect-$kind.txt" | sed "s/^/$kind: /"
  # The baseline beside ours on the tiny pi0.5 exports when the full-scale ones do not run.
  BJ=""
  if [ "${FULL:-1}" != 1 ] && { [ "$kind" = pi05 ] || { [ "$kind" = pi05-per-step ] && [ "$ENGINE" != cpu ]; }; }; then
    BJ=$(run_baseline "$kind" "$W/$kind")
  fi
  # shellcheck disable=SC2086
  "$BIN" bench engines --export "$W/$kind" --export-engine "$PROG_ENGINE" --precision f32,f16,bf16 \
    --calls "${KIND_CALLS:-20}" --warmup 2 $BJ >"$OUT/bench-$kind.txt" 2>&1 \
    || { cat "$OUT/bench-$kind.txt"; echo "FAIL: $kind on $PROG_ENGINE"; exit 1; }
  grep -E "^(engine|cpu \(tract\)|cuda|reference|baseline|  )|vs cpu|graphs on vs off" "$OUT/bench-$kind.txt" | sed "s/^/  /"
done

log "6. a real export: a cpu trace replayed against reflex serve --engine cuda"
"$BIN" demo --model "$W/pi05-per-step" --trace-dir "$W/v2-cpu-traces" --calls 30 >"$OUT/demo-v2.txt" 2>&1 \
  || { cat "$OUT/demo-v2.txt"; exit 1; }
TRACE=$(ls "$W"/v2-cpu-traces/*.jsonl.gz | head -1)
RUST_LOG=info "$BIN" serve "$W/pi05-per-step" --engine "$ENGINE" --listen "unix://$W/v2.sock" \
  2>"$OUT/serve-v2.log" &
V2=$!
wait_socket "$W/v2.sock"
"$BIN" replay "$TRACE" --target "unix://$W/v2.sock" --diff actions --fail-on actions \
  --output "$OUT/replay-v2-report.json" >"$OUT/replay-v2.txt" 2>&1 && RC=0 || RC=$?
kill -TERM "$V2"; wait "$V2" || true
# The prefix (every layer's KV cache) stays on the device: the cache's worst case is device memory.
grep -m1 'prefix cache bounded' "$OUT/serve-v2.log" || { echo "FAIL: no prefix cache bound logged"; exit 1; }
WHERE=device; [ "$ENGINE" = cpu ] && WHERE=host
grep -m1 'prefix cache bounded' "$OUT/serve-v2.log" | grep -q "location=\"\?$WHERE" \
  || { echo "FAIL: the prefix cache should be in $WHERE memory"; exit 1; }
tail -6 "$OUT/replay-v2.txt"
echo "replay exit: $RC"
[ "$RC" = 0 ] || { cat "$OUT/serve-v2.log"; echo "FAIL: replay of a real export's cpu trace on $ENGINE"; exit 1; }

if [ "${FULL:-1}" = 1 ]; then
  log "7. full-scale exports written here, on the cuda engine (FULL=0 skips)"
  for scale in smolvla-size pi05-widths; do
    "$BIN" export-demo --kind pi05 --scale "$scale" "$W/full-$scale" >/dev/null
    "$BIN" inspect "$W/full-$scale" --engine cuda >"$OUT/inspect-full-$scale.txt" 2>&1 || true
    grep -E "^engine cuda|^weights|^launches|^one prefix" "$OUT/inspect-full-$scale.txt"
    "$BIN" inspect "$W/full-$scale" --engine cuda --precision bf16 >"$OUT/inspect-full-$scale-bf16.txt" 2>&1 || true
    grep -E "device memory|precision" "$OUT/inspect-full-$scale-bf16.txt"
    BJ=$(run_baseline "full-$scale" "$W/full-$scale")
    # shellcheck disable=SC2086
    "$BIN" bench engines --export "$W/full-$scale" --export-engine "$PROG_ENGINE" --precision f32,bf16 \
      --calls "${FULL_CALLS:-5}" --warmup 1 $BJ >"$OUT/bench-full-$scale.txt" 2>&1 \
      || { cat "$OUT/bench-full-$scale.txt"; echo "FAIL: full $scale on $PROG_ENGINE"; exit 1; }
    grep -E "^(engine|cpu \(tract\)|cuda|reference|baseline|  )|vs cpu|graphs on vs off" "$OUT/bench-full-$scale.txt"
    rm -rf "$W/full-$scale"
  done
fi

if [ "$ENGINE" = cpu ]; then
  echo "ALL CHECKS PASSED (ENGINE=cpu: the script's own run, no GPU checked; baseline: $BASELINE_STATUS)"
else
  echo "ALL GPU CHECKS PASSED (baseline: $BASELINE_STATUS)"
fi
