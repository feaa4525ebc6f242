//! The `vramcal` binary: success paths, then one clear error line (non-zero exit, CSV
//! unchanged) for each bad input, as tables with one row per input, grouped by class: model
//! configs, numbers out of range, words outside an option's vocabulary, devices, options that
//! contradict each other, files, sweep grids. Many rows are findings of new-user trials: each
//! must stay fixed.

mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

fn vramcal() -> Command {
    Command::cargo_bin("vramcal").unwrap()
}

/// Runs `args`, expects failure with exactly one `error:` line containing `needle`, and
/// checks that `csv` (if any) was not modified.
fn fails_with<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    needle: &str,
    csv: Option<&Path>,
) {
    let before = csv.map(|p| std::fs::read(p).unwrap());
    let out = vramcal().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: stderr was {stderr}");
    assert!(
        errors[0].contains(needle),
        "{args:?}: {:?} does not contain {needle:?}",
        errors[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    if let (Some(p), Some(b)) = (csv, before) {
        assert_eq!(std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }
}

/// Runs vramcal with `args`, expects success, returns its stdout.
fn succeeds<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = vramcal().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rows(p: &Path) -> Vec<csv::StringRecord> {
    csv::Reader::from_path(p)
        .unwrap()
        .records()
        .map(|r| r.unwrap())
        .collect()
}

#[test]
fn models_lists_exact_counts() {
    // Mistral-7B, SmolLM2-135M; Qwen2.5-7B (q/k/v biases), Llama-3.1-8B, Mistral-Nemo
    // (head_dim 128), Qwen2.5-0.5B (tied): their config.json counts.
    vramcal().arg("models").assert().success().stdout(
        predicate::str::contains("7,241,732,096")
            .and(predicate::str::contains("134,515,008"))
            .and(predicate::str::contains(
                "qwen2.5-7b          7,615,616,512",
            ))
            .and(predicate::str::contains(
                "llama-3.1-8b        8,030,261,248",
            ))
            .and(predicate::str::contains(
                "mistral-nemo-12b   12,247,782,400",
            ))
            .and(predicate::str::contains(
                "qwen2.5-0.5b          494,032,768",
            ))
            .and(predicate::str::contains(
                "mixtral-8x7b-v0.1  46,702,792,704",
            )),
    );
}

/// Mixtral-8x7B under the torch profile: PEFT's `all-linear` adapts the router and the experts
/// (per layer, r 16: q/k/v/o 425,984; router 16·4096 + 8·16; `gate_up_proj` at rank 32·8:
/// 256·4096 + 28672·256; `down_proj` 128·14336 + 4096·128), the backward of a layer holds the
/// adapted `gate_up` stack's gradient beyond the `down` stack freed (E·h·i in bf16), and QLoRA
/// leaves the experts unquantized, in fp32 after `prepare_model_for_kbit_training`.
#[test]
fn mixtral_is_estimated_with_peft_all_linear() {
    let est = |extra: &[&str]| -> serde_json::Value {
        let out = vramcal()
            .args([
                "estimate",
                "--model",
                "mixtral-8x7b-v0.1",
                "--batch",
                "1",
                "--seq",
                "1024",
                "--dtype",
                "bf16",
                "--checkpointing",
                "layers",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let item = |v: &serde_json::Value, name: &str| -> Option<u64> {
        v["estimate"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .map(|i| i["bytes"].as_u64().unwrap())
    };
    let per_layer: u64 =
        425_984 + (16 * 4096 + 8 * 16) + (256 * 4096 + 28_672 * 256) + (128 * 14_336 + 4096 * 128);
    let lora = est(&[
        "--method",
        "lora",
        "--lora",
        "r=16,alpha=32,targets=all-linear",
    ]);
    assert_eq!(lora["trainable_params"], 32 * per_layer);
    assert_eq!(
        item(&lora, "expert gradient (layer backward)"),
        Some(8 * 4096 * 14_336 * 2)
    );
    // q/k/v/o only: the experts stay frozen, nothing of theirs is formed per forward.
    let attn = est(&["--method", "lora", "--lora", "r=16,alpha=32,targets=attn"]);
    assert_eq!(attn["trainable_params"], 32 * 425_984);
    assert_eq!(item(&attn, "expert gradient (layer backward)"), None);
    // QLoRA: bitsandbytes quantizes the attention's nn.Linear layers only.
    let experts: u64 = 32 * 8 * 3 * 4096 * 14_336;
    let q = est(&[
        "--method",
        "qlora",
        "--lora",
        "r=16,alpha=32,targets=all-linear",
    ]);
    assert!(item(&q, "weights").unwrap() > experts * 4);
    // vramcal's own step runs it too: the same trainable count; its table counts the router's
    // and experts' adapter products, which attention-only LoRA does not form.
    let own = |targets: &str| {
        est(&[
            "--method",
            "lora",
            "--lora",
            &format!("r=16,alpha=32,targets={targets}"),
            "--profile",
            "candle",
        ])
    };
    let (all, attn) = (own("all-linear"), own("attn"));
    assert_eq!(all["trainable_params"], 32 * per_layer);
    let peak = |v: &serde_json::Value| v["estimate"]["peak_bytes"].as_u64().unwrap();
    assert!(
        peak(&all) > peak(&attn),
        "{} vs {}",
        peak(&all),
        peak(&attn)
    );
}

/// `measure` of PEFT's `all-linear` on a Mixtral model: the row records the word (the model
/// has no `gate_proj`/`up_proj`/`down_proj` modules) and `check` reads it back.
#[test]
fn mixtral_all_linear_is_measured_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.csv");
    let out = out.to_str().unwrap();
    succeeds(&[
        "measure",
        "--model",
        "mixtral-mini",
        "--batch",
        "1",
        "--seq",
        "16",
        "--lora",
        "r=4,alpha=8,targets=all-linear",
        "--out",
        out,
    ]);
    let mut r = csv::Reader::from_path(out).unwrap();
    let h = r.headers().unwrap().clone();
    let row = r.records().next().unwrap().unwrap();
    let col = |name: &str| row[h.iter().position(|x| x == name).unwrap()].to_string();
    assert_eq!(col("lora_targets"), "all-linear");
    // Half of r 8's 1,405,184, PEFT 0.21.2's count (`results/torch-cpu/mixtral-mini.csv`).
    assert_eq!(col("trainable_params"), "702592");
    let text = succeeds(&["check", "--profile", "candle", "--measured", out]);
    assert!(text.contains("mixtral-mini lora r4 all-linear"), "{text}");
}

/// `plan --seq-lengths`: the step measured is the largest micro-batch, the tokens projected
/// those of the data set's epochs (counted here by hand), and the options that do not apply are
/// refused.
#[test]
fn plan_projects_the_data_sets_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("lengths.txt");
    std::fs::write(&f, "30\n12\n64\n5\n50\n9\n").unwrap();
    let plan = |extra: &[&str]| -> serde_json::Value {
        let out = vramcal()
            .args([
                "plan", "--model", "tiny", "--batch", "2", "--seq", "32", "--json",
            ])
            .arg("--seq-lengths")
            .arg(&f)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Truncated to 32: 30 + 12 + 32 + 5 + 32 + 9 = 120 tokens of data.
    let v = plan(&["--padding", "max", "--epochs", "2"]);
    assert_eq!(v["data"]["sequences"], 6);
    assert_eq!(v["data"]["real_tokens"], 120);
    assert_eq!(v["data"]["processed_tokens"], 6 * 32);
    assert_eq!(v["data"]["optimizer_steps"], 3);
    assert_eq!(
        (v["tokens"].as_u64(), v["real_tokens"].as_u64()),
        (Some(384), Some(240))
    );
    assert_eq!(v["steps"], 6);
    // Packed: all 170 tokens in rows of 32, the last padded: 6 rows, 3 micro-batches.
    let v = plan(&["--packing"]);
    assert_eq!(
        (
            v["data"]["real_tokens"].as_u64(),
            v["data"]["processed_tokens"].as_u64()
        ),
        (Some(170), Some(192))
    );
    // Padded to the longest, either sampler: between the data and max padding.
    for sampler in ["random", "length-grouped"] {
        let v = plan(&["--sampler", sampler]);
        let p = v["data"]["processed_tokens"].as_u64().unwrap();
        assert!((120..=192).contains(&p), "{sampler}: {p}");
    }
    for (extra, want) in [
        (&["--examples", "5"][..], "conflicts with --seq-lengths"),
        (
            &["--packing", "--sampler", "random"][..],
            "with --packing it changes nothing",
        ),
        (
            &["--sampler", "sorted"][..],
            "expected random or length-grouped",
        ),
    ] {
        let out = vramcal()
            .args(["plan", "--model", "tiny", "--batch", "2", "--seq", "32"])
            .arg("--seq-lengths")
            .arg(&f)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} accepted");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error")).count(),
            1,
            "{err}"
        );
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let out = vramcal()
        .args([
            "plan",
            "--model",
            "tiny",
            "--seq",
            "8",
            "--examples",
            "3",
            "--sampler",
            "random",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seq-lengths"));
}

/// A measured row names its optimizer (HF name), precision recipe and SGD momentum, and its
/// optimizer bytes are what the optimizer holds: an fp32 master copy and f32 moments of
/// `tiny`'s parameters under bf16-master, one f32 momentum buffer under SGD with momentum.
#[test]
fn measured_rows_record_optimizer_and_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.csv");
    for extra in [
        &["--precision", "bf16-master"][..],
        &["--optimizer", "sgd", "--momentum", "0.9"][..],
        &["--optimizer", "adamw-8bit"][..],
        &[
            "--precision",
            "bf16+amp",
            "--method",
            "lora",
            "--lora",
            "r=4,alpha=8,targets=q_proj,lm_head,embed_tokens",
        ][..],
    ] {
        vramcal()
            .args([
                "measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--quiet",
            ])
            .args(extra)
            .arg("--out")
            .arg(&out)
            .assert()
            .success();
    }
    let rows: Vec<csv::StringRecord> = csv::Reader::from_path(&out)
        .unwrap()
        .records()
        .map(|r| r.unwrap())
        .collect();
    let header = csv::Reader::from_path(&out)
        .unwrap()
        .headers()
        .unwrap()
        .clone();
    let col = |r: &csv::StringRecord, name: &str| {
        r[header.iter().position(|c| c == name).unwrap()].to_string()
    };
    let params: u64 = col(&rows[0], "params").parse().unwrap();
    assert_eq!(
        (col(&rows[0], "optimizer"), col(&rows[0], "precision")),
        ("adamw_torch".into(), "bf16-master".into())
    );
    assert_eq!(
        col(&rows[0], "optimizer_state_bytes"),
        (4 * params + 2 * 4 * params).to_string()
    );
    assert_eq!(
        (col(&rows[1], "optimizer"), col(&rows[1], "momentum")),
        ("sgd".into(), "0.9".into())
    );
    assert_eq!(
        col(&rows[1], "optimizer_state_bytes"),
        (4 * params).to_string()
    );
    assert_eq!(col(&rows[2], "optimizer"), "adamw_bnb_8bit");
    assert_eq!(col(&rows[2], "momentum"), "");
    // Autocast over bf16 weights with PEFT's fp32 adapters, on q_proj (tiny: 32 → 32, two
    // layers), the head (32 → 96) and the embedding (96 → 32): bf16 weights, fp32 adapters,
    // gradients and AdamW states.
    let adapters: u64 = 2 * 4 * (32 + 32) + 2 * 4 * (32 + 96);
    assert_eq!(
        (
            col(&rows[3], "precision"),
            col(&rows[3], "dtype"),
            col(&rows[3], "lora_targets")
        ),
        (
            "bf16+amp".into(),
            "bf16".into(),
            "q_proj;lm_head;embed_tokens".into()
        )
    );
    assert_eq!(col(&rows[3], "trainable_params"), adapters.to_string());
    assert_eq!(col(&rows[3], "grad_bytes"), (4 * adapters).to_string());
    assert_eq!(
        col(&rows[3], "optimizer_state_bytes"),
        (8 * adapters).to_string()
    );
    assert_eq!(
        col(&rows[3], "param_bytes"),
        (2 * params + 4 * adapters).to_string()
    );
    // A model with tensors of 4096 values and more: bitsandbytes' layout, by hand from the
    // parameter shapes (1 byte per value + an f32 absmax per 256 per moment; f32 below 4096).
    let eight = dir.path().join("eight.csv");
    vramcal()
        .args([
            "measure",
            "--model",
            "mistral-mini",
            "--batch",
            "1",
            "--seq",
            "8",
            "--quiet",
        ])
        .args(["--optimizer", "adamw_bnb_8bit", "--out"])
        .arg(&eight)
        .assert()
        .success();
    let cfg = vramcal::config::preset("mistral-mini").unwrap().config;
    let want: u64 = cfg
        .param_shapes()
        .iter()
        .map(|p| {
            let n = p.numel();
            if n >= 4096 {
                2 * (n + 4 * n.div_ceil(256))
            } else {
                2 * 4 * n
            }
        })
        .sum();
    let mut r = csv::Reader::from_path(&eight).unwrap();
    let h = r.headers().unwrap().clone();
    let row = r.records().next().unwrap().unwrap();
    let got = &row[h.iter().position(|c| c == "optimizer_state_bytes").unwrap()];
    assert_eq!(got, want.to_string());
}

/// `--seq-lengths`: the estimate is for the largest micro-batch the data can form, and a bad
/// file gets one `error:` line naming the file and the line.
#[test]
fn seq_lengths_give_the_worst_batch_and_bad_files_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("lengths.txt");
    std::fs::write(&f, "120\n340\n{\"length\": 812}\n77\n").unwrap();
    let json = |extra: &[&str]| -> serde_json::Value {
        let out = vramcal()
            .args([
                "estimate",
                "--model",
                "qwen2.5-0.5b",
                "--batch",
                "4",
                "--json",
            ])
            .arg("--seq-lengths")
            .arg(&f)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let plain = |seq: &str| -> serde_json::Value {
        let out = vramcal()
            .args([
                "estimate",
                "--model",
                "qwen2.5-0.5b",
                "--json",
                "--batch",
                "4",
                "--seq",
                seq,
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Padded to the longest: the same estimate as 4 × 812.
    let v = json(&[]);
    assert_eq!(
        (v["micro_batch"].as_u64(), v["seq"].as_u64()),
        (Some(4), Some(812))
    );
    assert_eq!(v["data"]["sequences"], 4);
    assert_eq!(v["estimate"], plain("812")["estimate"]);
    let v = json(&["--packing", "--seq", "2048"]);
    assert_eq!(v["seq"], 2048);
    let v = json(&["--padding-free"]);
    assert_eq!(
        (v["micro_batch"].as_u64(), v["seq"].as_u64()),
        (Some(1), Some(1349))
    );
    for (text, want) in [
        ("12\n0\n", "line 2: a sequence of 0 tokens"),
        ("12\n\n4\n", "line 2: empty line"),
        ("", "the file is empty"),
        ("12\nx3\n", "line 2: \"x3\" is not a token count"),
        (
            "12\n99999999\n",
            "line 2: 99999999 tokens is above the model's max_position_embeddings",
        ),
        ("12\n\u{0}\n", "line 2"),
        (
            "{\"len\": 3}\n",
            "line 1: the object has no \"length\" field",
        ),
    ] {
        std::fs::write(&f, text).unwrap();
        let out = vramcal()
            .args(["estimate", "--model", "qwen2.5-0.5b", "--seq-lengths"])
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} accepted");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: ") && err.contains("lengths.txt"),
            "{err}"
        );
        assert!(err.contains(want), "{err} lacks {want}");
    }
    std::fs::write(&f, b"12\n\xff\n").unwrap();
    let out = vramcal()
        .args(["estimate", "--model", "qwen2.5-0.5b", "--seq-lengths"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: not UTF-8"), "{err}");
    // Packing needs a row length; vramcal's own step has no padding-free attention.
    std::fs::write(&f, "12\n").unwrap();
    for (extra, want) in [
        (&["--packing"][..], "needs --seq"),
        (
            &["--padding-free", "--profile", "candle"][..],
            "no variable-length attention",
        ),
    ] {
        let out = vramcal()
            .args(["estimate", "--model", "qwen2.5-0.5b", "--seq-lengths"])
            .arg(&f)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
    }
}

/// The verdict's fixes include, for the PyTorch profiles, bitsandbytes' 8-bit and paged AdamW
/// and LoRA on fewer modules, each with its estimate; vramcal's own step (candle) is offered
/// no optimizer it does not train with.
#[test]
fn fixes_name_8bit_optimizers_and_fewer_lora_modules() {
    let text = |args: &[&str]| -> String {
        let out = vramcal().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let full = [
        "estimate",
        "--model",
        "llama-3.1-8b",
        "--batch",
        "1",
        "--seq",
        "2048",
        "--precision",
        "bf16",
        "--budget",
        "70GiB",
    ];
    let t = text(&full);
    assert!(t.contains("does NOT fit"), "{t}");
    assert!(
        t.contains("8-bit AdamW states (--optimizer adamw_bnb_8bit): "),
        "{t}"
    );
    assert!(
        t.contains("paged 8-bit AdamW (--optimizer paged_adamw_8bit"),
        "{t}"
    );
    let lora = [
        "estimate",
        "--model",
        "qwen2.5-7b",
        "--lora",
        "r=16,targets=all-linear",
        "--batch",
        "4",
        "--seq",
        "2048",
        "--precision",
        "bf16",
        "--gpu",
        "a100-40gb",
    ];
    let t = text(&lora);
    assert!(
        t.contains(
            "LoRA on q_proj and v_proj only (--lora r=16,alpha=8,dropout=0,targets=q_proj,v_proj)"
        ),
        "{t}"
    );
    let candle = [
        "estimate",
        "--model",
        "llama-3.1-8b",
        "--batch",
        "1",
        "--seq",
        "2048",
        "--dtype",
        "bf16",
        "--budget",
        "70GiB",
        "--profile",
        "candle",
    ];
    let t = text(&candle);
    assert!(
        t.contains("does NOT fit") && !t.contains("(--optimizer "),
        "{t}"
    );
}

#[test]
fn help_has_examples() {
    for cmd in ["measure", "sweep", "models"] {
        vramcal()
            .args([cmd, "--help"])
            .assert()
            .success()
            .stdout(predicate::str::contains("Examples"));
    }
}

#[test]
fn measure_appends_rows_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("sub/out.csv");
    let c = csv.to_str().unwrap();
    vramcal()
        .args([
            "measure", "--model", "tiny", "--batch", "2", "--seq", "8", "--out", c,
        ])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("step2_backward")
                .and(predicate::str::contains("peak allocated")),
        );
    let out = vramcal()
        .args([
            "measure", "--model", "tiny", "--batch", "1", "--seq", "16", "--json", "--out", c,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let row: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(row["status"], "ok");
    assert_eq!(row["seq"], 16);
    let r = rows(&csv);
    assert_eq!(r.len(), 2);
    let header = csv::Reader::from_path(&csv)
        .unwrap()
        .headers()
        .unwrap()
        .clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert_eq!(&r[0][col("status")], "ok");
    assert_eq!(&r[0][col("params")], "21664");
    let peak: u64 = r[1][col("peak_bytes")].parse().unwrap();
    assert_eq!(peak, row["peak_bytes"].as_u64().unwrap());
    assert!(r[0][col("command")].contains("measure --model tiny"));
}

#[test]
fn allow_longer_lifts_the_context_limit() {
    vramcal()
        .args([
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "70",
            "--allow-longer",
            "--quiet",
        ])
        .assert()
        .success();
}

#[test]
fn sweep_writes_one_row_per_point() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("sweep.csv");
    vramcal()
        .args([
            "sweep",
            "--model",
            "tiny",
            "--batch",
            "1,2",
            "--seq",
            "8,16",
            "--out",
            csv.to_str().unwrap(),
        ])
        .assert()
        .success();
    let r = rows(&csv);
    assert_eq!(r.len(), 4);
    let header = csv::Reader::from_path(&csv)
        .unwrap()
        .headers()
        .unwrap()
        .clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let points: Vec<(String, String)> = r
        .iter()
        .map(|x| (x[col("batch")].to_string(), x[col("seq")].to_string()))
        .collect();
    assert_eq!(
        points,
        [("1", "8"), ("1", "16"), ("2", "8"), ("2", "16")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert!(r.iter().all(|x| &x[col("status")] == "ok"));
    assert!(r
        .iter()
        .all(|x| x[col("command")].contains("sweep --model tiny")));
}

#[test]
fn sweep_over_methods_and_checkpointing_records_every_column() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("peft.csv");
    let saves = dir.path().join("saved");
    vramcal()
        .args([
            "sweep",
            "--model",
            "tiny",
            "--method",
            "full,lora,qlora",
            "--lora",
            "r=4,alpha=8,targets=q_proj,v_proj",
        ])
        .args([
            "--checkpointing",
            "none,layers",
            "--batch",
            "2",
            "--seq",
            "16",
            "--save",
            "adapter",
        ])
        .args([
            "--out",
            csv.to_str().unwrap(),
            "--save-dir",
            saves.to_str().unwrap(),
        ])
        .assert()
        .success();
    let r = rows(&csv);
    assert_eq!(r.len(), 6);
    let header = csv::Reader::from_path(&csv)
        .unwrap()
        .headers()
        .unwrap()
        .clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let get = |i: usize, name: &str| r[i][col(name)].to_string();
    let methods: Vec<String> = (0..6)
        .map(|i| format!("{}/{}", get(i, "method"), get(i, "checkpointing")))
        .collect();
    assert_eq!(
        methods,
        [
            "full/none",
            "full/layers",
            "lora/none",
            "lora/layers",
            "qlora/none",
            "qlora/layers"
        ]
    );
    for i in 0..6 {
        assert_eq!(get(i, "status"), "ok");
        assert!(get(i, "save_peak_bytes").parse::<u64>().unwrap() > 0);
        assert!(get(i, "saved_file_bytes").parse::<u64>().unwrap() > 0);
    }
    assert_eq!(get(0, "trainable_params"), "21664");
    assert_eq!(get(0, "lora_r"), "");
    assert_eq!(
        get(2, "trainable_params"),
        (2 * (4 * (32 + 32) + 4 * (32 + 16))).to_string()
    );
    assert_eq!(get(2, "lora_targets"), "q_proj;v_proj");
    assert_eq!(get(4, "quant"), "nf4");
    // The saved adapter of point 3 (lora/none) is a PEFT adapter; point 1 (full) a model.
    assert!(saves.join("point-3/adapter_model.safetensors").is_file());
    assert!(saves.join("point-3/adapter_config.json").is_file());
    assert!(saves.join("point-1/model.safetensors").is_file());
    // QLoRA's base weights are smaller than LoRA's.
    assert!(
        get(4, "param_bytes").parse::<u64>().unwrap()
            < get(2, "param_bytes").parse::<u64>().unwrap()
    );
}

#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::{Command as Std, Stdio};
    for args in [
        vec!["models", "--json"],
        vec!["measure", "--model", "tiny", "--batch", "1", "--seq", "4"],
    ] {
        let mut child = Std::new(assert_cmd::cargo::cargo_bin("vramcal"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader goes away before anything is written
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn the_table_reports_the_steady_state_step() {
    vramcal()
        .args(["measure", "--model", "tiny", "--batch", "1", "--seq", "8"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("step 2: ").and(predicate::str::contains("tokens/s, loss")),
        );
}

#[test]
fn timed_steps_are_counted_after_step_two() {
    let out = vramcal()
        .args([
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "8",
            "--timed-steps",
            "2",
            "--json",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["timed_steps"], 2);
    let median = row["step_seconds_median"].as_f64().unwrap();
    let tps = row["tokens_per_second"].as_f64().unwrap();
    assert!((tps - 8.0 / median).abs() < 1e-9 * tps);
}

#[test]
fn rows_are_never_glued_onto_a_last_line_without_a_newline() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("keep.csv");
    let c = csv.to_str().unwrap();
    let measure = [
        "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--out", c, "--quiet",
    ];
    vramcal().args(measure).assert().success();
    let mut bytes = std::fs::read(&csv).unwrap();
    bytes.pop();
    std::fs::write(&csv, &bytes).unwrap();
    vramcal().args(measure).assert().success();
    let r = rows(&csv);
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|x| x.len() == r[0].len()));
}

#[test]
fn a_device_can_be_the_output() {
    vramcal()
        .args([
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--out",
            "/dev/null",
            "--quiet",
        ])
        .assert()
        .success();
}

/// The estimate reports the optimizer step's items when the peak is there, and they add up.
#[test]
fn estimate_json_names_its_profile_and_its_items_add_up_to_the_peak() {
    let out = vramcal()
        .args(["estimate", "--model", "tiny", "--seq", "8", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The default answers for PyTorch + transformers (SDPA), and says so.
    assert_eq!(v["estimate"]["profile"], "torch-sdpa");
    assert_eq!(v["profile"], "torch-sdpa");
    assert_eq!(v["seq"], 8);
    let items: u64 = v["estimate"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["bytes"].as_u64().unwrap())
        .sum();
    let peak = v["estimate"]["peak_bytes"].as_u64().unwrap();
    assert!(items.abs_diff(peak) <= 8, "items {items} vs peak {peak}");
}

/// Accumulation keeps the summed gradients alive in vramcal's step: its estimate grows with it.
#[test]
fn accumulation_grows_the_candle_estimate() {
    let est = |acc: &str| -> u64 {
        let o = vramcal()
            .args([
                "estimate",
                "--profile",
                "candle",
                "--model",
                "smollm2-135m",
                "--seq",
                "64",
                "--accumulate",
                acc,
                "--json",
            ])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["estimate"]["peak_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(est("2") > est("1"));
}

#[test]
fn help_prints_whole_on_stdout() {
    vramcal()
        .args(["measure", "--help"])
        .assert()
        .success()
        .stdout(predicates::str::contains("--batch"));
}

// Refusals. Each row is one bad command line: the fragment its one `error:` line must contain,
// and the file (in the fixture's folder) that must stay byte-identical, if any.

/// One refused command line.
struct Case {
    /// Arguments after `vramcal`; `{dir}` stands for the [`Fixture`]'s folder and `{gguf}` for
    /// the real SmolLM2 GGUF.
    args: &'static [&'static str],
    /// What the one `error:` line must contain.
    error: &'static str,
    /// A file in the fixture's folder that must not change.
    untouched: Option<&'static str>,
}

/// A folder with what the tables point at: `keep.csv` holding one measured row of `tiny`, bad
/// model configs, bad weights, results files vramcal must not append to, and a file where a
/// folder is expected.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture { dir };
        let keep = fx.path("keep.csv");
        vramcal()
            .args([
                "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--out",
            ])
            .arg(&keep)
            .arg("--quiet")
            .assert()
            .success();

        // Model configs, each `<name>/config.json`.
        let tiny = vramcal::config::preset("tiny").unwrap().config;
        let tiny_json = serde_json::to_value(&tiny).unwrap();
        let config = |name: &str, text: String| {
            std::fs::create_dir(fx.path(name)).unwrap();
            std::fs::write(fx.path(name).join("config.json"), text).unwrap();
        };
        config("malformed", "{ \"hidden_size\": ".into());
        let mut missing = tiny_json.clone();
        missing.as_object_mut().unwrap().remove("vocab_size");
        config("no-vocab", missing.to_string());
        let mut arch = tiny_json.clone();
        arch["architectures"] = serde_json::json!(["BertModel"]);
        config("bert", arch.to_string());
        let mut zero = tiny_json.clone();
        zero["num_attention_heads"] = serde_json::json!(0);
        config("no-heads", zero.to_string());
        let mut layers = tiny_json.clone();
        layers["num_hidden_layers"] = serde_json::json!(100_000_000u64);
        layers["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        config("many-layers", layers.to_string());
        let mut yarn = tiny_json.clone();
        yarn["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        config("yarn", yarn.to_string());
        let mut mlp_bias = tiny_json.clone();
        mlp_bias["mlp_bias"] = serde_json::json!(true);
        config("mlp-bias", mlp_bias.to_string());

        // Weights: a safetensors header cut short, and `tiny`'s tensors plus one it lacks.
        std::fs::write(
            fx.path("w.safetensors"),
            b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
        )
        .unwrap();
        let m = vramcal::model::Decoder::new(
            &tiny,
            &mut vramcal::weights::RandomWeights::new(0),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut map: std::collections::HashMap<String, candle_core::Tensor> = m
            .trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        map.insert(
            "model.layers.2.input_layernorm.weight".into(),
            candle_core::Tensor::ones(32, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        );
        candle_core::safetensors::save(&map, fx.path("extra.safetensors")).unwrap();

        // Results files: another header, and rows written before the attention column existed.
        std::fs::write(fx.path("other.csv"), "a,b\n1,2\n").unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/cpu/smollm2-135m.csv");
        let mut r = csv::Reader::from_path(&src).unwrap();
        let header = r.headers().unwrap().clone();
        let a = header.iter().position(|c| c == "attention").unwrap();
        let mut w = csv::Writer::from_path(fx.path("old.csv")).unwrap();
        w.write_record(&header).unwrap();
        for rec in r.records() {
            let rec = rec.unwrap();
            let f: Vec<&str> = rec
                .iter()
                .enumerate()
                .map(|(i, v)| if i == a { "" } else { v })
                .collect();
            w.write_record(&f).unwrap();
        }
        drop(w);
        // The same rows, the first with an attention mode outside the vocabulary.
        let mut r = csv::Reader::from_path(&src).unwrap();
        let mut w = csv::Writer::from_path(fx.path("flash.csv")).unwrap();
        w.write_record(&header).unwrap();
        for (n, rec) in r.records().enumerate() {
            let rec = rec.unwrap();
            let f: Vec<&str> = rec
                .iter()
                .enumerate()
                .map(|(i, v)| if i == a && n == 0 { "flash" } else { v })
                .collect();
            w.write_record(&f).unwrap();
        }
        drop(w);

        // The same rows on a device vramcal does not write.
        let d = header.iter().position(|c| c == "device").unwrap();
        let mut r = csv::Reader::from_path(&src).unwrap();
        let mut w = csv::Writer::from_path(fx.path("gpu-device.csv")).unwrap();
        w.write_record(&header).unwrap();
        for rec in r.records() {
            let rec = rec.unwrap();
            let f: Vec<&str> = rec
                .iter()
                .enumerate()
                .map(|(i, v)| if i == d { "gpu" } else { v })
                .collect();
            w.write_record(&f).unwrap();
        }
        drop(w);

        // Simulated ranks, one edited to a rank no world of its size has.
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("results/cpu/smollm2-135m-sharded.csv");
        let mut r = csv::Reader::from_path(&src).unwrap();
        let header = r.headers().unwrap().clone();
        let k = header.iter().position(|c| c == "rank").unwrap();
        let mut w = csv::Writer::from_path(fx.path("bad-rank.csv")).unwrap();
        w.write_record(&header).unwrap();
        for (n, rec) in r.records().enumerate().take(20) {
            let rec = rec.unwrap();
            let f: Vec<&str> = rec
                .iter()
                .enumerate()
                .map(|(i, v)| if i == k && n == 5 { "64" } else { v })
                .collect();
            w.write_record(&f).unwrap();
        }
        drop(w);

        // Reference rows (PyTorch's) with a precision outside the format's vocabulary.
        let torch_rows =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("results/torch-cpu/smollm2-135m.csv");
        let text = std::fs::read_to_string(torch_rows).unwrap();
        std::fs::write(fx.path("fp8.csv"), text.replace(",fp32,", ",fp8,")).unwrap();

        // Calibration tables: a copy of the CPU one, and one whose device is not a device.
        let cal = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/calibration/cpu-candle.csv");
        let text = std::fs::read_to_string(cal).unwrap();
        std::fs::write(fx.path("cal.csv"), &text).unwrap();
        std::fs::write(fx.path("tpu-cal.csv"), text.replace(",cpu,", ",tpu,")).unwrap();

        // A file where --save-dir expects a folder.
        std::fs::write(fx.path("a-file"), "").unwrap();
        fx
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs every case of `cases` through [`fails_with`], then checks that `keep.csv` still
    /// holds its one row.
    fn refuses(&self, cases: &[Case]) {
        let dir = self.dir.path().to_str().unwrap();
        for case in cases {
            let args: Vec<String> = case
                .args
                .iter()
                .map(|a| {
                    let a = a.replace("{dir}", dir);
                    if a.contains("{gguf}") {
                        let g = common::smollm2_gguf().expect("the SmolLM2 GGUF");
                        a.replace("{gguf}", g.to_str().unwrap())
                    } else {
                        a
                    }
                })
                .collect();
            let untouched = case.untouched.map(|f| self.path(f));
            fails_with(&args, case.error, untouched.as_deref());
            // An output a refused command names `never-made` must not exist afterwards.
            assert!(
                !self.path("never-made").exists(),
                "{args:?} made its output"
            );
        }
        assert_eq!(rows(&self.path("keep.csv")).len(), 1);
    }
}

/// Model configs vramcal cannot build.
#[rustfmt::skip]
const BAD_MODELS: &[Case] = &[
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "{dir}/malformed/config.json",
            "--batch", "1", "--seq", "4"],
        error: "malformed model config",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "{dir}/no-vocab/config.json",
            "--batch", "1", "--seq", "4"],
        error: "vocab_size",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "{dir}/bert/config.json",
            "--batch", "1", "--seq", "4"],
        error: "unsupported architecture",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "{dir}/no-heads/config.json",
            "--batch", "1", "--seq", "4"],
        error: "num_attention_heads must be positive",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "nonexistent-model", "--batch",
            "1", "--seq", "4"],
        error: "unknown model",
        untouched: Some("keep.csv"),
    },
    // RoPE scalings vramcal does not apply, and MLP biases, are refused, not ignored.
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "{dir}/yarn/config.json",
            "--batch", "1", "--seq", "4"],
        error: "rope_scaling type \"yarn\" is not modelled",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["estimate", "--model", "{dir}/mlp-bias/config.json", "--batch", "1", "--seq",
            "4"],
        error: "mlp_bias = true is not modelled",
        untouched: None,
    },
    // A config with a hundred million layers is refused at once, not built until memory runs
    // out.
    Case {
        args: &["measure", "--model", "{dir}/many-layers/config.json", "--batch", "1", "--seq",
            "4"],
        error: "num_hidden_layers = 100000000",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "{dir}/many-layers/config.json", "--batch", "1", "--seq",
            "4"],
        error: "num_hidden_layers = 100000000",
        untouched: None,
    },
];

#[test]
fn bad_model_configs_are_refused_with_one_line_and_keep_the_csv() {
    Fixture::new().refuses(BAD_MODELS);
}

/// Sizes and settings out of range: zero, past the context, overflowing, more than the machine
/// has, negative or NaN.
#[rustfmt::skip]
const BAD_NUMBERS: &[Case] = &[
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "0", "--seq",
            "4"],
        error: "--batch",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1", "--seq",
            "65"],
        error: "max_position_embeddings",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch",
            "4611686018427387904", "--seq", "64"],
        error: "overflows",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1000000000",
            "--seq", "64"],
        error: "more than this machine",
        untouched: Some("keep.csv"),
    },
    // Optimizer settings are rejected before anything runs; negative numbers are values.
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--lr", "-1", "--out",
            "{dir}/keep.csv"],
        error: "--lr",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--lr", "NaN", "--out",
            "{dir}/keep.csv"],
        error: "--lr",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--weight-decay", "-5",
            "--out", "{dir}/keep.csv"],
        error: "--weight-decay",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--accumulate", "0"],
        error: "--accumulate",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--checkpointing",
            "every:0"],
        error: "at least 1",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--checkpointing",
            "every:3"],
        error: "between 1 and the layer count (2)",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--lora", "r=0"],
        error: "rank must be at least 1",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--lora",
            "r=4,alpha=0"],
        error: "alpha",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--lora",
            "dropout=1.5"],
        error: "dropout",
        untouched: None,
    },
    // A LoRA rank too large for the machine is named as the cause.
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--lora",
            "r=99999999999"],
        error: "--lora r = 99999999999: rank must be at most 1048576",
        untouched: None,
    },
    Case {
        args: &["plan", "--model", "tiny", "--seq", "8", "--examples", "2305843009213693952"],
        error: "overflows",
        untouched: None,
    },
    Case {
        args: &["check", "--measured", "results/cpu/smollm2-135m.csv", "--max-error=nan"],
        error: "must be a fraction between 0 and 1",
        untouched: None,
    },
];

#[test]
fn numbers_out_of_range_are_refused_with_one_line_and_keep_the_csv() {
    Fixture::new().refuses(BAD_NUMBERS);
}

/// Words outside an option's vocabulary, and malformed option lists.
#[rustfmt::skip]
const BAD_WORDS: &[Case] = &[
    // The error names the targets as given, not the whole --lora value.
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--method", "lora", "--lora",
            "r=8,targets=all-linear,gate,alpha=4"],
        error: "--lora targets = all-linear,gate: all-linear already names",
        untouched: None,
    },
    // `estimate`'s --world-size is --gpus under torchrun's word: one of them, named as given.
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--world-size",
            "8", "--gpus", "4"],
        error: "'--world-size <WORLD_SIZE>' cannot be used with '--gpus <GPUS>'",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--world-size", "4"],
        error: "--world-size = 4: needs --shard",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "ddp", "--world-size",
            "0"],
        error: "--world-size = 0: must be at least 1",
        untouched: None,
    },
    // torch's AdamW implementations: two words, for adamw_torch, for the torch profiles.
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--profile", "torch-sdpa",
            "--torch-adamw", "fused"],
        error: "expected for-loop or foreach",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--profile", "torch-sdpa",
            "--torch-adamw", "foreach", "--optimizer", "sgd"],
        error: "--torch-adamw = foreach: names an implementation of torch's AdamW, --optimizer adamw_torch, not of sgd",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--profile", "candle",
            "--torch-adamw", "for-loop"],
        error: "--torch-adamw is for the torch profiles",
        untouched: None,
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1", "--seq",
            "4", "--torch-adamw", "foreach"],
        error: "--torch-adamw is for estimate's torch profiles",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero3", "--gpus", "2",
            "--offload", "cpu"],
        error: "expected none, optimizer or optimizer+params",
        untouched: None,
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1", "--seq",
            "4", "--dtype", "int8"],
        error: "dtype",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--method", "dora"],
        error: "expected full, lora or qlora",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--quant", "int3"],
        error: "expected none, nf4 or nf4-dq",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--checkpointing",
            "sometimes"],
        error: "expected none, layers or every:K",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--save", "everything"],
        error: "expected none, adapter or merged",
        untouched: None,
    },
    // An empty or unknown --attention is an error, not sdpa.
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--attention", ""],
        error: "expected sdpa, eager or flash-attention-2",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--attention", "flash"],
        error: "expected sdpa, eager or flash-attention-2",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--lora",
            "targets=q_proj,embed"],
        error: "unknown target",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--lora", "r=8,r=4"],
        error: "r is given twice",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--lora", ",,,"],
        error: "is empty",
        untouched: None,
    },
    // PEFT's modules_to_save: a closed list, a module trained one way, recipes modelled.
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--lora",
            "targets=q,modules_to_save=norm"],
        error: "unknown module (expected lm_head or embed_tokens)",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--batch", "1", "--seq", "8", "--lora",
            "targets=q,lm_head,modules_to_save=lm_head"],
        error: "both a LoRA target and in modules_to_save",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--batch", "1", "--seq", "8", "--precision",
            "bf16+amp", "--lora", "targets=q,modules_to_save=embed_tokens"],
        error: "does not model yet",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--batch", "1", "--seq", "8", "--profile",
            "candle", "--precision", "amp-bf16", "--lora", "targets=q,modules_to_save=lm_head"],
        error: "under autocast with modules_to_save is not modelled yet",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--batch", "1", "--seq", "8", "--method",
            "qlora", "--dtype", "bf16", "--lora", "targets=q,modules_to_save=lm_head"],
        error: "QLoRA over 16-bit weights with modules_to_save is not modelled yet",
        untouched: None,
    },
];

#[test]
fn words_outside_an_options_vocabulary_are_refused_with_one_line() {
    Fixture::new().refuses(BAD_WORDS);
}

/// Devices vramcal does not know, or spells another way.
#[rustfmt::skip]
const BAD_DEVICES: &[Case] = &[
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1", "--seq",
            "4", "--device", "tpu"],
        error: "expected `cpu`",
        untouched: Some("keep.csv"),
    },
    // A rejected device creates no output folder (checked after the table).
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--device", "gpu",
            "--out", "{dir}/new/sub/x.csv"],
        error: "expected `cpu`",
        untouched: None,
    },
    // One spelling per GPU index.
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--device", "cuda:00"],
        error: "expected `cpu`",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--device", "cuda:+1"],
        error: "expected `cpu`",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--device",
            "cuda:99999"],
        error: "expected `cpu`",
        untouched: None,
    },
];

/// A CUDA device asked of a build without the `cuda` feature.
#[rustfmt::skip]
const CUDA_WITHOUT_THE_FEATURE: &[Case] = &[
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1", "--seq",
            "4", "--device", "cuda:0"],
        error: "without the `cuda` feature",
        untouched: Some("keep.csv"),
    },
];

#[test]
fn unknown_devices_are_refused_with_one_line_and_create_no_output_folder() {
    let fx = Fixture::new();
    fx.refuses(BAD_DEVICES);
    assert!(!fx.path("new").exists());
    if !cfg!(feature = "cuda") {
        fx.refuses(CUDA_WITHOUT_THE_FEATURE);
    }
}

/// Options that contradict each other, or need one that is not given.
#[rustfmt::skip]
const CONTRADICTIONS: &[Case] = &[
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--method", "qlora",
            "--dtype", "f64"],
        error: "f32, bf16, f16",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--method", "full",
            "--quant", "nf4"],
        error: "qlora",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--method", "full",
            "--lora", "r=4"],
        error: "needs --method lora",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--method", "qlora",
            "--quant", "none"],
        error: "conflicts with --method qlora",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--double-quant"],
        error: "goes with a 4-bit base",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--save-dir",
            "/tmp/vramcal-never"],
        error: "needs --save",
        untouched: None,
    },
    Case {
        args: &["sweep", "--model", "tiny", "--method", "full", "--lora", "r=4", "--batch", "1",
            "--seq", "8", "--out", "/tmp/vramcal-never.csv"],
        error: "needs a lora or qlora method",
        untouched: None,
    },
    Case {
        args: &["max", "--model", "tiny", "--axis", "seq", "--seq", "8", "--budget", "4MiB"],
        error: "is what --axis seq searches",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--budget", "1GiB", "--gpu",
            "a100-80gb"],
        error: "either --gpu or --budget",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--weights", "README.md"],
        error: "reads no weights",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--profile", "torch-eager",
            "--attention", "sdpa"],
        error: "the torch-eager profile predicts eager attention",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero3"],
        error: "give --gpus 2 or more",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "ddp", "--gpus", "2",
            "--device-map", "--max-memory", "0=1GiB"],
        error: "invalid --device-map = with --shard ddp: places whole layers",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "ddp"],
        error: "--shard ddp replicates the model on data-parallel GPUs",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "2",
            "--profile", "candle", "--reduce-bucket-size", "1000"],
        error: "which vramcal's own step (--profile candle) keeps at DeepSpeed's default",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--offload", "optimizer"],
        error: "invalid --offload = optimizer: needs --shard",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "2",
            "--offload", "optimizer+params"],
        error: "parameters are offloaded with ZeRO-3 or FSDP only",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "fsdp", "--gpus", "2",
            "--offload", "optimizer"],
        error: "FSDP's CPUOffload moves parameters, gradients and the optimizer step together",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "fsdp", "--gpus", "2",
            "--reduce-bucket-size", "1000"],
        error: "is DeepSpeed's bucket: fsdp has none",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "ddp", "--gpus", "2",
            "--offload", "optimizer"],
        error: "DDP keeps every rank's state on its GPU",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "2",
            "--reduce-bucket-size", "0"],
        error: "must be between 1 and 1099511627776 gradient elements",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "2",
            "--reduce-bucket-size", "18446744073709551615"],
        error: "must be between 1 and 1099511627776 gradient elements",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus",
            "18446744073709551615", "--offload", "optimizer"],
        error: "at most 1048576 data-parallel GPUs",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "2",
            "--offload", "optimizer", "--profile", "candle"],
        error: "which vramcal's own step (--profile candle) does not run",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero3", "--gpus", "2",
            "--checkpointing", "layers", "--reduce-bucket-size", "1000", "--profile", "candle"],
        error: "keeps at DeepSpeed's default (5e8 elements",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--gpus", "8"],
        error: "invalid --gpus = 8: needs --shard",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "2",
            "--gpus-per-node", "2"],
        error: "give it with --offload",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "8",
            "--offload", "optimizer", "--gpus-per-node", "9"],
        error: "must be between 1 and the data-parallel GPUs (--gpus or --world-size, 8)",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "8",
            "--offload", "optimizer", "--optimizer", "adamw_bnb_8bit"],
        error: "the host step runs DeepSpeedCPUAdam",
        untouched: None,
    },
    Case {
        args: &["max", "--model", "tiny", "--axis", "batch", "--batch", "4", "--seq", "8",
            "--budget", "4MiB"],
        error: "is what --axis batch searches",
        untouched: None,
    },
    Case {
        args: &["check", "--measured", "results/cpu/smollm2-135m.csv", "--max-error", "150%"],
        error: "must be a fraction between 0 and 1",
        untouched: None,
    },
    Case {
        args: &["check", "--measured", "results/cpu/smollm2-135m.csv", "--margin", "-1"],
        error: "must be a fraction between 0 and 1",
        untouched: None,
    },
    Case {
        args: &["check", "--measured", "results/cpu/smollm2-135m.csv", "--max-error", "3 pct"],
        error: "expected a fraction such as 0.03 or a percentage such as 3%",
        untouched: None,
    },
    Case {
        args: &["check", "--measured", "results/cpu/smollm2-135m.csv", "--out-csv",
            "{dir}/same.txt", "--out-md", "{dir}/same.txt"],
        error: "is also --out-csv",
        untouched: None,
    },
];

#[test]
fn contradicting_options_are_refused_with_one_line() {
    Fixture::new().refuses(CONTRADICTIONS);
}

/// Files vramcal cannot use: weights missing, cut short or holding a tensor the config does not
/// describe; a results file with another header, under `/proc` or written before the attention
/// column existed (its rows are not used silently); a file where a folder is expected.
#[rustfmt::skip]
const BAD_FILES: &[Case] = &[
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1", "--seq",
            "4", "--weights", "/no/such.gguf"],
        error: "no such file",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1", "--seq",
            "4", "--weights", "{dir}/w.safetensors"],
        error: "w.safetensors",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--weights",
            "{dir}/extra.safetensors", "--out", "{dir}/keep.csv"],
        error: "model.layers.2.input_layernorm.weight",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--out",
            "{dir}/other.csv"],
        error: "another header",
        untouched: Some("other.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--out",
            "/proc/vramcal/x.csv"],
        error: "/proc/vramcal",
        untouched: None,
    },
    Case {
        args: &["check", "--measured", "{dir}/old.csv"],
        error: "written before vramcal recorded the attention mode",
        untouched: Some("old.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--save", "adapter",
            "--save-dir", "{dir}/a-file"],
        error: "is not a folder",
        untouched: None,
    },
    // A row outside the vocabulary is named by file and row.
    Case {
        args: &["check", "--measured", "{dir}/flash.csv"],
        error: "flash.csv: row 2: invalid --attention = flash",
        untouched: Some("flash.csv"),
    },
    Case {
        args: &["calibrate", "--measured", "{dir}/flash.csv", "--out", "{dir}/fit.csv"],
        error: "flash.csv: row 2:",
        untouched: Some("flash.csv"),
    },
    Case {
        args: &["report", "--measured", "{dir}/flash.csv", "--out", "{dir}/never-made"],
        error: "flash.csv: row 2:",
        untouched: Some("flash.csv"),
    },
    Case {
        args: &["merge", "{dir}/bad-rank.csv", "--out", "{dir}/never-made"],
        error: "bad-rank.csv row 7",
        untouched: Some("bad-rank.csv"),
    },
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1", "--seq", "8", "--resume", "--out",
            "{dir}/bad-rank.csv"],
        error: "bad-rank.csv row 7",
        untouched: Some("bad-rank.csv"),
    },
    Case {
        args: &["check", "--measured", "{dir}/gpu-device.csv"],
        error: "gpu-device.csv: row 2: device \"gpu\"",
        untouched: Some("gpu-device.csv"),
    },
    // Simulated data-parallel ranks: what vramcal's step cannot simulate, and bad worlds,
    // before anything runs or is written.
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "zero3",
            "--world-size", "2", "--out", "{dir}/keep.csv"],
        error: "--checkpointing = none: a simulated ZeRO-3 rank needs --checkpointing layers",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "zero3",
            "--world-size", "2", "--checkpointing", "layers", "--optimizer", "adafactor"],
        error: "a zero3 rank steps its flat partition of each tensor, which needs an element-wise optimizer",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "zero3",
            "--world-size", "2", "--checkpointing", "layers", "--method", "qlora"],
        error: "a simulated ZeRO-3 rank shards dense tensors",
        untouched: None,
    },

    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "fsdp",
            "--world-size", "4", "--out", "{dir}/keep.csv"],
        error: "--checkpointing = none: a simulated FSDP rank needs --checkpointing layers",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "fsdp",
            "--world-size", "4", "--checkpointing", "every:2"],
        error: "--checkpointing = every:2",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "fsdp",
            "--world-size", "2", "--checkpointing", "layers", "--method", "qlora"],
        error: "NF4 weights are stored packed",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "fsdp",
            "--world-size", "2", "--checkpointing", "layers", "--save", "adapter"],
        error: "--save = adapter",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "zero2",
            "--world-size", "0", "--out", "{dir}/keep.csv"],
        error: "--world-size = 0: a data-parallel rank needs a world of 2 ranks or more",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "ddp",
            "--world-size", "1"],
        error: "--world-size = 1",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "zero1",
            "--world-size", "4", "--rank", "4", "--out", "{dir}/keep.csv"],
        error: "--rank = 4: ranks are numbered from 0 to the world size less one (3)",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "zero1",
            "--world-size", "2", "--optimizer", "adafactor"],
        error: "needs an element-wise optimizer",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "zero5",
            "--world-size", "2"],
        error: "expected ddp, zero1, zero2, zero3 or fsdp",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--world-size", "2"],
        error: "--shard",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "ddp"],
        error: "--world-size",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "zero2",
            "--world-size", "99999999999", "--out", "{dir}/keep.csv"],
        error: "--world-size = 99999999999: at most 1048576 ranks",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", "fsdp",
            "--world-size", "2", "--checkpointing", "layers", "--lora",
            "targets=q_proj,modules_to_save=lm_head"],
        error: "does not shard PEFT's full copies of saved modules",
        untouched: None,
    },
    // `estimate --profile candle` is vramcal's own step: what `measure --shard` refuses, so
    // does it.
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--profile", "candle", "--shard",
            "fsdp", "--gpus", "4"],
        error: "--checkpointing = none: a simulated FSDP rank needs --checkpointing layers",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--profile", "candle", "--shard",
            "zero3", "--gpus", "4"],
        error: "--checkpointing = none: a simulated ZeRO-3 rank needs --checkpointing layers",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--shard", "zero2", "--gpus", "4",
            "--rank", "4"],
        error: "--rank = 4: ranks are numbered from 0 to the world size less one (3)",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--rank", "1"],
        error: "--shard",
        untouched: None,
    },
    // What only the torch profiles describe is refused by vramcal's own step.
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--optimizer",
            "paged_adamw_8bit"],
        error: "paged optimizers keep their states in CUDA unified memory",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "qwen2.5-0.5b", "--batch", "1", "--seq", "8", "--method", "lora", "--lora", "targets=q_proj,embed_tokens", "--merge-save"],
        error: "head is tied to embed_tokens cannot be merged",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "mixtral-8x7b-v0.1", "--seq", "512", "--method", "lora",
            "--lora", "targets=q,gate_proj"],
        error: "a Mixtral model has no gate_proj/up_proj/down_proj modules",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "qwen2.5-0.5b", "--batch", "1", "--seq", "8", "--method", "lora", "--lora", "targets=q_proj,lm_head", "--save", "merged"],
        error: "an lm_head or embed_tokens adapter on a model whose head is tied to embed_tokens cannot be merged",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--precision", "fp16+amp"],
        error: "PyTorch's GradScaler refuses fp16 gradients",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--precision", "fp16"],
        error: "measure --dtype f16 (f32 states) or fp16-master instead",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--batch", "1", "--seq", "8", "--profile", "candle",
            "--optimizer", "paged_adamw_32bit"],
        error: "paged optimizers keep their states in CUDA unified memory",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--loss",
            "fused-linear-ce"],
        error: "vramcal's own step computes the loss with its own chunked head",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--loss",
            "transformers"],
        error: "--loss is for estimate's torch profiles",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--optimizer",
            "adafactor", "--optimizer-state-dtype", "bf16"],
        error: "adafactor keeps states of its own types",
        untouched: None,
    },
    Case {
        args: &["estimate", "--model", "tiny", "--batch", "1", "--seq", "8", "--loss", "liger"],
        error: "expected transformers or fused-linear-ce",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--momentum", "0.9"],
        error: "invalid --momentum = 0.9: is SGD's; --optimizer is adamw_torch",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--optimizer", "sgd",
            "--momentum", "1"],
        error: "invalid --momentum = 1: must be in [0, 1)",
        untouched: None,
    },
    Case {
        args: &["measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--optimizer",
            "adamw_8bit"],
        error: "invalid --optimizer = adamw_8bit: expected one of adamw_torch, adamw_torch_fused, adamw_bnb_8bit",
        untouched: None,
    },
    Case {
        args: &["check", "--measured", "{dir}/fp8.csv", "--profile", "torch-sdpa"],
        error: "column precision = \"fp8\": expected one of fp32, bf16, fp16",
        untouched: Some("fp8.csv"),
    },
    // check writes its tables, never over a calibration table.
    Case {
        args: &["check", "--measured", "results/cpu/smollm2-135m.csv", "--out-csv",
            "{dir}/cal.csv"],
        error: "is a calibration table",
        untouched: Some("cal.csv"),
    },
    Case {
        args: &["estimate", "--model", "tiny", "--seq", "8", "--profile", "candle",
            "--calibration", "{dir}/tpu-cal.csv"],
        error: "device \"tpu\"",
        untouched: Some("tpu-cal.csv"),
    },
    Case {
        args: &["calibrate", "--measured", "results/cpu/smollm2-135m.csv",
            "results/h200/vramcal-smollm2-135m.csv", "--out", "{dir}/mixed.csv"],
        error: "more than one device kind",
        untouched: None,
    },
];

#[test]
fn unusable_files_are_refused_with_one_line_and_left_untouched() {
    Fixture::new().refuses(BAD_FILES);
}

/// A GGUF cut to a third of its length, and a whole one for another model.
#[rustfmt::skip]
const BAD_GGUF: &[Case] = &[
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "smollm2-135m", "--batch", "1",
            "--seq", "4", "--weights", "{dir}/cut.gguf"],
        error: "cut.gguf",
        untouched: Some("keep.csv"),
    },
    Case {
        args: &["measure", "--out", "{dir}/keep.csv", "--model", "tiny", "--batch", "1", "--seq",
            "4", "--weights", "{gguf}"],
        error: "do not match",
        untouched: Some("keep.csv"),
    },
];

#[test]
fn damaged_or_mismatched_gguf_is_refused_with_one_line_and_keeps_the_csv() {
    let Some(g) = common::smollm2_gguf() else {
        return;
    };
    let fx = Fixture::new();
    let bytes = std::fs::read(&g).unwrap();
    std::fs::write(fx.path("cut.gguf"), &bytes[..bytes.len() / 3]).unwrap();
    fx.refuses(BAD_GGUF);
}

/// Sweep grids with a bad value, a repeated one, an empty list, a point past the context or a
/// point that cannot fit.
#[rustfmt::skip]
const BAD_SWEEP_GRIDS: &[Case] = &[
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1,0", "--seq", "8", "--out",
            "{dir}/never.csv"],
        error: "at least 1",
        untouched: None,
    },
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1,x", "--seq", "8", "--out",
            "{dir}/never.csv"],
        error: "positive integer",
        untouched: None,
    },
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1,1", "--seq", "8", "--out",
            "{dir}/never.csv"],
        error: "listed twice",
        untouched: None,
    },
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1", "--seq", "", "--out",
            "{dir}/never.csv"],
        error: "empty",
        untouched: None,
    },
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1", "--seq", "8,65", "--out",
            "{dir}/never.csv"],
        error: "max_position_embeddings",
        untouched: None,
    },
    // Two points that are one configuration.
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1", "--seq", "8", "--checkpointing",
            "layers,every:1", "--out", "{dir}/never.csv"],
        error: "are the same configuration",
        untouched: None,
    },
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1", "--seq", "8", "--method",
            "lora,qlora", "--quant", "nf4", "--out", "{dir}/never.csv"],
        error: "are the same configuration",
        untouched: None,
    },
    // A sweep point that cannot fit is rejected before any point runs.
    Case {
        args: &["sweep", "--model", "tiny", "--batch", "1,1000000000", "--seq", "64", "--out",
            "{dir}/keep.csv"],
        error: "more than this machine",
        untouched: Some("keep.csv"),
    },
];

#[test]
fn sweep_rejects_malformed_grids_before_running() {
    let fx = Fixture::new();
    let csv = fx.path("never.csv");
    for case in BAD_SWEEP_GRIDS {
        fx.refuses(std::slice::from_ref(case));
        assert!(!csv.exists() || std::fs::read_to_string(&csv).unwrap().is_empty());
    }
}

/// Values the argument parser refuses: one line on stderr (no blank line, usage or tip), as
/// every other error, and a non-zero exit.
const PARSER_REFUSALS: &[&[&str]] = &[
    &["--batch", "-1"],
    &["--batch", "1.5"],
    &["--batch", "1,2"],
    &["--nosuch"],
];

#[test]
fn parser_refusals_are_one_error_line() {
    for bad in PARSER_REFUSALS {
        let out = vramcal()
            .args(["measure", "--model", "tiny", "--seq", "4"])
            .args(*bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} succeeded");
        let line = common::stderr_line(&out);
        assert!(line.starts_with("error: "), "{bad:?}: {line}");
    }
    // A negative number is read as a value and refused as one, not taken for an option.
    let out = vramcal()
        .args(["measure", "--model", "tiny", "--batch", "-1", "--seq", "4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value '-1'"));
}

#[test]
fn a_missing_config_path_is_reported_once_as_a_missing_file() {
    let out = vramcal()
        .args([
            "measure",
            "--model",
            "./nope/config.json",
            "--batch",
            "1",
            "--seq",
            "4",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("./nope/config.json") && err.contains("not found"),
        "{err}"
    );
    assert_eq!(err.matches("not found").count(), 1, "{err}");
}

#[test]
fn a_measurement_respects_a_sweeps_lock() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("locked.csv");
    let lock = std::fs::File::create(format!("{}.lock", out.display())).unwrap();
    lock.try_lock().unwrap();
    fails_with(
        &[
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "8",
            "--out",
            out.to_str().unwrap(),
        ],
        "another vramcal sweep",
        None,
    );
}

/// The seed's scenario under the HF Trainer's default `bf16=True` (amp-bf16): the estimate
/// itemizes autocast's 16-bit weight copies kept for backward, every linear weight of every
/// layer and the head in bf16 (Mistral-7B: 32 × (2·4096² + 2·4096·1024 + 3·4096·14336) + 32000 ×
/// 4096 values × 2 bytes), and has none without autocast.
#[test]
fn seed_scenario_itemizes_autocast_copies() {
    let json = |precision: &str| -> serde_json::Value {
        let out = vramcal()
            .args([
                "estimate",
                "--model",
                "mistral-7b-v0.1",
                "--precision",
                precision,
                "--seq",
                "1024",
                "--gpu",
                "a100-80gb",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (h, kv, i, v, l) = (4096u64, 1024u64, 14336u64, 32000u64, 32u64);
    let per_layer = 2 * h * h + 2 * h * kv + 3 * h * i;
    let want = 2 * (l * per_layer + v * h);
    let amp = json("amp-bf16");
    assert_eq!(amp["autocast"]["weight_copies_bytes"].as_u64(), Some(want));
    assert!(amp["autocast"]["input_copies_bytes"].as_u64().unwrap() > 0);
    assert!(json("bf16")["autocast"].is_null());
}

/// With `--seq-lengths` padded to the longest, the verdict offers padding-free micro-batches:
/// one long sequence among short ones pads every micro-batch it joins (4 × 812 tokens), while
/// padding-free holds only the four longest's real tokens (812 + 70 + 60 + 50).
#[test]
fn padding_free_is_offered_for_padded_data() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("lengths.txt");
    std::fs::write(&f, "812\n50\n60\n70\n40\n30\n").unwrap();
    let out = vramcal()
        .args([
            "estimate",
            "--model",
            "qwen2.5-0.5b",
            "--batch",
            "4",
            "--budget",
            "1GiB",
        ])
        .args(["--json", "--seq-lengths"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peak = v["estimate"]["peak_bytes"].as_u64().unwrap();
    let free = v["alternatives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["change"].as_str().unwrap().starts_with("padding-free"))
        .expect("a padding-free fix");
    assert!(
        free["change"].as_str().unwrap().contains("1 × 992 tokens"),
        "{free}"
    );
    assert!(free["peak_bytes"].as_u64().unwrap() < peak);
}

/// estimate's suggested LoRA/QLoRA alternatives to a full fine-tuning `+amp` spec keep PEFT's
/// fp32 adapters and states, as `--method lora` with that recipe does: the suggestion's peak
/// equals the direct estimate's.
#[test]
fn advice_alternatives_under_amp_match_the_direct_estimate() {
    let run = |extra: &[&str]| -> String {
        let out = vramcal()
            .args([
                "estimate",
                "--model",
                "mistral-7b-v0.1",
                "--precision",
                "bf16+amp",
                "--seq",
                "1024",
                "--gpu",
                "4090",
            ])
            .args(extra)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let advice = run(&[]);
    let suggested = advice
        .lines()
        .find(|l| {
            l.contains(
                "(--method lora --lora r=16,alpha=32,targets=all-linear) + checkpointing (--checkpointing layers):",
            )
        })
        .unwrap_or_else(|| panic!("{advice}"))
        .rsplit(": ")
        .next()
        .unwrap()
        .trim()
        .to_string();
    let direct = run(&[
        "--method",
        "lora",
        "--lora",
        "r=16,alpha=32,targets=all-linear",
        "--checkpointing",
        "layers",
    ]);
    let peak = direct
        .lines()
        .find(|l| l.starts_with("peak (predicted)"))
        .unwrap_or_else(|| panic!("{direct}"))
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_string();
    assert_eq!(suggested, format!("{peak} GiB"), "{advice}\n{direct}");
}

/// `vramcal estimate <args> --json`, which must succeed, as JSON.
fn estimate_json(args: &[&str]) -> serde_json::Value {
    let out = vramcal()
        .arg("estimate")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        common::stderr_line(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `estimate --measured`: the rows of the estimated configuration are found in the files
/// (PyTorch's reference rows for the torch profiles, vramcal's rows for `candle`), with the
/// peak the files hold, whatever spelling the setup was given in; other configurations and
/// other stacks' files give none; a row is compared for its counter where it ran on the
/// estimate's kind of device, shown but not compared elsewhere; files that are not results are
/// refused.
#[test]
fn estimate_shows_measured_rows_of_the_same_configuration() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = |f: &str| root.join(f).to_string_lossy().into_owned();
    let torch = path("results/h200/torch-mistral-7b-v0.1.csv");
    let cpu = path("results/cpu/smollm2-135m.csv");
    let refs = path("results/torch-cpu/smollm2-135m.csv");
    let measured = |v: &serde_json::Value| v["measured"].as_array().unwrap().clone();
    // The reference row of Mistral-7B LoRA, 4 × 2048, no checkpointing, as the file has it.
    let mut r = csv::Reader::from_path(&torch).unwrap();
    let h = r.headers().unwrap().clone();
    let col = |rec: &csv::StringRecord, n: &str| {
        rec.get(h.iter().position(|x| x == n).unwrap())
            .unwrap()
            .to_string()
    };
    let row = r
        .records()
        .map(|x| x.unwrap())
        .find(|x| {
            col(x, "method") == "lora"
                && col(x, "batch") == "4"
                && col(x, "seq") == "2048"
                && col(x, "checkpointing") == "off"
        })
        .unwrap();
    let lora = |alpha: &str, seq: &'static str| {
        let mut a = vec!["--model", "mistral-7b-v0.1", "--batch", "4", "--seq", seq];
        a.extend(["--lora", alpha, "--measured", &torch, &cpu, &torch]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let qkvo = "r=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj";
    for spelling in [
        &["--precision", "bf16"][..],
        &["--dtype", "bf16", "--optimizer-state-dtype", "bf16"][..],
    ] {
        let args = lora(qkvo, "2048");
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(spelling);
        // The file named twice is read once.
        let m = measured(&estimate_json(&args));
        assert_eq!(m.len(), 1, "{spelling:?}: {m:?}");
        assert_eq!(m[0]["id"], col(&row, "id").as_str());
        assert_eq!(m[0]["peak_bytes"].to_string(), col(&row, "peak_bytes"));
        assert_eq!(m[0]["same_device_kind"], true);
    }
    // LoRA's alpha allocates nothing: another alpha finds the same row. Another sequence
    // length, or the candle profile, finds none in those files.
    let other_alpha = lora("r=16,alpha=8,targets=q_proj,k_proj,v_proj,o_proj", "2048");
    let other_seq = lora(qkvo, "1024");
    for (args, extra, n) in [
        (&other_alpha, &["--precision", "bf16"][..], 1),
        (&other_seq, &["--precision", "bf16"][..], 0),
        (
            &lora(qkvo, "2048"),
            &["--precision", "bf16", "--profile", "candle"][..],
            0,
        ),
    ] {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend(extra);
        let v = estimate_json(&a);
        assert_eq!(measured(&v).len(), n, "{a:?}");
        // Two files searched (one named twice); the other stack's passed over.
        assert_eq!(v["measured_search"]["files"], 2);
        assert_eq!(v["measured_search"]["other_stack_files"], 1);
    }
    // vramcal's own row for the candle profile: the training peak `check` holds it against.
    let small = [
        "--model",
        "smollm2-135m",
        "--batch",
        "2",
        "--seq",
        "512",
        "--profile",
        "candle",
    ];
    let m = measured(&estimate_json(
        &[&small[..], &["--measured", &cpu]].concat(),
    ));
    assert_eq!(m.len(), 1, "{m:?}");
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("check.csv");
    vramcal()
        .args([
            "check",
            "--profile",
            "candle",
            "--measured",
            &cpu,
            "--out-csv",
        ])
        .arg(&table)
        .assert()
        .success();
    let checked = rows(&table);
    let line = checked
        .iter()
        .find(|r| r.get(0) == m[0]["id"].as_str())
        .expect("the row is one check compares");
    assert_eq!(line.get(3).unwrap(), m[0]["peak_bytes"].to_string());
    // A CPU row beside an estimate for a GPU (uncalibrated candle coefficients) is shown but
    // not compared; with the CPU table the estimate is for the CPU: compared.
    assert_eq!(m[0]["same_device_kind"], false);
    let text = |extra: &[&str]| {
        let out = vramcal()
            .arg("estimate")
            .args(small)
            .args(extra)
            .args(["--measured", &cpu])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t = text(&[]);
    assert!(
        t.contains("measured (") && t.contains("not compared"),
        "{t}"
    );
    let t = text(&["--calibration", &path("results/calibration/cpu-candle.csv")]);
    assert!(t.contains("% over it") || t.contains("% under it"), "{t}");
    // PyTorch on the CPU: torch-eager finds the eager row, torch-sdpa the SDPA one, not
    // compared with a GPU estimate.
    let cpu_run = [
        "--model",
        "smollm2-135m",
        "--batch",
        "1",
        "--seq",
        "64",
        "--precision",
        "fp32",
    ];
    for (profile, attention) in [("torch-eager", "eager"), ("torch-sdpa", "sdpa")] {
        let extra = ["--profile", profile, "--measured", &refs];
        let m = measured(&estimate_json(&[&cpu_run[..], &extra[..]].concat()));
        assert_eq!(m.len(), 1, "{profile}: {m:?}");
        let id = m[0]["id"].as_str().unwrap();
        assert!(
            id.contains(&format!("-{attention}-ckpt-off-b1-s64")),
            "{id}"
        );
        assert_eq!(m[0]["same_device_kind"], false);
    }
    // With the CPU table the torch estimate is for the CPU: compared, for the row's counter.
    let cal = path("results/calibration/cpu-torch-sdpa.csv");
    let extra = ["--calibration", &cal, "--measured", &refs];
    let v = estimate_json(&[&cpu_run[..], &extra[..]].concat());
    let m = &v["measured"][0];
    assert_eq!(m["same_device_kind"], true, "{m}");
    let f = |k: &str| m[k].as_f64().unwrap();
    let want = (f("predicted_bytes") - f("peak_bytes")) / f("peak_bytes");
    assert!((f("relative_error") - want).abs() < 1e-12, "{m}");
    assert_eq!(
        m["predicted_bytes"], v["estimate"]["peak_bytes"],
        "allocated counter"
    );
    // Adafactor keeps its own state types: its bf16 row is found from --precision bf16.
    let ada = [
        "--model",
        "smollm2-135m",
        "--seq",
        "32",
        "--precision",
        "bf16",
    ];
    let v = estimate_json(&[&ada[..], &["--optimizer", "adafactor", "--measured", &refs]].concat());
    let ids: Vec<String> = measured(&v).iter().map(|m| m["id"].to_string()).collect();
    assert!(
        ids.iter().any(|i| i.contains("full-bf16-adafactor")),
        "{ids:?}"
    );
    // A file that is not there, or is not results (empty, another header): one error line.
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    let other = dir.path().join("other.csv");
    std::fs::write(&other, "a,b\n").unwrap();
    for f in [
        "no-such.csv",
        "README.md",
        "results/calibration/cpu-candle.csv",
        empty.to_str().unwrap(),
        other.to_str().unwrap(),
    ] {
        let p = path(f);
        let args = [
            "estimate",
            "--model",
            "tiny",
            "--seq",
            "16",
            "--measured",
            &p,
        ];
        fails_with(&args, f.rsplit('/').next().unwrap(), None);
    }
}

/// The `candle` profile's optimizer states are what vramcal's step allocates, to the byte, for
/// a mixture of experts, whose step holds one matrix (and one adapter share) per expert: 8-bit
/// AdamW's 4096-element threshold and Adafactor's factored moments apply per tensor.
#[test]
fn mixtral_optimizer_states_are_counted_per_expert() {
    for (method, lora) in [
        ("full", None),
        ("lora", Some("r=8,alpha=16,targets=all-linear")),
    ] {
        for optimizer in ["adafactor", "adamw_bnb_8bit"] {
            let mut args = vec![
                "--model",
                "mixtral-mini",
                "--method",
                method,
                "--optimizer",
                optimizer,
                "--batch",
                "1",
                "--seq",
                "8",
                "--json",
            ];
            if let Some(l) = lora {
                args.extend(["--lora", l]);
            }
            let json = |cmd: &str, extra: &[&str]| -> serde_json::Value {
                let all: Vec<&str> = [cmd].iter().chain(&args).chain(extra).copied().collect();
                serde_json::from_str(&succeeds(&all)).unwrap()
            };
            let measured = json("measure", &[])["optimizer_state_bytes"]
                .as_u64()
                .unwrap();
            let est = json("estimate", &["--profile", "candle"]);
            let counted = est["estimate"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"].as_str().unwrap().starts_with("optimizer states"))
                .unwrap()["bytes"]
                .as_u64()
                .unwrap();
            assert_eq!(counted, measured, "{method} {optimizer}");
        }
    }
}
