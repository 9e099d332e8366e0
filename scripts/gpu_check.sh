#!/usr/bin/env bash
# The GPU check, for a machine with a GPU: build zt-gguf with its backend in a fresh venv and run
# tests/test_gpu.py there (every kv-bias case of test-backend-ops on the GPU against the CPU reference
# kernels, one process per case, and the engine's scores fully offloaded against the CPU's).
#
#     bash scripts/gpu_check.sh cuda      # NVIDIA: a CUDA toolkit with nvcc and cuBLAS
#     bash scripts/gpu_check.sh vulkan    # any Vulkan driver (CI runs this on lavapipe, see .ci/run)
#
# ZT_GPU_VENV (default /tmp/zt-gpu-venv) is the venv; ZT_CUDA_ARCHS (default native) the CUDA architectures.
set -euo pipefail
cd "$(dirname "$0")/.."
backend="${1:-cuda}"
venv="${ZT_GPU_VENV:-/tmp/zt-gpu-venv}"
case "$backend" in
    cuda) args="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${ZT_CUDA_ARCHS:-native}" ;;
    vulkan) args="-DGGML_VULKAN=ON" ;;
    *) echo "gpu_check: unknown backend '$backend' (cuda or vulkan)" >&2; exit 2 ;;
esac
python3 -m venv "$venv"
. "$venv/bin/activate"
start=$SECONDS
CMAKE_ARGS="$args" pip install -q ".[test]"
echo "gpu_check: built with $args in $((SECONDS - start)) s"
python - <<'EOF'
from zt_gguf.testing import make_tiny_llama
from zt_gguf.engine import Model
import tempfile, pathlib
p = make_tiny_llama(pathlib.Path(tempfile.mkdtemp()) / "t.gguf").path
print("gpu_check: GPU devices:", Model(p).gpu_devices or "none")
EOF
ZT_GGUF_REQUIRE_GPU=1 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
echo "gpu_check: OK ($((SECONDS - start)) s)"
