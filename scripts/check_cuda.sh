#!/usr/bin/env bash
# Compile-check the CUDA backend's kv-bias code (patch 0008) with nvcc, on a machine without a GPU.
#
#     bash scripts/check_cuda.sh [BUILD_DIR]        # default build/cuda-check
#     ZT_CUDA_ARCHS="80;90" bash scripts/check_cuda.sh
#
# It configures ggml with GGML_CUDA=ON for the architectures in ZT_CUDA_ARCHS (default sm_80 and sm_90)
# and compiles, for each of them, exactly the translation units that patch 0008 changes or whose kernels
# it changes: softmax.cu, topk-moe.cu, fattn.cu, ggml-cuda.cu and one template instance of each flash
# attention kernel (vec, tile at head sizes 64 and 256, mma for plain and grouped-query tiles). Nothing is
# linked or run: correctness needs a GPU (scripts/gpu_check.sh cuda, on a machine with one). ggml-cuda
# includes cuBLAS headers, which the CUDA toolkit on this machine lacks; they come from the PyPI wheel
# nvidia-cublas (headers only; the library paths CMake asks for are empty stand-ins, never linked). ccache,
# when present, caches the nvcc objects. Measured here: 9 units x 2 architectures in 212 s on 2 cores.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$REPO/build/cuda-check}"
ARCHS="${ZT_CUDA_ARCHS:-80;90}"
CUBLAS_VERSION=13.0.2.14
CACHE="${ZT_GGUF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zt-gguf}/cublas-$CUBLAS_VERSION"
PY="${PYTHON:-python3}"

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
    echo "check_cuda: nvcc not found on PATH (install the CUDA toolkit, or the PyPI package nvidia-cuda-nvcc)" >&2
    exit 1
fi
CUDA_ROOT="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"

if [ ! -f "$CACHE/include/cublas_v2.h" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "check_cuda: fetching the cuBLAS headers (PyPI nvidia-cublas==$CUBLAS_VERSION)"
    if ! "$PY" -m pip download -q --no-deps -d "$tmp" "nvidia-cublas==$CUBLAS_VERSION"; then
        echo "check_cuda: pip could not download nvidia-cublas==$CUBLAS_VERSION (its headers are needed)" >&2
        exit 1
    fi
    "$PY" - "$tmp" "$CACHE" <<'EOF'
import pathlib, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("nvidia_cublas-*.whl"))
part = dest.with_name(dest.name + ".part")
(part / "include").mkdir(parents=True, exist_ok=True)
(part / "lib").mkdir(exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if "/include/" in n and n.endswith(".h"):
            (part / "include" / pathlib.Path(n).name).write_bytes(z.read(n))
for lib in ("libcublas.so", "libcublasLt.so"):
    (part / "lib" / lib).write_bytes(b"")  # stand-ins for CMake's imported targets: nothing is linked
if dest.exists():
    import shutil
    shutil.rmtree(dest)
part.rename(dest)
EOF
fi

cmake -S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DZT_BUILD_TOOLS=OFF -DZT_BUILD_TESTS=OFF -DZT_BUILD_PYTHON=OFF \
    -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=OFF "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" \
    "-DCMAKE_CUDA_COMPILER=$NVCC" "-DCUDAToolkit_ROOT=$CUDA_ROOT" \
    "-DCUDA_cublas_LIBRARY=$CACHE/lib/libcublas.so" "-DCUDA_cublasLt_LIBRARY=$CACHE/lib/libcublasLt.so" \
    "-DCMAKE_CUDA_FLAGS=-I$CACHE/include" >"$BUILD.configure.log" 2>&1 || {
    tail -n 30 "$BUILD.configure.log" >&2
    echo "check_cuda: configuring ggml-cuda failed (log: $BUILD.configure.log)" >&2
    exit 1
}

DIR=llama.cpp/ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir
OBJECTS=(
    "$DIR/softmax.cu.o"
    "$DIR/topk-moe.cu.o"
    "$DIR/fattn.cu.o"
    "$DIR/ggml-cuda.cu.o"
    "$DIR/template-instances/fattn-vec-instance-f16-f16.cu.o"
    "$DIR/template-instances/fattn-tile-instance-dkq64-dv64.cu.o"
    "$DIR/template-instances/fattn-tile-instance-dkq256-dv256.cu.o"
    "$DIR/template-instances/fattn-mma-f16-instance-ncols1_8-ncols2_1.cu.o"
    "$DIR/template-instances/fattn-mma-f16-instance-ncols1_1-ncols2_8.cu.o"
)
echo "check_cuda: nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), architectures $ARCHS, ${#OBJECTS[@]} translation units"
start=$SECONDS
cmake --build "$BUILD" -j "${ZT_JOBS:-2}" --target "${OBJECTS[@]}"
echo "check_cuda: OK (${#OBJECTS[@]} translation units compiled in $((SECONDS - start)) s)"
