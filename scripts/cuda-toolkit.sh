#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit (nvcc, headers, runtime) from PyPI wheels into a cache folder,
# for building vramcal's `cuda` feature on a machine without a GPU or a system CUDA install.
# Pinned to 13.0.x: the GPU machines' driver is CUDA 13.0 and refuses PTX from a newer nvcc.
# Also builds stub CUDA libraries (scripts/cuda-stubs.py) into <toolkit>/lib/stubs, where
# cudarc's build script looks, so the binary and the test binaries link and start here; on a GPU
# machine the same binary loads the real libraries (never put lib/stubs on LD_LIBRARY_PATH there).
# Prints the environment to use, e.g.:  eval "$(bash scripts/cuda-toolkit.sh)"
# (in every new shell). On failure it prints `false`, so that eval fails too.
# VRAMCAL_CUDA_STUBS is the library path that runs such a build here (the stubs and the
# toolkit's libcudart): LD_LIBRARY_PATH=$VRAMCAL_CUDA_STUBS cargo test --release --features cuda
#   VRAMCAL_CACHE      cache root (default ~/.cache/vramcal)
#   CUDA_COMPUTE_CAP   target (default 80: PTX for A100 that newer GPUs JIT-compile; 90 = sm_90a,
#                      H100/H200 only)
set -euo pipefail
trap 'echo false' ERR
cache="${VRAMCAL_CACHE:-$HOME/.cache/vramcal}"
dir="$cache/cuda-13.0"
root="$dir/nvidia/cu13"
wheels="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
# The marker is written only after a complete install, so a partial one is redone.
if [ ! -e "$dir/.installed" ] || [ "$(cat "$dir/.installed")" != "$wheels" ]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  python3 -m pip install --quiet --no-deps --only-binary=:all: --target "$dir" $wheels >&2
  [ -x "$root/bin/nvcc" ] || { echo "nvcc not found under $root after install" >&2; false; }
  echo "$wheels" >"$dir/.installed"
fi
# Some tools look for lib64 and for nvvm next to bin.
[ -e "$root/lib64" ] || ln -s lib "$root/lib64"
# The linker name of the runtime, as a full toolkit has it (candle-kernels links libcudart).
[ -e "$root/lib/libcudart.so" ] || ln -s libcudart.so.13 "$root/lib/libcudart.so"
# Stub libraries, generated from the cudarc version this checkout resolves to; redone when that
# version or the generator changes.
repo="$(cd "$(dirname "$0")/.." && pwd)"
cudarc="$(cargo metadata --quiet --format-version 1 --features cuda --manifest-path "$repo/Cargo.toml" \
  --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" |
  python3 -c 'import json, sys
found = [p["manifest_path"].rsplit("/", 1)[0] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
print(found[0] if found else "")')"
[ -n "$cudarc" ] || { echo "cudarc is not among the dependencies of the cuda feature" >&2; false; }
stubs="$root/lib/stubs"
tag="$(basename "$cudarc")-$(sha256sum "$repo/scripts/cuda-stubs.py" | cut -c1-12)"
if [ ! -e "$stubs/.from-$tag" ]; then
  rm -rf "$stubs"
  python3 "$repo/scripts/cuda-stubs.py" "$cudarc" "$stubs" >&2
  touch "$stubs/.from-$tag"
fi
q() { printf '%q' "$1"; }
echo "export CUDA_ROOT=$(q "$root")"
echo "export CUDA_PATH=$(q "$root")"
# A variable cudarc's build script watches: setting it makes a build folder made before the
# stubs existed look again for lib/stubs.
echo "export CUDA_HOME=$(q "$root")"
echo "export VRAMCAL_CUDA_STUBS=$(q "$stubs:$root/lib")"
echo "export PATH=$(q "$root/bin"):\$PATH"
echo "export CUDA_COMPUTE_CAP=$(q "${CUDA_COMPUTE_CAP:-80}")"
