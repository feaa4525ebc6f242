//! The `vramcal` binary: parse the command line, run the command, print errors as one line.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOC: vramcal::measure::CountingAlloc = vramcal::measure::CountingAlloc;

fn main() -> ExitCode {
    let cli = vramcal::cli::Cli::parse();
    match vramcal::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
