//! The estimator's accuracy gate on the committed CPU measurements, the committed calibration
//! table being what `vramcal calibrate` makes of them, the check against published PyTorch
//! measurements, and bad input for estimate, calibrate and check.

mod common;

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vramcal"))
}

/// The CPU calibration set (results/cpu/README.md): f32, bf16, bf16-master and fp16-master;
/// AdamW, 8-bit AdamW, Adafactor and SGD; full, LoRA (q,v and all linear layers) and QLoRA;
/// checkpointing none, layers, every:3 and every:10; attention sdpa and eager; smollm2-135m
/// and tinyllama-1.1b.
const MEASURED: [&str; 8] = [
    "results/cpu/smollm2-135m.csv",
    "results/cpu/smollm2-135m-peft.csv",
    "results/cpu/smollm2-135m-ckpt.csv",
    "results/cpu/smollm2-135m-eager.csv",
    "results/cpu/smollm2-135m-all-linear.csv",
    "results/cpu/smollm2-135m-bf16.csv",
    "results/cpu/tinyllama-1.1b.csv",
    "results/cpu/smollm2-135m-optimizers.csv",
];
const CALIBRATION: &str = "results/calibration/cpu-candle.csv";

/// The accuracy targets of the estimator on the committed measurements: median |error| ≤ 1 %,
/// max ≤ 3 %, and no under-estimate once a 3 % safety margin is added.
#[test]
fn candle_estimates_stay_accurate_on_committed_measurements() {
    accuracy_gate(
        &MEASURED,
        CALIBRATION,
        "0.03",
        "under-estimates 0 of 183 with a 3.0 % margin",
    );
}

/// Thresholds may be written as percentages: `3%` is `0.03`.
#[test]
fn thresholds_read_as_percentages() {
    accuracy_gate(
        &MEASURED,
        CALIBRATION,
        "3%",
        "under-estimates 0 of 183 with a 3.0 % margin; thresholds: max |error| <= 3.00 %",
    );
}

/// `vramcal check` of `measured` with `calibration` passes median |error| ≤ 1 %, max ≤
/// `max_and_margin`, the same safety margin, and prints `expect`.
fn accuracy_gate(measured: &[&str], calibration: &str, max_and_margin: &str, expect: &str) {
    let out = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("check")
        .arg("--measured")
        .args(measured)
        .args(["--calibration", calibration])
        .args(["--max-median-error", "0.01", "--max-error", max_and_margin])
        .args(["--margin", max_and_margin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(expect), "{text}");
}

/// The committed table is reproduced by `vramcal calibrate` on the committed measurements.
#[test]
fn committed_calibration_is_what_calibrate_makes() {
    let cpu = calibrate_makes(&MEASURED, CALIBRATION);
    // The held-out rows (the longest sequence) meet the targets: median ≤ 1 %, max ≤ 3 %.
    let (median, max) = held_out(&cpu);
    assert!(median <= 1.0 && max <= 3.0, "{cpu}");
    calibrate_makes(&H200_MEASURED, H200_CALIBRATION);
}

/// (median, max) |error| in % of the held-out rows that `calibrate` printed.
fn held_out(text: &str) -> (f64, f64) {
    let held = text
        .lines()
        .find(|l| l.starts_with("held-out rows"))
        .unwrap_or_else(|| panic!("{text}"));
    (
        number_after(held, "median |error|"),
        number_after(held, "max"),
    )
}

/// `vramcal check --measured <f> --profile torch-sdpa`, run.
fn check_torch_sdpa(f: &std::path::Path) -> std::process::Output {
    bin()
        .args(["check", "--measured"])
        .arg(f)
        .args(["--profile", "torch-sdpa"])
        .output()
        .unwrap()
}

/// The number that follows `key` in `line` (a percentage or a count in vramcal's summaries).
fn number_after(line: &str, key: &str) -> f64 {
    line.split(key)
        .nth(1)
        .unwrap()
        .trim_start()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The torch profile's tables are what `calibrate` makes of PyTorch's rows, per device kind,
/// and their held-out rows (the longest sequence, never fitted) meet the targets: median ≤ 1 %,
/// max ≤ 3 %, on the CPU grid and on the H200 rows.
#[test]
fn committed_torch_tables_are_what_calibrate_makes() {
    let files = common::torch_cpu_files();
    let cpu: Vec<&str> = files.iter().map(String::as_str).collect();
    let profile = ["--profile", "torch-sdpa"];
    let text = calibrate_makes_with(&cpu, "results/calibration/cpu-torch-sdpa.csv", &profile);
    let (median, max) = held_out(&text);
    assert!(median <= 1.0 && max <= 3.0, "{text}");
    // PyTorch on the CPU has no caching allocator: no reserved model is fitted there.
    assert!(!text.contains("reserved"), "{text}");
    let h200 = [
        "results/h200/torch-mistral-7b-v0.1.csv",
        "results/h200/torch-smollm2-135m.csv",
    ];
    let text = calibrate_makes_with(&h200, "results/calibration/h200-torch-sdpa.csv", &profile);
    let (median, max) = held_out(&text);
    assert!(median <= 1.0 && max <= 3.0, "{text}");
    // The caching allocator's reserve, fitted on the rows' peak_reserved_bytes: the held-out
    // reserved peaks within 5 % median (the issue's target) and 10 % max.
    let held = text
        .lines()
        .find(|l| l.starts_with("reserved, held-out rows"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        number_after(held, "median |error|") <= 5.0 && number_after(held, "max") <= 10.0,
        "{held}"
    );
}

/// Outside the calibration set: bf16 QLoRA of Mistral-7B at 1 × 128 on the CPU (where the
/// estimate was 8.6 % low before the bf16 matmul term) is estimated within 3 %.
#[test]
fn mistral_qlora_bf16_on_the_cpu_is_estimated_within_3_percent() {
    let out = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "check",
            "--profile",
            "candle",
            "--measured",
            "results/cpu/mistral-7b-v0.1-qlora-bf16.csv",
            "--calibration",
            CALIBRATION,
            "--max-error",
            "0.03",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Outside the calibration set, a third architecture at its real size: Qwen2.5-0.5B (Qwen2's
/// q/k/v biases, tied head, 151,936-token vocabulary), LoRA f32 and full bf16, checkpointing
/// none and layers, measured by `vramcal sweep` (`results/cpu/qwen2.5-0.5b.csv`): the candle
/// profile, uncalibrated and with the CPU table, within 1 % of every row.
#[test]
fn qwen2_on_the_cpu_is_estimated_within_1_percent() {
    for table in [None, Some(CALIBRATION)] {
        let mut args = vec![
            "check",
            "--profile",
            "candle",
            "--measured",
            "results/cpu/qwen2.5-0.5b.csv",
            "--max-error",
            "1%",
        ];
        if let Some(t) = table {
            args.extend(["--calibration", t]);
        }
        let text = succeeds(&args);
        assert_eq!(rows_checked(&text), 8, "{text}");
    }
}

/// Outside the calibration set, estimated with the CPU table fitted before they existed:
/// vramcal's step under autocast (`amp-bf16`, `amp-fp16`, `bf16+amp`, `fp16+amp`; full, LoRA
/// and QLoRA on smollm2-135m, checkpointed too, `results/cpu/smollm2-135m-autocast.csv`), and
/// with LoRA on `lm_head` and `embed_tokens` (f32, bf16, amp-bf16; checkpointing none and
/// layers; dropout on the head; the head alone, `results/cpu/smollm2-135m-lm-head-embed.csv`,
/// on whose head-only rows the `lora_B` gradient sum of the head was found): median within 1 %,
/// every row within 2 %, none under with a 2 % margin.
#[test]
fn autocast_and_top_level_adapter_rows_are_estimated_without_refitting() {
    unfitted_files_hold(
        &[
            ("results/cpu/smollm2-135m-autocast.csv", 42),
            ("results/cpu/smollm2-135m-lm-head-embed.csv", 36),
        ],
        "2%",
    );
}

/// Each of `files` (rows the CPU table was never fitted on, with their count) within `max`,
/// median within 1 %, and no row under with a margin of `max`.
fn unfitted_files_hold(files: &[(&str, usize)], max: &str) {
    for &(file, rows) in files {
        let text = check_unfitted(file, max, "1%", max);
        assert_eq!(rows_checked(&text), rows, "{text}");
        assert!(
            text.contains(&format!("under-estimates 0 of {rows}")),
            "{text}"
        );
    }
}

/// PEFT's `modules_to_save` in vramcal's step (`results/cpu/*-modules-to-save.csv`, never
/// fitted): trainable copies of `lm_head` and/or `embed_tokens` beside q/v or attention
/// adapters, LoRA and QLoRA, f32 and bf16, checkpointing none and layers, on tied
/// (smollm2-135m) and untied (mistral-mini) heads: median within 1 %, every row within 1 %,
/// none under with a 1 % margin. Their counted terms: the tied model's copy, the saved head's
/// gradient and candle's `GradStore` at the head's backward, the bf16 head's weight-gradient
/// sum (an allocation probe in the fused head, `bf16_matmul_widening`), a saved embedding
/// alone summed at the end of backward.
#[test]
fn modules_to_save_rows_are_estimated_without_refitting() {
    unfitted_files_hold(
        &[
            ("results/cpu/smollm2-135m-modules-to-save.csv", 32),
            ("results/cpu/mistral-mini-modules-to-save.csv", 12),
        ],
        "1%",
    );
}

/// PyTorch's Adafactor and bitsandbytes' 8-bit AdamW on a mixture of experts' 3-D tensors, fp32
/// and bf16, on the CPU (`results/torch-cpu-optimizers/`, never fitted): first principles within
/// 0.1 % (Adafactor factors a 3-D stack over its last two dimensions; bitsandbytes' CPU kernel
/// steps a bf16 parameter through an fp32 copy).
#[test]
fn torch_profiles_hold_optimizers_on_expert_stacks() {
    let text = succeeds(&[
        "check",
        "--profile",
        "torch-sdpa",
        "--measured",
        "results/torch-cpu-optimizers/mixtral-mini-optimizers.csv",
        "--max-median-error",
        "0.1%",
        "--max-error",
        "0.1%",
    ]);
    assert_eq!(rows_checked(&text), 16, "{text}");
    assert!(text.contains("bf16 adamw_bnb_8bit"), "{text}");
}

/// torch's two AdamW implementations on the CPU (`results/torch-cpu-optimizers/`, 16 rows,
/// never fitted; `--torch-adamw` in `scripts/torch_reference.py` and `estimate`): foreach
/// (`foreach=True`: one buffer of every trainable tensor, CUDA's default, first measured here
/// on the CPU) and for-loop (`foreach=False`, the CPU's default), full fine-tuning and LoRA,
/// fp32 and bf16: within 0.1 % with the CPU table.
#[test]
fn torch_profiles_hold_both_adamw_implementations() {
    let text = succeeds(&[
        "check",
        "--profile",
        "torch-sdpa",
        "--measured",
        "results/torch-cpu-optimizers/smollm2-135m-torch-adamw.csv",
        "--calibration",
        "results/calibration/cpu-torch-sdpa.csv",
        "--max-median-error",
        "0.1%",
        "--max-error",
        "0.1%",
    ]);
    assert_eq!(rows_checked(&text), 16, "{text}");
    assert!(
        text.contains("adamw_torch foreach") && text.contains("adamw_torch for-loop"),
        "{text}"
    );
    // `estimate --measured` shows the rows of the implementation estimated (the default rows
    // of results/torch-cpu are for-loop ones: the CPU's default).
    for (imp, rows) in [
        (
            "foreach",
            vec!["torch-smollm2-135m-full-fp32-adamw_torch-sdpa-ckpt-off-b1-s128-foreach"],
        ),
        (
            "for-loop",
            vec![
                "torch-smollm2-135m-full-fp32-adamw_torch-sdpa-ckpt-off-b1-s128",
                "torch-smollm2-135m-full-fp32-adamw_torch-sdpa-ckpt-off-b1-s128-for-loop",
            ],
        ),
    ] {
        let out = succeeds(&[
            "estimate",
            "--model",
            "smollm2-135m",
            "--calibration",
            "results/calibration/cpu-torch-sdpa.csv",
            "--precision",
            "fp32",
            "--batch",
            "1",
            "--seq",
            "128",
            "--torch-adamw",
            imp,
            "--measured",
            "results/torch-cpu/smollm2-135m.csv",
            "results/torch-cpu-optimizers/smollm2-135m-torch-adamw.csv",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["torch_adamw"], imp);
        let ids: Vec<&str> = v["measured"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, rows, "{imp}");
        for r in v["measured"].as_array().unwrap() {
            assert!(r["relative_error"].as_f64().unwrap().abs() < 1e-3, "{r}");
        }
    }
}

/// pub-11 (DeepSpeed ZeRO-2 fp16 over 8 V100-32GB, out of memory in AdamW's step) with the
/// implementation its trace shows, `--torch-adamw for-loop`: the step holds two fp32 buffers
/// of the rank's partition (foreach: one), and with the H200 table the predicted reserved peak
/// is over the card's 31.75 GiB (the row's `gpu_memory_bytes`), where foreach fits.
#[test]
fn pub_11_runs_out_of_memory_with_the_for_loop_adamw_it_ran() {
    let estimate = |imp: &str| -> serde_json::Value {
        let out = succeeds(&[
            "estimate",
            "--model",
            "llama-2-7b",
            "--profile",
            "torch-sdpa",
            "--method",
            "full",
            "--precision",
            "fp16-master",
            "--optimizer",
            "adamw_torch",
            "--batch",
            "1",
            "--seq",
            "1024",
            "--checkpointing",
            "layers",
            "--gpus",
            "8",
            "--shard",
            "zero2",
            "--calibration",
            "results/calibration/h200-torch-sdpa.csv",
            "--budget",
            "34091302912B",
            "--torch-adamw",
            imp,
            "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let item = |v: &serde_json::Value, name: &str| -> u64 {
        v["estimate"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()["bytes"]
            .as_u64()
            .unwrap()
    };
    let (for_loop, foreach) = (estimate("for-loop"), estimate("foreach"));
    // DeepSpeed's flat fp32 gradient partition is the size of the rank's fp32 partition.
    let partition = item(&foreach, "gradients");
    assert_eq!(item(&foreach, "optimizer step transient"), partition);
    assert_eq!(item(&for_loop, "optimizer step transient"), 2 * partition);
    assert_eq!(for_loop["torch_adamw"], "for-loop");
    assert_eq!(for_loop["budget"]["fits"], false, "{for_loop}");
    assert_eq!(foreach["budget"]["fits"], true, "{foreach}");
}

/// PyTorch with PEFT's `modules_to_save` on the CPU (`results/torch-cpu-modules-to-save/`,
/// 28 rows, never fitted; kept out of `results/torch-cpu/`, whose longest sequence is the CPU
/// table's held-out set): the uncalibrated torch profile holds every row within 0.6 %, median
/// within 0.1 %.
#[test]
fn torch_profiles_hold_modules_to_save_rows() {
    let text = succeeds(&[
        "check",
        "--profile",
        "torch-sdpa",
        "--measured",
        "results/torch-cpu-modules-to-save/smollm2-135m-modules-to-save.csv",
        "results/torch-cpu-modules-to-save/mistral-mini-modules-to-save.csv",
        "--max-median-error",
        "0.1%",
        "--max-error",
        "0.6%",
    ]);
    assert_eq!(rows_checked(&text), 28, "{text}");
    assert!(text.contains("+full lm_head,embed_tokens"), "{text}");
}

/// vramcal's own step on Mixtral's mixture of experts (`results/cpu/mixtral-mini.csv`, never
/// fitted): median within 1.5 %, none under by more than 0.5 %, every row within 6 % (full
/// fine-tuning is over-estimated at small batches, where some experts receive no token;
/// `results/cpu/README.md`), and the LoRA/QLoRA rows within 2 %.
#[test]
fn mixture_of_experts_rows_are_estimated_without_refitting() {
    let file = "results/cpu/mixtral-mini.csv";
    let text = check_unfitted(file, "6%", "1.5%", "0.5%");
    assert_eq!(rows_checked(&text), 52, "{text}");
    assert!(text.contains("under-estimates 0 of 52"), "{text}");
    let adapters: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("mixtral-mini lora") || l.contains("mixtral-mini qlora"))
        .map(|l| {
            let cell = l.split('|').nth(6).unwrap().trim();
            cell.trim_end_matches('%').trim().parse::<f64>().unwrap()
        })
        .collect();
    assert_eq!(adapters.len(), 32, "{text}");
    assert!(adapters.iter().all(|e| e.abs() <= 2.0), "{adapters:?}");
}

/// PEFT's `all-linear` on Mixtral in vramcal's own step (`results/cpu/mixtral-mini-all-linear.csv`,
/// never fitted: the router's and the experts' adapter tensors are counted in the saved-tensor
/// table): median within 1 %, every row within 1.5 %, none under by more than 0.5 %.
#[test]
fn mixture_of_experts_all_linear_rows_are_estimated_without_refitting() {
    let text = check_unfitted(
        "results/cpu/mixtral-mini-all-linear.csv",
        "1.5%",
        "1%",
        "0.5%",
    );
    assert_eq!(rows_checked(&text), 32, "{text}");
    assert!(text.contains("under-estimates 0 of 32"), "{text}");
    assert!(text.contains("mixtral-mini qlora r8 all-linear"), "{text}");
}

/// Full fine-tuning of an untied model under checkpointing with optimizers whose small states
/// leave the peak at the head's moment (`results/cpu/mistral-mini-optimizers-ckpt.csv`, never
/// fitted): every row within 1.5 %, median within 0.5 % (the bf16 rows were 8–11 % over while
/// the head's moment counted the untied head's gradient twice).
#[test]
fn untied_full_fine_tuning_with_small_optimizer_states_is_estimated() {
    let text = check_unfitted(
        "results/cpu/mistral-mini-optimizers-ckpt.csv",
        "1.5%",
        "0.5%",
        "1.5%",
    );
    assert_eq!(rows_checked(&text), 10, "{text}");
    assert!(text.contains("bf16 adafactor"), "{text}");
}

/// vramcal's simulated data-parallel ranks (`results/cpu/smollm2-135m-sharded.csv`: ddp, zero1,
/// zero2, zero3 and fsdp at N = 2, 4, 8, never fitted: their sharded terms are counted) against
/// the one-device CPU table: every row within 1 % (issue "Beyond one GPU": `estimate --shard`
/// within 1 % of each simulated rank, N = 8 held out; no row of the file is fitted). The DDP and
/// ZeRO-1/2 terms are exact besides: no such rank is estimated further off, in bytes, than its
/// configuration's one-device row in the same file, beyond 0.05 % of its peak (candle's
/// bookkeeping of the partition's tensors). FSDP and ZeRO-3 ranks at N ≥ 4 peak at the tied
/// head's backward, the one-device rows at the end of backward.
#[test]
fn simulated_ranks_are_estimated_within_1_percent() {
    let file = "results/cpu/smollm2-135m-sharded.csv";
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("check.csv");
    let text = check_candle(
        file,
        &[
            "--max-error",
            "1%",
            "--max-median-error",
            "0.5%",
            "--out-csv",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(rows_checked(&text), 108, "{text}");
    let mut r = csv::Reader::from_path(&out).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let bytes = |r: &csv::StringRecord, i: usize| r[i].parse::<i64>().unwrap();
    let (config, measured, predicted) = (1, 3, 4);
    let err = |r: &csv::StringRecord| bytes(r, predicted) - bytes(r, measured);
    let (mut ranks, mut fsdp, mut zero3) = (0, 0, 0);
    for row in &rows {
        let c = &row[config];
        // The configuration without its "<shard> rank R/N".
        let words: Vec<&str> = c.split(' ').collect();
        let Some(at) = words.iter().position(|w| *w == "rank") else {
            continue;
        };
        if words[at - 1] == "fsdp" {
            fsdp += 1;
            continue;
        }
        if words[at - 1] == "zero3" {
            zero3 += 1;
            continue;
        }
        let one = [&words[..at - 1], &words[at + 2..]].concat().join(" ");
        let base = rows
            .iter()
            .find(|b| b[config] == one)
            .unwrap_or_else(|| panic!("no one-device row {one:?} for {c:?}"));
        let slack = bytes(row, measured) / 2000;
        assert!(
            err(row).abs() <= err(base).abs() + slack,
            "{c}: off by {} B, its one-device row by {} B",
            err(row),
            err(base)
        );
        ranks += 1;
    }
    assert_eq!((ranks, fsdp, zero3), (44, 22, 28));
}

/// smollm2-135m (a tied embedding) divides every tensor's rows by 2, 4 and 8, so a ZeRO-3 rank's
/// flat partition of each is the FSDP rank's rows: the committed ZeRO-3 rows' step-2 loss (after
/// one update of the rank's elements from its reduced gradients) equals the FSDP row's of the
/// same configuration, to the bit.
#[test]
fn simulated_zero3_and_fsdp_ranks_step_the_same_elements_alike() {
    let mut r = csv::Reader::from_path("results/cpu/smollm2-135m-sharded.csv").unwrap();
    let h = r.headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let key = |row: &csv::StringRecord| -> Vec<String> {
        [
            "method",
            "lora_r",
            "lora_targets",
            "dtype",
            "precision",
            "batch",
            "seq",
            "accumulate",
            "world_size",
            "rank",
            "checkpointing",
        ]
        .iter()
        .map(|c| row[col(c)].to_string())
        .collect()
    };
    let mut pairs = 0;
    for z in rows.iter().filter(|x| &x[col("shard")] == "zero3") {
        let Some(f) = rows
            .iter()
            .find(|x| &x[col("shard")] == "fsdp" && key(x) == key(z))
        else {
            continue;
        };
        assert_eq!(z[col("loss_step2")], f[col("loss_step2")], "{:?}", key(z));
        pairs += 1;
    }
    assert!(pairs >= 15, "{pairs} pairs");
}

/// `vramcal check` of `file` (rows the CPU table was never fitted on) against the CPU table,
/// with these thresholds (max, median) and under-estimate margin; what it printed.
fn check_unfitted(file: &str, max: &str, median: &str, margin: &str) -> String {
    check_candle(
        file,
        &[
            "--max-error",
            max,
            "--max-median-error",
            median,
            "--margin",
            margin,
        ],
    )
}

/// `vramcal check --profile candle` of `file` against the CPU table with `extra` options; what
/// it printed.
fn check_candle(file: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "check",
        "--profile",
        "candle",
        "--measured",
        file,
        "--calibration",
        CALIBRATION,
    ];
    args.extend_from_slice(extra);
    succeeds(&args)
}

/// `vramcal calibrate --measured <measured>` makes the coefficients of `committed`; returns
/// what calibrate printed.
fn calibrate_makes(measured: &[&str], committed: &str) -> String {
    calibrate_makes_with(measured, committed, &[])
}

/// [`calibrate_makes`] with more arguments for `calibrate` (e.g. `--profile`).
fn calibrate_makes_with(measured: &[&str], committed: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("cal.csv");
    let st = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("calibrate")
        .args(extra)
        .arg("--measured")
        .args(measured)
        .args(["--out", fresh.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let coef = |p: &std::path::Path| -> Vec<(String, f64)> {
        let mut r = csv::Reader::from_path(p).unwrap();
        let h = r.headers().unwrap().clone();
        let (t, c) = (
            h.iter().position(|x| x == "term").unwrap(),
            h.iter().position(|x| x == "coefficient").unwrap(),
        );
        r.records()
            .map(|x| x.unwrap())
            .map(|x| (x[t].to_string(), x[c].parse().unwrap()))
            .collect()
    };
    let committed = coef(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(committed));
    let made = coef(&fresh);
    assert_eq!(committed.len(), made.len());
    for ((t1, c1), (t2, c2)) in committed.iter().zip(&made) {
        assert_eq!(t1, t2);
        assert!(
            (c1 - c2).abs() <= 1e-9 * c1.abs().max(1.0),
            "{t1}: committed {c1}, calibrate makes {c2}"
        );
    }
    format!(
        "{}{}",
        String::from_utf8_lossy(&st.stdout),
        String::from_utf8_lossy(&st.stderr)
    )
}

const H200_MEASURED: [&str; 2] = [
    "results/h200/vramcal-smollm2-135m.csv",
    "results/h200/vramcal-mistral-7b-v0.1.csv",
];
const H200_CALIBRATION: &str = "results/calibration/h200-candle.csv";

/// On the H200 measurements (bf16, smollm2-135m and Mistral-7B) with the H200 calibration:
/// median |error| ≤ 1 %, max ≤ 6 %, and no under-estimate with a 6 % margin.
#[test]
fn candle_estimates_stay_accurate_on_the_h200_measurements() {
    accuracy_gate(
        &H200_MEASURED,
        H200_CALIBRATION,
        "0.06",
        "under-estimates 0 of 67 with a 6.0 % margin",
    );
}

/// Runs vramcal with `args` in the repository root, expects success, returns its stdout.
fn succeeds(args: &[&str]) -> String {
    let out = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number of rows a `check` summary line reports.
fn rows_checked(text: &str) -> usize {
    let line = text.lines().find(|l| l.starts_with("profile ")).unwrap();
    number_after(line, "): ") as usize
}

/// PyTorch's own CPU peaks (`results/torch-cpu/`, exact to the byte, three architectures, every
/// recipe of the grid): the torch profiles' first-principles (uncalibrated) estimate is within
/// 1 % median and 3 % max of every one of at least 200 rows, each read in its own precision,
/// optimizer and attention.
#[test]
fn torch_profiles_hold_pytorchs_cpu_peaks() {
    let files = common::torch_cpu_files();
    let mut args = vec!["check", "--profile", "torch-sdpa", "--measured"];
    args.extend(files.iter().map(String::as_str));
    args.extend(["--max-median-error", "1%", "--max-error", "3%"]);
    let text = succeeds(&args);
    assert!(rows_checked(&text) >= 200, "{text}");
}

#[test]
fn public_measurements_are_checked_with_the_torch_profiles() {
    let public = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/cases/public-measurements.csv");
    if !public.is_file() {
        if std::env::var_os("CI").is_some() {
            panic!("{} is missing", public.display());
        }
        eprintln!("SKIPPED: {} not found", public.display());
        return;
    }
    // Reference rows name their own attention: only torch-sdpa checks them.
    for profile in ["torch-eager", "candle"] {
        fails(
            &[
                "check",
                "--measured",
                public.to_str().unwrap(),
                "--profile",
                profile,
            ],
            "check them with --profile torch-sdpa",
        );
    }
    // Never fitted to: the torch profile as it stands (uncalibrated) holds the measured rows to
    // 6 % median and 10 % max. (The issue's targets, 3 % and 6 %, are not met yet: the
    // FlashAttention-2 and Llama-2 LoRA rows are under-estimated by 2–10 %. The DeepSpeed ZeRO-2
    // row that ran out of memory, pub-11, is predicted to fit: the format's `adamw_torch` is the
    // foreach step, one buffer; the run's trace shows the for-loop one, two buffers, which the
    // row cannot say: `pub_11_runs_out_of_memory_with_the_for_loop_adamw_it_ran`.)
    let text = succeeds(&[
        "check",
        "--measured",
        public.to_str().unwrap(),
        "--profile",
        "torch-sdpa",
    ]);
    let line = text.lines().find(|l| l.starts_with("profile ")).unwrap();
    assert!(
        number_after(line, "median") <= 6.0 && number_after(line, "max") <= 10.0,
        "{line}"
    );
    assert!(
        text.contains("| pub-01 |") && text.contains("| pub-11 |"),
        "{text}"
    );
}

/// PyTorch on the H200 (`results/h200/torch-*.csv`, 71 rows), uncalibrated (first principles,
/// the cuBLAS workspaces counted): median ≤ 1 %, max ≤ 3 % (the issue's targets for the
/// uncalibrated profile are 3 % and 8 %).
#[test]
fn torch_profile_holds_the_h200_rows_uncalibrated() {
    succeeds(&[
        "check",
        "--measured",
        "results/h200/torch-mistral-7b-v0.1.csv",
        "results/h200/torch-smollm2-135m.csv",
        "--profile",
        "torch-sdpa",
        "--max-median-error",
        "1%",
        "--max-error",
        "3%",
    ]);
}

fn fails(args: &[&str], needle: &str) {
    let out = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let lines: Vec<_> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "{args:?}: {}", lines[0]);
}

#[test]
fn estimator_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let est = ["estimate", "--model", "smollm2-135m", "--seq", "128"];
    let with = |extra: &[&str]| -> Vec<String> {
        est.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |v: Vec<String>, needle: &str| {
        fails(&v.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };
    run(with(&["--gpu", "tpu-v9"]), "`vramcal gpus` lists");
    // A cell that does not parse: its row (line) and column named.
    let bad = dir.path().join("bad-cell.csv");
    let mut r = csv::Reader::from_path(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/cpu/smollm2-135m.csv"),
    )
    .unwrap();
    let h = r.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = r.records().take(2).map(Result::unwrap).collect();
    let col = h.iter().position(|c| c == "peak_bytes").unwrap();
    let mut w = csv::Writer::from_path(&bad).unwrap();
    w.write_record(&h).unwrap();
    w.write_record(&rows[0]).unwrap();
    let cells: Vec<&str> = rows[1]
        .iter()
        .enumerate()
        .map(|(i, c)| if i == col { "12x4" } else { c })
        .collect();
    w.write_record(&cells).unwrap();
    w.flush().unwrap();
    fails(
        &["check", "--measured", bad.to_str().unwrap()],
        "row 3 does not parse: column peak_bytes: invalid digit",
    );
    // One file twice would count its rows twice.
    fails(
        &[
            "check",
            "--measured",
            "results/cpu/smollm2-135m.csv",
            "./results/cpu/smollm2-135m.csv",
        ],
        "given twice",
    );
    // vramcal's CPU rows against the H200's table: refused, as reference rows are.
    fails(
        &[
            "check",
            "--measured",
            "results/cpu/smollm2-135m.csv",
            "--calibration",
            H200_CALIBRATION,
        ],
        "row 2 ran on cpu, but the calibration table results/calibration/h200-candle.csv describes a GPU",
    );
    run(with(&["--gpu", "a100"]), "a100-40gb or a100-80gb");
    run(with(&["--budget", "80"]), "missing its unit");
    run(
        with(&["--profile", "jax"]),
        "expected candle, torch-sdpa or torch-eager",
    );
    run(
        with(&["--calibration", CALIBRATION, "--profile", "torch-sdpa"]),
        "not torch-sdpa",
    );
    let old = dir.path().join("old.csv");
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CALIBRATION))
            .unwrap();
    std::fs::write(
        &old,
        text.replace(&format!(",{},", env!("CARGO_PKG_VERSION")), ",0.0.1,"),
    )
    .unwrap();
    run(
        with(&[
            "--calibration",
            old.to_str().unwrap(),
            "--profile",
            "candle",
        ]),
        "was made by vramcal 0.0.1",
    );
    // Damaged coefficients are refused, naming the term, not used (a peak of 2^64 - 1 bytes).
    for (term, bad, says) in [
        ("activations", "-1.0", "coefficient -1 for term activations"),
        (
            "activations",
            "1e308",
            "coefficient 1e308 for term activations",
        ),
        ("constant", "1e308", "coefficient 1e308 for term constant"),
        ("constant", "1e12", "coefficient 1e12 for term constant"),
        (
            "attention_scores",
            "NaN",
            "coefficient NaN for term attention_scores",
        ),
        (
            "logits_and_loss",
            "inf",
            "coefficient inf for term logits_and_loss",
        ),
        ("gradients_live", "2", "counted, not fitted"),
        ("attention_transient", "0", "counted, not fitted"),
    ] {
        let damaged = dir.path().join("damaged.csv");
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        for l in lines.iter_mut() {
            let mut f: Vec<String> = l.split(',').map(String::from).collect();
            if f.len() > 3 && f[2] == term {
                f[3] = bad.to_string();
                *l = f.join(",");
            }
        }
        std::fs::write(&damaged, lines.join("\n") + "\n").unwrap();
        run(
            with(&[
                "--calibration",
                damaged.to_str().unwrap(),
                "--profile",
                "candle",
            ]),
            says,
        );
    }
    // An endless device file is refused, with one error line.
    run(
        with(&["--calibration", "/dev/zero", "--profile", "candle"]),
        "not a regular file",
    );
    fails(&["check", "--measured", "/dev/zero"], "not a regular file");
    fails(
        &["calibrate", "--measured", "/dev/zero"],
        "not a regular file",
    );
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    fails(
        &["check", "--measured", empty.to_str().unwrap()],
        "empty.csv",
    );
    let junk = dir.path().join("junk.csv");
    std::fs::write(&junk, "a,b\n1,2\n").unwrap();
    fails(&["check", "--measured", junk.to_str().unwrap()], "junk.csv");
    fails(
        &[
            "calibrate",
            "--measured",
            junk.to_str().unwrap(),
            "--out",
            dir.path().join("c.csv").to_str().unwrap(),
        ],
        "junk.csv",
    );
    fails(
        &[
            "check",
            "--measured",
            MEASURED[0],
            "--calibration",
            CALIBRATION,
            "--max-error",
            "0.001",
        ],
        "exceeds --max-error",
    );
}

#[test]
fn report_writes_the_plots_and_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let st = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "report",
            "--measured",
            MEASURED[0],
            MEASURED[1],
            "--calibration",
            CALIBRATION,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let index = std::fs::read_to_string(out.join("index.md")).unwrap();
    let svgs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    // Seven configurations (full fine-tuning without a save; full, LoRA and QLoRA with an
    // adapter save, each with and without checkpointing): a peak and a components chart each.
    assert_eq!(svgs.len(), 14);
    for svg in &svgs {
        let text = std::fs::read_to_string(svg).unwrap();
        assert!(
            text.contains("<text") && text.contains("GiB"),
            "{}",
            svg.display()
        );
        let png = svg.with_extension("png");
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", png.display());
        let name = svg.file_name().unwrap().to_string_lossy().to_string();
        assert!(index.contains(&name), "index.md does not show {name}");
    }
    assert!(index.contains("median |error|"));
}

/// Rows that differ only in their LoRA settings, quantization or attention get charts of their
/// own: every successful row is a plotted point, and no chart's file overwrites another's.
#[test]
fn report_keeps_every_configuration_apart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let files = [
        "results/cpu/smollm2-135m-peft.csv",
        "results/cpu/smollm2-135m-all-linear.csv",
        "results/cpu/smollm2-135m-eager.csv",
    ];
    let mut args = vec!["report", "--measured"];
    args.extend(files);
    args.extend(["--out", out.to_str().unwrap()]);
    succeeds(&args);
    let ok_rows: usize = files
        .iter()
        .map(|f| {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            csv::Reader::from_path(p)
                .unwrap()
                .deserialize::<std::collections::HashMap<String, String>>()
                .filter(|r| r.as_ref().unwrap()["status"] == "ok")
                .count()
        })
        .sum();
    let index = std::fs::read_to_string(out.join("index.md")).unwrap();
    assert!(
        index.contains(&format!("Over {ok_rows} measured points")),
        "{index}"
    );
    let charts = index.lines().filter(|l| l.starts_with("## ")).count();
    let svgs = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "svg")
        })
        .count();
    assert_eq!(svgs, 2 * charts, "{index}");
}

/// Rows of a PyTorch-reference file (scripts/torch_reference.py) that ran out of memory carry
/// `status=oom` and may have no peak: they are skipped, not checked and not fatal.
#[test]
fn reference_rows_that_failed_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("torch.csv");
    std::fs::write(
        &f,
        "id,source,model,method,lora_r,lora_alpha,lora_targets,quant,precision,optimizer,batch,seq,seq_kind,checkpointing,attention,gpu,counter,peak_bytes,notes,status\n\
         a,t,smollm2-135m,full,,,,none,bf16,adamw_torch,1,512,fixed,off,sdpa,g,allocated,2000000000,,ok\n\
         b,t,smollm2-135m,full,,,,none,bf16,adamw_torch,64,4096,fixed,off,sdpa,g,allocated,,CUDA out of memory,oom\n\
         c,t,smollm2-135m,full,,,,none,bf16,adamw_torch,64,2048,fixed,off,sdpa,g,allocated,12345,partial,oom\n",
    )
    .unwrap();
    let out = check_torch_sdpa(&f);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(": 1 rows;"), "{text}");
}

/// Published-measurement rows that vramcal cannot model are refused by name; `report` refuses
/// such files and an output path that is a file; `calibrate` says which terms no row exercises.
#[test]
fn unmodelled_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("ia3.csv");
    std::fs::write(
        &f,
        "id,source,model,method,lora_r,lora_alpha,lora_targets,quant,precision,optimizer,batch,seq,seq_kind,checkpointing,attention,gpu,counter,peak_bytes,notes\n\
         x,t,smollm2-135m,ia3,,,,none,bf16,adamw_torch,1,512,fixed,off,sdpa,g,allocated,2000000000,\n",
    )
    .unwrap();
    let out = check_torch_sdpa(&f);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("column method = \"ia3\""));
    let out = bin()
        .args(["report", "--measured", f.to_str().unwrap(), "--out"])
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use it with `vramcal check`"));
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["report", "--measured", MEASURED[0], "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a folder"));
    let out = bin()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "calibrate",
            "--measured",
            MEASURED[0],
            "--holdout",
            "none",
            "--out",
        ])
        .arg(dir.path().join("c.csv"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("no fitted row exercises the term checkpoint_inputs"));
}

/// Reference rows with the `offload` column are estimated (the GPU's peak; the host's RAM is
/// not a GPU counter), and offload a stack cannot run, or without sharding, is refused by column.
#[test]
fn offload_rows_are_estimated_and_impossible_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let head = "id,source,model,method,lora_r,lora_alpha,lora_targets,quant,precision,optimizer,batch,seq,seq_kind,checkpointing,attention,gpus,shard,offload,gpu,counter,peak_bytes,notes\n";
    let check = |rows: &str| {
        let f = dir.path().join("offload.csv");
        std::fs::write(&f, format!("{head}{rows}")).unwrap();
        check_torch_sdpa(&f)
    };
    let on = "a,t,llama-2-7b,full,,,,none,bf16-master,adamw_torch,1,512,fixed,on,sdpa,8,zero2,optimizer,g,allocated,16000000000,\n";
    let off = "b,t,llama-2-7b,full,,,,none,bf16-master,adamw_torch,1,512,fixed,on,sdpa,8,zero2,,g,allocated,16000000000,\n";
    let out = check(&format!("{on}{off}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let predicted = |id: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("| {id} |")))
            .unwrap();
        line.split('|').nth(5).unwrap().trim().parse().unwrap()
    };
    assert!(predicted("a") < predicted("b"), "{text}");
    for (row, column) in [
        ("c,t,llama-2-7b,full,,,,none,bf16-master,adamw_torch,1,512,fixed,on,sdpa,8,ddp,optimizer,g,allocated,1,\n", "column offload = \"optimizer\""),
        ("d,t,llama-2-7b,full,,,,none,bf16-master,adamw_torch,1,512,fixed,on,sdpa,8,zero2,optimizer+params,g,allocated,1,\n", "column offload = \"optimizer+params\""),
        ("e,t,llama-2-7b,full,,,,none,bf16-master,adamw_torch,1,512,fixed,on,sdpa,8,zero2,disk,g,allocated,1,\n", "column offload = \"disk\""),
        ("f,t,llama-2-7b,full,,,,none,bf16-master,adamw_torch,1,512,fixed,on,sdpa,2,,,g,allocated,1,\n", "column gpus = \"2\": more than one GPU needs a shard"),
        ("g,t,llama-2-7b,full,,,,none,bf16-master,adamw_torch,1,512,fixed,on,sdpa,1,ddp,,g,allocated,1,\n", "column gpus = \"1\": a ddp row needs gpus of 2 or more"),
    ] {
        let out = check(row);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(column), "{row}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// PyTorch FSDP2 on the CPU (`results/torch-cpu-fsdp/`, 2, 4 and 8 gloo ranks, fp32 and bf16):
/// the `torch-sdpa` estimate (fitted CPU table) holds the LoRA rows (whose peak is each rank's whole-model load)
/// to the kilobyte, and every rank of a full fine-tuning row peaks at the estimate plus a whole
/// number of one layer's fp32 gradient buffers (gloo finishes reduce-scatters on its own
/// threads, so how many are alive at once changes between identical runs; docs/estimating.md).
#[test]
fn fsdp_ranks_peak_at_the_estimate_plus_whole_layer_buffers() {
    let file = "results/torch-cpu-fsdp/smollm2-135m-fsdp.csv";
    let text = succeeds(&[
        "check",
        "--measured",
        file,
        "--profile",
        "torch-sdpa",
        "--calibration",
        "results/calibration/cpu-torch-sdpa.csv",
    ]);
    let predicted: std::collections::HashMap<String, i64> = text
        .lines()
        .filter(|l| l.starts_with("| torch-"))
        .map(|l| {
            let c: Vec<&str> = l.split('|').map(str::trim).collect();
            (c[1].to_string(), c[5].parse().unwrap())
        })
        .collect();
    // One decoder layer of smollm2-135m in fp32: its parameters × 4 B = 14,160,384 bytes.
    let cfg = vramcal::config::preset("smollm2-135m").unwrap().config;
    let unit: i64 = 4 * cfg
        .param_shapes()
        .iter()
        .filter(|p| p.name.starts_with("model.layers.0."))
        .map(|p| p.numel() as i64)
        .sum::<i64>();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let mut rows = 0;
    let mut ks = Vec::new();
    for r in csv::Reader::from_path(path)
        .unwrap()
        .deserialize::<std::collections::HashMap<String, String>>()
    {
        let r = r.unwrap();
        let p = predicted[&r["id"]];
        // One layer's gradient buffer in the row's dtype; bf16 ranks queue more of them
        // (11 to 24 here), so only fp32's spread is pinned below.
        let fp32 = r["precision"] == "fp32";
        let unit = if fp32 { unit } else { unit / 2 };
        let spread = if fp32 { -2..=6 } else { 0..=30 };
        let ranks: Vec<i64> = r["notes"]
            .split("peak per rank: ")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .split(", ")
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(ranks.len(), r["gpus"].parse::<usize>().unwrap());
        for peak in ranks {
            if r["method"] == "lora" {
                assert!((peak - p).abs() < 4096, "{}: {peak} vs {p}", r["id"]);
            } else {
                let k = ((peak - p) as f64 / unit as f64).round() as i64;
                assert!(
                    spread.contains(&k) && (peak - p - k * unit).abs() < 64 * 1024,
                    "{}: rank peak {peak} is the estimate {p} + {k} × {unit} + {}",
                    r["id"],
                    peak - p - k * unit
                );
                if fp32 {
                    ks.push(k);
                }
            }
        }
        rows += 1;
    }
    assert_eq!(rows, 21);
    // The estimate lies inside the measured spread: one layer buffer more or less in the
    // model would move the spread out of −2..=6.
    assert_eq!(
        (ks.iter().min(), ks.iter().max()),
        (Some(&-2), Some(&6)),
        "{ks:?}"
    );
}

/// PyTorch DDP on the CPU (`results/torch-cpu/smollm2-135m-ddp.csv`, 2, 4 and 8 gloo ranks):
/// the uncalibrated `torch-sdpa` estimate, which counts DDP's bucket copy of the gradients and
/// its construction's parameter broadcast, is within 0.01 % of every row.
#[test]
fn ddp_rows_are_counted_to_the_kilobyte() {
    let text = succeeds(&[
        "check",
        "--measured",
        "results/torch-cpu/smollm2-135m-ddp.csv",
        "--profile",
        "torch-sdpa",
        "--max-error",
        "0.0001",
    ]);
    assert!(rows_checked(&text) >= 16, "{text}");
    assert!(text.contains("ddp×2") && text.contains("ddp×4"), "{text}");
}
