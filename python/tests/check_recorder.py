"""vramcal.MemoryRecorder on the CPU with the real stack (torch, transformers, peft from the
reference harness's environment): a tiny Llama trained three steps by the HF Trainer, full
fine-tuning and PEFT LoRA (with modules_to_save), each appending one reference row that
`vramcal check` reads; without count_cpu_memory the recorder says so once and writes nothing.
Where lightning is installed, the same model in a LightningModule with vramcal.LightningRecorder
(32-true, bf16-mixed with accumulation, a module of two HF models refused). Run by scripts/python-wheel-check.sh where VRAMCAL_TORCH_PYTHON names that environment."""

import contextlib
import csv
import io
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import vramcal

BIN = os.environ["VRAMCAL_BIN"]


def train(folder, rows, recorder, peft_config=None, evaluate=False):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    if peft_config is not None:
        import peft

        model = peft.get_peft_model(model, peft_config)
    data = [{"input_ids": torch.randint(0, 256, (16,))} for _ in range(6)]
    for d in data:
        d["labels"] = d["input_ids"].clone()
    # Evaluation between steps, on longer sequences: its forwards are not the step's.
    longer = [{"input_ids": torch.randint(0, 256, (48,))} for _ in range(2)]
    for d in longer:
        d["labels"] = d["input_ids"].clone()
    extra = dict(eval_strategy="steps", eval_steps=1, eval_on_start=True) if evaluate else {}
    args = TrainingArguments(
        output_dir=os.path.join(folder, "out"), per_device_train_batch_size=2, max_steps=3,
        optim="adamw_torch", use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True, **extra)
    Trainer(model=model, args=args, train_dataset=data, eval_dataset=longer if evaluate else None,
            callbacks=[recorder]).train()


def main():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "tiny-llama")
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        rows = os.path.join(tmp, "rows.csv")
        train(folder, rows, vramcal.MemoryRecorder(out=rows, count_cpu_memory=True),
              evaluate=True)
        import peft

        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               modules_to_save=["lm_head"], task_type="CAUSAL_LM")
        train(folder, rows, vramcal.MemoryRecorder(out=rows, count_cpu_memory=True), lora)
        # Without count_cpu_memory: one line on standard error, no row.
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            train(folder, rows, vramcal.MemoryRecorder(out=rows))
        said = [l for l in err.getvalue().splitlines() if "vramcal.MemoryRecorder" in l]
        assert len(said) == 1 and "keeps no memory statistics" in said[0], said
        # A plain loop: the same row through LoopRecorder.
        torch.manual_seed(0)
        model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
        model.train()
        # torch's foreach AdamW asked for on the CPU (CUDA's default): the row says so.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        with vramcal.LoopRecorder(model, opt, optim="adamw_torch", batch=2, out=rows,
                                  count_cpu_memory=True) as rec:
            for _ in range(3):
                ids = torch.randint(0, 256, (2, 16))
                with rec.step():
                    model(input_ids=ids, labels=ids).loss.backward()
                    with rec.optimizer_step():
                        opt.step()
                    opt.zero_grad()
        # A fused AdamW under optim="adamw_torch" (adamw_torch_fused names it): said once, no row.
        fused = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            with vramcal.LoopRecorder(model, fused, optim="adamw_torch", batch=2, out=rows,
                                      count_cpu_memory=True) as rec:
                pass
        assert "a fused AdamW under optim='adamw_torch'" in err.getvalue(), err.getvalue()
        del fused
        expected = ["full", "lora", "full"]
        sft = sft_trainer_refused(folder, rows)
        # What is alive in the process counts (as torch.cuda.max_memory_allocated would): the
        # loop's model and optimizer are let go before the next runs.
        del model, opt, rec
        lightning = lightning_runs(folder, rows)
        expected += ["full"] * lightning
        with open(rows) as f:
            got = list(csv.DictReader(f))
        assert [r["method"] for r in got] == expected, got
        if lightning:
            assert [r["precision"] for r in got[3:]] == ["fp32", "amp-bf16"], got[3:]
            assert got[4]["accumulate"] == "2", got[4]
        # A file of other columns is left as it is, and said so once.
        other = os.path.join(tmp, "other.csv")
        with open(other, "w") as f:
            f.write("id,peak_bytes\nx,1\n")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            train(folder, other, vramcal.MemoryRecorder(out=other, count_cpu_memory=True))
        assert "has other columns" in err.getvalue(), err.getvalue()
        with open(other) as f:
            assert f.read() == "id,peak_bytes\nx,1\n"
        assert got[1]["modules_to_save"] == "lm_head" and got[1]["lora_targets"] == "q_proj;v_proj"
        assert [r["torch_adamw"] for r in got[:3]] == ["", "", "foreach"], got
        assert all(int(r["peak_bytes"]) > 0 and r["seq"] == "16" for r in got), got
        out = subprocess.run([BIN, "check", "--measured", rows, "--profile", "torch-sdpa"],
                             capture_output=True, text=True, cwd=tmp)
        assert out.returncode == 0, out.stderr
        print(out.stdout)
        summary = [l for l in out.stdout.splitlines() if l.startswith("profile ")]
        assert summary and f"{len(expected)} rows" in summary[0], out.stdout
    print(f"MemoryRecorder (torch {torch.__version__}, transformers {transformers.__version__}): "
          f"{len(expected)} rows (two Trainer runs, a plain loop"
          f"{f', {lightning} Lightning runs' if lightning else ''}) recorded on the CPU and read "
          "by vramcal check; no row without statistics"
          f"{'; TRL SFTTrainer (fused LM head) refused' if sft else ''}")


def sft_trainer_refused(folder, rows):
    """Where trl has its fused LM head (SFTTrainer calls the model with fused_lm_head=True, a
    loss of its own): the recorder says so once and appends nothing."""
    try:
        from trl import SFTConfig, SFTTrainer
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError:
        return False
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    before = open(rows).read() if os.path.exists(rows) else None
    vocab = Tokenizer(models.WordLevel({str(i): i for i in range(256)}, unk_token="0"))
    tok = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="0", eos_token="1")
    data = Dataset.from_list([{"input_ids": torch.randint(2, 256, (16,)).tolist()}
                              for _ in range(4)])
    args = SFTConfig(output_dir=os.path.join(folder, "sft"), per_device_train_batch_size=2,
                     max_steps=2, optim="adamw_torch", use_cpu=True, report_to=[],
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, max_length=16,
                     bf16=False, gradient_checkpointing=False)
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                   callbacks=[vramcal.MemoryRecorder(out=rows, count_cpu_memory=True)]).train()
    said = [l for l in err.getvalue().splitlines() if "vramcal.MemoryRecorder" in l]
    assert len(said) == 1 and "fused_lm_head=True" in said[0], said
    assert (open(rows).read() if os.path.exists(rows) else None) == before
    return True


def lightning_runs(folder, rows):
    """Two Lightning runs recorded into `rows` (32-true; bf16-mixed with accumulation), and a
    module of two HF models refused; 0 where lightning is not installed."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        return 0
    from torch.utils.data import DataLoader

    class Module(pl.LightningModule):
        def __init__(self, *models):
            super().__init__()
            self.model = models[0]
            if len(models) > 1:
                self.teacher = models[1]

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def fit(recorder, precision, accumulate=1, two=False):
        import gc

        gc.collect()
        torch.manual_seed(0)
        models = [LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
                  for _ in range(2 if two else 1)]
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, precision=precision,
                             accumulate_grad_batches=accumulate, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[recorder])
        trainer.fit(Module(*models), DataLoader(torch.randint(0, 256, (12, 16)), batch_size=2))

    fit(vramcal.LightningRecorder(optim="adamw_torch", out=rows, count_cpu_memory=True), "32-true")
    fit(vramcal.LightningRecorder(optim="adamw_torch", out=rows, count_cpu_memory=True),
        "bf16-mixed", accumulate=2)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        fit(vramcal.LightningRecorder(optim="adamw_torch", out=rows, count_cpu_memory=True),
            "32-true", two=True)
    assert "holding 2 Hugging Face models" in err.getvalue(), err.getvalue()
    return 2


if __name__ == "__main__":
    sys.exit(main())
