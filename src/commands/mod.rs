//! The commands behind the CLI verbs, each parse → compute → render: the arguments are checked
//! and turned into typed values ([`setup`] for what every verb that names a training setup
//! shares), the work is done by the library ([`crate::estimate`], [`crate::measure`],
//! [`crate::calibrate`]), and the result is rendered by [`crate::export`]. No command imports
//! another: what they share is in [`setup`] (with both ends of the child protocol,
//! [`setup::child`]). They return `anyhow` errors with
//! context; `main` prints one line and exits non-zero.

pub mod calibrate;
pub mod check;
pub mod estimate;
pub mod gpus;
pub mod max;
pub mod measure;
pub mod merge;
pub mod models;
pub mod plan;
pub mod report;
pub mod setup;
pub mod slurm;
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
        Command::Merge(a) => merge::run(&a),
        Command::Slurm(a) => slurm::run(&a),
        Command::Max(a) => max::run(&a),
        Command::Plan(a) => plan::run(&a),
        Command::Estimate(a) => estimate::run(&a),
        Command::Calibrate(a) => calibrate::run(&a),
        Command::Check(a) => check::run(&a),
        Command::Report(a) => report::run(&a),
    }
}

/// The command line of this process, quoted where needed, for recording in results.
pub fn command_line() -> String {
    // `args_os`: an argument that is not UTF-8 (a file name) is written with U+FFFD, where
    // `args` would panic.
    std::env::args_os()
        .enumerate()
        .map(|(i, a)| {
            let a = if i == 0 {
                "vramcal".to_string()
            } else {
                a.to_string_lossy().into_owned()
            };
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
