#!/usr/bin/env python3
"""The same training step in PyTorch + transformers, for checking vramcal against PyTorch.

Builds `MistralForCausalLM` / `LlamaForCausalLM` from a vramcal preset's config (read from
`vramcal models --json`, so both tools train the same shapes) with random weights, and runs
vramcal's protocol: load, then two steps of forward, loss, backward and AdamW step, for each
batch x seq point. LoRA is a plain wrapper (rank r, alpha, frozen base, adapters on the target
modules, as PEFT builds it), so PEFT need not be installed.

On CUDA it records `torch.cuda.max_memory_allocated` (and `max_memory_reserved`) per phase,
the counters vramcal's `allocated` and `reserved` correspond to. On the CPU, where PyTorch keeps
no allocator statistics, it records the bytes of the tensors autograd saves for backward
(`torch.autograd.graph.saved_tensors_hooks`, each storage counted once) and step times, for
the activation and speed ratios of issue "Lean and fast training step".

Rows are written in the schema of `../shared/cases/public-measurements.csv`, so
`vramcal check --measured <file> --profile torch-sdpa` reads them; extra columns give the
phases. Run by hand or by scripts/gpu-check.sh; needs torch and transformers, nothing else.

Example:
  python3 scripts/torch_reference.py --vramcal target/release/vramcal --model smollm2-135m \\
      --batch 1,2 --seq 256,512 --dtype f32 --device cpu --out torch-cpu.csv
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
import warnings

import torch
import transformers

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
FIELDS = [
    "id", "source", "model", "method", "lora_r", "lora_alpha", "lora_targets", "quant",
    "precision", "optimizer", "batch", "seq", "seq_kind", "checkpointing", "attention", "gpu",
    "counter", "peak_bytes", "notes", "status", "peak_reserved_bytes", "load_peak_bytes",
    "step2_forward_peak_bytes", "step2_backward_peak_bytes", "step2_optimizer_step_peak_bytes",
    "saved_activation_bytes", "step1_seconds", "step2_seconds", "step_seconds_median",
    "timed_steps", "forward_seconds",
    "backward_seconds", "optimizer_seconds", "torch_version", "transformers_version",
]


class LoraLinear(torch.nn.Module):
    """`base(x) + (x A^T B^T) * alpha / r`, A ~ kaiming-uniform, B = 0 (PEFT's defaults)."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def preset_config(vramcal: str, name: str) -> dict:
    out = subprocess.run([vramcal, "models", "--json"], check=True, capture_output=True, text=True)
    for p in json.loads(out.stdout):
        if p["name"] == name:
            return p["config"]
    sys.exit(f"unknown preset {name}")


def build(cfg: dict, dtype, device, attn: str):
    arch = cfg["architectures"][0]
    kw = {k: v for k, v in cfg.items() if k != "architectures" and v is not None}
    if arch == "MistralForCausalLM":
        conf = transformers.MistralConfig(**kw)
        cls = transformers.MistralForCausalLM
    else:
        conf = transformers.LlamaConfig(**kw)
        cls = transformers.LlamaForCausalLM
    conf._attn_implementation = attn
    torch.manual_seed(0)
    # Built in the target dtype on the device directly: no fp32 copy inflates the load phase.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(conf)
    finally:
        torch.set_default_dtype(prev)
    return model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args, cfg, method, ckpt, batch, seq):
    device, dtype = args.device, DTYPES[args.dtype]
    cuda = device.startswith("cuda")
    row = {
        "source": f"scripts/torch_reference.py (torch {torch.__version__})",
        "model": args.model, "method": method, "quant": "none",
        "precision": {"bf16": "bf16 weights", "f16": "fp16 weights", "f32": "fp32"}[args.dtype],
        "optimizer": "torch.optim.AdamW (states in the parameters' dtype)",
        "batch": batch, "seq": seq, "seq_kind": "random tokens",
        "checkpointing": "on" if ckpt else "off",
        "attention": args.attn,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "counter": "allocated" if cuda else "none (CPU: see saved_activation_bytes)",
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "timed_steps": args.timed_steps,
    }
    if method == "lora":
        row.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                   lora_targets=";".join(args.lora_targets.split(",")))
    row["id"] = f"torch-{args.model}-{method}-{'ckpt' if ckpt else 'nockpt'}-b{batch}-s{seq}"
    phases = {}

    def phase(name, fn):
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        phases[name] = {"seconds": time.perf_counter() - t0}
        if cuda:
            phases[name]["peak"] = torch.cuda.max_memory_allocated(device)
            phases[name]["reserved"] = torch.cuda.max_memory_reserved(device)
        return out

    model = opt = None
    try:
        model = phase("load", lambda: build(cfg, dtype, device, args.attn))
        if method == "lora":
            for p in model.parameters():
                p.requires_grad_(False)
            targets = set(args.lora_targets.split(","))
            for name, mod in list(model.named_modules()):
                for child, sub in list(mod.named_children()):
                    if child in targets and isinstance(sub, torch.nn.Linear):
                        setattr(mod, child, LoraLinear(sub, args.lora_r, args.lora_alpha))
        if ckpt:
            # Deprecated in transformers 5 (activation_checkpointing_enable takes other
            # arguments there) but present in 4 and 5 alike.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            if method == "lora":
                model.enable_input_require_grads()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g).to(device)
        saved = {}
        # Parameters and buffers that autograd saves (a linear layer saves its weight) are not
        # activations: leave their storages out.
        fixed = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

        def pack(t):
            try:
                key = t.untyped_storage().data_ptr()
                if key not in fixed:
                    saved[key] = t.untyped_storage().nbytes()
            except RuntimeError:
                pass
            return t

        times = []
        for step in range(1, 3 + args.timed_steps):
            if step > 2:
                # Extra steps: timed only, like vramcal's --timed-steps.
                t0 = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                times.append(time.perf_counter() - t0)
                continue
            t0 = time.perf_counter()
            saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = phase(f"step{step}_forward", lambda: model(input_ids=ids, labels=ids).loss)
            row["saved_activation_bytes"] = sum(saved.values())
            phase(f"step{step}_backward", lambda: loss.backward())
            del loss

            def opt_step():
                opt.step()
                opt.zero_grad(set_to_none=True)

            phase(f"step{step}_optimizer_step", opt_step)
            row[f"step{step}_seconds"] = time.perf_counter() - t0
            if step == 2:
                times.append(row["step2_seconds"])
        times.sort()
        n = len(times)
        row["step_seconds_median"] = times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2
        row["status"] = "ok"
    except torch.OutOfMemoryError as e:
        row["status"] = "oom"
        row["notes"] = str(e).splitlines()[0][:200]
    except RuntimeError as e:
        # cuBLAS/cuDNN allocation failures arrive as RuntimeError; anything else is an error row.
        text = str(e)
        alloc = "ALLOC" in text or "out of memory" in text
        row["status"] = "oom" if alloc else "error"
        row["notes"] = text.splitlines()[0][:200] if text else type(e).__name__
    finally:
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    for k in ("forward", "backward", "optimizer"):
        name = {"forward": "step2_forward", "backward": "step2_backward",
                "optimizer": "step2_optimizer_step"}[k]
        if name in phases:
            row[f"{k}_seconds"] = phases[name]["seconds"]
    if cuda and phases:
        row["peak_bytes"] = max(p["peak"] for p in phases.values())
        row["peak_reserved_bytes"] = max(p["reserved"] for p in phases.values())
        for name in ("load", "step2_forward", "step2_backward", "step2_optimizer_step"):
            if name in phases:
                row[f"{name}_peak_bytes"] = phases[name]["peak"]
    # No allocator counter on the CPU: peak_bytes stays empty there (saved_activation_bytes is
    # the comparable figure), so such a file is not mistaken for peaks by `vramcal check`.
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vramcal", default=os.environ.get("VRAMCAL_BIN", "vramcal"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="full", help="comma-separated: full,lora")
    ap.add_argument("--checkpointing", default="none", help="comma-separated: none,layers")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--seq", default="512")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--timed-steps", type=int, default=0,
                    help="extra steps after step 2, timed only; step_seconds_median covers step 2 and these")
    ap.add_argument("--out", required=True, help="CSV to append to")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = preset_config(a.vramcal, a.model)
    new = not os.path.exists(a.out) or os.path.getsize(a.out) == 0
    with open(a.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for method in a.method.split(","):
            for ck in a.checkpointing.split(","):
                for b in map(int, a.batch.split(",")):
                    for s in map(int, a.seq.split(",")):
                        r = measure(a, cfg, method, ck != "none", b, s)
                        w.writerow(r)
                        f.flush()
                        print(f"{r['id']}: {r['status']} peak {r.get('peak_bytes')} bytes, "
                              f"step2 {r.get('step2_seconds')} s", flush=True)


if __name__ == "__main__":
    main()
