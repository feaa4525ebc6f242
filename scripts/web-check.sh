#!/usr/bin/env bash
# Builds the estimator page (scripts/web-build.sh) and checks it in a real headless Chromium
# (web/tests/check_page.py): 26 configurations set through the form and 300 generated ones, each
# answer compared byte for byte with `vramcal estimate --json`; bad input shown next to its field; page weight and time to
# the first estimate printed. Lints the browser build first (the web crate and the vramcal library
# for wasm32, clippy -D warnings).
#
# Installs what it needs where missing: Debian's chromium and chromium-driver (apt-get, as root),
# selenium from PyPI in ~/.cache/vramcal/web-venv.
# Usage: bash scripts/web-check.sh [VRAMCAL_BINARY] [check_page.py options, e.g. --screenshot F]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/vramcal}")"
shift || true
cache="$HOME/.cache/vramcal"
mkdir -p "$cache"

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "not root and no chromium/chromedriver: the page check is skipped (install Debian's chromium and chromium-driver)" >&2
    exit 0
  fi
fi
if ! "$cache/web-venv/bin/python" -c "import selenium" 2>/dev/null; then
  python3 -m venv "$cache/web-venv"
  "$cache/web-venv/bin/pip" install --quiet "selenium>=4.20,<5"
fi

bash scripts/web-build.sh
target_dir="$(realpath -m "${CARGO_TARGET_DIR:-$cache/target}-web")"
(cd web && cargo fmt --check && CARGO_TARGET_DIR="$target_dir" cargo clippy --release --locked --quiet -- -D warnings)
RUSTFLAGS='--cfg getrandom_backend="wasm_js"' CARGO_TARGET_DIR="$target_dir" \
  cargo clippy --release --lib --no-default-features --target wasm32-unknown-unknown --quiet -- -D warnings
"$cache/web-venv/bin/python" web/tests/check_page.py --vramcal "$bin" "$@"
