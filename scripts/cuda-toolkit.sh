#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit (nvcc, headers, runtime) from PyPI wheels into a cache folder,
# for building vramcal's `cuda` feature on a machine without a GPU or a system CUDA install.
# Pinned to 13.0.x: the GPU machines' driver is CUDA 13.0 and refuses PTX from a newer nvcc.
# Also builds stub CUDA libraries (scripts/cuda-stubs.py) into <toolkit>/lib/stubs, where
# cudarc's build script looks, so the binary and the test binaries link and start here; on a GPU
# machine the same binary loads the real libraries (never put lib/stubs on LD_LIBRARY_PATH there).
# Prints the environment to use, e.g.:  eval "$(bash scripts/cuda-toolkit.sh)"
# VRAMCAL_CUDA_STUBS is the library path that runs such a build here (the stubs and the
# toolkit's libcudart): LD_LIBRARY_PATH=$VRAMCAL_CUDA_STUBS cargo test --release --features cuda
#   VRAMCAL_CACHE      cache root (default ~/.cache/vramcal)
#   CUDA_COMPUTE_CAP   target (default 80: PTX for A100 that newer GPUs JIT-compile; 90 = sm_90a,
#                      H100/H200 only)
set -euo pipefail
cache="${VRAMCAL_CACHE:-$HOME/.cache/vramcal}"
dir="$cache/cuda-13.0"
root="$dir/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ]; then
  mkdir -p "$dir"
  python3 -m pip install --quiet --no-deps --only-binary=:all: --target "$dir" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
[ -x "$root/bin/nvcc" ] || { echo "nvcc not found under $root after install" >&2; exit 1; }
# Some tools look for lib64 and for nvvm next to bin.
[ -e "$root/lib64" ] || ln -s lib "$root/lib64"
# The linker name of the runtime, as a full toolkit has it (candle-kernels links libcudart).
[ -e "$root/lib/libcudart.so" ] || ln -s libcudart.so.13 "$root/lib/libcudart.so"
# Stub libraries, generated from the cudarc version this checkout resolves to.
repo="$(cd "$(dirname "$0")/.." && pwd)"
cudarc="$(cargo metadata --quiet --format-version 1 --features cuda --manifest-path "$repo/Cargo.toml" \
  --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" |
  python3 -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')"
stubs="$root/lib/stubs"
if [ ! -e "$stubs/.from-$(basename "$cudarc")" ]; then
  rm -rf "$stubs"
  python3 "$repo/scripts/cuda-stubs.py" "$cudarc" "$stubs" >&2
  touch "$stubs/.from-$(basename "$cudarc")"
fi
echo "export CUDA_ROOT=$root"
echo "export CUDA_PATH=$root"
# A variable cudarc's build script watches: setting it makes a build folder made before the
# stubs existed look again for lib/stubs.
echo "export CUDA_HOME=$root"
echo "export VRAMCAL_CUDA_STUBS=$stubs:$root/lib"
echo "export PATH=$root/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}"
