#!/usr/bin/env bash
# Check that `pip install .` works WITHOUT the network, in a fresh virtual environment, given a wheelhouse.
#
# Usage:
#   scripts/offline_install.sh --prepare [WHEELHOUSE]   # once, WITH access to a package index
#   scripts/offline_install.sh [WHEELHOUSE]             # the offline check
# WHEELHOUSE defaults to ~/.cache/pyrefusal/wheelhouse.
#
# What an offline `pip install .` needs, honestly:
#   * a wheel of every build requirement (scikit-build-core, pybind11, llama-cpp-python==0.3.36 and theirs) and of
#     every runtime dependency in pyproject.toml. pip's HTTP cache is not enough: without an index pip cannot look
#     anything up, so the wheels must lie in a directory given with --find-links.
#   * llama-cpp-python's wheel above all: PyPI ships it as a source distribution, so without a built wheel pip
#     compiles llama.cpp (about 17 minutes on 2 cores). --prepare copies the wheel pip built and cached during an
#     earlier `pip install .` (~/.cache/pip/wheels/**/llama_cpp_python-0.3.36-*.whl), or builds it once with
#     `pip wheel` when there is none.
#   * a C++ compiler, CMake >= 3.15 and Ninja (or make) on PATH: pyrefusal's own extension (pyrefusal._core) is
#     always compiled by `pip install .`.
#
# The check copies the tracked files of this checkout to a temporary directory, makes a fresh venv, and runs
#   pip install --no-index --find-links WHEELHOUSE .
# inside a network namespace with no interface (`unshare -rn`; where that is not allowed it falls back to
# --no-index alone and says so), with pip's configuration files ignored (PIP_CONFIG_FILE=/dev/null) so that no
# machine-wide index or find-links helps. Then it imports pyrefusal._core and runs `pyrefusal doctor`.
# It does not run `pyrefusal run`: that needs the model file too (~/.cache/pyrefusal/models, or the registry's
# download, which needs the network) - see README "Offline".
#
# Measured on the 2-core development machine (2026-12-07), wheelhouse prepared: see the timing it prints.
set -euo pipefail

prepare=0
if [[ "${1:-}" == "--prepare" ]]; then
  prepare=1
  shift
fi
WHEELHOUSE=${1:-${HOME}/.cache/pyrefusal/wheelhouse}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36

if [[ $prepare == 1 ]]; then
  mkdir -p "$WHEELHOUSE"
  # every requirement of pyproject.toml (build + runtime) but llama-cpp-python, and llama-cpp-python's own
  mapfile -t reqs < <("$PY" - "$REPO/pyproject.toml" <<'PYEOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
reqs = [*p["build-system"]["requires"], *p["project"]["dependencies"]]
reqs = [r for r in reqs if not r.replace("_", "-").startswith("llama-cpp-python")]
reqs += ["diskcache>=5.6.1", "typing-extensions>=4.5.0", "numpy>=1.20.0", "jinja2>=2.11.3"]  # llama-cpp-python's
print("\n".join(reqs))
PYEOF
  )
  echo "== downloading ${#reqs[@]} requirements (and theirs) as wheels into $WHEELHOUSE"
  "$PY" -m pip download --only-binary=:all: -d "$WHEELHOUSE" "${reqs[@]}"
  cached=$(find "${PIP_CACHE_DIR:-$HOME/.cache/pip}/wheels" -name "llama_cpp_python-${LLAMA_VERSION}-*.whl" 2>/dev/null | head -1)
  if [[ -n "$cached" ]]; then
    echo "== llama-cpp-python: using pip's cached build $cached"
    cp "$cached" "$WHEELHOUSE/"
  else
    echo "== llama-cpp-python: no cached wheel; building it once with pip wheel (compiles llama.cpp: ~17 min on 2 cores)"
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$PY" -m pip wheel --no-deps -w "$WHEELHOUSE" "llama-cpp-python==${LLAMA_VERSION}"
  fi
  echo "== wheelhouse ready: $(ls "$WHEELHOUSE" | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
  exit 0
fi

if ! ls "$WHEELHOUSE"/llama_cpp_python-${LLAMA_VERSION}-*.whl >/dev/null 2>&1; then
  echo "no llama_cpp_python-${LLAMA_VERSION} wheel in $WHEELHOUSE: run '$0 --prepare $WHEELHOUSE' once with network" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== copying the tracked files of $REPO to $work/src"
mkdir "$work/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/src")
"$PY" -m venv "$work/venv"

offline=(unshare -rn)
if ! unshare -rn true 2>/dev/null; then
  echo "!! unshare -rn is not allowed here: the check runs with --no-index only (pip cannot reach an index, but other"
  echo "!! network access is not blocked)"
  offline=()
fi

start=$(date +%s)
# a clean environment: no pip configuration, no index, no cache, no machine-wide find-links
env -i PATH="$work/venv/bin:$PATH" HOME="$work/home" PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 \
  PIP_FIND_LINKS="$WHEELHOUSE" PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  ${offline[@]+"${offline[@]}"} bash -c "
    set -euo pipefail
    cd '$work/src'
    '$work/venv/bin/python' -m pip install --no-index --find-links '$WHEELHOUSE' .
    cd '$work'
    '$work/venv/bin/python' -c 'import pyrefusal._core as c, pyrefusal; print(\"pyrefusal\", pyrefusal.__version__, \"_core\", c.build_info())'
    '$work/venv/bin/pyrefusal' doctor
  "
echo "== offline install OK in $(( $(date +%s) - start )) s (fresh venv, no network${offline[*]:+, in unshare -rn})"
