#!/usr/bin/env bash
# The one-call GPU check. Runs on a machine with an NVIDIA GPU, no Rust and no network, from a
# copy of this repository plus a prebuilt `--features cuda` binary (scripts/gpu-binary.sh).
#
#   bash scripts/gpu-check.sh [OUT_DIR]        (default: $OUT, else ./gpu-check-out)
#
# It prints the device, measures a fixed grid with vramcal's three counters (allocated =
# memory-pool high-water, reserved, device = cuMemGetInfo), compares the estimator with it
# (`vramcal check`), and, where python3 has torch and transformers, measures the same points
# with scripts/torch_reference.py (torch.cuda.max_memory_allocated) and writes a side-by-side
# table. Everything lands in OUT_DIR: one CSV per sweep, check tables, compare.md, and
# gpu-check.log. Grid stages run in priority order under one deadline (about 7.5 minutes by
# default, VRAMCAL_GPU_CHECK_SECONDS); a stage cut short keeps the rows it finished and says so.
#
#   VRAMCAL_BIN        the binary (default target/gpu/vramcal, or its .gz)
#   VRAMCAL_TESTS_BIN  the tests/cuda.rs test binary (default target/gpu/cuda-tests, or its .gz)
set -uo pipefail
out="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$out" && out="$(cd "$out" && pwd)" # relative to where it was called from
cd "$(dirname "$0")/.."
budget_s="${VRAMCAL_GPU_CHECK_SECONDS:-450}"
bin="${VRAMCAL_BIN:-target/gpu/vramcal}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu-check.log") 2>&1
start=$(date +%s)
left() { echo $((budget_s - ($(date +%s) - start))); }

echo "== vramcal GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not available"

# The CUDA 13 libraries come from the Python wheels (PyTorch's nvidia-* packages); libcuda.so.1
# from the driver. The stub libraries of the build machine must never be on this path.
libs="$(python3 - <<'EOF' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
names = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13"]
dirs = sorted({os.path.dirname(f) for r in roots for n in names
               for f in glob.glob(os.path.join(r, "nvidia", "**", n), recursive=True)})
print(":".join(dirs))
EOF
)"
if [ -n "$libs" ]; then
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
case ":${LD_LIBRARY_PATH:-}:" in
  *stubs*) echo "error: a stub library folder is on LD_LIBRARY_PATH ($LD_LIBRARY_PATH)"; exit 1 ;;
esac
if [ ! -x "$bin" ] && [ -f "$bin.gz" ]; then
  tmp="$(mktemp -d)"
  gunzip -c "$bin.gz" >"$tmp/vramcal" && chmod +x "$tmp/vramcal" && bin="$tmp/vramcal"
fi
if [ ! -x "$bin" ]; then
  echo "error: no vramcal binary at $bin (build it with scripts/gpu-binary.sh, or set VRAMCAL_BIN)"
  exit 1
fi
missing="$(ldd "$bin" | grep 'not found')"
if [ -n "$missing" ]; then
  echo "error: $bin cannot start; missing libraries (libcuda.so.1 comes with the NVIDIA driver; the"
  echo "others with PyTorch's CUDA 13 wheels, nvidia-cublas, -curand, -cuda-runtime; or set LD_LIBRARY_PATH):"
  echo "$missing"
  exit 1
fi
"$bin" --version
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
# One tiny point first: the device works (and the driver JIT-compiles the PTX once, into its
# cache, before anything is timed).
if ! timeout 300 "$bin" measure --model tiny --batch 1 --seq 8 --device cuda:0 --quiet; then
  echo "error: vramcal cannot measure on cuda:0 here (the line above says why)"
  exit 1
fi
# The kernels of kernels/fused.cu against the CPU (tests/cuda.rs), when their test binary came.
tests="${VRAMCAL_TESTS_BIN:-target/gpu/cuda-tests}"
if [ ! -x "$tests" ] && [ -f "$tests.gz" ]; then
  tmp_t="$(mktemp -d)"
  gunzip -c "$tests.gz" >"$tmp_t/cuda-tests" && chmod +x "$tmp_t/cuda-tests" && tests="$tmp_t/cuda-tests"
fi
if [ -x "$tests" ]; then
  echo "== kernels vs CPU (tests/cuda.rs kernels_match_the_cpu)"
  if timeout 120 "$tests" kernels_match_the_cpu --exact --nocapture --test-threads 1; then
    echo "kernels: match the CPU"
  else
    echo "kernels: MISMATCH or failure (above); the measurements below use them all the same"
  fi
else
  echo "== kernels vs CPU: skipped (no test binary at $tests; scripts/gpu-binary.sh makes it)"
fi

lora="r=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj"
# Same recipe on both sides: bf16 weights, AdamW states in bf16 (PyTorch's AdamW keeps its
# states in the parameters' dtype), random weights and tokens.
# LoRA first: if a stage is cut short, the points most users run are the ones measured.
common=(--device cuda:0 --weights random --dtype bf16 --optimizer-state-dtype bf16
  --method lora,full --lora "$lora" --checkpointing layers,none)

stage() { # name, at most this many seconds, command...
  local name=$1 cap=$2 t
  shift 2
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -le 15 ]; then
    echo "-- $name: skipped, the time budget is spent"
    return
  fi
  echo "-- $name (at most ${t} s)"
  timeout --signal=TERM "$t" "$@"
  local rc=$?
  case $rc in
    0) ;;
    124) echo "-- $name: cut short by the time budget; its finished rows are kept" ;;
    *) echo "-- $name: exit status $rc; its finished rows are kept" ;;
  esac
}

have_torch=0
python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null && have_torch=1
torch_ref=(python3 scripts/torch_reference.py --vramcal "$bin" --method lora,full
  --lora-r 16 --lora-alpha 32 --lora-targets q_proj,k_proj,v_proj,o_proj
  --checkpointing layers,none --dtype bf16 --device cuda --attn sdpa)

# Per-stage caps (seconds) keep one stage from eating the others' time.
stage "vramcal smollm2-135m" 110 "$bin" sweep --model smollm2-135m "${common[@]}" \
  --batch 1,2,4 --seq 512,1024,2048,4096 --resume --out "$out/vramcal-smollm2-135m.csv"
if [ $have_torch = 1 ]; then
  stage "torch smollm2-135m" 80 "${torch_ref[@]}" --model smollm2-135m --batch 1,2,4 \
    --seq 512,1024,2048,4096 --out "$out/torch-smollm2-135m.csv"
fi
stage "vramcal mistral-7b-v0.1" 150 "$bin" sweep --model mistral-7b-v0.1 "${common[@]}" \
  --batch 1,4 --seq 512,2048,4096 --resume --out "$out/vramcal-mistral-7b-v0.1.csv"
if [ $have_torch = 1 ]; then
  stage "torch mistral-7b-v0.1" 100 "${torch_ref[@]}" --model mistral-7b-v0.1 --batch 1,4 \
    --seq 512,2048,4096 --out "$out/torch-mistral-7b-v0.1.csv"
else
  echo "-- torch reference: skipped (python3 with torch, transformers and CUDA not found)"
fi

echo "== the estimator against these measurements (report only; no thresholds)"
shopt -s nullglob
mine=("$out"/vramcal-*.csv)
theirs=("$out"/torch-*.csv)
if [ ${#mine[@]} -gt 0 ]; then
  "$bin" check --measured "${mine[@]}" --profile candle --out-md "$out/check-candle.md" \
    --out-csv "$out/check-candle.csv" | tail -n 8
fi
if [ ${#theirs[@]} -gt 0 ]; then
  "$bin" check --measured "${theirs[@]}" --profile torch-sdpa --out-md "$out/check-torch-sdpa.md" \
    --out-csv "$out/check-torch-sdpa.csv" | tail -n 8
fi

if [ ${#mine[@]} -gt 0 ] && [ ${#theirs[@]} -gt 0 ]; then
  echo "== vramcal vs PyTorch on the same points (allocated = pool high-water vs max_memory_allocated)"
  python3 - "$out" <<'EOF'
import csv, glob, os, sys
out = sys.argv[1]
def rows(pattern):
    for f in sorted(glob.glob(os.path.join(out, pattern))):
        yield from csv.DictReader(open(f))
key = lambda r, ck: (r["model"], r["method"], ck, int(r["batch"]), int(r["seq"]))
mine = {key(r, "on" if r["checkpointing"] != "none" else "off"): r for r in rows("vramcal-*.csv")}
theirs = {key(r, r["checkpointing"]): r for r in rows("torch-*.csv")}
gib = lambda b: f"{int(b) / 2**30:.2f}" if b else "-"
def step2(r):
    # Step 2's peak (forward, backward, optimizer step): loading differs between the tools.
    v = [int(r[k]) for k in ("step2_forward_peak_bytes", "step2_backward_peak_bytes",
                             "step2_optimizer_step_peak_bytes") if r.get(k)]
    return max(v) if v else None
lines = ["| model | method | ckpt | batch | seq | vramcal step-2 peak GiB | torch step-2 peak GiB | ratio | vramcal reserved GiB | torch reserved GiB | vramcal device GiB | vramcal s/step | torch s/step |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for k in sorted(set(mine) & set(theirs)):
    m, t = mine[k], theirs[k]
    a, b = step2(m), step2(t)
    ratio = f"{a / b:.2f}" if a and b and m["status"] == t["status"] == "ok" else f"{m['status']}/{t['status']}"
    lines.append(f"| {' | '.join(map(str, k))} | {gib(a)} | {gib(b)} | {ratio} | "
                 f"{gib(m['peak_reserved_bytes'])} | {gib(t['peak_reserved_bytes'])} | {gib(m['peak_device_bytes'])} | "
                 f"{m['step2_seconds'] or '-'} | {t['step2_seconds'] or '-'} |")
text = "GiB = 2^30 bytes.\n\n" + "\n".join(lines) + "\n"
open(os.path.join(out, "compare.md"), "w").write(text)
print(text)
EOF
fi
echo "== done in $(($(date +%s) - start)) s; files in $out:"
ls -l "$out"
