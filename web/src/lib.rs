//! vramcal's estimator as WebAssembly for the static page in `web/` (wasm-bindgen).
//!
//! The page builds the arguments of `vramcal estimate` from its form and calls [`estimate`],
//! which runs the library's [`vramcal::commands::estimate::json_for_options`]: the text it
//! answers is byte for byte what `vramcal estimate <args> --json` prints. The committed
//! calibration tables and measured results are embedded (`build.rs`) under the paths the
//! command line names them by (`results/calibration/h200-torch-sdpa.csv`), so the page passes
//! `--calibration` and `--measured` exactly as a command line run in the repository would.

use std::path::Path;

use wasm_bindgen::prelude::*;

mod files {
    include!(concat!(env!("OUT_DIR"), "/files.rs"));
}

thread_local! {
    /// The message of the last panic (a bug: the estimate traps), for [`last_panic`].
    static PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The message of the panic that stopped the last call, if one did. A panic aborts (traps) in
/// WebAssembly; the page reads this message, shows it and starts a fresh instance.
#[wasm_bindgen]
pub fn last_panic() -> Option<String> {
    PANIC.with(|p| p.borrow().clone())
}

/// Hands the embedded files to the library's input layer and installs the panic hook, once.
fn provide_embedded() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    DONE.with(|d| {
        if !d.replace(true) {
            std::panic::set_hook(Box::new(|info| {
                PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            }));
            for (path, text) in files::CALIBRATION.iter().chain(files::MEASURED) {
                vramcal::input::provide(Path::new(path), text.as_bytes().to_vec());
            }
        }
    });
}

/// What the form offers, as JSON: the model presets (name, Hub id, parameters), the GPUs
/// (name, memory in bytes), the closed vocabularies of methods, precision recipes, optimizers
/// (HF `optim` names), LoRA targets and profiles, the embedded calibration tables (path,
/// profile, device) and measured files (paths), and vramcal's version.
#[wasm_bindgen]
pub fn catalog() -> String {
    use vramcal::spec::{Method, Optimizer, Precision, Profile, Target};
    let calibrations: Vec<serde_json::Value> = files::CALIBRATION
        .iter()
        .map(|(path, text)| {
            let mut r = csv::Reader::from_reader(text.as_bytes());
            let first = r.records().next().and_then(|x| x.ok());
            let field = |i: usize| first.as_ref().and_then(|f| f.get(i)).unwrap_or("");
            serde_json::json!({"path": path, "profile": field(0), "device": field(1)})
        })
        .collect();
    serde_json::json!({
        "version": vramcal::VERSION,
        "presets": vramcal::config::presets().iter().map(|p| serde_json::json!({
            "name": p.name,
            "hf_id": p.hf_id,
            "params": p.config.param_count(),
        })).collect::<Vec<_>>(),
        "gpus": vramcal::throughput::GPUS.iter().map(|g| serde_json::json!({
            "name": g.name,
            "memory_bytes": g.memory_bytes,
        })).collect::<Vec<_>>(),
        "methods": Method::ALL.iter().map(|m| m.label()).collect::<Vec<_>>(),
        "precisions": Precision::ALL.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "optimizers": Optimizer::ALL.iter().map(|o| o.name()).collect::<Vec<_>>(),
        "targets": Target::ALL.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "profiles": Profile::ALL.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "calibrations": calibrations,
        "measured": files::MEASURED.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
    })
    .to_string()
}

/// Gives the estimator a `config.json` the user pasted or chose, under `path`
/// (`pasted/config.json`), for `--model path`.
#[wasm_bindgen]
pub fn provide_config(path: &str, text: &str) {
    vramcal::input::provide(Path::new(path), text.as_bytes().to_vec());
}

/// Runs `vramcal estimate <args> --json`. Answers JSON: `{"json": TEXT}` with the command's
/// output, or `{"error": LINE, "option": "--seq" | null}` with its one-line error and the
/// option at fault where there is one.
#[wasm_bindgen]
pub fn estimate(args: Vec<String>) -> String {
    provide_embedded();
    match vramcal::commands::estimate::json_for_options(&args) {
        Ok(json) => serde_json::json!({ "json": json }),
        Err(e) => serde_json::json!({ "error": e.message, "option": e.option }),
    }
    .to_string()
}
