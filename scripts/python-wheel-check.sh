#!/usr/bin/env bash
# Builds the Python package (python/: maturin + PyO3, abi3) into a wheel, installs it into a fresh
# virtual environment and checks that `vramcal.estimate(...)` returns exactly what
# `vramcal estimate ... --json` prints for every configuration of python/tests/check_wheel.py
# (and raises the command's one-line message for refused ones); then, where torch, transformers and
# peft are installed, vramcal.MemoryRecorder in three real HF Trainer runs on the CPU
# (python/tests/check_recorder.py).
# Usage: bash scripts/python-wheel-check.sh [VRAMCAL_BINARY]   (default: target/release/vramcal)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/vramcal}")"
cache="$HOME/.cache/vramcal"
mkdir -p "$cache"
# maturin from PyPI, in its own environment (kept between runs).
if [ ! -x "$cache/py-venv/bin/maturin" ]; then
  python3 -m venv "$cache/py-venv"
  "$cache/py-venv/bin/pip" install --quiet "maturin>=1.5,<2"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Its own build folder beside the CLI's (other features of the vramcal crate).
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}-python" \
  "$cache/py-venv/bin/maturin" build --release --quiet -m python/Cargo.toml -o "$work/wheels" >&2
wheel="$(ls "$work"/wheels/vramcal-*.whl)"
echo "built $(basename "$wheel") ($(stat -c %s "$wheel") bytes)"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --no-index "$wheel"
(cd "$work" && VRAMCAL_BIN="$bin" "$work/venv/bin/python" "$OLDPWD/python/tests/check_wheel.py")
# vramcal.MemoryRecorder with the real stack, where the reference harness's environment exists
# (VRAMCAL_TORCH_PYTHON, default ~/.cache/vramcal/torch-venv/bin/python): a fresh venv of the
# same Python that sees that environment's packages (torch, transformers, peft) through a .pth
# file, the wheel installed into it.
torch_py="${VRAMCAL_TORCH_PYTHON:-$cache/torch-venv/bin/python}"
if [ -x "$torch_py" ] && "$torch_py" -c "import torch, transformers, peft" 2>/dev/null; then
  "$torch_py" -m venv "$work/tvenv"
  site="$("$work/tvenv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
  "$torch_py" -c 'import site; print(site.getsitepackages()[0])' > "$site/vramcal-torch-env.pth"
  "$work/tvenv/bin/pip" install --quiet --no-index "$wheel"
  (cd "$work" && VRAMCAL_BIN="$bin" "$work/tvenv/bin/python" "$OLDPWD/python/tests/check_recorder.py" 2>&1 |
    grep -E "^(\||profile |MemoryRecorder |Traceback|AssertionError|  File)") 
else
  echo "MemoryRecorder check skipped: no environment with torch, transformers and peft ($torch_py)"
fi
