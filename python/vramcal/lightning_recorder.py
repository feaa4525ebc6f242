"""``vramcal.LightningRecorder``: ``MemoryRecorder`` as a Lightning callback
(``lightning.pytorch.Callback``), for a ``LightningModule`` that trains a Hugging Face model.

The run's configuration is read as for the HF Trainer, from the model (its config, PEFT and
quantization configs, weight dtype, gradient checkpointing, attention) and from Lightning's
``Trainer``: ``precision`` (``32-true``, ``bf16-true``, ``16-true``; ``bf16-mixed`` and
``16-mixed`` are autocast), ``accumulate_grad_batches``, ``world_size`` (DDP), the train
DataLoader's ``batch_size`` and its one optimizer, which must be the class ``optim`` names (the
HF ``TrainingArguments.optim`` name, given here since Lightning has none). Phases: the forward
from a hook on the HF model, the backward until ``on_before_optimizer_step``, the optimizer step
until ``on_train_batch_end``. Another precision or strategy (FSDP, DeepSpeed), a module holding
no or several HF models (give ``model=``), several optimizers: said once, nothing recorded.
"""

from types import SimpleNamespace

from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from .recorder import MemoryRecorder, Unsupported

# Lightning's precision settings the reference rows describe: (autocast bf16, autocast fp16).
PRECISION = {
    "32-true": (False, False),
    "bf16-true": (False, False),
    "16-true": (False, False),
    "bf16-mixed": (True, False),
    "16-mixed": (False, True),
}


class LightningRecorder(Callback):
    """Records the peak memory of a Lightning run as a reference row appended to ``out``.

    ``optim``: the HF ``optim`` name of the optimizer ``configure_optimizers`` returns
    (``adamw_torch``, ``adamw_bnb_8bit``, …); ``model``: the Hugging Face model trained (default:
    the one ``PreTrainedModel`` or PEFT model among the module's children); ``batch``: the
    micro-batch (default: the train DataLoader's ``batch_size``). The other arguments are
    ``MemoryRecorder``'s.
    """

    def __init__(self, optim, model=None, batch=None, out="vramcal-reference-rows.csv",
                 count_cpu_memory=False, predict=True, source=None):
        super().__init__()
        self.optim = optim
        self.model = model
        self.batch = batch
        self.args = None
        self.state = SimpleNamespace(is_world_process_zero=True)
        self.recorder = MemoryRecorder(out=out, count_cpu_memory=count_cpu_memory,
                                       predict=predict, source=source)

    def _hf_model(self, pl_module):
        if self.model is not None:
            return self.model
        from transformers import PreTrainedModel

        def is_hf(m):
            base = m.get_base_model() if hasattr(m, "get_base_model") else m
            return isinstance(base, PreTrainedModel)

        found = [m for m in pl_module.children() if is_hf(m)]
        if len(found) != 1:
            raise Unsupported(f"a LightningModule holding {len(found)} Hugging Face models "
                              "(give LightningRecorder(model=...))")
        return found[0]

    def _configure(self, trainer, pl_module):
        model = self._hf_model(pl_module)
        precision = str(trainer.precision)
        if precision not in PRECISION:
            raise Unsupported(f"Lightning precision {precision!r}")
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise Unsupported(f"Lightning strategy {type(trainer.strategy).__name__} "
                              "(single device and DDP are read)")
        batch = self.batch
        if batch is None:
            batch = getattr(trainer.train_dataloader, "batch_size", None)
        if not isinstance(batch, int) or batch < 1:
            raise Unsupported("the micro-batch (the train DataLoader has no batch_size: give "
                              "LightningRecorder(batch=...))")
        if len(trainer.optimizers) != 1:
            raise Unsupported(f"{len(trainer.optimizers)} optimizers")
        bf16, fp16 = PRECISION[precision]
        args = SimpleNamespace(
            optim=self.optim, per_device_train_batch_size=batch,
            gradient_accumulation_steps=trainer.accumulate_grad_batches, bf16=bf16, fp16=fp16,
            gradient_checkpointing=False, deepspeed=None, fsdp="",
            world_size=trainer.world_size, use_liger_kernel=False, auto_find_batch_size=False)
        return args, model

    def on_train_start(self, trainer, pl_module):
        self.state.is_world_process_zero = trainer.is_global_zero
        if not trainer.is_global_zero:
            return
        try:
            args, model = self._configure(trainer, pl_module)
        except Unsupported as e:
            self.recorder._say(f"{e}: not in the reference-row vocabulary, nothing is recorded")
            return
        self.recorder.on_train_begin(args, self.state, None, model=model,
                                     optimizer=trainer.optimizers[0])
        if self.recorder.mode:
            self.args = args

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.args and batch_idx % self.args.gradient_accumulation_steps == 0:
            self.recorder.on_step_begin(self.args, self.state, None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.args:
            self.recorder.on_pre_optimizer_step(self.args, self.state, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.args and self.recorder.phase == "optimizer_step":
            self.recorder.on_optimizer_step(self.args, self.state, None)
            self.recorder.on_step_end(self.args, self.state, None)

    def on_train_end(self, trainer, pl_module):
        if self.args:
            self.recorder.on_train_end(self.args, self.state, None)
            self.args = None

    def on_exception(self, trainer, pl_module, exception):
        if self.args:
            for h in self.recorder.hooks:
                h.remove()
            if self.recorder.mode == "cpu":
                self.recorder.prof.__exit__(None, None, None)
            self.args = None
