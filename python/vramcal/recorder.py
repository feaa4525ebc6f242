"""``vramcal.MemoryRecorder``: a ``transformers.TrainerCallback`` that measures the peak memory
of a real fine-tune and appends it, with the run's own configuration, as a reference row
(``../shared/cases/README.md``'s format) that ``vramcal check`` reads.

On CUDA it resets and reads ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` at
each phase boundary (forward: a hook on the model; backward: until ``on_pre_optimizer_step``;
optimizer step: until ``on_optimizer_step``) for steps 1 and 2 and the steady state (the largest
of the later steps). On the CPU, PyTorch keeps no allocator statistics: with
``count_cpu_memory=True`` the live tensor bytes are rebuilt from ``torch.profiler``'s memory
events (as ``scripts/torch_reference.py`` does) on top of the tensors alive when training
starts; without it, or on another device, the recorder says so once and records nothing.

A configuration outside the reference-row vocabulary (an optimizer, a quantization, a target
module, a LoRA option such as DoRA or rank patterns, a sharding vramcal does not know, an
optimizer passed by hand that is not ``args.optim``'s or a fused AdamW under ``adamw_torch``, a
model spread over devices, a batch that is not ``per_device_train_batch_size``, TRL's fused LM
head, which recent SFTTrainers install) is said once and not recorded: a row is never guessed.
An ``adamw_torch`` optimizer built with ``foreach=True`` or ``False`` gives the row's
``torch_adamw`` (``foreach``, ``for-loop``; empty: torch's default for the device).
Only the training step's forwards are counted (not evaluation's), and only the main process
writes. At the end of step 1 vramcal's prediction for the same configuration is printed beside
the measured peak.
"""

import csv
import gc
import os
import sys
import time
import uuid

from transformers import TrainerCallback

FIELDS = [
    "id", "source", "model", "method", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
    "modules_to_save", "quant", "precision", "optimizer", "optimizer_state_dtype", "batch",
    "accumulate", "seq", "seq_kind", "checkpointing", "attention", "loss", "gpus", "shard",
    "offload", "gpu", "gpu_memory_bytes", "counter", "peak_bytes", "peak_reserved_bytes",
    "status", "step1_forward_peak_bytes", "step1_backward_peak_bytes",
    "step1_optimizer_step_peak_bytes", "step2_forward_peak_bytes", "step2_backward_peak_bytes",
    "step2_optimizer_step_peak_bytes", "steady_peak_bytes", "steps", "notes", "torch_adamw",
]
# Recorder files written before the `torch_adamw` column (2026-12-02) take rows that leave it
# empty.
FIELDS_BEFORE_TORCH_ADAMW = FIELDS[:-1]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "lm_head", "embed_tokens"]
OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "adafactor", "sgd"]
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash-attention-2"}
PHASES = ("forward", "backward", "optimizer_step")


class Unsupported(Exception):
    """A part of the run the reference-row vocabulary cannot describe."""


def _value(x):
    return getattr(x, "value", x)


def configuration(args, model):
    """The reference-row columns describing the run (all but the sequence and the peaks), and
    the matching ``vramcal estimate`` options. Raises ``Unsupported``."""
    import torch

    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    row = {"model": getattr(cfg, "_name_or_path", "") or ""}
    if not row["model"]:
        raise Unsupported("the model's config has no _name_or_path for `vramcal check` to read")
    opts = {"model": row["model"]}
    quant = getattr(cfg, "quantization_config", None)
    if quant is not None:
        q = quant if isinstance(quant, dict) else quant.to_dict()
        if not q.get("load_in_4bit") or q.get("bnb_4bit_quant_type") != "nf4":
            raise Unsupported(f"quantization {q.get('quant_method')} other than bitsandbytes nf4")
        row["quant"] = "nf4-dq" if q.get("bnb_4bit_use_double_quant") else "nf4"
    else:
        row["quant"] = "none"
    if peft_config:
        if len(peft_config) != 1:
            raise Unsupported("more than one PEFT adapter")
        pc = next(iter(peft_config.values()))
        if _value(getattr(pc, "peft_type", "")) != "LORA":
            raise Unsupported(f"PEFT method {_value(pc.peft_type)}")
        targets = pc.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                raise Unsupported(f"target_modules {targets!r}")
            names = ["all-linear"]
        else:
            names = sorted(targets, key=lambda t: TARGETS.index(t) if t in TARGETS else 99)
            if any(t not in TARGETS for t in names):
                raise Unsupported(f"target_modules {sorted(targets)}")
        unread = [name for name, off in [
            ("use_dora", not getattr(pc, "use_dora", False)),
            ("rank_pattern", not getattr(pc, "rank_pattern", None)),
            ("alpha_pattern", not getattr(pc, "alpha_pattern", None)),
            ("layers_to_transform", getattr(pc, "layers_to_transform", None) is None),
            ("exclude_modules", not getattr(pc, "exclude_modules", None)),
            ("trainable_token_indices", not getattr(pc, "trainable_token_indices", None)),
            ("bias", getattr(pc, "bias", "none") == "none"),
        ] if not off]
        if unread:
            raise Unsupported(f"LoRA settings {', '.join(unread)}")
        saved = list(pc.modules_to_save or [])
        if any(m not in ("lm_head", "embed_tokens") for m in saved):
            raise Unsupported(f"modules_to_save {saved}")
        row.update(method="qlora" if row["quant"] != "none" else "lora", lora_r=pc.r,
                   lora_alpha=pc.lora_alpha, lora_dropout=pc.lora_dropout,
                   lora_targets=";".join(names), modules_to_save=";".join(saved))
        lora = f"r={pc.r},alpha={pc.lora_alpha},dropout={pc.lora_dropout},targets=" + ",".join(names)
        if saved:
            lora += ",modules_to_save=" + ",".join(saved)
        opts.update(method=row["method"], lora=lora)
        if row["quant"] == "nf4-dq":
            opts["double_quant"] = True
    else:
        if row["quant"] != "none":
            raise Unsupported("a quantized model without LoRA adapters")
        if not all(p.requires_grad for p in model.parameters()):
            raise Unsupported("full fine-tuning with parameters frozen by hand")
        row["method"] = "full"
        opts["method"] = "full"
    weights = base.get_input_embeddings().weight.dtype
    width = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weights)
    if width is None:
        raise Unsupported(f"weights in {weights}")
    amp = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    if amp is None:
        precision = width
    elif width == "fp32":
        precision = f"amp-{amp}"
    elif width == amp:
        precision = f"{width}+amp"
    else:
        raise Unsupported(f"autocast to {amp} over {width} weights")
    row["precision"] = precision
    opts["precision"] = precision
    optim = str(_value(args.optim))
    if optim not in OPTIMIZERS:
        raise Unsupported(f"optim {optim!r}")
    row["optimizer"] = optim
    opts["optimizer"] = optim
    if getattr(args, "auto_find_batch_size", False):
        raise Unsupported("auto_find_batch_size (the batch that ran is not known in advance)")
    devices = set(getattr(base, "hf_device_map", {}).values())
    if len(devices) > 1:
        raise Unsupported("a model spread over devices (device_map)")
    row.update(batch=args.per_device_train_batch_size,
               accumulate=args.gradient_accumulation_steps)
    opts.update(batch=args.per_device_train_batch_size,
                accumulate=args.gradient_accumulation_steps)
    ckpt = args.gradient_checkpointing or getattr(base, "is_gradient_checkpointing", False)
    row["checkpointing"] = "on" if ckpt else "off"
    if ckpt:
        opts["checkpointing"] = "layers"
    attn = ATTENTION.get(getattr(cfg, "_attn_implementation", None) or "eager")
    if attn is None:
        raise Unsupported(f"attention {cfg._attn_implementation!r}")
    row["attention"] = attn
    opts["profile"] = "torch-eager" if attn == "eager" else "torch-sdpa"
    if attn == "flash-attention-2":
        opts["attention"] = "flash-attention-2"
    if getattr(args, "use_liger_kernel", False):
        row["loss"] = "fused-linear-ce"
        opts["loss"] = "fused-linear-ce"
    world = getattr(args, "world_size", 1) or 1
    if args.deepspeed or args.fsdp:
        raise Unsupported("DeepSpeed or FSDP runs (their stage is not read yet)")
    if world > 1:
        row.update(gpus=world, shard="ddp")
        opts.update(gpus=world, shard="ddp")
    return row, opts


def check_optimizer(name, optimizer):
    """Refuses an optimizer that is not the one ``args.optim`` names (one passed to the Trainer
    by hand), a fused AdamW under ``adamw_torch`` (``adamw_torch_fused`` names it), or SGD with
    momentum (the reference rows have no column for it). Returns the implementation of
    ``adamw_torch`` its ``foreach=`` names (``"foreach"``, ``"for-loop"``; the rows'
    ``torch_adamw``), or None for torch's default for the device."""
    import torch

    if optimizer is None:
        return None
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    expected = {"adamw_torch": torch.optim.AdamW, "adamw_torch_fused": torch.optim.AdamW,
                "sgd": torch.optim.SGD}.get(name)
    if expected is not None and not isinstance(opt, expected):
        raise Unsupported(f"an optimizer ({type(opt).__name__}) other than optim={name!r}")
    if name == "sgd" and any(g.get("momentum", 0) for g in opt.param_groups):
        raise Unsupported("SGD with momentum")
    if name == "adamw_torch":
        if any(g.get("fused") for g in opt.param_groups):
            raise Unsupported("a fused AdamW under optim='adamw_torch' (adamw_torch_fused names it)")
        foreach = {g.get("foreach") for g in opt.param_groups}
        if len(foreach) > 1:
            raise Unsupported("AdamW parameter groups of different foreach= settings")
        f = foreach.pop() if foreach else None
        if f is not None:
            return "foreach" if f else "for-loop"
    return None


def live_tensor_bytes():
    """Bytes of every tensor storage alive in this process now (each storage once), on the CPU."""
    import torch

    seen = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
                s = o.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        except Exception:  # objects half torn down, tensors without storage
            continue
    return sum(seen.values())


class MemoryRecorder(TrainerCallback):
    """Records the peak memory of a run as a reference row appended to ``out`` (a CSV).

    ``count_cpu_memory``: on the CPU, count live tensor bytes with ``torch.profiler`` (slow,
    exact); ``predict``: print vramcal's estimate beside the measured peak after step 1;
    ``source``: the row's ``source`` column.
    """

    def __init__(self, out="vramcal-reference-rows.csv", count_cpu_memory=False, predict=True,
                 source=None):
        self.out = out
        self.count_cpu_memory = count_cpu_memory
        self.predict = predict
        self.source = source
        self.mode = None
        self.said = set()
        self.steps = []
        self.seq = []
        self.batches = []
        self.padded = False
        self.phase = None
        self.ranges = []
        self.hooks = []
        self.row = None
        self.opts = None
        self.in_step = False
        self.refused = None

    def _say(self, text):
        if text not in self.said:
            self.said.add(text)
            print(f"vramcal.MemoryRecorder: {text}", file=sys.stderr)

    # Phase bookkeeping: CUDA peaks are read and reset at each boundary; on the CPU each phase
    # is a profiler range whose peak is rebuilt at the end.
    def _begin(self, name):
        import torch

        if self.mode == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self.mode == "cpu":
            rf = torch.profiler.record_function(f"vramcal::{len(self.steps)}::{name}")
            rf.__enter__()
            self.ranges.append(rf)
        self.phase = name

    def _end(self):
        import torch

        if self.phase is None or not self.steps:
            return
        step = self.steps[-1]
        if self.mode == "cuda":
            step[self.phase] = max(step.get(self.phase, 0), torch.cuda.max_memory_allocated())
            step["reserved"] = max(step.get("reserved", 0), torch.cuda.max_memory_reserved())
        elif self.mode == "cpu" and self.ranges:
            self.ranges.pop().__exit__(None, None, None)
        self.phase = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        import torch

        if not state.is_world_process_zero:
            return
        try:
            self.row, self.opts = configuration(args, model)
            implementation = check_optimizer(self.row["optimizer"], optimizer)
            if implementation is not None:
                self.row["torch_adamw"] = implementation
                self.opts["torch_adamw"] = implementation
        except Unsupported as e:
            self._say(f"{e}: not in the reference-row vocabulary, nothing is recorded")
            return
        device = next(model.parameters()).device.type
        if device == "cuda":
            self.mode = "cuda"
            props = torch.cuda.get_device_properties(next(model.parameters()).device)
            self.row.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
        elif device == "cpu" and self.count_cpu_memory:
            self.mode = "cpu"
            self.row.update(gpu="cpu")
            self.baseline = live_tensor_bytes()
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        else:
            hint = " (count_cpu_memory=True counts it with torch.profiler)" if device == "cpu" else ""
            self._say(f"the model is on {device}, which keeps no memory statistics{hint}: "
                      "nothing is recorded")
            return

        def pre(module, args_, kwargs):
            # Only the training step's forwards (with gradients, inside a step): not evaluation,
            # not generation. Not `module.training`: Lightning leaves a model loaded by
            # from_pretrained in eval mode and trains it so.
            if not (self.in_step and torch.is_grad_enabled()):
                return
            if kwargs.get("fused_lm_head"):
                # TRL's own tiled head and loss (trl.trainer.utils.add_fused_lm_head, which
                # SFTTrainer installs): neither transformers' loss nor Liger's.
                self.refused = ("the forward is called with fused_lm_head=True (TRL's fused LM "
                                "head), a loss the reference rows have no value for")
            ids = kwargs.get("input_ids", args_[0] if args_ else None)
            if ids is not None and hasattr(ids, "shape"):
                self.seq.append(int(ids.shape[-1]))
                self.batches.append(int(ids.shape[0]) if ids.dim() > 1 else 1)
            mask = kwargs.get("attention_mask")
            if mask is not None and bool((mask == 0).any()):
                self.padded = True
            if self.phase in (None, "backward"):
                self._end()
                self._begin("forward")

        def post(module, args_, out):
            if not (self.in_step and torch.is_grad_enabled()):
                return
            self._end()
            self._begin("backward")

        self.hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
                      model.register_forward_hook(post)]

    def on_step_begin(self, args, state, control, **kw):
        if self.mode:
            self.steps.append({})
            self.in_step = True

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self.mode:
            self._end()
            self._begin("optimizer_step")

    def on_optimizer_step(self, args, state, control, **kw):
        if self.mode:
            self._end()

    def on_step_end(self, args, state, control, **kw):
        if self.mode:
            self._end()
            self.in_step = False
        if self.mode == "cuda" and len(self.steps) == 1 and self.predict and not self.refused:
            self._predict(max(v for k, v in self.steps[0].items() if k in PHASES))

    def on_train_end(self, args, state, control, **kw):
        if not self.mode:
            return
        for h in self.hooks:
            h.remove()
        self._end()
        if self.mode == "cpu":
            self.prof.__exit__(None, None, None)
        if self.refused:
            self._say(f"{self.refused}: nothing is recorded")
            return
        if self.mode == "cpu":
            self._cpu_peaks()
        self._write()

    def _cpu_peaks(self):
        """Each step's phase peaks from the profiler's memory events, on top of the baseline."""
        events = self.prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        ranges = sorted((e.start_ns(), e.end_ns(), e.name()) for e in events
                        if e.name().startswith("vramcal::"))
        live, i = self.baseline, 0
        for a, b, name in ranges:
            _, step, phase = name.split("::")
            while i < len(mem) and mem[i][0] < a:
                live += mem[i][1]
                i += 1
            best = live
            while i < len(mem) and mem[i][0] <= b:
                live += mem[i][1]
                best = max(best, live)
                i += 1
            s = self.steps[int(step) - 1]
            s[phase] = max(s.get(phase, 0), best)

    def _predict(self, measured):
        try:
            from . import estimate

            opts = dict(self.opts, seq=max(self.seq) if self.seq else None)
            e = estimate(**opts)["estimate"]["peak_bytes"]
            print(f"vramcal.MemoryRecorder: step 1 peaked at {measured / 2**30:.2f} GiB "
                  f"allocated; vramcal estimate predicts {e / 2**30:.2f} GiB "
                  f"({100 * (e - measured) / measured:+.1f} %; GiB = 2^30 bytes)", file=sys.stderr)
        except ValueError as err:
            self._say(f"no prediction: {err}")

    def _write(self):
        import torch
        import transformers

        from . import __version__

        done = [s for s in self.steps if all(p in s for p in PHASES)]
        if not done:
            self._say("no step completed: nothing is recorded")
            return
        if self.batches and max(self.batches) != self.row["batch"]:
            # Padding-free collators flatten the batch into one row; a last short batch is
            # smaller, never larger.
            self._say(f"the forwards saw micro-batches of up to {max(self.batches)} sequences, "
                      f"not per_device_train_batch_size = {self.row['batch']}: nothing is recorded")
            return
        peak = lambda s: max(s[p] for p in PHASES)  # noqa: E731
        row = dict(self.row)
        seqs = set(self.seq)
        row.update(
            id=f"rec-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}",
            source=self.source or (f"vramcal.MemoryRecorder {__version__} (torch {torch.__version__}, "
                                   f"transformers {transformers.__version__})"),
            seq=max(self.seq), seq_kind="padded" if self.padded else
            "fixed" if len(seqs) == 1 else "max",
            counter="allocated", peak_bytes=max(peak(s) for s in done), status="ok",
            steps=len(done),
            notes=("CPU: PyTorch's live tensor bytes (profiler memory events on top of the "
                   "tensors alive at train begin)" if self.mode == "cpu" else
                   "torch.cuda.max_memory_allocated per phase"),
        )
        if self.mode == "cuda":
            row["peak_reserved_bytes"] = max(s.get("reserved", 0) for s in done)
        for n, s in enumerate(done[:2], start=1):
            for p in PHASES:
                row[f"step{n}_{p}_peak_bytes"] = s[p]
        if len(done) > 2:
            row["steady_peak_bytes"] = max(peak(s) for s in done[2:])
        new = not os.path.exists(self.out) or os.path.getsize(self.out) == 0
        fields = FIELDS
        if not new:
            with open(self.out, newline="") as f:
                header = next(csv.reader(f), [])
            if header == FIELDS_BEFORE_TORCH_ADAMW and not row.get("torch_adamw"):
                fields = header
            elif header == FIELDS_BEFORE_TORCH_ADAMW:
                self._say(f"{self.out} was written before the torch_adamw column, which this "
                          f"row needs (torch_adamw={row['torch_adamw']!r}): nothing is written to it "
                          "(give another out=)")
                return
            elif header != FIELDS:
                self._say(f"{self.out} has other columns than a recorder's file: nothing is "
                          "written to it (give another out=)")
                return
        with open(self.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
            if new:
                w.writeheader()
            w.writerow(row)
        print(f"vramcal.MemoryRecorder: appended {row['id']} to {self.out} "
              f"(`vramcal check --measured {self.out} --profile {self.opts['profile']}`)",
              file=sys.stderr)


class LoopRecorder:
    """``MemoryRecorder`` for a plain PyTorch loop, as a context manager. A plain loop has no
    ``TrainingArguments``: the settings the model does not carry are given here (``optim``, the
    HF name of the optimizer the loop steps; ``batch``, the micro-batch; ``accumulate``;
    ``bf16``/``fp16`` for autocast; ``gradient_checkpointing``), and the loop marks each step and
    its optimizer step::

        with vramcal.LoopRecorder(model, optimizer, optim="adamw_torch", batch=8,
                                  out="runs.csv") as rec:
            for batch in loader:
                with rec.step():
                    model(**batch).loss.backward()
                    with rec.optimizer_step():
                        optimizer.step()
                    optimizer.zero_grad()

    The forward is found by a hook on the model, the backward is what runs until the optimizer
    step. Everything else is ``MemoryRecorder``'s: the same row, the same refusals. Without
    ``optimizer`` nothing of it is checked: its class is taken to be ``optim``'s and its
    ``foreach=`` torch's default for the device (the row's ``torch_adamw`` empty).
    """

    def __init__(self, model, optimizer=None, *, optim, batch, accumulate=1, bf16=False,
                 fp16=False, gradient_checkpointing=False, out="vramcal-reference-rows.csv",
                 count_cpu_memory=False, predict=True, source=None):
        from types import SimpleNamespace

        self.model = model
        self.optimizer = optimizer
        self.args = SimpleNamespace(
            optim=optim, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
            bf16=bf16, fp16=fp16, gradient_checkpointing=gradient_checkpointing, deepspeed=None,
            fsdp="", world_size=1, use_liger_kernel=False, auto_find_batch_size=False)
        self.state = SimpleNamespace(is_world_process_zero=True)
        self.recorder = MemoryRecorder(out=out, count_cpu_memory=count_cpu_memory,
                                       predict=predict, source=source)

    def __enter__(self):
        self.recorder.on_train_begin(self.args, self.state, None, model=self.model,
                                     optimizer=self.optimizer)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.recorder.on_train_end(self.args, self.state, None)
        else:
            for h in self.recorder.hooks:
                h.remove()
            if self.recorder.mode == "cpu":
                self.recorder.prof.__exit__(*exc)
        return False

    def step(self):
        """Marks one training step (forwards, backwards and the optimizer step)."""
        return _Phase(lambda: self.recorder.on_step_begin(self.args, self.state, None),
                      lambda: self.recorder.on_step_end(self.args, self.state, None))

    def optimizer_step(self):
        """Marks the optimizer step inside :meth:`step`."""
        return _Phase(lambda: self.recorder.on_pre_optimizer_step(self.args, self.state, None),
                      lambda: self.recorder.on_optimizer_step(self.args, self.state, None))


class _Phase:
    def __init__(self, enter, leave):
        self.enter, self.leave = enter, leave

    def __enter__(self):
        self.enter()
        return self

    def __exit__(self, *exc):
        self.leave()
        return False
