#!/usr/bin/env python3
"""Writes tests/data/peft-mixtral-all-linear/: a tiny random Mixtral (transformers' own
MixtralForCausalLM, saved with save_pretrained), a PEFT LoRA adapter on it with
target_modules="all-linear" (PEFT adapts the attention, and through `ParamWrapper`s the router
`gate.weight` and the experts' 3-D `gate_up_proj`/`down_proj`, rank and alpha doubled on the
fused gate_up), every adapter tensor random (init_lora_weights=False: B is not zero), and
expected.json: token ids, targets and PEFT's mean cross-entropy of the targets (fp32, no
dropout), with the command, versions and date. tests/peft.rs loads the base and the adapter
into vramcal's own step and checks it computes the same loss: vramcal reads and computes PEFT's
expert adapters as PEFT does.

Run with the reference venv (torch, transformers, peft):
    python scripts/peft_moe_fixture.py tests/data/peft-mixtral-all-linear
"""
import datetime
import json
import os
import platform
import sys

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM


def main(out: str) -> None:
    torch.manual_seed(0)
    cfg = MixtralConfig(
        # Sizes that differ pairwise (h = 24, i = 20, E = 3, 2r·E = 12, r·E = 6), so that a
        # transposed or mis-interleaved factor would not keep its shape.
        vocab_size=64, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
        num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
    )
    base = MixtralForCausalLM(cfg).float().eval()
    # Base weights away from init's tiny values so every term matters.
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.3)
    os.makedirs(out, exist_ok=True)
    base.save_pretrained(out, safe_serialization=True)
    model = get_peft_model(base, LoraConfig(
        r=2, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
        task_type="CAUSAL_LM", init_lora_weights=False,
    ))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    # PEFT's model card and transformers' generation defaults: not part of the fixture.
    for extra in ("README.md", "generation_config.json"):
        os.remove(os.path.join(out, extra))
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
        # Without the adapter: the check must see the adapter's effect.
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.float()
        base_loss = torch.nn.functional.cross_entropy(plain.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    json.dump({
        "input_ids": ids.tolist(),
        "targets": targets.tolist(),
        "loss": loss.item(),
        "loss_without_adapter": base_loss.item(),
        "command": "python " + " ".join(sys.argv),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "device": "cpu",
        "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, open(os.path.join(out, "expected.json"), "w"), indent=1)
    print(f"wrote {out}: loss {loss.item():.6f} (without the adapter {base_loss.item():.6f})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/peft-mixtral-all-linear")
