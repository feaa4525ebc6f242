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
/// [`Row::header`] (a file of an earlier vramcal, whose columns are all still there, is first
/// rewritten with today's header). Creates missing parent folders.
///
/// # Errors
/// [`Error::Csv`] for another header or an unreadable file, [`Error::Io`] if the folder
/// cannot be created or the file cannot be opened for appending.
pub fn check_writable(path: &Path) -> Result<()> {
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
            upgrade(path)?;
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
    check_writable(path)?;
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

/// Every complete row of a results file (all lines but a last one without its newline, which
/// [`repair_last_line`] deals with) must parse: a row damaged earlier (cut inside a quoted field,
/// say) would swallow the rows after it, so nothing is appended to such a file.
fn check_rows(path: &Path, bytes: &[u8]) -> Result<()> {
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(i) => &bytes[..=i],
        None => return Ok(()),
    };
    let mut rdr = csv::Reader::from_reader(complete);
    for (i, r) in rdr.deserialize::<Row>().enumerate() {
        if let Err(e) = r {
            return Err(csv_err(
                path,
                format!(
                    "row {} does not parse ({e}): the file is damaged before its last line; nothing was appended. Repair or move it, or choose another --out",
                    i + 2
                ),
            ));
        }
    }
    Ok(())
}

fn ends_with_newline(path: &Path) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::End(-1)).map_err(|e| Error::io(path, e))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last).map_err(|e| Error::io(path, e))?;
    Ok(last[0] == b'\n')
}

/// Reads every row of a results CSV.
///
/// # Errors
/// [`Error::Csv`] if the file is unreadable or a row does not parse.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let mut rdr = crate::input::csv_reader(path)?;
    rdr.deserialize()
        .map(|r| r.map_err(|e| csv_err(path, format!("bad row: {e}"))))
        .collect()
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

/// A last line without its newline is a write cut short (vramcal writes whole rows ending in a
/// newline) or a hand edit: with fewer fields than the header it is removed (the point is
/// measured again on `--resume`), with as many it is kept and given its newline. Nothing
/// complete is lost.
///
/// # Errors
/// [`Error::Io`].
pub fn repair_last_line(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.len() == 0 || !meta.is_file() || ends_with_newline(path)? {
        return Ok(());
    }
    let bytes = crate::input::read_capped(path)?;
    let start = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let fields = |line: &[u8]| -> usize {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(line)
            .records()
            .next()
            .and_then(|r| r.ok())
            .map_or(0, |r| r.len())
    };
    let header_end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let complete = start > 0 && fields(&bytes[start..]) == fields(&bytes[..header_end]);
    let mut f = OpenOptions::new()
        .write(true)
        .append(complete)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if complete {
        f.write_all(b"\n").map_err(|e| Error::io(path, e))?;
    } else {
        f.set_len(start as u64).map_err(|e| Error::io(path, e))?;
    }
    f.sync_data().map_err(|e| Error::io(path, e))
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
