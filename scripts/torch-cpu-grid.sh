#!/usr/bin/env bash
# The PyTorch CPU reference grid of results/torch-cpu/ (issue "Predict the PyTorch fine-tune
# people actually run"): scripts/torch_reference.py --count-cpu-memory over two architectures
# (smollm2-135m: Llama, tied head; mistral-mini: Mistral, GQA + sliding window, untied), and a
# small grid of a third (qwen2.5-0.5b: Qwen2, q/k/v biases), full /
# PEFT LoRA / bitsandbytes QLoRA, checkpointing off/on/reentrant, sdpa/eager, fp32/bf16/amp-bf16,
# the optimizers of HF's Trainer, LoRA targets and dropout. Peaks are exact (profiler memory
# events); times ran under the profiler and are not comparable.
#
# Usage: scripts/torch-cpu-grid.sh PYTHON VRAMCAL OUTDIR [MODEL...]
#   PYTHON: a Python with torch, transformers, peft and bitsandbytes; VRAMCAL: the binary.
# Resumable: points already in OUTDIR/<model>.csv are left out (--skip-existing).
set -euo pipefail
py=$1 bin=$2 out=$3
shift 3
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(mistral-mini smollm2-135m qwen2.5-0.5b)
mkdir -p "$out"
for m in "${models[@]}"; do
  f="$out/$m.csv"
  run() { "$py" scripts/torch_reference.py --vramcal "$bin" --model "$m" --device cpu \
    --count-cpu-memory --threads 2 --lora-r 8 --lora-alpha 16 --skip-existing --out "$f" "$@"; }
  if [ "$m" = qwen2.5-0.5b ]; then
    # A third architecture at its real size (Qwen2: q/k/v biases, tied head, 151,936-token
    # vocabulary), a small grid: LoRA fp32 with checkpointing off/on, full bf16 (biases trained).
    run --method lora --lora-targets q_proj,v_proj --precision fp32 --checkpointing off,on \
      --seq 32,64,128
    run --method full --precision bf16 --seq 32,64,128
    continue
  fi
  # fp32: methods x attention x checkpointing x batch x seq (256 is the held-out length).
  run --method full,lora --lora-targets q_proj,v_proj --precision fp32 --attn sdpa,eager \
    --checkpointing off,on --batch 1,2 --seq 64,128,256
  # Reentrant checkpointing.
  run --method full,lora --lora-targets q_proj,v_proj --precision fp32 --checkpointing reentrant \
    --seq 64,128,256
  # Optimizers users pick (HF TrainingArguments.optim).
  run --method full,lora --lora-targets q_proj,v_proj --precision fp32 --seq 64,128,256 \
    --optimizer adamw_torch_fused,sgd,adafactor,adamw_bnb_8bit,paged_adamw_8bit,paged_adamw_32bit
  # LoRA targets and dropout.
  run --method lora --lora-targets q_proj,k_proj,v_proj,o_proj --lora-targets all-linear \
    --lora-dropout 0,0.05 --precision fp32 --checkpointing off,on --seq 64,128,256
  run --method lora --lora-targets q_proj,v_proj --lora-dropout 0.05 --precision fp32 \
    --checkpointing off,on --seq 64,128,256
  # QLoRA (bitsandbytes NF4 on the CPU), fp32 compute.
  run --method qlora --lora-targets q_proj,v_proj --quant nf4,nf4-dq --precision fp32 \
    --checkpointing off,on --seq 64,128,256
  # 16-bit recipes (slow on CPUs without bf16 units: shorter sequences, 128 held out).
  run --method full,lora --lora-targets q_proj,v_proj --precision bf16,amp-bf16 \
    --checkpointing off,on --seq 32,64,128
  run --method qlora --lora-targets q_proj,v_proj --quant nf4-dq --precision amp-bf16 \
    --checkpointing off,on --seq 32,64,128
  # Adafactor with 16-bit weights (its fp32 copies of gradient and parameter).
  run --method full --precision bf16 --optimizer adafactor --seq 32,64,128
done
