//! Durations as MeshPolicy carries them: Go's `time.ParseDuration` syntax ("10s", "1m30s", "500ms"), the
//! format the apiserver's CEL `duration()` accepts, so admission and the controller agree on every value.
use std::time::Duration;

/// The schema pattern for a duration string (one or more `<number><unit>` terms, no sign).
pub const PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a duration such as \"10s\", \"1m30s\" or \"500ms\"")]
pub struct ParseDurationError {
    pub value: String,
}

/// Parses a non-negative Go duration. Rejects what Go rejects, and values beyond `u64` nanoseconds.
pub fn parse(value: &str) -> Result<Duration, ParseDurationError> {
    let err = || ParseDurationError { value: value.to_owned() };
    if value.is_empty() {
        return Err(err());
    }
    let mut rest = value;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(err()),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() || (num.contains('.') && frac.is_empty()) || frac.contains('.') {
            return Err(err());
        }
        let int: u128 = int.parse().map_err(|_| err())?;
        let mut frac_nanos: u128 = 0;
        let mut scale = nanos_per_unit;
        for d in frac.bytes().take(12) {
            scale /= 10;
            frac_nanos += u128::from(d - b'0') * scale;
        }
        total = int
            .checked_mul(nanos_per_unit)
            .and_then(|n| n.checked_add(frac_nanos))
            .and_then(|n| total.checked_add(n))
            .filter(|n| *n <= u128::from(u64::MAX))
            .ok_or_else(err)?;
        rest = tail;
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in ["", "10", "s", "10x", "-1s", "1.s", ".5s", "1..5s", "10 s", "99999999999999999999h"] {
            assert_eq!(parse(bad), Err(ParseDurationError { value: bad.into() }), "{bad}");
        }
    }
}
