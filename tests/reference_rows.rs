//! The strict parser of reference rows (`../shared/cases/README.md`): every bad cell is refused
//! with one `error:` line naming the file, the row and the column, and nothing is written.

use std::process::Command;

const HEADER: &str = "id,source,model,method,lora_r,lora_alpha,lora_dropout,lora_targets,quant,precision,optimizer,optimizer_state_dtype,batch,accumulate,seq,seq_kind,checkpointing,attention,loss,gpus,shard,offload,gpu,gpu_memory_bytes,counter,peak_bytes,notes";
const GOOD: &str = "r1,t,smollm2-135m,lora,16,32,,q_proj;v_proj,none,bf16,adamw_torch,,2,,512,fixed,on,sdpa,,,,,A100-80GB,,allocated,2000000000,";

/// One bad input: the row(s) after the header (or a whole file), the fragments the error names.
struct Case {
    what: &'static str,
    file: String,
    expect: &'static [&'static str],
}

/// `GOOD` with column `col` set to `value`.
fn with(col: &str, value: &str) -> String {
    let names: Vec<&str> = HEADER.split(',').collect();
    let mut cells: Vec<String> = GOOD.split(',').map(String::from).collect();
    let i = names.iter().position(|n| *n == col).unwrap();
    cells[i] = value.to_string();
    format!("{HEADER}\n{}\n", cells.join(","))
}

/// `vramcal check --profile torch-sdpa --measured <file> <extra…>`, run in the repository root.
fn check(file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["check", "--profile", "torch-sdpa", "--measured"])
        .arg(file)
        .args(extra)
        .output()
        .unwrap()
}

fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = [
        ("method", "ia3"),
        ("quant", "bnb.nf4"),
        ("precision", "mixed"),
        ("optimizer", "adamw"),
        ("optimizer_state_dtype", "fp8"),
        ("seq_kind", "random"),
        ("checkpointing", "yes"),
        ("attention", "flash"),
        ("loss", "liger"),
        ("shard", "zero4"),
        ("offload", "disk"),
        ("counter", "peak"),
        ("lora_targets", "q;v"),
        ("lora_dropout", "1.5"),
        ("lora_r", "0"),
        ("batch", "two"),
        ("model", "gpt-5"),
        ("peak_bytes", "1.5e9"),
    ]
    .into_iter()
    .map(|(col, value)| Case {
        what: col,
        file: with(col, value),
        expect: &[],
    })
    .collect();
    for c in &mut v {
        c.expect = match c.what {
            "method" => &[":2 (row \"r1\"): column method = \"ia3\""],
            "quant" => &["column quant = \"bnb.nf4\""],
            "precision" => &["column precision = \"mixed\""],
            "optimizer" => &["column optimizer = \"adamw\"", "adamw_torch_fused"],
            "optimizer_state_dtype" => &["column optimizer_state_dtype = \"fp8\""],
            "seq_kind" => &["column seq_kind = \"random\""],
            "checkpointing" => &["column checkpointing = \"yes\""],
            "attention" => &["column attention = \"flash\""],
            "loss" => &["column loss = \"liger\""],
            "shard" => &["column shard = \"zero4\""],
            "offload" => &["column offload = \"disk\""],
            "counter" => &["column counter = \"peak\""],
            "lora_targets" => &["column lora_targets = \"q;v\""],
            "lora_dropout" => &["column lora_dropout = \"1.5\""],
            "lora_r" => &["column lora_r = \"0\""],
            "batch" => &["column batch = \"two\""],
            "model" => &["column model = \"gpt-5\""],
            _ => &["column peak_bytes = \"1.5e9\"", "integer bytes"],
        };
    }
    for (what, col, value, expect) in [
        (
            "counter none",
            "counter",
            "none",
            "column counter = \"none\"",
        ),
        ("empty id", "id", "", "column id = \"\""),
        (
            "empty gpu",
            "gpu",
            "",
            "column gpu = \"\": every row names it",
        ),
        (
            "every:0",
            "checkpointing",
            "every:0",
            "column checkpointing = \"every:0\"",
        ),
        (
            "unknown target",
            "lora_targets",
            "q_proj;head",
            "column lora_targets = \"q_proj;head\": expected ';'-separated",
        ),
        (
            "unknown loss",
            "loss",
            "liger",
            "column loss = \"liger\": expected empty or fused-linear-ce",
        ),
        (
            "offload without sharding",
            "offload",
            "optimizer",
            "column offload = \"optimizer\": offload needs shard zero1, zero2, zero3 or fsdp",
        ),
        ("status", "notes", "x", ""),
        ("8-bit states dtype", "optimizer", "adamw_bnb_8bit", ""),
    ] {
        let file = match what {
            // A `status` column with a value outside ok/oom/error.
            "status" => format!("{HEADER},status\n{GOOD},finished\n"),
            "8-bit states dtype" => {
                with("optimizer", value).replace(",adamw_bnb_8bit,,", ",adamw_bnb_8bit,fp32,")
            }
            _ => with(col, value),
        };
        let expect: &'static [&'static str] = match what {
            "status" => &["column status = \"finished\""],
            "8-bit states dtype" => &[
                "column optimizer_state_dtype = \"fp32\"",
                "only torch's AdamW",
            ],
            _ => Box::leak(Box::new([expect])),
        };
        v.push(Case { what, file, expect });
    }
    v.push(Case {
        what: "zero peak",
        file: with("peak_bytes", "0"),
        expect: &["column peak_bytes = \"0\""],
    });
    v.push(Case {
        what: "full row with a LoRA rank",
        file: with("method", "full"),
        expect: &["column lora_r = \"16\"", "no LoRA setting"],
    });
    v.push(Case {
        what: "sharded row on one GPU",
        file: with("shard", "zero2"),
        expect: &["column gpus", "needs gpus of 2 or more"],
    });
    v.push(Case {
        what: "oom row with a peak",
        file: with("counter", "oom").replace(",A100-80GB,,", ",A100-80GB,85899345920,"),
        expect: &["column peak_bytes", "an oom row has no peak"],
    });
    v.push(Case {
        what: "duplicate id",
        file: format!("{HEADER}\n{GOOD}\n{GOOD}\n"),
        expect: &[
            ":3 (row \"r1\"): column id",
            "duplicate id (first at line 2)",
        ],
    });
    v.push(Case {
        what: "oom row without the card's memory",
        file: with("counter", "oom").replace(",2000000000,", ",,"),
        expect: &["column gpu_memory_bytes", "oom row needs the card's memory"],
    });
    v.push(Case {
        what: "missing column",
        file: format!(
            "{}\n{}\n",
            HEADER.replace(",counter", ""),
            GOOD.replace(",allocated", "")
        ),
        expect: &["missing required column \"counter\""],
    });
    v.push(Case {
        what: "reserved below allocated",
        file: format!("{HEADER},peak_reserved_bytes\n{GOOD},1999999999\n"),
        expect: &[
            "column peak_reserved_bytes = \"1999999999\"",
            "below peak_bytes",
        ],
    });
    v.push(Case {
        what: "reserved beside a reserved counter",
        file: format!(
            "{HEADER},peak_reserved_bytes\n{},2100000000\n",
            GOOD.replace(",allocated,", ",reserved,")
        ),
        expect: &[
            "column peak_reserved_bytes = \"2100000000\"",
            "beside an allocated peak",
        ],
    });
    v.push(Case {
        what: "reserved not an integer",
        file: format!("{HEADER},peak_reserved_bytes\n{GOOD},2.1e9\n"),
        expect: &["column peak_reserved_bytes = \"2.1e9\""],
    });
    // vramcal's `modules_to_save` column (beyond the shared format): a closed list, LoRA rows
    // only, a module trained one way.
    v.push(Case {
        what: "modules_to_save unknown",
        file: format!("{HEADER},modules_to_save\n{GOOD},norm\n"),
        expect: &["column modules_to_save = \"norm\"", "lm_head, embed_tokens"],
    });
    v.push(Case {
        what: "modules_to_save on a full row",
        file: format!(
            "{HEADER},modules_to_save\nr1,t,smollm2-135m,full,,,,,none,bf16,adamw_torch,,2,,512,fixed,on,sdpa,,,,,A100-80GB,,allocated,2000000000,,lm_head\n"
        ),
        expect: &["column modules_to_save = \"lm_head\"", "no LoRA setting"],
    });
    v.push(Case {
        what: "modules_to_save also a target",
        file: format!(
            "{HEADER},modules_to_save\nr1,t,smollm2-135m,lora,16,32,,q_proj;lm_head,none,bf16,adamw_torch,,2,,512,fixed,on,sdpa,,,,,A100-80GB,,allocated,2000000000,,lm_head\n"
        ),
        expect: &["column modules_to_save = \"lm_head\"", "cannot also be in"],
    });
    // vramcal's `torch_adamw` column: two words, on adamw_torch rows only.
    v.push(Case {
        what: "torch_adamw unknown",
        file: format!("{HEADER},torch_adamw\n{GOOD},fused\n"),
        expect: &[
            "column torch_adamw = \"fused\"",
            "expected for-loop, foreach or empty",
        ],
    });
    v.push(Case {
        what: "torch_adamw on another optimizer",
        file: format!(
            "{HEADER},torch_adamw\nr1,t,smollm2-135m,lora,16,32,,q_proj;v_proj,none,bf16,sgd,,2,,512,fixed,on,sdpa,,,,,A100-80GB,,allocated,2000000000,,foreach\n"
        ),
        expect: &["column torch_adamw = \"foreach\"", "not of this row's optimizer"],
    });
    v.push(Case {
        what: "model path that does not exist",
        file: with("model", "./no/such/folder"),
        expect: &[
            "column model = \"./no/such/folder\"",
            "no such file or folder",
        ],
    });
    v.push(Case {
        what: "qlora row with quant none",
        file: with("method", "qlora"),
        expect: &["column quant = \"none\"", "qlora rows have an nf4"],
    });
    v
}

#[test]
fn every_bad_cell_is_refused_by_file_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    for (i, c) in cases().into_iter().enumerate() {
        let f = dir.path().join(format!("case{i}.csv"));
        std::fs::write(&f, &c.file).unwrap();
        let out_csv = dir.path().join(format!("never-made-{i}.csv"));
        let out = check(&f, &["--out-csv", out_csv.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: accepted", c.what);
        assert_eq!(err.lines().count(), 1, "{}: {err}", c.what);
        assert!(err.starts_with("error: "), "{}: {err}", c.what);
        assert!(err.contains(&f.display().to_string()), "{}: {err}", c.what);
        for e in c.expect {
            assert!(err.contains(e), "{}: {err} lacks {e}", c.what);
        }
        assert!(!out_csv.exists(), "{}: wrote {}", c.what, out_csv.display());
    }
}

/// The good row itself is read, and an `oom` row with the card's memory is checked as "predicted
/// above the card".
#[test]
fn good_rows_and_oom_rows_are_read() {
    let dir = tempfile::tempdir().unwrap();
    // `check --profile torch-sdpa` of a file holding `text`: its stdout, after success.
    let checked = |name: &str, text: String| -> String {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        let out = check(&f, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let oom = GOOD.replace("r1,", "r2,").replace(
        ",A100-80GB,,allocated,2000000000,",
        ",tiny card,1000000,oom,,",
    );
    let text = checked("ok.csv", format!("{HEADER}\n{GOOD}\n{oom}\n"));
    assert!(
        text.contains("| r2 |") && text.contains("above the card: right"),
        "{text}"
    );
    assert!(text.contains("1 of 1 predicted above their card"), "{text}");
    // A user's run (vramcal.MemoryRecorder's rows): the model as its config.json folder, read
    // as `--model` reads it; the same estimate as the preset it copies.
    let folder = dir.path().join("my-model");
    std::fs::create_dir_all(&folder).unwrap();
    let cfg = vramcal::config::preset("smollm2-135m").unwrap().config;
    std::fs::write(
        folder.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let user = GOOD.replace("smollm2-135m", folder.to_str().unwrap());
    let by_path = checked("user.csv", format!("{HEADER}\n{user}\n"));
    let by_preset = checked("preset.csv", format!("{HEADER}\n{GOOD}\n"));
    let predicted = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("| r1 |"))
            .map(|l| l.split('|').nth(5).unwrap().trim().to_string())
            .unwrap()
    };
    assert_eq!(predicted(&by_path), predicted(&by_preset), "{by_path}");
    // As scripts/torch_reference.py writes one: status oom, counter oom, the card's memory.
    let text = checked("script-oom.csv", format!("{HEADER},status\n{oom},oom\n"));
    assert!(
        text.contains("| r2 |") && text.contains("no row with a measured peak"),
        "{text}"
    );
    assert!(text.contains("1 of 1 predicted above their card"), "{text}");
}

/// A calibration table of one device kind is not applied to rows of another: a GPU row with
/// the CPU table is refused by row.
#[test]
fn a_table_of_another_device_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gpu.csv");
    std::fs::write(&f, format!("{HEADER}\n{GOOD}\n")).unwrap();
    let out = check(
        &f,
        &["--calibration", "results/calibration/cpu-torch-sdpa.csv"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted");
    assert!(
        err.starts_with("error: ") && err.contains("row \"r1\""),
        "{err}"
    );
    assert!(err.contains("describes the CPU"), "{err}");
}

/// A `reserved` row is held against the predicted reserved peak where the table models the
/// caching allocator (the H200 table, fitted on `peak_reserved_bytes`), and against the
/// allocated peak, said in the counter column, where it does not (uncalibrated).
#[test]
fn reserved_rows_meet_the_reserved_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("reserved.csv");
    let row = GOOD.replace(",allocated,", ",reserved,");
    std::fs::write(&f, format!("{HEADER}\n{row}\n")).unwrap();
    let run = |table: Option<&str>| -> (String, u64) {
        let extra: Vec<&str> = table.map_or(vec![], |t| vec!["--calibration", t]);
        let out = check(&f, &extra);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("| r1 |"))
            .unwrap()
            .to_string();
        let predicted: u64 = line.split('|').nth(5).unwrap().trim().parse().unwrap();
        (line, predicted)
    };
    let (plain, allocated) = run(None);
    assert!(
        plain.contains("| reserved vs allocated (no reserved model) |"),
        "{plain}"
    );
    let (fitted, reserved) = run(Some("results/calibration/h200-torch-sdpa.csv"));
    assert!(fitted.contains("| reserved |"), "{fitted}");
    // The caching allocator's reserve is on top of the allocated peak: the reserved prediction
    // exceeds the (calibrated) allocated one by more than the fitted constant alone.
    assert!(reserved > allocated + (64 << 20), "{plain}\n{fitted}");
}

/// A calibration table with one of the two reserved terms is refused (both or neither).
#[test]
fn a_table_with_half_the_reserved_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let table = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results/calibration/h200-torch-sdpa.csv"),
    )
    .unwrap();
    assert!(
        table.contains(",reserved_kept,"),
        "the H200 table models reserved"
    );
    let cut: String = table
        .lines()
        .filter(|l| !l.contains(",reserved_kept,"))
        .map(|l| format!("{l}\n"))
        .collect();
    let f = dir.path().join("half.csv");
    std::fs::write(&f, cut).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args([
            "estimate",
            "--model",
            "smollm2-135m",
            "--seq",
            "512",
            "--precision",
            "bf16",
            "--calibration",
        ])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted");
    assert!(
        err.starts_with("error: ") && err.contains("both or neither"),
        "{err}"
    );
}

/// A row with Liger's fused linear cross-entropy (`loss` `fused-linear-ce`) is checked, and
/// predicted below the same row with transformers' loss by at least the `(N, V)` fp32
/// log-softmax it no longer saves (N = 2 × 512 tokens, V = 49,152: 201 MB).
#[test]
fn fused_linear_ce_rows_are_predicted() {
    let dir = tempfile::tempdir().unwrap();
    let predicted = |loss: &str| -> u64 {
        let f = dir.path().join(format!("r-{loss}.csv"));
        std::fs::write(&f, with("loss", loss)).unwrap();
        let table = dir.path().join(format!("t-{loss}.csv"));
        let out = check(&f, &["--out-csv", table.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut r = csv::Reader::from_path(&table).unwrap();
        let h = r.headers().unwrap().clone();
        let i = h.iter().position(|c| c == "predicted_bytes").unwrap();
        let row = r.records().next().unwrap().unwrap();
        row[i].parse().unwrap()
    };
    let (hf, liger) = (predicted(""), predicted("fused-linear-ce"));
    assert!(hf >= liger + 2 * 512 * 49_152 * 4, "{hf} vs {liger}");
}
