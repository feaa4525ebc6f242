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
            eprintln!("error: {}", one_line(&vramcal::cli::error_line(&e)));
            // A setup parser's refusal exits as the commands' own refusals do.
            if vramcal::cli::setup_error(&e).is_some() {
                return ExitCode::FAILURE;
            }
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match vramcal::commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// `text` on one line, whatever a refused value held (a line break in `--time`, say): control
/// characters escaped (`\n`).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
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

/// Set by the parent for a measuring child (`commands::setup::child::run_point`): [`getrandom`] then
/// fills with fixed bytes.
const FIXED_KEYS_ENV: &str = "VRAMCAL_FIXED_HASH_KEYS";

/// `getrandom(2)` for this binary (glibc's symbol, which std imports weakly for the keys of
/// every `HashMap`). In a measuring child it returns fixed bytes, so that the hash tables of the
/// step (candle's `GradStore` and graph walk, candle-core 0.11.1 `src/backprop.rs`) place their
/// entries, leave tombstones and resize identically in every run: with random keys the peak of
/// one point moved by a table's growth (544 B on `tiny`, tens of KB on real models) from run to
/// run. Nothing in a measurement needs unpredictable bytes (weights and batches come from
/// seeded generators; the tables hold the program's own tensors, so fixed keys open no
/// hash-flooding risk). Every other process gets the kernel's random bytes.
///
/// # Safety
/// `buf` must be valid for `len` bytes of writes, as for the C function.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[no_mangle]
pub unsafe extern "C" fn getrandom(
    buf: *mut std::ffi::c_void,
    len: usize,
    flags: std::ffi::c_uint,
) -> isize {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: not yet known, 1: fixed, 2: the kernel's.
    static MODE: AtomicU8 = AtomicU8::new(0);
    let mut mode = MODE.load(Ordering::Relaxed);
    if mode == 0 {
        mode = if std::env::var_os(FIXED_KEYS_ENV).is_some() {
            1
        } else {
            2
        };
        MODE.store(mode, Ordering::Relaxed);
    }
    if mode == 1 {
        // SAFETY: the caller guarantees `buf` is writable for `len` bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        for (i, b) in out.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(0x5d);
        }
        return len as isize;
    }
    // SAFETY: forwards the caller's arguments to the system call unchanged.
    unsafe { libc::syscall(libc::SYS_getrandom, buf, len, flags) as isize }
}
