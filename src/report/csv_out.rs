//! Appending rows to a results CSV: one whole row per write, flushed and synced, after checking
//! that an existing file has the same header.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::report::Row;

fn csv_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Csv {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Checks that `path` can take rows: it is absent or empty, or its header equals
/// [`Row::header`] or is a file of an earlier vramcal whose columns are all still there (which
/// [`append_row`] rewrites with today's header before its first row; nothing is rewritten
/// here). Creates missing parent folders.
///
/// # Errors
/// [`Error::Csv`] for another header or an unreadable file, [`Error::Io`] if the folder
/// cannot be created or the file cannot be opened for appending.
pub fn check_writable(path: &Path) -> Result<()> {
    writable(path, false)
}

/// [`check_writable`]; with `upgrade`, a file of an earlier vramcal is rewritten with today's
/// header (only when a row is about to be appended: a command refused later leaves it as it
/// was).
fn writable(path: &Path, upgrade_it: bool) -> Result<()> {
    if let Ok(meta) = std::fs::metadata(path) {
        let t = meta.file_type();
        #[cfg(unix)]
        let special = {
            use std::os::unix::fs::FileTypeExt;
            t.is_fifo() || t.is_socket()
        };
        #[cfg(not(unix))]
        let special = false;
        if special || t.is_dir() {
            return Err(csv_err(
                path,
                "is a folder, FIFO or socket, not a results file: choose another --out",
            ));
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    if path.exists()
        && std::fs::metadata(path)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
    {
        let bytes = crate::input::read_capped(path)?;
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(bytes.as_slice());
        let first = rdr
            .records()
            .next()
            .transpose()
            .map_err(|e| csv_err(path, format!("cannot read the header: {e}")))?
            .unwrap_or_default();
        let have: Vec<String> = first.iter().map(String::from).collect();
        let now = Row::header();
        if have != now {
            let earlier_version =
                have.iter().all(|c| now.contains(c)) && have.iter().any(|c| c == "tool_version");
            if !earlier_version {
                return Err(csv_err(
                    path,
                    "exists with another header (not a vramcal results file of this version); choose another --out",
                ));
            }
            if upgrade_it {
                upgrade(path)?;
            } else {
                // Refused now, not after a point was measured for it.
                check_rows(path, &bytes)?;
            }
        } else {
            check_rows(path, &bytes)?;
        }
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Rewrites a results file of an earlier vramcal, whose columns are a subset of today's, with
/// today's header (columns added since then are empty in its rows), through a temporary file
/// renamed over it, so rows can be appended. Its rows keep every value they had.
fn upgrade(path: &Path) -> Result<()> {
    repair_last_line(path)?;
    let rows = read_rows(path)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".upgrade");
    let tmp = PathBuf::from(tmp);
    let mut w = csv::Writer::from_path(&tmp).map_err(|e| csv_err(&tmp, e.to_string()))?;
    for r in &rows {
        w.serialize(r).map_err(|e| csv_err(&tmp, e.to_string()))?;
    }
    if rows.is_empty() {
        w.write_record(Row::header())
            .map_err(|e| csv_err(&tmp, e.to_string()))?;
    }
    let f = w.into_inner().map_err(|e| csv_err(&tmp, e.to_string()))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Appends `row` to `path` (writing the header first if the file is new or empty), in one
/// write, then flushes and syncs, so a crash never leaves half a row.
///
/// # Errors
/// As [`check_writable`]; [`Error::Io`] if the write fails (the file keeps its earlier rows).
pub fn append_row(path: &Path, row: &Row) -> Result<()> {
    writable(path, true)?;
    repair_last_line(path)?;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let new = meta.len() == 0;
    let mut w = csv::WriterBuilder::new()
        .has_headers(new)
        .from_writer(vec![]);
    w.serialize(row).map_err(|e| csv_err(path, e.to_string()))?;
    let bytes = w.into_inner().map_err(|e| csv_err(path, e.to_string()))?;
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    f.flush().map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        // (Devices such as /dev/null cannot be synced.)
        f.sync_data().map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Every complete row of a results file (all records but a last one cut short, which
/// [`repair_last_line`] deals with) must parse: a row damaged earlier (cut inside a quoted field,
/// say) would swallow the rows after it, so nothing is appended to such a file.
fn check_rows(path: &Path, bytes: &[u8]) -> Result<()> {
    let (last_start, last_complete) = last_record(bytes);
    if !last_complete && hides_rows(bytes, last_start) {
        return Err(csv_err(
            path,
            "a row is cut inside a quoted field and rows follow it: the file is damaged before its last line; nothing was appended. Repair or move it, or choose another --out",
        ));
    }
    let complete = if last_complete {
        bytes
    } else {
        &bytes[..last_start]
    };
    let mut rdr = csv::Reader::from_reader(complete);
    let header = rdr
        .headers()
        .map_err(|e| csv_err(path, e.to_string()))?
        .clone();
    for (i, r) in rdr.deserialize::<Row>().enumerate() {
        if let Err(e) = r {
            return Err(csv_err(
                path,
                format!(
                    "row {} does not parse ({}): the file is damaged before its last line; nothing was appended. Repair or move it, or choose another --out",
                    i + 2,
                    cell_error(&e, &header)
                ),
            ));
        }
    }
    Ok(())
}

/// Reads every row of a results CSV.
///
/// # Errors
/// [`Error::Csv`] if the file is unreadable or a row does not parse.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let mut rdr = crate::input::csv_reader(path)?;
    let header = rdr
        .headers()
        .map_err(|e| csv_err(path, e.to_string()))?
        .clone();
    rdr.deserialize()
        .enumerate()
        .map(|(i, r)| {
            let r: Row = r.map_err(|e| {
                csv_err(
                    path,
                    format!("row {} does not parse: {}", i + 2, cell_error(&e, &header)),
                )
            })?;
            check_vocabulary(&r)
                .map_err(|reason| csv_err(path, format!("row {}: {reason}", i + 2)))?;
            Ok(r)
        })
        .collect()
}

/// Refuses a row whose `device`, `memory_counter` or `peak_phase` is not one vramcal writes:
/// `cpu` or `cuda:N …`; the probes' counters ([`crate::measure::probe::HOST_COUNTER`] and
/// its absolute form, `cuda-mempool`, `cuda-device …`, or empty in rows older than the
/// column); a phase of the step protocol
/// (`load`, `optimizer_init`, `stepK_forward`, `stepK_backward`, `stepK_optimizer_step`,
/// `save`) or empty when no phase finished.
fn check_vocabulary(r: &Row) -> std::result::Result<(), String> {
    use crate::measure::probe::{HOST_COUNTER, HOST_COUNTER_ABSOLUTE};
    if !(r.device == "cpu" || r.device.starts_with("cuda:")) {
        return Err(format!("device {:?}: expected cpu or cuda:N", r.device));
    }
    let counter = &r.memory_counter;
    // Empty in rows written before the column existed.
    if !(counter.is_empty()
        || counter == HOST_COUNTER
        || counter == HOST_COUNTER_ABSOLUTE
        || counter == "cuda-mempool"
        || counter.starts_with("cuda-device"))
    {
        return Err(format!(
            "memory_counter {counter:?}: not a counter vramcal records"
        ));
    }
    let phase = r.peak_phase.as_str();
    let step_phase = phase
        .strip_prefix("step")
        .and_then(|rest| rest.split_once('_'))
        .is_some_and(|(k, what)| {
            !k.is_empty()
                && k.bytes().all(|c| c.is_ascii_digit())
                && matches!(what, "forward" | "backward" | "optimizer_step")
        });
    if !(phase.is_empty() || matches!(phase, "load" | "optimizer_init" | "save") || step_phase) {
        return Err(format!("peak_phase {phase:?}: not a phase of the step"));
    }
    Ok(())
}

/// Reads the rows of a results CSV for `--resume`. A last line without its newline (a write cut
/// short) is removed from the file first, so the resumed sweep measures that point again.
/// An absent or empty file has no rows.
///
/// # Errors
/// [`Error::Csv`] if a complete row does not parse; [`Error::Io`].
pub fn read_rows_for_resume(path: &Path) -> Result<Vec<Row>> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(vec![]);
    };
    if meta.len() == 0 || !meta.is_file() {
        return Ok(vec![]);
    }
    repair_last_line(path)?;
    read_rows(path)
}

/// A last row cut short is a write that a crash or kill interrupted (vramcal writes whole rows
/// ending in a newline) or a hand edit. The last CSV record (which may span lines inside a
/// quoted field) is complete when it has the header's number of fields and closes every quote:
/// then it is kept and given its newline if it lacks one; otherwise it is removed from its first
/// byte on (the point is measured again on `--resume`), so a quote it left open cannot swallow
/// the rows appended next. Nothing complete is lost.
///
/// # Errors
/// [`Error::Io`]; [`Error::Csv`] if the file cannot be read (see [`crate::input::read_capped`]).
pub fn repair_last_line(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.len() == 0 || !meta.is_file() {
        return Ok(());
    }
    let bytes = crate::input::read_capped(path)?;
    let (last_start, complete) = last_record(&bytes);
    if complete && bytes.ends_with(b"\n") {
        return Ok(());
    }
    if !complete && hides_rows(&bytes, last_start) {
        return Err(csv_err(
            path,
            "a row is cut inside a quoted field and rows follow it: the file is damaged before its last line; nothing was changed. Repair or move it",
        ));
    }
    let mut f = OpenOptions::new()
        .write(true)
        .append(complete)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if complete {
        f.write_all(b"\n").map_err(|e| Error::io(path, e))?;
    } else {
        f.set_len(last_start as u64)
            .map_err(|e| Error::io(path, e))?;
    }
    f.sync_data().map_err(|e| Error::io(path, e))
}

/// Where the last CSV record of `bytes` starts (a record may span lines inside a quoted field)
/// and whether it is complete: the first record's (the header's) number of fields and every
/// quote closed (quotes inside fields are doubled, so an open one leaves an odd count).
pub(crate) fn last_record(bytes: &[u8]) -> (usize, bool) {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut rec = csv::ByteRecord::new();
    let (mut width, mut last_start, mut last_fields) = (None, 0usize, 0usize);
    loop {
        let start = rdr.position().byte() as usize;
        match rdr.read_byte_record(&mut rec) {
            Ok(true) => {
                width.get_or_insert(rec.len());
                last_start = start;
                last_fields = rec.len();
            }
            Ok(false) => break,
            Err(_) => {
                last_start = start;
                last_fields = 0;
                break;
            }
        }
    }
    let quotes_closed = bytes[last_start..].iter().filter(|&&b| b == b'"').count() % 2 == 0;
    (last_start, Some(last_fields) == width && quotes_closed)
}

/// Whether an incomplete last record hides whole rows: read from its second line on, the text
/// holds a record of the header's width. A write cut short is a prefix of one row (whose later
/// lines, inside a quoted field, are fragments of a message); a row cut inside a quoted field
/// *followed by rows* opens a quote that swallows them, and removing the record would lose them.
fn hides_rows(bytes: &[u8], last_start: usize) -> bool {
    let tail = &bytes[last_start..];
    let Some(nl) = tail.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let width = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(bytes)
        .byte_records()
        .next()
        .and_then(|r| r.ok())
        .map_or(0, |r| r.len());
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(&tail[nl + 1..])
        .byte_records()
        .any(|r| r.is_ok_and(|r| r.len() == width))
}

/// Takes the advisory lock `<out>.lock` (for a whole sweep, or a measurement until its row is
/// written) (released by the kernel if the
/// process dies, so a killed sweep never leaves a stale lock).
///
/// # Errors
/// When another process holds it.
pub fn lock(out: &Path) -> anyhow::Result<LockGuard> {
    let path = PathBuf::from(format!("{}.lock", out.display()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("creating the lock file {}: {e}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(LockGuard { _file: f, path }),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another vramcal sweep or measurement is writing {} (it holds {}); wait for it or choose another --out",
            out.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::Error::from(e).context(format!("locking {}", path.display()))),
    }
}

/// Holds the lock; removes the lock file when dropped.
pub struct LockGuard {
    _file: std::fs::File,
    path: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What is wrong with a row that does not deserialize: for a cell, its column's name and why
/// (`column peak_bytes: invalid digit found in string`); otherwise the reader's message.
fn cell_error(e: &csv::Error, header: &csv::StringRecord) -> String {
    match e.kind() {
        csv::ErrorKind::Deserialize { err, .. } => match err.field() {
            Some(f) => format!(
                "column {}: {}",
                header.get(f as usize).unwrap_or("?"),
                err.kind()
            ),
            None => err.kind().to_string(),
        },
        _ => e.to_string(),
    }
}
