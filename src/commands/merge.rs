//! `vramcal merge`: joins result CSVs (the parts of a sharded sweep, `sweep --shard I/N`, e.g.
//! one per Slurm array task) into one file, under today's header: every part's columns must be
//! among today's (a part of an earlier vramcal joins with the columns added since empty), and
//! every part must end in a whole row; rows are kept in the order the parts list them; two rows of one configuration
//! ([`super::sweep::config_key`], what `--resume` matches) are one row when identical (so
//! merging again, or merging the result with its parts, changes nothing) and otherwise refused,
//! unless `--keep newest` keeps the later `utc_time`. The output is written whole, through a
//! temporary file renamed into place: on any error nothing is written.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use crate::cli::MergeArgs;
use crate::error::Error;

/// Runs `vramcal merge`.
///
/// # Errors
/// A part that cannot be read, whose header has a column this vramcal does not write, whose last row is
/// cut, or that holds rows vramcal does not write; conflicting rows of one configuration
/// without `--keep newest`; an unwritable `--out`.
pub fn run(a: &MergeArgs) -> anyhow::Result<ExitCode> {
    // Every part is written under today's header (one of an earlier vramcal remapped to it).
    let header: csv::ByteRecord = crate::report::Row::header().into_iter().collect();
    // (configuration key, record, utc_time, where it came from)
    let mut rows: Vec<(String, csv::ByteRecord, String, String)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut replaced = 0;
    for part in &a.parts {
        let bytes = crate::input::read_capped(part)?;
        if bytes.is_empty() {
            return Err(Error::invalid(
                "merge",
                part.display(),
                "is empty (no header): a sweep task stopped before its first row? rerun it (sbatch --array=I, or sweep --resume)",
            )
            .into());
        }
        let mut rdr = csv::Reader::from_reader(bytes.as_slice());
        let h = rdr.byte_headers()?.clone();
        let has = |c: &str| h.iter().any(|x| x == c.as_bytes());
        if !["tool_version", "model", "peak_bytes", "status"]
            .iter()
            .all(|c| has(c))
        {
            return Err(Error::invalid(
                "merge",
                part.display(),
                "its header is not a vramcal results header (tool_version, model, …, peak_bytes, status)",
            )
            .into());
        }
        // A part of an earlier vramcal (its columns all among today's) joins with today's
        // header, its rows given the columns added since, empty (as appending to it would).
        let unknown: Vec<String> = h
            .iter()
            .filter(|c| !header.iter().any(|t| t == *c))
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        if !unknown.is_empty() {
            return Err(Error::invalid(
                "merge",
                part.display(),
                format!(
                    "its header has columns this vramcal does not write ({}): a file of another tool or of a newer vramcal",
                    unknown.join(", ")
                ),
            )
            .into());
        }
        let remap = (h != header).then(|| h.clone());
        // vramcal ends every row it writes with a newline: without one the row may be cut
        // inside its last field.
        if !crate::report::csv_out::last_record(&bytes).1 || !bytes.ends_with(b"\n") {
            return Err(Error::invalid(
                "merge",
                part.display(),
                "its last row is cut short (a killed write?): resume the sweep that wrote it (--resume repairs it) or remove that row",
            )
            .into());
        }
        let typed = crate::report::csv_out::read_rows(part)?;
        for (i, (rec, row)) in rdr.byte_records().zip(&typed).enumerate() {
            let rec = match &remap {
                Some(from) => to_header(&rec?, from, &header),
                None => rec?,
            };
            let key = super::sweep::config_key(row);
            let from = format!("{} row {}", part.display(), i + 2);
            // A simulated rank no run could make (a rank not below its world size, a world size
            // without a shard): an edited or damaged part, refused.
            crate::calibrate::sharding_from_row(row)
                .map_err(|e| Error::invalid("merge", &from, e.to_string()))?;
            match at.get(&key) {
                None => {
                    at.insert(key.clone(), rows.len());
                    rows.push((key, rec, row.utc_time.clone(), from));
                }
                Some(&j) if rows[j].1 == rec => {}
                Some(&j) => {
                    if a.keep.is_none() {
                        return Err(Error::invalid(
                            "merge",
                            from,
                            format!(
                                "measures the configuration of {} again with other values: keep one (--keep newest keeps the later utc_time)",
                                rows[j].3
                            ),
                        )
                        .into());
                    }
                    // The later part wins a tie (one second's resolution).
                    if row.utc_time >= rows[j].2 {
                        rows[j] = (key, rec, row.utc_time.clone(), from);
                        replaced += 1;
                    }
                }
            }
        }
    }
    let dir = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut w = csv::Writer::from_writer(&mut tmp);
        w.write_byte_record(&header)?;
        for (_, rec, _, _) in &rows {
            w.write_byte_record(rec)?;
        }
        w.flush()?;
    }
    tmp.flush().map_err(|e| Error::io(&a.out, e))?;
    tmp.persist(&a.out)
        .map_err(|e| Error::io(&a.out, e.error))?;
    eprintln!(
        "wrote {} row(s) from {} file(s) to {}{}",
        rows.len(),
        a.parts.len(),
        a.out.display(),
        if replaced > 0 {
            format!(" ({replaced} replaced by newer rows)")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `rec`, a record under header `from`, under header `to`: each of `to`'s columns taken from
/// `from`'s column of that name, empty where `from` has none.
fn to_header(
    rec: &csv::ByteRecord,
    from: &csv::ByteRecord,
    to: &csv::ByteRecord,
) -> csv::ByteRecord {
    to.iter()
        .map(|c| {
            from.iter()
                .position(|f| f == c)
                .and_then(|i| rec.get(i))
                .unwrap_or(b"")
        })
        .collect()
}
