//! Parsing and printing sizes and durations.

use std::time::Duration;

/// Parses a byte count: a decimal number with an optional binary suffix `k`, `m`, `g` or `t`
/// (any case, optionally followed by `b` or `ib`), so `4k`, `4K`, `4KiB` and `4096` are equal.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, suffix) = s.split_at(digits);
    if number.is_empty() {
        return Err(format!("{text:?} is not a size: give bytes, or a number with k, m, g or t"));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown suffix {suffix:?}: use k, m, g or t (powers of 1024)"
            ))
        }
    };
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is too large"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// Like [`parse_size`], but zero is refused.
pub fn parse_nonzero_size(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err(format!("{text:?}: the size must be more than zero")),
        n => Ok(n),
    }
}

/// The longest duration accepted (a day), so nothing overflows when added to a clock.
const MAX_SECS: f64 = 86_400.0;

/// Parses seconds, possibly fractional (`5`, `0.5`, `2.25`); zero is allowed.
pub fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds (like 5 or 0.5)"))?;
    if !secs.is_finite() || !(0.0..=MAX_SECS).contains(&secs) {
        return Err(format!("{text:?}: give between 0 and {MAX_SECS} seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// Like [`parse_secs`], but zero is refused.
pub fn parse_positive_secs(text: &str) -> Result<Duration, String> {
    let d = parse_secs(text)?;
    if d.is_zero() {
        return Err(format!("{text:?}: the duration must be more than zero"));
    }
    Ok(d)
}

/// A byte count for people: `512 B`, `4 KiB`, `64.0 MiB`, `1.50 GiB`. Exact multiples of a
/// unit print without decimals.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if n.is_multiple_of(scale) {
        format!("{} {}", n / scale, UNITS[unit])
    } else {
        format!("{:.2} {}", n as f64 / scale as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4kb"), Ok(4096));
        assert_eq!(parse_size(" 1m "), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("7b"), Ok(7));
        for bad in ["", "k", "-4k", "4x", "4 k", "1.5m", "4kk", "0x10"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16777216t").unwrap_err().contains("too large"));
        assert!(parse_nonzero_size("0").is_err());
        assert_eq!(parse_nonzero_size("1"), Ok(1));
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("0"), Ok(Duration::ZERO));
        for bad in ["", "-1", "NaN", "inf", "1e9", "5s", "x"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        assert!(parse_positive_secs("0").is_err());
        assert_eq!(parse_positive_secs("2.25"), Ok(Duration::from_millis(2250)));
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
        assert_eq!(human_bytes(1 << 50), "1024 TiB");
    }
}
