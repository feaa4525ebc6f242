#!/usr/bin/env bash
# Builds the `--features cuda` binary on a machine without a GPU (CUDA 13.0 toolkit from PyPI
# wheels, stub libraries to link against) and puts a stripped copy at target/gpu/vramcal, the
# binary scripts/gpu-check.sh runs on a GPU machine, and the tests/cuda.rs test binary at
# target/gpu/cuda-tests: carry target/gpu/vramcal.gz and target/gpu/cuda-tests.gz there with the
# repository.
# Cold: about 15 minutes on 2 cores. The build folder is $CARGO_TARGET_DIR when set (docs/cuda.md's
# "Building" sets it), else <cache>/target-cuda, the one .ci/run uses.
#   VRAMCAL_CACHE      cache root (default ~/.cache/vramcal)
#   CUDA_COMPUTE_CAP   80 (default: PTX for A100 and newer, JIT-compiled once per machine) or 90
#                      (sm_90a, H100/H200 only, no JIT)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-toolkit.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${VRAMCAL_CACHE:-$HOME/.cache/vramcal}/target-cuda}"
cargo build --release --features cuda
mkdir -p target/gpu
strip -o target/gpu/vramcal "$CARGO_TARGET_DIR/release/vramcal"
# About 60 MB stripped (PTX for every candle kernel), 15 MB gzipped: carry the .gz.
gzip -9 -c target/gpu/vramcal >target/gpu/vramcal.gz
# The test binary of tests/cuda.rs, for its kernels-vs-CPU test (gpu-check.sh runs it first).
tests="$(cargo test --release --features cuda --test cuda --no-run --message-format json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')"
[ -n "$tests" ] || { echo "error: the tests/cuda.rs binary was not built" >&2; exit 1; }
strip -o target/gpu/cuda-tests "$tests"
gzip -9 -c target/gpu/cuda-tests >target/gpu/cuda-tests.gz
# It starts here against the stubs; a GPU machine loads its real libraries instead.
LD_LIBRARY_PATH="$VRAMCAL_CUDA_STUBS" target/gpu/vramcal --version >&2
ls -l target/gpu/
