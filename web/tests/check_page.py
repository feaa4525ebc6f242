#!/usr/bin/env python3
"""Checks the estimator page (web/dist, built by scripts/web-build.sh) in a real headless Chromium.

For each configuration below it loads or changes the page's form as a user would, reads the
JSON answer from the DOM and compares it, byte for byte, with `vramcal estimate <same args> --json`
run in the repository (the embedded calibration tables and measured results under the same
paths). It then gives the form bad input and checks that each error is shown next to its field
with the command line's own message, never a blank page or a NaN. It measures the page's weight
and its time to the first estimate (median of fresh loads; reported, not asserted) and can save a
screenshot and a benchmark row.

Usage: check_page.py --vramcal target/release/vramcal [--screenshot docs/web-page.png]
                     [--bench-out results/bench/web-page.csv]
Needs: chromium and chromium-driver (Debian packages), selenium (pip).
"""

import argparse
import csv
import datetime
import functools
import gzip
import http.server
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = Path(__file__).resolve().parents[2]

# A Llama-architecture config.json as people paste it (TinyLlama-1.1B's fields).
PASTED = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
    "use_cache": True,
    "vocab_size": 32000,
}

H200_SDPA = "results/calibration/h200-torch-sdpa.csv"
H200_CANDLE = "results/calibration/h200-candle.csv"
CPU_CANDLE = "results/calibration/cpu-candle.csv"
QKVO = "q_proj,k_proj,v_proj,o_proj"

# The form's fields, in the order they are set (profile before calibration: the calibration
# list follows the profile).
FIELDS = ["model", "method", "lora-r", "lora-alpha", "lora-targets", "precision", "optimizer",
          "checkpointing", "batch", "seq", "allow-longer", "gpu", "profile", "calibration"]
DEFAULT = {"model": "mistral-7b-v0.1", "method": "lora", "lora-r": "16", "lora-alpha": "32",
           "lora-targets": QKVO, "precision": "bf16", "optimizer": "adamw_torch",
           "checkpointing": "none", "batch": "1", "seq": "1024", "allow-longer": False,
           "gpu": "a100-80gb",
           "profile": "torch-sdpa", "calibration": ""}

CONFIGS = [
    {},
    {"method": "full", "precision": "amp-bf16", "gpu": "a100-80gb"},
    {"method": "full", "precision": "bf16-master", "optimizer": "adamw_bnb_8bit", "gpu": "h100-80gb"},
    {"method": "qlora", "lora-targets": "all-linear", "checkpointing": "layers", "batch": "4", "seq": "2048", "gpu": "rtx4090-24gb"},
    {"batch": "4", "seq": "2048", "calibration": H200_SDPA,
     "expect": ["torch-mistral-7b-v0.1-lora-nockpt-b4-s2048"]},
    {"batch": "1", "seq": "4096", "checkpointing": "layers", "calibration": H200_SDPA, "gpu": "h200-141gb",
     "expect": ["torch-mistral-7b-v0.1-lora-ckpt-b1-s4096"]},
    {"model": "llama-3.1-8b", "method": "qlora", "lora-r": "64", "lora-alpha": "16", "lora-targets": "all-linear", "optimizer": "paged_adamw_8bit", "seq": "2048", "gpu": "rtx3090-24gb"},
    {"model": "llama-3-8b", "method": "full", "precision": "bf16", "optimizer": "adafactor", "checkpointing": "layers", "gpu": "h100-80gb"},
    {"model": "qwen2.5-7b", "lora-targets": "q_proj,v_proj", "precision": "fp16", "seq": "512", "gpu": "a10g-24gb"},
    {"model": "qwen2.5-0.5b", "method": "full", "precision": "fp32", "optimizer": "sgd", "seq": "256", "gpu": "t4-16gb"},
    {"model": "mixtral-8x7b-v0.1", "method": "qlora", "lora-targets": "q_proj,v_proj", "gpu": "h100-80gb"},
    {"model": "mistral-nemo-12b", "method": "qlora", "checkpointing": "every:4", "seq": "8192", "gpu": "a100-40gb"},
    {"model": "tinyllama-1.1b", "method": "full", "precision": "fp16-master", "batch": "8", "seq": "512", "profile": "torch-eager"},
    {"model": "smollm2-135m", "method": "full", "precision": "fp32", "batch": "2", "seq": "512", "profile": "candle", "calibration": CPU_CANDLE, "gpu": "",
     "expect": ["results/cpu/smollm2-135m.csv:9"]},
    {"model": "smollm2-135m", "method": "lora", "lora-r": "8", "lora-alpha": "16", "lora-targets": "q_proj,v_proj", "precision": "fp32", "batch": "2", "seq": "256", "profile": "candle", "calibration": CPU_CANDLE, "gpu": ""},
    {"model": "smollm2-135m", "method": "lora", "precision": "bf16", "checkpointing": "layers", "batch": "1", "seq": "512", "calibration": H200_SDPA, "gpu": "h200-141gb",
     "expect": ["torch-smollm2-135m-lora-ckpt-b1-s512"]},
    {"model": "mistral-7b-v0.1", "method": "lora", "precision": "bf16", "batch": "4", "seq": "2048", "profile": "candle", "calibration": H200_CANDLE, "gpu": "h200-141gb",
     "expect": ["results/h200/vramcal-mistral-7b-v0.1.csv:12"]},
    {"model": "smollm2-360m", "method": "full", "precision": "amp-fp16", "optimizer": "adamw_torch", "batch": "16", "seq": "1024", "gpu": "rtx4080-16gb"},
    {"model": "llama-2-7b", "method": "lora", "lora-targets": "all-linear,lm_head", "precision": "bf16+amp", "gpu": "l4-24gb"},
    {"model": "qwen2-7b", "method": "lora", "lora-targets": "q_proj,v_proj,embed_tokens", "precision": "bf16", "seq": "2048", "gpu": "a100-80gb"},
    {"model": "paste", "method": "lora", "precision": "bf16", "seq": "2048", "gpu": "rtx4090-24gb"},
    {"model": "paste", "method": "full", "precision": "amp-bf16", "optimizer": "adamw_bnb_8bit", "checkpointing": "layers", "batch": "2", "seq": "2048", "gpu": "h100-80gb"},
    # Sizes whose products pass 2^32 (usize is 32 bits in WebAssembly): a 70000 × 65536 table.
    {"model": "paste", "method": "full", "seq": "16", "gpu": "b200-180gb",
     "config": json.dumps(dict(PASTED, vocab_size=70000, hidden_size=65536, num_attention_heads=512,
                               num_key_value_heads=512, intermediate_size=128, num_hidden_layers=1))},
    # Past the context: refused without the box (a bad input below), estimated with it.
    {"model": "tinyllama-1.1b", "seq": "8192", "allow-longer": True, "checkpointing": "layers"},
    {"model": "qwen1.5-7b", "method": "qlora", "lora-r": "32", "lora-alpha": "64", "batch": "2", "seq": "4096", "optimizer": "paged_adamw_32bit", "checkpointing": "layers", "gpu": "rtx4090-24gb"},
]


@functools.lru_cache(maxsize=None)
def measured_files():
    """The results files the page embeds (web/build.rs): vramcal's rows and reference rows."""
    out = []
    for d in sorted(p for p in (ROOT / "results").iterdir() if p.is_dir() and p.name != "calibration"):
        for f in sorted(d.glob("*.csv")):
            head = f.read_text(encoding="utf-8")[:16]
            if head.startswith("tool_version,") or head.startswith("id,source,"):
                out.append(str(f.relative_to(ROOT)))
    return tuple(out)


def cli_args(c, pasted_path):
    """`vramcal estimate` arguments for configuration `c` (the form's fields)."""
    a = ["--model", pasted_path if c["model"] == "paste" else c["model"], "--method", c["method"]]
    if c["method"] != "full":
        a += ["--lora", f"r={c['lora-r']},alpha={c['lora-alpha']},targets={c['lora-targets']}"]
    a += ["--precision", c["precision"], "--optimizer", c["optimizer"],
          "--checkpointing", c["checkpointing"], "--batch", c["batch"], "--seq", c["seq"]]
    if c["allow-longer"]:
        a += ["--allow-longer"]
    if c["gpu"]:
        a += ["--gpu", c["gpu"]]
    a += ["--profile", c["profile"]]
    if c["calibration"]:
        a += ["--calibration", c["calibration"]]
    return a + ["--measured", *measured_files()]


def grid_configs(n):
    """`n` generated argument lists (seeded): every preset, method, recipe, optimizer, profile,
    checkpointing, micro-batches up to 64 and sequences up to 131072 tokens."""
    import random

    rng = random.Random(20261201)
    presets = ["mistral-7b-v0.1", "llama-2-7b", "llama-3-8b", "llama-3.1-8b", "mistral-nemo-12b",
               "mixtral-8x7b-v0.1", "qwen1.5-7b", "qwen2-7b", "qwen2.5-0.5b", "qwen2.5-7b",
               "tinyllama-1.1b", "smollm2-135m", "smollm2-360m", "mixtral-mini", "mistral-mini"]
    out = []
    for _ in range(n):
        method = rng.choice(["full", "lora", "qlora"])
        a = ["--model", rng.choice(presets), "--method", method]
        if method != "full":
            a += ["--lora", f"r={rng.choice([8, 16, 64, 256])},alpha=16,targets="
                  + rng.choice(["q_proj,v_proj", "all-linear", "q_proj,k_proj,v_proj,o_proj"])]
        a += ["--precision", rng.choice(["fp32", "bf16", "fp16", "amp-bf16", "bf16+amp", "bf16-master"]),
              "--optimizer", rng.choice(["adamw_torch", "adamw_bnb_8bit", "adafactor", "sgd"]),
              "--checkpointing", rng.choice(["none", "layers", "every:2"]),
              "--batch", str(rng.choice([1, 2, 4, 8, 16, 64])),
              "--seq", str(rng.choice([128, 1024, 4096, 8192, 16384, 32768, 131072])),
              "--gpu", rng.choice(["h200-141gb", "a100-80gb", "rtx4090-24gb"]),
              "--profile", rng.choice(["torch-sdpa", "torch-eager", "candle"])]
        out.append(a + ["--measured", *measured_files()])
    return out


def cli(vramcal, args):
    p = subprocess.run([vramcal, "estimate", *args, "--json"], cwd=ROOT, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder):
    handler = functools.partial(QuietHandler, directory=str(folder))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"]:
        o.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)


def load(d, url):
    d.get(url)
    WebDriverWait(d, 30).until(lambda d: d.execute_script(
        "return document.body.dataset.ready === '1' || document.getElementById('general-error').textContent !== ''"))
    err = d.find_element(By.ID, "general-error").text
    if d.execute_script("return document.body.dataset.ready") != "1":
        raise SystemExit(f"page did not start: {err}")


def set_field(d, name, value):
    el = d.find_element(By.ID, name)
    if el.get_attribute("type") == "checkbox":
        if el.is_selected() != value:
            el.click()
    elif el.tag_name == "select":
        Select(el).select_by_value(value)
    else:
        el.clear()
        el.send_keys(value)


def set_config(d, c):
    for name in FIELDS:
        if name == "model" and c["model"] == "paste":
            Select(d.find_element(By.ID, "model")).select_by_value("paste")
            d.execute_script(
                "const t = document.getElementById('config'); t.value = arguments[0];"
                "t.dispatchEvent(new Event('input', {bubbles: true}));", c["config"])
            continue
        if name.startswith("lora-") and c["method"] == "full":
            continue  # hidden for full fine-tuning
        set_field(d, name, c[name])


def page_json(d):
    return d.execute_script("return document.getElementById('json').textContent")


def errors(d):
    return d.execute_script(
        "return [...document.querySelectorAll('.error')].filter(e => e.textContent)"
        ".map(e => [e.dataset.for, e.textContent])")


def body_text(d):
    return d.execute_script("return document.body.innerText")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vramcal", required=True)
    ap.add_argument("--dist", default=str(ROOT / "web" / "dist"))
    ap.add_argument("--screenshot")
    ap.add_argument("--bench-out")
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--grid", type=int, default=300, help="generated configurations")
    a = ap.parse_args()
    vramcal = str(Path(a.vramcal).resolve())
    tmp = Path(tempfile.mkdtemp())
    (tmp / "pasted").mkdir()
    (tmp / "pasted" / "config.json").write_text(json.dumps(PASTED, indent=2))
    pasted_path = str(tmp / "pasted" / "config.json")
    srv, url = serve(a.dist)
    d = browser()
    failures = []
    try:
        load(d, url)
        # The page's first answer is its defaults'.
        c0 = dict(DEFAULT)
        rc, out, err = cli(vramcal, cli_args(c0, pasted_path))
        assert rc == 0, err
        if page_json(d) != out:
            failures.append("the page's first estimate differs from the CLI's")
        for i, over in enumerate(CONFIGS):
            c = {**DEFAULT, "config": json.dumps(PASTED, indent=2), **over}
            set_config(d, c)
            Path(pasted_path).write_text(c["config"])
            rc, out, err = cli(vramcal, cli_args(c, pasted_path))
            if rc != 0:
                failures.append(f"config {i}: the CLI refused it: {err.strip()}")
                continue
            got = page_json(d)
            shown_errors = errors(d)
            if shown_errors:
                failures.append(f"config {i}: the page shows errors {shown_errors}")
            elif got != out:
                failures.append(f"config {i}: page JSON differs from `vramcal estimate --json` ({len(got)} vs {len(out)} bytes)")
            else:
                x = json.loads(out)
                # What the page shows is that JSON's: the peak row and the verdict.
                rows = d.execute_script(
                    "return [...document.querySelectorAll('#items tbody tr')].map(r => r.cells[1].textContent)")
                if str(x["estimate"]["peak_bytes"]) not in rows:
                    failures.append(f"config {i}: the items table lacks the peak")
                if x["budget"] and x["budget"]["name"] not in d.find_element(By.ID, "verdict").text:
                    failures.append(f"config {i}: the verdict does not name the GPU")
                b = x["budget"]
                fit = [a for a in x["alternatives"]
                       if b and (a["reserved_bytes"] or a["peak_bytes"]) <= b["bytes"]]
                if len(fit) != len(d.find_elements(By.CSS_SELECTOR, "#fixes li")):
                    failures.append(f"config {i}: the fixes shown are not the JSON's that fit")
                shown = [p.text for p in d.find_elements(By.CSS_SELECTOR, "#measured p.measured")]
                ids = [m["id"] for m in x["measured"]]
                if ids != over.get("expect", []) or len(shown) != len(ids) or not all(
                        m in s for m, s in zip(ids, shown)):
                    failures.append(f"config {i}: measured rows {ids} shown as {shown}, "
                                    f"expected {over.get('expect', [])}")
                if len(x["estimate"]["items"]) != len(d.find_elements(By.CSS_SELECTOR, "#bar .seg")):
                    failures.append(f"config {i}: the bar's segments differ from the items")
            if "NaN" in body_text(d):
                failures.append(f"config {i}: NaN on the page")
        compared = len(CONFIGS) + 1
        measured_shown = 0

        # A grid straight through the page's estimator (window.vramcal.estimate), large
        # configurations included: usize is 32 bits in WebAssembly, so a product that would
        # overflow must not give another number than the CLI's.
        grid = grid_configs(a.grid)
        answers = d.execute_script("""
            const out = [];
            for (const args of arguments[0]) {
              try { out.push(JSON.parse(window.vramcal.estimate(args))); }
              catch (e) { out.push({trap: String(e) + ": " + window.vramcal.lastPanic()}); }
            }
            return out;""", grid)
        for args, got in zip(grid, answers):
            rc, out, err = cli(vramcal, args)
            if "trap" in got:
                failures.append(f"grid: the estimator trapped ({got['trap']}) on {' '.join(args[:-len(measured_files()) - 1])}")
                continue
            want = {"json": out} if rc == 0 else {"error": err.strip().removeprefix("error: ")}
            if ("json" in want) != ("json" in got) or want.get("json", want.get("error")) != got.get("json", got.get("error")):
                failures.append(f"grid: page and CLI differ on {' '.join(args[:-len(measured_files()) - 1])}: "
                                f"{str(got)[:160]} vs {str(want)[:160]}")
        compared += len(grid)

        # Bad input: the message next to its field, the CLI's own line where the paths agree.
        bad = [
            ({"batch": "0"}, "--batch", True),
            ({"seq": ""}, "--seq", True),
            ({"model": "smollm2-135m", "seq": "100000"}, "--seq", True),
            ({"lora-targets": "q_projx"}, "--lora", True),
            ({"lora-r": "0"}, "--lora", True),
            ({"profile": "candle", "optimizer": "paged_adamw_8bit", "gpu": ""}, "--optimizer", True),
            ({"lora-targets": "q_proj,modules_to_save=lm_head", "precision": "bf16+amp"}, "--lora", True),
            ({"model": "paste", "config": "{not json"}, "--model", False),
            ({"model": "paste", "config": json.dumps({"architectures": ["BertForMaskedLM"], "hidden_size": 768})}, "--model", False),
            ({"model": "paste", "config": ""}, "--model", False),
        ]
        for over, field, same_text in bad:
            load(d, url)
            c = {**DEFAULT, "config": json.dumps(PASTED), **over}
            set_config(d, c)
            shown = errors(d)
            rc, out, err = cli(vramcal, cli_args(c, pasted_path)) if c["model"] != "paste" else (1, "", "")
            where = [f for f, _ in shown]
            if where != [field]:
                failures.append(f"bad input {over}: error shown at {shown}, expected next to {field}")
            if same_text and shown and ("error: " + shown[0][1]) != err.strip():
                failures.append(f"bad input {over}: page says {shown[0][1]!r}, CLI {err.strip()!r}")
            if "NaN" in body_text(d) or not d.find_element(By.ID, "form").is_displayed():
                failures.append(f"bad input {over}: NaN or no form")
            if d.find_element(By.ID, "result").is_displayed():
                failures.append(f"bad input {over}: an answer is still shown beside the error")

        # Time to the first estimate, fresh loads (reported, not asserted).
        first, est = [], []
        for _ in range(a.loads):
            d.execute_cdp_cmd("Network.clearBrowserCache", {})
            load(d, url)
            first.append(float(d.execute_script("return document.body.dataset.firstEstimateMs")))
            est.append(float(d.execute_script("return document.body.dataset.estimateMs")))

        if a.screenshot:
            load(d, url)
            shot = {**DEFAULT, "batch": "4", "seq": "2048", "calibration": H200_SDPA, "gpu": "a100-40gb"}
            set_config(d, shot)
            d.execute_script("window.scrollTo(0, 0)")
            d.save_screenshot(a.screenshot)
            measured_shown = len(d.find_elements(By.CSS_SELECTOR, "#measured p.measured"))
        browser_version = d.capabilities.get("browserVersion", "")
    finally:
        d.quit()
        srv.shutdown()

    dist = Path(a.dist)
    wasm = dist / "pkg" / "vramcal_web_bg.wasm"
    files = [p for p in dist.rglob("*") if p.is_file()]
    weight = {
        "wasm_bytes": wasm.stat().st_size,
        "wasm_gzip_bytes": len(gzip.compress(wasm.read_bytes(), 9)),
        "page_bytes": sum(p.stat().st_size for p in files),
        "page_gzip_bytes": sum(len(gzip.compress(p.read_bytes(), 9)) for p in files),
    }
    timing = {
        "first_estimate_ms_median": statistics.median(first),
        "estimate_ms_median": statistics.median(est),
        "loads": a.loads,
    }
    print(f"compared {compared} configurations with `vramcal estimate --json` ({len(CONFIGS) + 1} "
          f"through the form, {a.grid} generated), {len(bad)} bad inputs")
    print(f"page weight: {weight}")
    print(f"time (Chromium {browser_version}, headless, this machine): {timing}")
    if a.screenshot:
        print(f"screenshot: {a.screenshot} ({measured_shown} measured row(s) shown)")
    if a.bench_out:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
        version = subprocess.run([vramcal, "--version"], capture_output=True, text=True).stdout.split()[-1]
        row = {
            "utc_time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host_cpu": f"{cpu} ({os.cpu_count()} CPUs)",
            "tool_version": version,
            "browser": f"Chromium {browser_version} (headless)",
            "command": "python3 " + " ".join(sys.argv),
            **weight,
            **timing,
        }
        new = not Path(a.bench_out).exists()
        with open(a.bench_out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row), lineterminator="\n")
            if new:
                w.writeheader()
            w.writerow(row)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("page check passed")


if __name__ == "__main__":
    main()
