#!/usr/bin/env bash
# vramcal's simulated data-parallel ranks on the CPU (issue "Beyond one GPU"):
# results/cpu/smollm2-135m-sharded.csv. Each row is one `vramcal measure --shard S
# --world-size N --rank R` (src/measure/sharded.rs, src/measure/fsdp.rs): ddp, zero1 and zero2
# at N = 2, 4, 8 for full fine-tuning (f32, bf16 weights, checkpointing), LoRA r16 on all linear
# layers, other ranks, gradient accumulation, a master-weight recipe and SGD with momentum; then
# fsdp (checkpointing every layer) at N = 2, 4, 8 for full fine-tuning (f32, bf16), LoRA, the
# last rank and accumulation; each configuration's one-device row beside them; then zero3 as
# fsdp. Peaks are exact
# (the counting allocator).
#
# Usage: scripts/cpu-sharded-grid.sh VRAMCAL OUT.csv [fsdp|zero3]   (that part only)
set -euo pipefail
bin=$1 out=$2
m() { "$bin" measure --model smollm2-135m --quiet --out "$out" "$@"; }
fsdp() {
  local full=(--batch 2 --seq 256 --checkpointing layers)
  local long=(--batch 1 --seq 512 --checkpointing layers)
  local lora=(--batch 1 --seq 256 --checkpointing layers --method lora --lora r=16,alpha=32,targets=all-linear)
  local bf16=(--batch 1 --seq 128 --checkpointing layers --dtype bf16)
  for cfg in full long lora bf16; do
    declare -n a=$cfg
    [ "$cfg" = full ] || m "${a[@]}"   # the full configuration's one-device row is above
    for n in 2 4 8; do
      m "${a[@]}" --shard fsdp --world-size "$n"
    done
  done
  # Short sequences (the end of backward holds the peak there, not the head's backward).
  for seq in 64 128; do
    m --batch 1 --seq "$seq" --checkpointing layers
    for n in 2 4 8; do
      m --batch 1 --seq "$seq" --checkpointing layers --shard fsdp --world-size "$n"
    done
  done
  m "${full[@]}" --shard fsdp --world-size 8 --rank 7
  # A rank past some tensors' last rows (LoRA r4: 4 rows of each A), holding padding only.
  m --batch 1 --seq 128 --checkpointing layers --method lora --lora r=4,alpha=8,targets=all-linear
  m --batch 1 --seq 128 --checkpointing layers --method lora --lora r=4,alpha=8,targets=all-linear \
    --shard fsdp --world-size 8 --rank 7
  m --batch 1 --seq 256 --checkpointing layers --accumulate 2
  m --batch 1 --seq 256 --checkpointing layers --accumulate 2 --shard fsdp --world-size 4
}
# DeepSpeed ZeRO-3 (checkpointing every layer; src/measure/zero3.rs) at N = 2, 4, 8, beside the
# one-device rows the FSDP part measures: full fine-tuning (f32, bf16), LoRA, short sequences,
# the last rank, accumulation; the bucket is DeepSpeed's default (5e8 elements).
zero3() {
  local full=(--batch 2 --seq 256 --checkpointing layers)
  local long=(--batch 1 --seq 512 --checkpointing layers)
  local lora=(--batch 1 --seq 256 --checkpointing layers --method lora --lora r=16,alpha=32,targets=all-linear)
  local bf16=(--batch 1 --seq 128 --checkpointing layers --dtype bf16)
  local s64=(--batch 1 --seq 64 --checkpointing layers)
  local s128=(--batch 1 --seq 128 --checkpointing layers)
  for cfg in full long lora bf16 s64 s128; do
    declare -n a=$cfg
    for n in 2 4 8; do
      m "${a[@]}" --shard zero3 --world-size "$n"
    done
  done
  m "${full[@]}" --shard zero3 --world-size 8 --rank 7
  m --batch 1 --seq 128 --checkpointing layers --method lora --lora r=4,alpha=8,targets=all-linear \
    --shard zero3 --world-size 8 --rank 7
  m --batch 1 --seq 256 --checkpointing layers --accumulate 2 --shard zero3 --world-size 4
  # Added in the thirteenth session (the fused head's chunk and autocast moments): bf16 beyond
  # one chunk of 256 tokens, the autocast recipes; and FSDP's bf16 rank 0 of 8 at 1 × 512.
  m --batch 1 --seq 300 --checkpointing layers --dtype bf16 --shard zero3 --world-size 4
  m --batch 1 --seq 512 --checkpointing layers --dtype bf16 --shard zero3 --world-size 4
  m --batch 1 --seq 512 --checkpointing layers --dtype bf16 --shard fsdp --world-size 8
  m --batch 1 --seq 64 --checkpointing layers --precision amp-bf16 --shard zero3 --world-size 4
  m --batch 1 --seq 64 --checkpointing layers --precision amp-fp16 --shard zero3 --world-size 4
  m --batch 1 --seq 128 --checkpointing layers --precision amp-bf16 --shard zero3 --world-size 4
  m --batch 1 --seq 512 --checkpointing layers --precision amp-bf16 --shard zero3 --world-size 4
  m --batch 1 --seq 128 --checkpointing layers --precision bf16+amp --shard zero3 --world-size 4
}
if [ "${3:-}" = fsdp ]; then fsdp; exit 0; fi
if [ "${3:-}" = zero3 ]; then zero3; exit 0; fi
full=(--batch 2 --seq 256)
lora=(--batch 1 --seq 256 --method lora --lora r=16,alpha=32,targets=all-linear)
ckpt=(--batch 2 --seq 256 --checkpointing layers)
bf16=(--batch 1 --seq 128 --dtype bf16)
for cfg in full lora ckpt bf16; do
  declare -n a=$cfg
  m "${a[@]}"
  for n in 2 4 8; do
    for s in ddp zero1 zero2; do
      m "${a[@]}" --shard "$s" --world-size "$n"
    done
  done
done
# The last ranks hold the shorter partitions.
m "${full[@]}" --shard zero2 --world-size 8 --rank 7
m "${full[@]}" --shard zero1 --world-size 4 --rank 3
# Gradient accumulation: DDP all-reduces at the last micro-batch, ZeRO-2 reduce-scatters each.
m --batch 1 --seq 256 --accumulate 2
m --batch 1 --seq 256 --accumulate 2 --shard ddp --world-size 4
m --batch 1 --seq 256 --accumulate 2 --shard zero2 --world-size 4
# fp32 master weights of a bf16 model (the optimizer's partition and its fp32 copy), SGD.
m --batch 1 --seq 128 --precision bf16-master
m --batch 1 --seq 128 --precision bf16-master --shard zero1 --world-size 4
m --batch 1 --seq 128 --precision bf16-master --shard zero2 --world-size 8
m "${full[@]}" --optimizer sgd --momentum 0.9
m "${full[@]}" --optimizer sgd --momentum 0.9 --shard zero2 --world-size 4
m "${full[@]}" --optimizer sgd --momentum 0.9 --shard ddp --world-size 2
fsdp
zero3
