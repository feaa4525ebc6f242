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

With `--world-size N --shard ddp|fsdp` (CPU only) each point runs N data-parallel ranks, one
process each, over gloo (torch's `DistributedDataParallel`, or FSDP2's `fully_shard` on each
decoder layer and the root); each rank is counted as above, and the row holds the largest
rank's peaks, with every rank's peak in its notes and `gpus`/`shard` columns.

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
import gc
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
    "id", "source", "model", "method", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "quant",
    "precision", "optimizer", "batch", "seq", "seq_kind", "checkpointing", "attention", "gpu",
    "counter", "peak_bytes", "notes", "status", "peak_reserved_bytes", "load_peak_bytes",
    "step2_forward_peak_bytes", "step2_backward_peak_bytes", "step2_optimizer_step_peak_bytes",
    "saved_activation_bytes", "step1_seconds", "step2_seconds", "step_seconds_median",
    "timed_steps", "forward_seconds",
    "backward_seconds", "optimizer_seconds", "torch_version", "transformers_version",
    "peft_version", "bitsandbytes_version", "utc_time", "host_cpu", "threads", "command",
    "trainable_params",
]
# CUDA files also carry the card's memory, which out-of-memory rows need (`counter` = `oom`).
FIELDS_CUDA = FIELDS + ["gpu_memory_bytes"]
# Data-parallel files (--world-size 2 or more) say how many ranks and how they shard.
FIELDS_DIST = FIELDS + ["gpus", "shard"]
# Files of --modules-to-save runs add a `modules_to_save` column (PEFT's; a column of vramcal's
# reference files beyond ../shared/cases/README.md, which has none for it).
SAVE_NAMES = ["lm_head", "embed_tokens"]
# --torch-adamw: torch's AdamW implementations other than fused (adamw_torch_fused); files of
# such runs add a `torch_adamw` column (vramcal's, beyond ../shared/cases/README.md).
TORCH_ADAMW = ["for-loop", "foreach"]
# --shard: torch's DistributedDataParallel, or FSDP2 (`fully_shard` on each decoder layer, then
# the root), both with their defaults.
SHARDS = ["ddp", "fsdp"]


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
    elif arch == "Qwen2ForCausalLM":
        conf = transformers.Qwen2Config(**kw)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "MixtralForCausalLM":
        conf = transformers.MixtralConfig(**kw)
        cls = transformers.MixtralForCausalLM
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


# The reference-row vocabulary of ../shared/cases/README.md this script can run.
PRECISIONS = {
    # value: (weights dtype, autocast dtype or None, LoRA adapters in fp32 (PEFT's
    # autocast_adapter_dtype))
    "fp32": (torch.float32, None, False),
    "bf16": (torch.bfloat16, None, False),
    "fp16": (torch.float16, None, False),
    "amp-bf16": (torch.float32, torch.bfloat16, False),
    "amp-fp16": (torch.float32, torch.float16, False),
    "bf16+amp": (torch.bfloat16, torch.bfloat16, True),
    "fp16+amp": (torch.float16, torch.float16, True),
}
OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adamw_bnb_8bit",
              "paged_adamw_8bit", "paged_adamw_32bit"]
METHODS = ["full", "lora", "qlora"]
QUANTS = ["nf4", "nf4-dq"]
CHECKPOINTING = {"off": None, "on": False, "reentrant": True}  # value: use_reentrant
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_NAMES = LINEAR + ["lm_head", "embed_tokens"]
SHORT = {"q_proj,v_proj": "qv", "q_proj,k_proj,v_proj,o_proj": "qkvo", "all-linear": "all"}


def optimizer(name, params, impl=None):
    """The optimizer HF's Trainer builds for `TrainingArguments.optim = name` (transformers
    `trainer.py` `get_optimizer_cls_and_kwargs`): torch's AdamW (foreach where torch's default
    picks it: CUDA tensors; fused for `adamw_torch_fused`), torch's SGD (momentum 0), and
    transformers' Adafactor (`adafactor`: `scale_parameter=False, relative_step=False` and the
    learning rate, as the Trainer passes them) and bitsandbytes' 8-bit and paged optimizers.
    `impl` (--torch-adamw) names torch's AdamW implementation for `adamw_torch`: `for-loop`
    (`foreach=False`) or `foreach` (`foreach=True`); None leaves torch's default."""
    if name == "adafactor":
        return transformers.optimization.Adafactor(params, lr=5e-5, scale_parameter=False,
                                                   relative_step=False)
    if name == "adamw_torch" and impl is not None:
        return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, foreach=impl == "foreach")
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=5e-5)
    bnb = import_bnb(name)
    cls = {"adamw_bnb_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=5e-5, weight_decay=0.0)


def import_bnb(what):
    try:
        import bitsandbytes
    except ImportError:
        raise Unsupported(f"{what} needs bitsandbytes (pip install bitsandbytes); this Python has "
                          f"torch {torch.__version__} without it")
    return bitsandbytes


def import_peft(what):
    try:
        import peft
    except ImportError:
        raise Unsupported(f"{what} needs PEFT (pip install peft); this Python has torch "
                          f"{torch.__version__} and transformers {transformers.__version__} "
                          f"without it")
    return peft


def lora_targets(text):
    """`q_proj,v_proj` or `all-linear` as PEFT's `target_modules`; names outside the reference
    vocabulary are refused."""
    if text == "all-linear":
        return "all-linear"
    names = text.split(",")
    bad = [n for n in names if n not in TARGET_NAMES]
    if bad or not names:
        raise SystemExit(f"error: --lora-targets {text!r}: unknown module {bad}; expected "
                         f"'all-linear' or ','-separated {', '.join(TARGET_NAMES)}")
    return names


def saved_checkpoint(cfg, dtype, attn):
    """The random-weight model saved as a checkpoint (a temporary folder) for `quantized` to
    load, made before the memory count starts: users load a checkpoint, they do not build one."""
    import tempfile
    d = tempfile.TemporaryDirectory()
    model = build(cfg, dtype, "cpu", attn)
    model.save_pretrained(d.name)
    del model
    gc.collect()
    return d


def quantized(folder, dtype, device, attn, quant, compute):
    """A bitsandbytes 4-bit model as users load one: `from_pretrained` of the checkpoint in
    `folder` with a `BitsAndBytesConfig` (NF4, double quantization for `nf4-dq`, compute in
    `compute`)."""
    bnb = import_bnb("QLoRA")
    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quant == "nf4-dq", bnb_4bit_compute_dtype=compute)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=q, dtype=dtype, device_map=device, attn_implementation=attn)
    return model, bnb.__version__


def point_id(model, p):
    parts = ["torch", model, p["method"]]
    if p["method"] != "full":
        parts += [f"r{p['lora_r']}", SHORT.get(p["lora_targets"], p["lora_targets"].replace(",", "+")),
                  f"d{p['lora_dropout']:g}"]
    if p["method"] == "qlora":
        parts.append(p["quant"])
    parts += [p["precision"], p["optimizer"], p["attn"], f"ckpt-{p['checkpointing']}",
              f"b{p['batch']}", f"s{p['seq']}"]
    if p.get("modules_to_save") and p["method"] != "full":
        parts.append("save-" + "+".join(p["modules_to_save"]))
    if p.get("world_size", 1) > 1:
        parts.append(f"{p['shard']}{p['world_size']}")
    if p.get("torch_adamw"):
        parts.append(p["torch_adamw"])
    return "-".join(parts)


def fsdp_unsharded_storages(model):
    """The storages of FSDP2's gathered (unsharded) parameters now allocated (FSDP2's
    `FSDPParam._unsharded_param`, a private attribute: empty if it is gone)."""
    out = set()
    for m in model.modules():
        state = getattr(m, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if state else None
        for fp in getattr(group, "fsdp_params", []) if group else []:
            try:
                st = fp._unsharded_param.untyped_storage()
                if st.nbytes() > 0:
                    out.add(st.data_ptr())
            except (AttributeError, RuntimeError):
                pass
    return out


def data_parallel(model, shard):
    """The model as its data-parallel wrapper runs it: DDP (gradient buckets of 25 MiB, not
    views of the gradients: torch's defaults), or FSDP2 with each decoder layer and the root
    sharded (`fully_shard`'s defaults: reshard after forward, one layer prefetched)."""
    if shard == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for m in list(model.modules()):
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    fully_shard(model)
    return model


def measure(args, cfg, p):
    """One row: load, then two steps (forward + loss under the recipe's autocast, backward,
    optimizer step, zero_grad(set_to_none)), each phase counted."""
    row = base_row(args, p)
    notes = []
    if CHECKPOINTING[p["checkpointing"]] is not None:
        notes.append(f"gradient_checkpointing_enable(use_reentrant={CHECKPOINTING[p['checkpointing']]})")
    return measure_row(args, cfg, p, row, notes)


def base_row(args, p):
    """The columns every row of point `p` has, whatever happens to it."""
    cuda = args.device.startswith("cuda")
    method, ckpt = p["method"], CHECKPOINTING[p["checkpointing"]]
    row = {
        "id": point_id(args.model, p),
        "source": f"scripts/torch_reference.py (torch {torch.__version__})",
        "model": args.model, "method": method, "quant": p["quant"] if method == "qlora" else "none",
        "precision": p["precision"], "optimizer": p["optimizer"],
        "batch": p["batch"], "seq": p["seq"], "seq_kind": "fixed",
        "checkpointing": "off" if ckpt is None else "on",
        "attention": p["attn"],
        "gpu": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "counter": "allocated" if cuda or args.count_cpu_memory else "none (CPU: see saved_activation_bytes)",
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "timed_steps": args.timed_steps,
        "utc_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host_cpu": host_cpu(), "threads": torch.get_num_threads(),
        "command": " ".join(["python3", "scripts/torch_reference.py"] + sys.argv[1:]),
    }
    if method != "full":
        row.update(lora_r=p["lora_r"], lora_alpha=p["lora_alpha"], lora_dropout=p["lora_dropout"],
                   lora_targets=p["lora_targets"].replace(",", ";"),
                   modules_to_save=";".join(p.get("modules_to_save") or []))
    if args.world_size > 1:
        row.update(gpus=args.world_size, shard=args.shard)
    if p.get("torch_adamw"):
        row.update(torch_adamw=p["torch_adamw"])
    return row


def measure_row(args, cfg, p, row, notes):
    """`measure`'s body: fills `row` (and `notes`) by running the point."""
    device = args.device
    cuda = device.startswith("cuda")
    dtype, autocast, fp32_adapters = PRECISIONS[p["precision"]]
    method, ckpt = p["method"], CHECKPOINTING[p["checkpointing"]]
    batch, seq = p["batch"], p["seq"]
    phases = {}
    # PyTorch's live CPU tensor bytes over load and steps 1-2 (not the timed steps after them).
    # The previous row's tensors are collected first: a free of theirs inside the count would
    # read as a negative allocation.
    checkpoint = saved_checkpoint(cfg, dtype, p["attn"]) if method == "qlora" else None
    gc.collect()
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
        peft = import_peft("LoRA") if method != "full" else None
        if peft is not None:
            row["peft_version"] = peft.__version__
        if method == "qlora" or p["optimizer"] not in ("adamw_torch", "adamw_torch_fused", "sgd"):
            row["bitsandbytes_version"] = import_bnb(f"{method} with {p['optimizer']}").__version__
        if p["optimizer"].startswith("paged_") and not cuda:
            notes.append(f"bitsandbytes {row['bitsandbytes_version']} runs paged optimizers "
                         f"non-paged on the CPU (its own warning)")
        if method == "qlora":
            model, _ = phase("load", lambda: quantized(
                checkpoint.name, dtype, device, p["attn"], p["quant"], autocast or dtype))
            # As QLoRA recipes do: norms, embeddings and head cast to fp32, input gradients on,
            # and checkpointing enabled here when asked.
            kw = {"use_reentrant": ckpt} if ckpt is not None else None
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=ckpt is not None,
                gradient_checkpointing_kwargs=kw)
            notes.append("prepare_model_for_kbit_training")
        else:
            model = phase("load", lambda: build(cfg, dtype, device, p["attn"]))
            if ckpt is not None:
                # Deprecated in transformers 5 (activation_checkpointing_enable takes other
                # arguments there) but present in 4 and 5 alike.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    model.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": ckpt})
                if method == "lora":
                    model.enable_input_require_grads()
        if ckpt is not None:
            model.config.use_cache = False
        if peft is not None:
            # PEFT's LoRA as users run it: the base frozen, A kaiming-uniform, B zero.
            with warnings.catch_warnings():
                # transformers 5 deprecates an attribute PEFT reads under checkpointing.
                warnings.simplefilter("ignore", FutureWarning)
                targets = lora_targets(p["lora_targets"])
                model = peft.get_peft_model(model, peft.LoraConfig(
                    r=p["lora_r"], lora_alpha=p["lora_alpha"], lora_dropout=p["lora_dropout"],
                    target_modules=targets, bias="none", task_type="CAUSAL_LM",
                    modules_to_save=p.get("modules_to_save") or None),
                    autocast_adapter_dtype=fp32_adapters or method == "qlora")
        model.train()
        if args.world_size > 1:
            model = phase("wrap", lambda: data_parallel(model, args.shard))
            notes.append(f"rank {torch.distributed.get_rank()} of {args.world_size} "
                         f"({args.shard}, gloo)")
        params = [q for q in model.parameters() if q.requires_grad]
        # What the optimizer steps, as PEFT builds it (a Mixtral all-linear LoRA's fused expert
        # adapters at doubled rank included).
        row["trainable_params"] = sum(q.numel() for q in params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # bitsandbytes' paged-on-CPU warning
            opt = optimizer(p["optimizer"], params, p.get("torch_adamw"))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g).to(device)
        saved = {}
        # Parameters and buffers that autograd saves (a linear layer saves its weight) are not
        # activations: leave their storages out.
        # (FSDP2's parameters are DTensors: their local shards' storages.)
        fixed = {getattr(t, "_local_tensor", t).untyped_storage().data_ptr()
                 for t in list(model.parameters()) + list(model.buffers())}

        gathered = fsdp_unsharded_storages if args.shard == "fsdp" else (lambda m: set())

        def pack(t):
            try:
                key = t.untyped_storage().data_ptr()
                # FSDP's gathered parameters are parameters too, though allocated in forward.
                if key not in fixed and key not in gathered(model):
                    saved[key] = t.untyped_storage().nbytes()
            except RuntimeError:
                pass
            return t

        def forward():
            with torch.autocast(device.split(":")[0], dtype=autocast) if autocast else contextlib.nullcontext():
                return model(input_ids=ids, labels=ids).loss

        def opt_step():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                opt.step()
            opt.zero_grad(set_to_none=True)

        times = []
        for step in range(1, 3 + args.timed_steps):
            if step > 2:
                counting.close()
                # Extra steps: timed only, like vramcal's --timed-steps.
                t0 = time.perf_counter()
                forward().backward()
                opt_step()
                sync(device)
                times.append(time.perf_counter() - t0)
                continue
            t0 = time.perf_counter()
            saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = phase(f"step{step}_forward", forward)
            row["saved_activation_bytes"] = sum(saved.values())
            phase(f"step{step}_backward", lambda: loss.backward())
            del loss
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
        notes.append(str(e))
        print(f"{row['id']}: {e}", file=sys.stderr)
    except torch.OutOfMemoryError as e:
        row["status"] = "oom"
        notes.append(str(e).splitlines()[0][:200])
    except RuntimeError as e:
        # cuBLAS/cuDNN allocation failures arrive as RuntimeError; anything else is an error row.
        text = str(e)
        alloc = "ALLOC" in text or "out of memory" in text
        row["status"] = "oom" if alloc else "error"
        notes.append(text.splitlines()[0][:200] if text else type(e).__name__)
        if not alloc:
            print(f"{row['id']}: {notes[-1]}", file=sys.stderr)
    finally:
        counting.close()
        del model, opt
        if checkpoint is not None:
            checkpoint.cleanup()
        if cuda:
            torch.cuda.empty_cache()
    for k in ("forward", "backward", "optimizer"):
        name = {"forward": "step2_forward", "backward": "step2_backward",
                "optimizer": "step2_optimizer_step"}[k]
        if name in phases:
            row[f"{k}_seconds"] = phases[name]["seconds"]
    if cuda and row.get("status") == "oom":
        # The reference format's out-of-memory row: no peak, the card's memory instead
        # (`counter` = `oom`; `vramcal check` expects the prediction above it). What was
        # allocated before the failure goes into the notes.
        row["counter"] = "oom"
        row["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        if phases:
            notes.append("allocated before running out: "
                         f"{max(q['peak'] for q in phases.values())} B")
    elif cuda and phases:
        row["peak_bytes"] = max(q["peak"] for q in phases.values())
        row["peak_reserved_bytes"] = max(q["reserved"] for q in phases.values())
        for name in ("load", "step2_forward", "step2_backward", "step2_optimizer_step"):
            if name in phases:
                row[f"{name}_peak_bytes"] = phases[name]["peak"]
    if mem is not None and phases and row.get("status") == "ok":
        _, peak, _, lowest = mem.peaks()
        row["peak_bytes"] = max(peak.values())
        for name in ("load", "step2_forward", "step2_backward", "step2_optimizer_step"):
            if name in peak:
                row[f"{name}_peak_bytes"] = peak[name]
        notes.append("CPU: peaks are PyTorch's live tensor bytes from the profiler's memory "
                     "events; times ran under the profiler")
        if lowest < 0:
            # Not an exact count: the row says so and is not used as a peak.
            row["status"] = "error"
            notes.append(f"WARNING: frees of tensors older than the count ({-lowest} B)")
    row["notes"] = "; ".join(notes)
    # Without --count-cpu-memory no allocator counter on the CPU: peak_bytes stays empty there
    # (saved_activation_bytes is the comparable figure), so such a file is not mistaken for
    # peaks by `vramcal check`.
    return row


def rank_worker(rank, args, cfg, p, port, folder):
    """One data-parallel rank: joins the gloo group, measures, writes its row as JSON."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        row = measure(args, cfg, p)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(row, f)
    finally:
        torch.distributed.destroy_process_group()


def measure_ranks(args, cfg, p):
    """One row of an N-rank data-parallel step: every rank measured as `measure` does, in its
    own process; each peak column is the largest over the ranks, each rank's overall peak is in
    the notes. A rank that dies (the OOM killer, an exception) makes an error row saying so."""
    import socket
    import tempfile
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failure = None
    with tempfile.TemporaryDirectory() as folder:
        try:
            mp.spawn(rank_worker, args=(args, cfg, p, port, folder), nprocs=args.world_size)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            # The missing ranks make an error row that says why.
            failure = str(e).strip().splitlines()[-1]
            print(f"{point_id(args.model, p)}: a rank failed: {failure}", file=sys.stderr)
        rows = []
        for r in range(args.world_size):
            path = os.path.join(folder, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    rows.append(json.load(f))
    if len(rows) < args.world_size:
        row = base_row(args, p)
        row["status"] = "error"
        row["notes"] = (f"{args.world_size - len(rows)} of {args.world_size} ranks wrote no row"
                        + (f" ({failure})" if failure else ""))
        return row
    row = dict(rows[0])
    if any(r.get("status") != "ok" for r in rows):
        bad = next(r for r in rows if r.get("status") != "ok")
        row.update(status=bad.get("status"), notes=bad.get("notes", ""))
        row.pop("peak_bytes", None)
        return row
    for k in ["peak_bytes"] + [k for k in row if k.endswith("_peak_bytes")]:
        row[k] = max(int(r[k]) for r in rows)
    kept = [n for n in row["notes"].split("; ") if not n.startswith("rank ")]
    row["notes"] = "; ".join(
        [f"{args.world_size} ranks ({args.shard}, gloo, one process each); each peak column "
         "is the largest over the ranks; peak per rank: "
         + ", ".join(str(r["peak_bytes"]) for r in rows)] + kept)
    return row


def choices(text, allowed, option):
    """A ','-separated list whose every value is in `allowed`; else one error line."""
    vals = text.split(",")
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise SystemExit(f"error: {option} {text!r}: unknown {', '.join(bad)}; expected "
                         f"','-separated values of {', '.join(allowed)}")
    return vals


def numbers(text, option, kind=int):
    try:
        vals = [kind(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {option} {text!r}: expected ','-separated numbers")
    return vals


def grid(a):
    """Every point of the options' product, as dicts of one configuration each."""
    # Old spellings: --checkpointing none/layers and --dtype f32/bf16/f16.
    ck = ",".join({"none": "off", "layers": "on"}.get(v, v) for v in a.checkpointing.split(","))
    prec = a.precision or ",".join({"f32": "fp32", "f16": "fp16"}.get(v, v) for v in a.dtype.split(","))
    methods = choices(a.method, METHODS, "--method")
    precs = choices(prec, list(PRECISIONS), "--precision")
    opts = choices(a.optimizer, OPTIMIZERS, "--optimizer")
    cks = choices(ck, list(CHECKPOINTING), "--checkpointing")
    attns = choices(a.attn, ["sdpa", "eager"], "--attn")
    quants = choices(a.quant, QUANTS, "--quant")
    targets = a.lora_targets or ["q_proj,k_proj,v_proj,o_proj"]
    for t in targets:
        lora_targets(t)
    drops = numbers(a.lora_dropout, "--lora-dropout", float)
    if any(not 0 <= d < 1 for d in drops):
        raise SystemExit(f"error: --lora-dropout {a.lora_dropout!r}: each must be in [0, 1)")
    batches, seqs = numbers(a.batch, "--batch"), numbers(a.seq, "--seq")
    if any(v < 1 for v in batches + seqs):
        raise SystemExit("error: --batch and --seq values must be positive")
    for m in methods:
        adapters = [(t, d) for t in targets for d in drops] if m != "full" else [("", 0.0)]
        for q in (quants if m == "qlora" else ["none"]):
            for t, d in adapters:
                for pr in precs:
                    for o in opts:
                        for at in attns:
                            for c in cks:
                                for b in batches:
                                    for s in seqs:
                                        yield dict(method=m, quant=q, lora_targets=t, lora_dropout=d,
                                                   lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                                                   precision=pr, optimizer=o, attn=at,
                                                   checkpointing=c, batch=b, seq=s,
                                                   world_size=a.world_size, shard=a.shard,
                                                   modules_to_save=a.modules_to_save,
                                                   torch_adamw=a.torch_adamw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vramcal", default=os.environ.get("VRAMCAL_BIN", "vramcal"))
    ap.add_argument("--self-test", action="store_true",
                    help="check the CPU memory count on tensors of known size, then exit")
    ap.add_argument("--count-cpu-memory", action="store_true",
                    help="on the CPU, record the exact peak of PyTorch's live tensor bytes per phase "
                         "(profiler memory events; slows the step)")
    ap.add_argument("--model")
    ap.add_argument("--method", default="full", help="','-separated: " + ",".join(METHODS))
    ap.add_argument("--quant", default="nf4", help="QLoRA base: ','-separated nf4,nf4-dq")
    ap.add_argument("--precision", help="','-separated recipes of ../shared/cases/README.md: "
                    + ",".join(PRECISIONS))
    ap.add_argument("--dtype", default="bf16", help="older spelling of --precision: f32,bf16,f16")
    ap.add_argument("--optimizer", default="adamw_torch",
                    help="','-separated HF TrainingArguments.optim names: " + ",".join(OPTIMIZERS))
    ap.add_argument("--checkpointing", default="off",
                    help="','-separated: off, on (non-reentrant), reentrant (none/layers: off/on)")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--seq", default="512")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attn", default="sdpa", help="','-separated: sdpa,eager")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", default="0", help="','-separated dropout probabilities")
    ap.add_argument("--lora-targets", action="append",
                    help="PEFT target_modules, e.g. q_proj,v_proj or all-linear; repeat for more sets "
                         "(default q_proj,k_proj,v_proj,o_proj)")
    ap.add_argument("--modules-to-save", type=lambda v: v.split(","),
                    help="PEFT's modules_to_save for the LoRA/QLoRA points: ','-separated "
                         + ", ".join(SAVE_NAMES) + " (full trainable copies beside the adapters)")
    ap.add_argument("--torch-adamw", choices=TORCH_ADAMW,
                    help="torch's AdamW implementation for --optimizer adamw_torch: for-loop "
                         "(foreach=False) or foreach (foreach=True); default: torch's choice for "
                         "the device (for-loop on the CPU, foreach on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--timed-steps", type=int, default=0,
                    help="extra steps after step 2, timed only; step_seconds_median covers step 2 and these")
    ap.add_argument("--skip-existing", action="store_true",
                    help="leave out points whose id is already in --out (resuming a grid)")
    ap.add_argument("--out", help="CSV to append to")
    ap.add_argument("--world-size", type=int, default=1,
                    help="data-parallel ranks, each its own process on this machine's CPU (gloo), "
                         "with --shard; the row's peaks are the largest rank's")
    ap.add_argument("--shard", help="with --world-size 2 or more: " + ",".join(SHARDS))
    a = ap.parse_args()
    if a.world_size < 1:
        ap.error("--world-size must be at least 1")
    if (a.world_size > 1) != (a.shard is not None):
        ap.error("--world-size 2 or more and --shard go together")
    if a.shard is not None:
        choices(a.shard, SHARDS, "--shard")
        if "," in a.shard:
            ap.error("--shard takes one value")
        if a.device != "cpu":
            ap.error("--world-size runs its ranks on the CPU (gloo): give --device cpu")
    if a.modules_to_save is not None:
        bad = [m for m in a.modules_to_save if m not in SAVE_NAMES]
        if bad or len(set(a.modules_to_save)) != len(a.modules_to_save):
            ap.error(f"--modules-to-save {','.join(a.modules_to_save)!r}: expected distinct "
                     + ", ".join(SAVE_NAMES))
        if a.world_size > 1:
            ap.error("--modules-to-save is not combined with --world-size yet")
    if a.torch_adamw is not None and a.optimizer != "adamw_torch":
        ap.error("--torch-adamw names an implementation of --optimizer adamw_torch (alone)")
    if a.self_test:
        self_test()
        return
    if not a.model or not a.out:
        ap.error("--model and --out are required")
    points = list(grid(a))
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = preset_config(a.vramcal, a.model)
    new = not os.path.exists(a.out) or os.path.getsize(a.out) == 0
    done = set()
    fields = (FIELDS_CUDA if a.device.startswith("cuda")
              else FIELDS_DIST if a.world_size > 1 else FIELDS)
    if a.modules_to_save:
        fields = fields + ["modules_to_save"]
    if a.torch_adamw:
        fields = fields + ["torch_adamw"]
    if not new:
        with open(a.out, newline="") as f:
            r = csv.DictReader(f)
            # Files written before a column was added (`trainable_params`) keep their columns.
            older = [c for c in fields if c != "trainable_params"]
            if r.fieldnames not in (fields, older):
                sys.exit(f"error: {a.out} has other columns than this script writes; "
                         f"use a new --out file")
            fields = r.fieldnames
            done = {row["id"] for row in r}
    with open(a.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for p in points:
            pid = point_id(a.model, p)
            if pid in done:
                if a.skip_existing:
                    continue
                sys.exit(f"error: {pid} is already in {a.out} (--skip-existing resumes a grid)")
            r = measure(a, cfg, p) if a.world_size == 1 else measure_ranks(a, cfg, p)
            w.writerow(r)
            f.flush()
            done.add(pid)
            print(f"{r['id']}: {r['status']} peak {r.get('peak_bytes')} bytes, "
                  f"step2 {r.get('step2_seconds')} s", flush=True)


if __name__ == "__main__":
    main()
