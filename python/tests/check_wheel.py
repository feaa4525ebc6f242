"""The installed wheel's `vramcal.estimate` against the command line's JSON: identical for every
configuration below, and the same one-line message for refused ones. Run by
scripts/python-wheel-check.sh in a fresh virtual environment (VRAMCAL_BIN: the CLI to compare)."""

import json
import os
import subprocess
import sys

import vramcal

BIN = os.environ["VRAMCAL_BIN"]

CASES = [
    dict(model="mistral-7b-v0.1", seq=1024),
    dict(model="mistral-7b-v0.1", method="lora", lora="r=16,alpha=32,targets=all-linear",
         batch=4, seq=1024, dtype="bf16", gpu="4090"),
    dict(model="mistral-7b-v0.1", precision="amp-bf16", seq=1024, gpu="a100-80gb"),
    dict(model="llama-3.1-8b", method="qlora", lora="r=16,alpha=32,targets=all-linear",
         precision="amp-bf16", batch=2, seq=2048, checkpointing="layers", gpu="a100-40gb"),
    dict(model="llama-3-8b", method="lora", lora=["r=8", "targets=q", "v"], seq=4096,
         loss="fused-linear-ce", dtype="bf16"),
    dict(model="qwen2.5-7b", optimizer="adamw_bnb_8bit", dtype="bf16", seq=512, batch=2),
    dict(model="qwen2.5-0.5b", method="lora", lora="r=8,targets=q,v,modules_to_save=lm_head",
         seq=512),
    dict(model="smollm2-135m", profile="candle", seq=256, batch=2),
    dict(model="smollm2-135m", profile="candle", method="lora", checkpointing="layers",
         seq=512),
    dict(model="smollm2-135m", profile="torch-eager", seq=256),
    dict(model="mixtral-8x7b-v0.1", method="qlora", lora="r=16,targets=all-linear",
         precision="amp-bf16", seq=1024),
    dict(model="mistral-nemo-12b", shard="zero3", gpus=8, dtype="bf16", seq=2048),
    dict(model="mistral-7b-v0.1", shard="zero2", gpus=4, offload="optimizer", dtype="bf16",
         seq=1024),
    dict(model="llama-2-7b", shard="fsdp", gpus=2, dtype="bf16", seq=1024, accumulate=4),
    dict(model="llama-2-7b", shard="ddp", gpus=2, method="lora", dtype="bf16", seq=1024),
    dict(model="tinyllama-1.1b", optimizer="adafactor", seq=1024, budget="12GiB"),
    dict(model="tinyllama-1.1b", optimizer="sgd", momentum=0.9, seq=1024),
    dict(model="smollm2-360m", precision="bf16-master", seq=2048, profile="torch-eager"),
    dict(model="qwen2-7b", method="lora", lora="r=64,alpha=16,targets=attn", seq=8192,
         checkpointing="every:4", gpu="h100-80gb"),
    dict(model="mistral-7b-v0.1", method="lora", batch=8, seq=512,
         calibration="results/calibration/cpu-torch-sdpa.csv"),
    dict(model="mistral-7b-v0.1", method="lora", batch=8, seq=512, allow_longer=True),
    dict(model="mistral-7b-v0.1", lora="r=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj",
         precision="bf16", batch=4, seq=2048,
         measured=["results/h200/torch-mistral-7b-v0.1.csv", "results/cpu/smollm2-135m.csv"]),
]

BAD = [
    dict(model="gpt-5", seq=8),
    dict(model="mistral-7b-v0.1", seq=0),
    dict(model="mistral-7b-v0.1", seq=8, lora="r=0"),
    dict(model="mistral-7b-v0.1", seq=8, gpu="voodoo-3"),
    dict(model="mistral-7b-v0.1", seq=8, no_such_option=1),
]


def cli(args):
    return subprocess.run([BIN, "estimate", *args], capture_output=True, text=True,
                          cwd=os.environ.get("VRAMCAL_REPO", os.getcwd()))


def main():
    os.chdir(os.environ.get("VRAMCAL_REPO", os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))))
    for kw in CASES:
        args = vramcal.estimate_args(**kw)
        out = cli(args + ["--json"])
        assert out.returncode == 0, (kw, out.stderr)
        want = json.loads(out.stdout)
        got = vramcal.estimate(**kw)
        assert got == want, (kw, got, want)
        if "measured" in kw:
            assert len(got["measured"]) == 1, got["measured"]
        # Identical bytes, not only equal values.
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True), kw
    for kw in BAD:
        out = cli(vramcal.estimate_args(**kw) + ["--json"])
        assert out.returncode != 0, kw
        line = out.stderr.strip()
        assert line.startswith("error: ") and "\n" not in line, (kw, line)
        try:
            vramcal.estimate(**kw)
        except ValueError as e:
            assert str(e) == line[len("error: "):], (kw, str(e), line)
        else:
            raise AssertionError(f"{kw}: accepted")
    print(f"vramcal {vramcal.__version__} wheel: {len(CASES)} estimates identical to the CLI's "
          f"JSON, {len(BAD)} refusals with the CLI's line")


if __name__ == "__main__":
    sys.exit(main())
