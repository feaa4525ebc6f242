//! The commands behind the CLI verbs. They return `anyhow` errors with context; `main` prints
//! one line and exits non-zero.

pub mod calibrate;
pub mod check;
pub mod estimate;
pub mod gpus;
pub mod max;
pub mod measure;
pub mod models;
pub mod plan;
pub mod point;
pub mod report;
pub mod setup;
pub mod sweep;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
///
/// # Errors
/// Any command's error, with context.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Models { json } => models::run(json),
        Command::Gpus { json } => gpus::run(json),
        Command::Measure(a) => measure::run(&a),
        Command::Sweep(a) => sweep::run(&a),
        Command::Max(a) => max::run(&a),
        Command::Plan(a) => plan::run(&a),
        Command::Estimate(a) => estimate::run(&a),
        Command::Calibrate(a) => calibrate::run(&a),
        Command::Check(a) => check::run(&a),
        Command::Report(a) => report::run(&a),
    }
}

/// Writes `text` to stdout. A closed pipe (`vramcal models | head`) ends the output quietly
/// instead of panicking as `print!` does.
///
/// # Errors
/// Other write errors.
pub fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// The command line of this process, quoted where needed, for recording in results.
pub fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            let a = if i == 0 { "vramcal".to_string() } else { a };
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
