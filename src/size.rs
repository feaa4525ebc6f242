//! Memory sizes: one parser for the command line (`24GiB`, `512MiB`, `80GB`, `1.5GiB`,
//! `4096B`, or plain bytes) and the formatting of bytes for display (GiB = 2^30).

use crate::error::{Error, Result};

/// Parses a size into bytes. Units: `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of 2^10) and `KB`,
/// `MB`, `GB`, `TB` (powers of 10), case-insensitive, optionally separated by a space. A plain
/// number is bytes; below 1 MiB it is refused as a likely missing unit (`--budget 80`).
///
/// # Errors
/// [`Error::InvalidValue`] naming `what` for a malformed, negative, zero or overflowing size.
pub fn parse_size(what: &str, s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let value: f64 = num.parse().map_err(|_| {
        Error::invalid(
            what,
            s,
            "expected a size such as 24GiB, 512MiB, 80GB or plain bytes",
        )
    })?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(Error::invalid(
                what,
                s,
                "unknown unit (expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)",
            ))
        }
    };
    let bytes = value * mult;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(Error::invalid(
            what,
            s,
            "must be a positive size that fits in 64 bits",
        ));
    }
    if unit.is_empty() && bytes < (1u64 << 20) as f64 {
        return Err(Error::invalid(
            what,
            s,
            "a size this small is probably missing its unit (e.g. 80GiB)",
        ));
    }
    if mult == 1.0 && value.fract() != 0.0 {
        return Err(Error::invalid(what, s, "is not a whole number of bytes"));
    }
    // Larger units round to the nearest byte (1.1GiB is not a whole number of bytes either).
    Ok(bytes.round() as u64)
}

/// Formats bytes for reading: MiB (2^20) below 1 GiB, else GiB (2^30), with the unit.
pub fn human(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

/// Formats bytes as GiB (2^30 bytes) with two decimals, for display only.
pub fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn units() {
        assert_eq!(parse_size("x", "24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("x", "512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("x", "80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_size("x", "1.5gib").unwrap(), 3 << 29);
        assert!(parse_size("x", "1.5B").is_err());
        assert_eq!(parse_size("x", "0.5KiB").unwrap(), 512);
        assert_eq!(parse_size("x", "2000000").unwrap(), 2_000_000);
        assert_eq!(parse_size("x", "4096B").unwrap(), 4096);
        for bad in [
            "",
            "GiB",
            "-1GiB",
            "0GiB",
            "80",
            "12 parsecs",
            "1e400GB",
            "NaNGiB",
        ] {
            assert!(parse_size("x", bad).is_err(), "{bad}");
        }
    }
}
