//! Reading the user's text inputs (results CSVs, calibration tables, reference rows,
//! `config.json`) with a size limit, so that an endless or device file (`/dev/zero`, a FIFO that
//! never closes its end of a huge stream) is refused with an error instead of exhausting memory.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest text input vramcal reads (bytes): 64 MiB, some 100,000 results rows. The committed
/// results files are under 1 MiB; a `config.json` is a few KB.
pub const MAX_INPUT_BYTES: u64 = 64 << 20;

/// Reads `path` whole, refusing folders and anything longer than [`MAX_INPUT_BYTES`] (read up
/// to one byte past the limit, so a device or pipe that never ends costs at most that much).
///
/// # Errors
/// [`Error::Io`] if it cannot be opened or read; [`Error::Csv`] (naming the file) if it is a
/// folder or too long.
pub fn read_capped(path: &Path) -> Result<Vec<u8>> {
    let too = |reason: String| Error::Csv {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(too("is a folder, not a file".into()));
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
