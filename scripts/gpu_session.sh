#!/usr/bin/env bash
# pyrefusal on the GPU machine: CUDA builds, GPU tests, random 7B/8B models, the benchmark table.
#
# The GPU machine has no network and each command there may run 10 minutes (30 minutes of device
# time per session), so the work is split into phases that keep their state in build/gpu/ (ignored
# by git, kept between calls while the machine stays warm). Everything a phase produces (logs,
# results) is copied to $OUT, which the device tool brings back.
#
#   0. here, on a machine with the package registry (once):   scripts/gpu_session.sh prepare
#      -> .gpu/ (trimmed llama-cpp-python source, gguf/diskcache wheels, pytest wheels in .gpu/extra)
#   1. device call, carry [".gpu"]:  bash scripts/gpu_session.sh build   (~6-7 min)
#      wheels; llama-cpp-python with CUDA (~5.5 min, 16 jobs) while the F16 random models are written
#   2. device call, carry [".gpu"]:  bash scripts/gpu_session.sh test    (~9.5 min)
#      pyrefusal with PYREFUSAL_CUDA=ON while Q4_K_M models are quantized; pytest -m gpu tests/test_cuda.py;
#      then benchmarks/bench_gpu.py until 9 minutes are used (memory probe, paper stack, Q4_K_M rows first)
#   3. device call, carry [".gpu"]:  bash scripts/gpu_session.sh bench   (<= 9.5 min)
#      bench_gpu.py --append: measures only what is still missing (F16 rows); repeat if rows were skipped
#      for time. Every call leaves the table so far in $OUT/results (<gpu-name>-<date>.md/.json).
#   (without time limits: bash scripts/gpu_session.sh all)
#
# Environment: PYTHON (python3), CUDA_ARCH (90a: H100/H200), JOBS (nproc), LIMIT (540: seconds a call
# may use before bench_gpu.py starts nothing new), SHAPES (qwen2.5-7b,llama-3.1-8b), BENCH_ARGS (extra
# bench_gpu.py arguments, e.g. "--gen 256").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
ARCH=${CUDA_ARCH:-90a}
JOBS=${JOBS:-$(nproc)}
SHAPES=${SHAPES:-qwen2.5-7b,llama-3.1-8b}
WORK=$ROOT/build/gpu
SITE=$WORK/site
MODELS=$WORK/models
RESULTS=$WORK/results
OUT=${OUT:-$WORK/out}
LOGS=$OUT/logs
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -d /usr/local/cuda/bin ] && export PATH=$PATH:/usr/local/cuda/bin

phase=${1:-}

log() { echo "== $(date -u +%H:%M:%S) $*"; }

# The installed pyrefusal (with its CUDA _core) must win over the source tree: put the install
# first on the path and keep the working directory off it (pytest then needs --import-mode=append).
use_site() {
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONSAFEPATH=1
}

collect() {
  mkdir -p "$OUT/results"
  cp -f "$RESULTS"/* "$OUT/results/" 2>/dev/null || true
  { nvidia-smi 2>/dev/null || echo "no nvidia-smi"; df -h "$ROOT" || true; ls -la "$MODELS" 2>/dev/null || true; } \
    > "$LOGS/machine-$phase.txt" 2>&1
}

prepare() {
  # PIP_NO_BUILD_ISOLATION=0 (sic: "0" turns isolation off) lets `pip download` read the sdist's metadata
  # with the local scikit-build-core; with isolation, `--no-binary :all:` compiles CMake from source first.
  $PY -c 'import scikit_build_core' || $PY -m pip install scikit-build-core
  PIP_NO_BUILD_ISOLATION=0 ../shared/gpu/prepare-llama-sdist.sh "$LLAMA_VERSION" .gpu
  mkdir -p .gpu/extra
  # pytest for the GPU tests, installed there only when the image lacks it
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .gpu/extra pytest pluggy iniconfig packaging pygments
  du -sh .gpu
  ls -la .gpu .gpu/extra
}

make_f16() {
  local s
  for s in ${SHAPES//,/ }; do
    [ -f "$MODELS/random-$s-f16.gguf" ] && continue
    $PY benchmarks/make_random_gguf.py --shape "$s" --dtype f16 --threads "${1:-4}" --out "$MODELS/random-$s-f16.gguf"
  done
}

make_q4() {
  local s
  for s in ${SHAPES//,/ }; do
    [ -f "$MODELS/random-$s-q4_k_m.gguf" ] && continue
    $PY benchmarks/make_random_gguf.py --shape "$s" --dtype q4_k_m --f16 "$MODELS/random-$s-f16.gguf" \
      --out "$MODELS/random-$s-q4_k_m.gguf"
  done
}

build() {
  [ -f .gpu/llama-cpp-python-trim.tar.gz ] || { echo "no .gpu/: run 'scripts/gpu_session.sh prepare' and carry .gpu"; exit 2; }
  mkdir -p "$SITE" "$MODELS"
  $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .gpu/*.whl
  use_site
  $PY -c 'import pytest' 2>/dev/null || $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .gpu/extra/*.whl
  log "F16 random models in the background ($SHAPES)"
  make_f16 4 > "$LOGS/make-f16.log" 2>&1 &
  local f16=$!
  if [ -f "$SITE/.llama-cuda-built" ]; then
    log "llama-cpp-python with CUDA already built (this machine, earlier call)"
  else
    log "building llama-cpp-python $LLAMA_VERSION with CUDA (arch $ARCH, $JOBS jobs)"
    local src
    src=$(mktemp -d)
    tar xzf .gpu/llama-cpp-python-trim.tar.gz -C "$src"
    (cd "$src/llama-cpp-python" && CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DLLAVA_BUILD=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$JOBS $PY -m pip install --no-build-isolation --no-deps --upgrade --target "$SITE" .) \
      > "$LOGS/llama-build.log" 2>&1 || { tail -50 "$LOGS/llama-build.log"; exit 1; }
    touch "$SITE/.llama-cuda-built"
  fi
  wait "$f16" || { tail -20 "$LOGS/make-f16.log"; exit 1; }
  tail -3 "$LOGS/make-f16.log"
  $PY -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "GPU offload:", llama_cpp.llama_supports_gpu_offload())'
}

test_phase() {
  use_site
  log "Q4_K_M models in the background"
  make_q4 > "$LOGS/quantize.log" 2>&1 &
  local q4=$!
  log "building pyrefusal with PYREFUSAL_CUDA=ON"
  PYREFUSAL_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
    $PY -m pip install --no-build-isolation --no-deps --upgrade --target "$SITE" . > "$LOGS/pyrefusal-build.log" 2>&1 \
    || { tail -50 "$LOGS/pyrefusal-build.log"; exit 1; }
  $PY -c 'import llama_cpp, pyrefusal._core as c; from pyrefusal.backend import build_info as b; i = b(); print({k: i[k] for k in ("cuda_kernel", "gpu_offload", "llama_cpp_python", "ggml_version")})' \
    | tee "$LOGS/build-info.txt"
  log "pytest -m gpu tests/test_cuda.py"
  local rc=0
  $PY -m pytest -p no:cacheprovider --import-mode=append -m gpu -rA tests/test_cuda.py 2>&1 | tee "$LOGS/pytest-gpu.txt" \
    || rc=$?
  wait "$q4" || { tail -20 "$LOGS/quantize.log"; exit 1; }
  tail -2 "$LOGS/quantize.log"
  return "$rc"
}

bench() {
  use_site
  local deadline=$(( ${LIMIT:-540} - SECONDS ))  # SECONDS: time this call has run so far
  [ "${LIMIT:-540}" -eq 0 ] && deadline=0       # LIMIT=0: no deadline
  if [ "$deadline" -lt 0 ]; then log "no time left for bench_gpu.py in this call"; return 0; fi
  log "bench_gpu.py (deadline $deadline s; 0 = none)"
  # --append: a later `bench` call continues where this one stopped
  # shellcheck disable=SC2086
  $PY benchmarks/bench_gpu.py --shape "$SHAPES" --model-dir "$MODELS" --results "$RESULTS" --append \
    --deadline-s "$deadline" ${BENCH_ARGS:-} 2>&1 | tee -a "$LOGS/bench.log"
}

mkdir -p "$LOGS"
trap collect EXIT
case "$phase" in
  prepare) trap - EXIT; prepare ;;
  build) build ;;
  test) rc=0; test_phase || rc=$?; bench; exit "$rc" ;;
  bench) bench ;;
  all) build; rc=0; test_phase || rc=$?; LIMIT=0 bench; exit "$rc" ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
