#!/usr/bin/env bash
# Builds the Python package (python/: maturin + PyO3, abi3) into a wheel, installs it into a fresh
# virtual environment and checks that `vramcal.estimate(...)` returns exactly what
# `vramcal estimate ... --json` prints for every configuration of python/tests/check_wheel.py
# (and raises the command's one-line message for refused ones).
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
