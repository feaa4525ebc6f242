//! Both ends of the child protocol: running one measured point in a child process of this
//! binary (a fresh allocator per point; an abort, a crash or an out-of-memory kill ends only the
//! child), and the child's body. The child streams its progress as JSON lines ([`ChildLine`]),
//! so a child that dies still yields a row with every phase it finished.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use std::process::ExitCode;

use crate::cli::MeasureArgs;
use crate::measure::device::{open_device, probe_for};
use crate::measure::{
    failure_hint, is_device_oom, measure_with, Event, Measurement, MemoryProbe, Options, Setup,
};
use crate::report::{Row, RowContext, Status};
use crate::size::human;
use crate::spec::DeviceChoice;
use crate::spec::TrainSpec;

/// One line a child writes on stdout.
#[derive(Debug, Serialize, Deserialize)]
pub enum ChildLine {
    /// A phase started.
    Started(String),
    /// A phase ended: the measurement so far.
    Progress(Box<Measurement>),
    /// The finished row.
    Row(Box<Row>),
}

/// Writes one line for the parent; a parent that went away ends the child.
///
/// # Errors
/// JSON serialization errors.
pub fn send(line: &ChildLine) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string(line)? + "\n";
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        // Nobody reads our result any more (the parent was killed): stop measuring.
        std::process::exit(3);
    }
    Ok(())
}

/// What a point produced.
pub struct PointResult {
    /// The row (from the child, or built from its last progress if it died).
    pub row: Row,
    /// The measurement as far as it got.
    pub measurement: Measurement,
}

/// Runs `exe measure --child <args>` and collects the point, its `point_seconds` the child's
/// wall time from start to exit. `on_started` sees each phase as it starts.
///
/// # Errors
/// Only when the child cannot be started; a child that fails gives a row with status `oom`
/// (an allocation failure: the budget or the machine) or `error`.
pub fn run_point(
    exe: &Path,
    args: &[OsString],
    ctx: &RowContext,
    spec: &TrainSpec,
    mut on_started: impl FnMut(&str),
) -> anyhow::Result<PointResult> {
    let t0 = std::time::Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .arg("--child")
        .env("RUST_BACKTRACE", "0")
        // Fixed hash-table keys in the child, so its allocations repeat exactly (see
        // `getrandom` in src/main.rs).
        .env("VRAMCAL_FIXED_HASH_KEYS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let stdout = child.stdout.take().expect("piped");
    let mut last = Measurement::default();
    let mut started = String::new();
    let mut row = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<ChildLine>(&line) {
            Ok(ChildLine::Started(p)) => {
                on_started(&p);
                started = p;
            }
            Ok(ChildLine::Progress(m)) => last = *m,
            Ok(ChildLine::Row(r)) => row = Some(*r),
            Err(_) => {}
        }
    }
    let status = child.wait().context("waiting for the measuring child")?;
    let point_seconds = Some(t0.elapsed().as_secs_f64());
    let stderr = err_thread.join().unwrap_or_default();
    if let Some(row) = row {
        return Ok(PointResult {
            row: Row {
                point_seconds,
                ..row
            },
            measurement: last,
        });
    }
    let (st, message) = failure(&status, &stderr, &started, ctx.budget_bytes);
    Ok(PointResult {
        row: Row {
            point_seconds,
            ..Row::new(ctx, spec, &last, st, &message)
        },
        measurement: last,
    })
}

/// Why a child that wrote no row failed: `oom` (Rust's allocation-failure report, or SIGKILL,
/// the kernel's OOM killer) or `error`, and a message naming the phase `started` and the
/// reason from its `stderr`.
fn failure(
    status: &std::process::ExitStatus,
    stderr: &str,
    started: &str,
    budget: Option<u64>,
) -> (Status, String) {
    // Rust's allocation-failure line when there is one (what follows it, such as a note that
    // the backtrace was skipped, says nothing about the point); else the last line.
    let reason = stderr
        .lines()
        .rev()
        .find(|l| l.contains("memory allocation of"))
        .or_else(|| {
            stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty() && !l.starts_with("note:"))
        })
        .unwrap_or("")
        .trim()
        .to_string();
    let signal = signal_name(status);
    let oom = stderr.contains("memory allocation of") || signal == "SIGKILL";
    let during = if started.is_empty() {
        String::new()
    } else {
        format!(" during {started}")
    };
    let message = if oom {
        match budget {
            Some(b) if stderr.contains("memory allocation of") => {
                format!(
                    "out of memory{during}: needed more than --budget {b} bytes ({}) ({reason})",
                    human(b)
                )
            }
            _ if reason.is_empty() && signal == "SIGKILL" => format!(
                "out of memory{during}: killed by SIGKILL, the kernel's OOM killer (the machine ran out of memory)"
            ),
            _ => format!("out of memory{during}: {reason}"),
        }
    } else {
        match status.code() {
            Some(c) => format!("measuring process failed{during} (exit code {c}): {reason}"),
            None => format!("measuring process killed by {signal}{during}: {reason}"),
        }
    };
    (if oom { Status::Oom } else { Status::Error }, message)
}

fn signal_name(status: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    let signal = {
        use std::os::unix::process::ExitStatusExt;
        status.signal()
    };
    // Signals are a Unix notion (the browser build compiles this but never runs a child).
    #[cfg(not(unix))]
    let signal: Option<i32> = {
        let _ = status;
        None
    };
    match signal {
        Some(6) => "SIGABRT".into(),
        Some(9) => "SIGKILL".into(),
        Some(11) => "SIGSEGV".into(),
        Some(n) => format!("signal {n}"),
        None => "no signal".into(),
    }
}

/// The measuring child's side of the protocol (`vramcal measure --child`): opens the checked
/// `device` (only the child holds a CUDA context), applies `budget` (the counting allocator's
/// cap on the CPU; on a GPU a blocker allocation leaves only the budget free, held until the
/// child exits), runs the step and streams [`ChildLine`]s. `setup.device` is replaced by the
/// opened device.
///
/// # Errors
/// The device cannot be opened or probed; a failed step is reported in the row instead.
pub fn child(
    a: &MeasureArgs,
    ctx: &RowContext,
    mut setup: Setup,
    device: DeviceChoice,
    budget: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let device = open_device(device)?;
    #[cfg(feature = "cuda")]
    let blocker = match (&device, budget) {
        (candle_core::Device::Cuda(d), Some(b)) => {
            Some(crate::measure::cuda::Blocker::leave_free(d, b)?)
        }
        _ => None,
    };
    #[cfg(feature = "cuda")]
    let probe = probe_for(&device, blocker.as_ref().map_or(0, |b| b.bytes), budget)?;
    #[cfg(not(feature = "cuda"))]
    let probe = probe_for(&device, 0, budget)?;
    setup.device = device;
    run_child(a, ctx, setup, probe.as_ref())
}

/// The measuring child: runs the protocol in this process under the probe's budget, streaming its
/// progress and then the row as JSON lines on stdout.
fn run_child(
    a: &MeasureArgs,
    ctx: &RowContext,
    setup: Setup,
    probe: &dyn MemoryProbe,
) -> anyhow::Result<ExitCode> {
    die_with_parent();
    let mut m = Measurement::default();
    let mut on_event = |e: Event<'_>| {
        let line = match e {
            Event::Started(p) => ChildLine::Started(p.to_string()),
            Event::Finished(m) => ChildLine::Progress(Box::new(m.clone())),
        };
        let _ = send(&line);
    };
    let opts = Options {
        save_dir: a.model.save_dir.as_deref(),
        timed_steps: a.model.timed_steps,
        on_event: Some(&mut on_event),
    };
    let result = measure_with(&setup, probe, &mut m, opts);
    crate::measure::alloc::set_limit(None);
    let (status, message) = match &result {
        Ok(()) => (Status::Ok, String::new()),
        Err(e) => {
            let msg = e.to_string();
            let status = if is_device_oom(&msg) {
                Status::Oom
            } else {
                Status::Error
            };
            match failure_hint(&msg) {
                Some(h) => (status, format!("{msg} ({h})")),
                None => (status, msg),
            }
        }
    };
    let row = Row::new(ctx, &setup.spec, &m, status, &message);
    // The complete measurement (step times and losses come after the last phase event).
    send(&ChildLine::Progress(Box::new(m)))?;
    send(&ChildLine::Row(Box::new(row)))?;
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Makes the kernel kill this measuring child when its parent dies (`kill -9` of a sweep),
/// so it never keeps a large point running beside a resumed sweep (Linux `PR_SET_PDEATHSIG`).
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_PDEATHSIG only sets a signal number for this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        // The parent may already be gone (re-parented to init or a subreaper).
        if std::os::unix::process::parent_id() == 1 {
            std::process::exit(3);
        }
    }
}
