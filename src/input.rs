//! Reading the user's text inputs (results CSVs, calibration tables, reference rows,
//! `config.json`) with a size limit, so that an endless or device file (`/dev/zero`, a FIFO that
//! never closes its end of a huge stream) is refused with an error instead of exhausting memory.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest text input vramcal reads (bytes): 64 MiB, some 100,000 results rows. The committed
/// results files are under 1 MiB; a `config.json` is a few KB.
pub const MAX_INPUT_BYTES: u64 = 64 << 20;

/// Reads `path` whole, refusing folders, devices, FIFOs and sockets, and anything longer than
/// [`MAX_INPUT_BYTES`] (read up to one byte past the limit, so a file that grows while read
/// costs at most that much).
///
/// # Errors
/// [`Error::Io`] if it cannot be opened or read; [`Error::Csv`] (naming the file) if it is not
/// a regular file or too long.
pub fn read_capped(path: &Path) -> Result<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    return memory::read(path).ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not provided to the page"),
        )
    });
    #[cfg(not(target_arch = "wasm32"))]
    read_file_capped(path)
}

/// [`read_capped`] from the file system.
#[cfg(not(target_arch = "wasm32"))]
fn read_file_capped(path: &Path) -> Result<Vec<u8>> {
    let too = |reason: String| Error::Csv {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(too("is a folder, not a file".into()));
    }
    if !meta.is_file() {
        // A FIFO would block until a writer comes, a device never ends.
        return Err(too(
            "is not a regular file (a device, FIFO or socket): give a file".into(),
        ));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    f.take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > MAX_INPUT_BYTES {
        return Err(too(format!(
            "longer than {} MiB (an endless or device file?); vramcal reads text inputs up to that size",
            MAX_INPUT_BYTES >> 20
        )));
    }
    Ok(buf)
}

/// Whether `path` names an input file: on disk, or in the browser build among the files
/// given to `provide` (wasm32 only).
pub fn exists(path: &Path) -> bool {
    #[cfg(target_arch = "wasm32")]
    return memory::contains(path);
    #[cfg(not(target_arch = "wasm32"))]
    path.exists()
}

/// The browser build's input files (`web/`): it has no file system, so the page hands over
/// the texts it reads (the embedded calibration tables and results, a pasted `config.json`)
/// under the paths the command line names them by, and [`read_capped`] reads them from here.
#[cfg(target_arch = "wasm32")]
mod memory {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    thread_local! {
        static FILES: RefCell<HashMap<PathBuf, Vec<u8>>> = RefCell::new(HashMap::new());
    }

    pub(super) fn provide(path: &Path, bytes: Vec<u8>) {
        FILES.with(|f| f.borrow_mut().insert(path.to_path_buf(), bytes));
    }

    pub(super) fn contains(path: &Path) -> bool {
        FILES.with(|f| f.borrow().contains_key(path))
    }

    pub(super) fn read(path: &Path) -> Option<Vec<u8>> {
        FILES.with(|f| f.borrow().get(path).cloned())
    }
}

/// Gives the browser build the contents of the input file `path` (replacing any earlier
/// ones): what [`read_capped`] and [`exists`] see there.
#[cfg(target_arch = "wasm32")]
pub fn provide(path: &Path, bytes: Vec<u8>) {
    memory::provide(path, bytes)
}

/// [`read_capped`] as UTF-8 text.
///
/// # Errors
/// As [`read_capped`]; [`Error::Csv`] if the bytes are not UTF-8.
pub fn read_text_capped(path: &Path) -> Result<String> {
    String::from_utf8(read_capped(path)?).map_err(|_| Error::Csv {
        path: path.to_path_buf(),
        reason: "is not UTF-8 text".into(),
    })
}

/// A CSV reader (with headers) over the capped contents of `path`.
///
/// # Errors
/// As [`read_capped`].
pub fn csv_reader(path: &Path) -> Result<csv::Reader<std::io::Cursor<Vec<u8>>>> {
    Ok(csv::Reader::from_reader(std::io::Cursor::new(read_capped(
        path,
    )?)))
}

/// Refuses `out` as the output of a table (`calibrate --out`, `check --out-csv`/`--out-md`)
/// when writing it would destroy measurements: it is one of the `inputs`, or it already holds a
/// vramcal results file or reference rows (recognised by their header). Anything else
/// (absent, empty, a previous table) may be replaced.
///
/// # Errors
/// [`Error::InvalidValue`] naming `flag` and the file.
pub fn refuse_overwriting_measurements(
    flag: &str,
    out: &Path,
    inputs: &[std::path::PathBuf],
) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    if inputs.iter().any(|i| same(i, out)) {
        return Err(Error::invalid(
            flag,
            out.display(),
            "is one of the measured files read: choose another output",
        ));
    }
    let Ok(meta) = std::fs::metadata(out) else {
        return Ok(());
    };
    if !meta.is_file() {
        return Err(Error::invalid(flag, out.display(), "is not a regular file"));
    }
    let mut head = String::new();
    if let Ok(f) = std::fs::File::open(out) {
        let _ =
            std::io::BufRead::read_line(&mut std::io::BufReader::new(f.take(1 << 16)), &mut head);
    }
    let cols: Vec<&str> = head.trim_end().split(',').collect();
    let results = cols.contains(&"tool_version") && cols.contains(&"peak_bytes");
    let reference = cols.contains(&"counter") && cols.contains(&"source");
    if results || reference {
        return Err(Error::invalid(
            flag,
            out.display(),
            "holds measurements (a results file or reference rows): choose another output",
        ));
    }
    Ok(())
}

/// Refuses `out` as the output of `check` (`--out-csv`, `--out-md`) when it is a calibration
/// table (recognised by its header), which `check` would destroy; `calibrate --out` may
/// replace one.
///
/// # Errors
/// [`Error::InvalidValue`] naming `flag` and the file.
pub fn refuse_overwriting_calibration(flag: &str, out: &Path) -> Result<()> {
    let mut head = String::new();
    if let Ok(f) = std::fs::File::open(out) {
        let _ =
            std::io::BufRead::read_line(&mut std::io::BufReader::new(f.take(1 << 16)), &mut head);
    }
    let cols: Vec<&str> = head.trim_end().split(',').collect();
    if cols.contains(&"term") && cols.contains(&"coefficient") {
        return Err(Error::invalid(
            flag,
            out.display(),
            "is a calibration table: choose another output",
        ));
    }
    Ok(())
}
