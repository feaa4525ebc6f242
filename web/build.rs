//! Embeds the committed calibration tables and measured results (`../results/`) in the page's
//! WebAssembly: `$OUT_DIR/files.rs` lists each file under the path the command line names it
//! by (relative to the repository root), so that the page's arguments are `vramcal estimate`'s.
//! Measured files are those with vramcal's results header (`tool_version,…`) or the
//! reference-row header (`id,source,…`); `vramcal check`'s outputs and benchmarks are left out.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn csvs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    v.sort();
    v
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let results = root.join("results");
    println!("cargo:rerun-if-changed={}", results.display());
    let mut calibration = Vec::new();
    let mut measured = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&results)
        .expect("results/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        println!("cargo:rerun-if-changed={}", d.display());
        for f in csvs(&d) {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let rel = f
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let abs = f.canonicalize().unwrap();
            if d.ends_with("calibration") {
                calibration.push((rel, abs));
            } else if text.starts_with("tool_version,") || text.starts_with("id,source,") {
                measured.push((rel, abs));
            }
        }
    }
    let list = |v: &[(String, PathBuf)]| {
        let mut s = String::from("&[\n");
        for (rel, abs) in v {
            writeln!(
                s,
                "    ({rel:?}, include_str!({:?})),",
                abs.display().to_string()
            )
            .unwrap();
        }
        s + "]"
    };
    let code = format!(
        "/// The calibration tables, `(path, text)`.\npub const CALIBRATION: &[(&str, &str)] = {};\n/// The measured results and reference rows, `(path, text)`.\npub const MEASURED: &[(&str, &str)] = {};\n",
        list(&calibration),
        list(&measured)
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("files.rs");
    std::fs::write(out, code).unwrap();
}
