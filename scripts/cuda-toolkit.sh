#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit (nvcc, headers, runtime) from PyPI wheels into a cache folder,
# for building vramcal's `cuda` feature on a machine without a GPU or a system CUDA install.
# Pinned to 13.0.x: the GPU machines' driver is CUDA 13.0 and refuses PTX from a newer nvcc.
# Prints the environment to use, e.g.:  eval "$(bash scripts/cuda-toolkit.sh)"
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
echo "export CUDA_ROOT=$root"
echo "export CUDA_PATH=$root"
echo "export PATH=$root/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}"
