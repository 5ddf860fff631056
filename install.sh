#!/usr/bin/env bash
# Set up cope-local in ./.venv: torch first (CPU build unless CUDA is present), then
# llama-cpp-python (compiled here, cached), then the project. Idempotent: a rerun
# takes seconds. Usage: ./install.sh [--gpu cuda|metal|cpu]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
TORCH_VERSION=2.13.0

gpu=auto
[ "${1:-}" = "--gpu" ] && gpu=${2:-auto}
if [ "$gpu" = auto ]; then
  if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then gpu=metal
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=cuda
  else gpu=cpu; fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# 1. torch before anything that depends on it, or pip pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # On machines whose pip offers only CUDA builds of torch, point pip at PyTorch's CPU
  # wheel index first (PIP_EXTRA_INDEX_URL): training runs fine on the CPU.
  pip install "torch==$TORCH_VERSION"
fi

# 2. llama-cpp-python is compiled from source. The wheel is cached per build flavour,
#    because pip's own cache ignores CMAKE_ARGS.
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  flavour=$gpu; cmake_args=${CMAKE_ARGS:-}
  case "$gpu" in
    cuda) cmake_args="$cmake_args -DGGML_CUDA=on" ;;
    metal) cmake_args="$cmake_args -DGGML_METAL=on" ;;
    cpu)
      # Some virtual machines report AMX but do not grant it to processes: a native
      # build then dies with SIGILL in its first matrix multiply. Build without AMX,
      # with the vector extensions this CPU really has.
      if grep -qs amx_tile /proc/cpuinfo; then
        flavour=cpu-noamx
        cmake_args="$cmake_args -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
        if grep -qs avx512f /proc/cpuinfo; then
          flavour=cpu-noamx-avx512
          cmake_args="$cmake_args -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON"
        fi
      fi ;;
  esac
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/cope-local/wheels/$LLAMA_VERSION-$flavour"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "install.sh: compiling llama-cpp-python $LLAMA_VERSION ($flavour); this takes a few minutes once, then it is cached" >&2
    mkdir -p "$wheels"
    CMAKE_ARGS="$cmake_args" pip wheel --no-deps --no-cache-dir -w "$wheels" "llama-cpp-python==$LLAMA_VERSION"
  fi
  pip install --no-deps "$wheels"/llama_cpp_python-*.whl
fi

# 3. the project and its test tools (torch and llama-cpp-python are already satisfied).
pip install -e ".[test]"
echo "install.sh: ready: .venv/bin/cope" >&2
