#!/usr/bin/env bash
# Builds the estimator page into web/dist/ (static files: serve the folder with any static file
# server, e.g. `python3 -m http.server -d web/dist 8000`).
#
# Installs what it needs where missing: the wasm32-unknown-unknown Rust target (rustup) and
# wasm-bindgen-cli at the version web/Cargo.lock pins (cargo install). The WebAssembly is built
# in ${CARGO_TARGET_DIR:-~/.cache/vramcal/target}-web. Prints the page's weight.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# Absolute: the build runs in web/, wasm-bindgen here.
target_dir="$(realpath -m "${CARGO_TARGET_DIR:-$HOME/.cache/vramcal/target}-web")"

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
version=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' web/Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$version" ]; then
  echo "installing wasm-bindgen-cli $version (once)" >&2
  # Not --locked: its lock file pins a webpki-roots release the crates.io index no longer offers.
  cargo install wasm-bindgen-cli --version "$version"
fi

(cd web && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked)
rm -rf web/dist
mkdir -p web/dist
wasm-bindgen --target web --no-typescript --out-dir web/dist/pkg \
  "$target_dir/wasm32-unknown-unknown/release/vramcal_web.wasm"
cp web/static/* web/dist/

wasm=web/dist/pkg/vramcal_web_bg.wasm
raw=$(stat -c %s "$wasm")
gz=$(gzip -9 -c "$wasm" | wc -c)
all=$(find web/dist -type f -exec cat {} + | wc -c)
allgz=$(find web/dist -type f | while read -r f; do gzip -9 -c "$f" | wc -c; done | awk '{s+=$1} END {print s}')
echo "built $root/web/dist: wasm $raw bytes ($gz gzipped); page $all bytes ($allgz gzipped, file by file)"
