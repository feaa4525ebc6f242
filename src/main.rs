//! The `vramcal` binary: parse the command line, run the command, print errors as one line.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOC: vramcal::measure::CountingAlloc = vramcal::measure::CountingAlloc;

fn main() -> ExitCode {
    vramcal::measure::alloc::tune_host_allocator();
    let cli = match vramcal::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version and a bare `vramcal`: clap prints them whole.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            // One line, as every other error: clap's first (its tips and usage follow it).
            let text = e.render().to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            match line.strip_prefix("error: ") {
                Some(rest) => eprintln!("error: {rest}"),
                None => eprintln!("error: {line}"),
            }
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match vramcal::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `hypotf` for this binary, so that it does not import glibc 2.35's `hypotf@GLIBC_2.35` (the
/// SVG renderer behind `vramcal report` calls it) and starts on machines with glibc 2.34, such
/// as the lent GPU machines. The squares of f32 values cannot overflow an f64, so the sum of
/// squares in f64 (square root: one instruction, no libm) rounded once to f32 is within an ulp
/// of glibc's result; infinities win over NaN as C99 (F.10.4.3) requires.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[no_mangle]
pub extern "C" fn hypotf(x: f32, y: f32) -> f32 {
    if x.is_infinite() || y.is_infinite() {
        return f32::INFINITY;
    }
    let (x, y) = (f64::from(x), f64::from(y));
    (x * x + y * y).sqrt() as f32
}
