#!/usr/bin/env python3
"""The same training step in PyTorch + transformers, for checking vramcal against PyTorch.

Builds `MistralForCausalLM` / `LlamaForCausalLM` from a vramcal preset's config (read from
`vramcal models --json`, so both tools train the same shapes) with random weights, and runs
vramcal's protocol: load, then two steps of forward, loss, backward and AdamW step, for each
batch x seq point. LoRA is PEFT's (`peft.LoraConfig` + `get_peft_model`, dropout 0, the target
modules given), as users run it; without PEFT installed, LoRA rows are `error` rows saying so.

On CUDA it records `torch.cuda.max_memory_allocated` (and `max_memory_reserved`) per phase,
the counters vramcal's `allocated` and `reserved` correspond to. On the CPU, where PyTorch keeps
no allocator statistics, it records the bytes of the tensors autograd saves for backward
(`torch.autograd.graph.saved_tensors_hooks`, each storage counted once) and step times, for
the activation and speed ratios of issue "Lean and fast training step"; with
`--count-cpu-memory` it also records the exact peak of PyTorch's live tensor bytes per phase
(`counter` = `allocated`): the profiler's memory events (`torch.profiler.profile(
profile_memory=True)`: one event per allocation and free with the bytes requested from the CPU
allocator), summed in time order from before the model is built, each phase a
`record_function` range on the same clock (see `CpuMemory`; `--self-test` checks it on
tensors whose bytes are known). The profiler slows the step, so those rows' times are not
comparable (their `notes` say so).

Rows are written in the schema of `../shared/cases/public-measurements.csv`, so
`vramcal check --measured <file> --profile torch-sdpa` reads them; extra columns give the
phases. Run by hand or by scripts/gpu-check.sh; needs torch and transformers, and PEFT for LoRA.

Example:
  python3 scripts/torch_reference.py --vramcal target/release/vramcal --model smollm2-135m \\
      --batch 1,2 --seq 256,512 --dtype f32 --device cpu --out torch-cpu.csv
"""

import argparse
import contextlib
import csv
import json
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
    "peft_version", "utc_time", "host_cpu", "threads", "command",
]


def host_cpu():
    """The CPU's model name and the SIMD level PyTorch's kernels use on it."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


class Unsupported(Exception):
    """A configuration the installed libraries cannot run (the row says which library)."""


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


class CpuMemory:
    """PyTorch's live CPU tensor bytes over a run, exact to the byte, from the profiler's memory
    events (torch.profiler with profile_memory=True records every allocation (+bytes requested)
    and free (-bytes) of the CPU allocator, from any thread). Start it before the first tensor
    of the run exists: frees of older tensors would count negative. Phases are
    `record_function("vramcal::<phase>")` ranges, timed on the profiler's own clock."""

    PREFIX = "vramcal::"

    def __init__(self):
        self.prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self):
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        return self.prof.__exit__(*exc)

    def phase(self, name):
        return torch.profiler.record_function(self.PREFIX + name)

    def peaks(self):
        """(overall peak bytes, {phase: peak bytes while it ran}, bytes live at the end, lowest
        running total). A phase's peak counts what was live when it began, as
        torch.cuda.max_memory_allocated after reset_peak_memory_stats does."""
        events = self.prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        ranges = [(e.name()[len(self.PREFIX):], e.start_ns(), e.end_ns())
                  for e in events if e.name().startswith(self.PREFIX)]
        live, lowest, overall = 0, 0, 0
        peak = {}
        for name, a, b in ranges:
            peak[name] = None
        i = 0
        # Walk the events once per phase (phases are few); live bytes at a phase's start are
        # the running total of the events before it.
        for name, a, b in sorted(ranges, key=lambda r: r[1]):
            while i < len(mem) and mem[i][0] < a:
                live += mem[i][1]
                lowest = min(lowest, live)
                overall = max(overall, live)
                i += 1
            best = live
            while i < len(mem) and mem[i][0] <= b:
                live += mem[i][1]
                lowest = min(lowest, live)
                best = max(best, live)
                i += 1
            overall = max(overall, best)
            peak[name] = best
        for _, n in mem[i:]:
            live += n
            lowest = min(lowest, live)
            overall = max(overall, live)
        return overall, peak, live, lowest


def self_test():
    """Checks CpuMemory on tensors whose bytes are known; exits non-zero if it is off."""
    with CpuMemory() as m:
        with m.phase("a"):
            a = torch.empty(1000, dtype=torch.float32)   # 4000 B
            b = torch.empty(250, dtype=torch.float64)    # 2000 B: 6000 B live
            del a                                        # 2000 B
        with m.phase("b"):
            c = torch.empty(3, 5, dtype=torch.bfloat16)  # 30 B: 2030 B live
            d = torch.ones(64, 64) @ torch.ones(64, 64)  # 3 x 16384 B live, then two freed
            del b, c
        del d
    overall, peak, end, lowest = m.peaks()
    got = (overall, peak, end, lowest)
    # Phase b: 2000 (b) + 30 (c) + two 16384 B operands + the 16384 B product live at once.
    want = (2030 + 3 * 16384, {"a": 6000, "b": 2030 + 3 * 16384}, 0, 0)
    print(f"self-test: overall/phases/end/lowest {got}, expected {want}")
    if got != want:
        sys.exit("self-test failed: the profiler's memory events do not add up to the known bytes")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args, cfg, method, ckpt, batch, seq):
    device, dtype = args.device, DTYPES[args.dtype]
    cuda = device.startswith("cuda")
    row = {
        "source": f"scripts/torch_reference.py (torch {torch.__version__})",
        "model": args.model, "method": method, "quant": "none",
        "precision": {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}[args.dtype],
        "optimizer": "adamw_torch",
        "batch": batch, "seq": seq, "seq_kind": "random tokens",
        "checkpointing": "on" if ckpt else "off",
        "attention": args.attn,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "counter": "allocated" if cuda or args.count_cpu_memory else "none (CPU: see saved_activation_bytes)",
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "timed_steps": args.timed_steps,
        "utc_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host_cpu": host_cpu(), "threads": torch.get_num_threads(),
        "command": " ".join(["python3", "scripts/torch_reference.py"] + sys.argv[1:]),
    }
    if method == "lora":
        row.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                   lora_targets=";".join(args.lora_targets.split(",")))
    row["id"] = f"torch-{args.model}-{method}-{'ckpt' if ckpt else 'nockpt'}-b{batch}-s{seq}"
    phases = {}
    # PyTorch's live CPU tensor bytes over load and steps 1-2 (not the timed steps after them).
    counting = contextlib.ExitStack()
    mem = counting.enter_context(CpuMemory()) if args.count_cpu_memory and not cuda else None

    def phase(name, fn):
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with mem.phase(name) if mem else contextlib.nullcontext():
            out = fn()
        sync(device)
        phases[name] = {"seconds": time.perf_counter() - t0}
        if cuda:
            phases[name]["peak"] = torch.cuda.max_memory_allocated(device)
            phases[name]["reserved"] = torch.cuda.max_memory_reserved(device)
        return out

    model = opt = None
    try:
        if method == "lora":
            try:
                import peft
            except ImportError:
                raise Unsupported(
                    f"LoRA rows need PEFT (pip install peft); this Python has torch "
                    f"{torch.__version__} and transformers {transformers.__version__} without it")
            row["peft_version"] = peft.__version__
        model = phase("load", lambda: build(cfg, dtype, device, args.attn))
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
        if method == "lora":
            # PEFT's LoRA as users run it: the base frozen, A kaiming-uniform, B zero.
            with warnings.catch_warnings():
                # transformers 5 deprecates an attribute PEFT reads under checkpointing.
                warnings.simplefilter("ignore", FutureWarning)
                model = peft.get_peft_model(model, peft.LoraConfig(
                    r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                    target_modules=args.lora_targets.split(","), bias="none",
                    task_type="CAUSAL_LM"))
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
                counting.close()
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
    except Unsupported as e:
        row["status"] = "error"
        row["notes"] = str(e)
        print(f"{row['id']}: {e}", file=sys.stderr)
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
        counting.close()
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
    if mem is not None and phases:
        _, peak, _, lowest = mem.peaks()
        row["peak_bytes"] = max(peak.values())
        for name in ("load", "step2_forward", "step2_backward", "step2_optimizer_step"):
            if name in peak:
                row[f"{name}_peak_bytes"] = peak[name]
        note = ("CPU: peaks are PyTorch's live tensor bytes from the profiler's memory events; "
                "times ran under the profiler")
        if lowest < 0:
            note += f"; WARNING: frees of tensors older than the count ({-lowest} B)"
        row["notes"] = "; ".join(x for x in (row.get("notes"), note) if x)
    # Without --count-cpu-memory no allocator counter on the CPU: peak_bytes stays empty there
    # (saved_activation_bytes is the comparable figure), so such a file is not mistaken for
    # peaks by `vramcal check`.
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vramcal", default=os.environ.get("VRAMCAL_BIN", "vramcal"))
    ap.add_argument("--self-test", action="store_true",
                    help="check the CPU memory count on tensors of known size, then exit")
    ap.add_argument("--count-cpu-memory", action="store_true",
                    help="on the CPU, record the exact peak of PyTorch's live tensor bytes per phase "
                         "(profiler memory events; slows the step)")
    ap.add_argument("--model")
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
    ap.add_argument("--out", help="CSV to append to")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return
    if not a.model or not a.out:
        ap.error("--model and --out are required")
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
