//! Durations as kube-proxy takes them (Go's `time.ParseDuration`), for the flags and the
//! configuration file alike; its own module so that neither `cli` nor `config` imports the
//! other for it.

use std::str::FromStr;
use std::time::Duration;

/// `--min-sync-period 1s`, `--sync-period 1h`: Go-style durations, as kube-proxy takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

/// The longest duration Go (and so kube-proxy) can represent: `i64::MAX` nanoseconds, about
/// 292 years. Anything longer is refused, so that no arithmetic on a configured duration can
/// overflow.
pub const MAX_DURATION: Duration = Duration::new(9_223_372_036, 854_775_807);

/// Why a text is not a duration kube-proxy would take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("a duration cannot be negative")]
    Negative,
    #[error("not a duration (e.g. 1s, 500ms, 1h30m)")]
    Malformed,
    #[error("too long: a duration is at most 2562047h47m16.854775807s (about 292 years)")]
    TooLong,
}

impl FromStr for GoDuration {
    type Err = DurationError;

    /// `0`, or a sequence of numbers with units: `1h30m`, `500ms`, `1.5s` (ns, us, ms, s, m, h),
    /// as Go's `time.ParseDuration`, counted exactly in nanoseconds.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "0" {
            return Ok(GoDuration(Duration::ZERO));
        }
        if s.starts_with('-') {
            return Err(DurationError::Negative);
        }
        let malformed = || DurationError::Malformed;
        let too_long = || DurationError::TooLong;
        let mut rest = s.strip_prefix('+').unwrap_or(s);
        if rest.is_empty() {
            return Err(DurationError::Empty);
        }
        let limit = MAX_DURATION.as_nanos();
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let int_len = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let (int, after) = rest.split_at(int_len);
            let (frac, after) = match after.strip_prefix('.') {
                Some(f) => f.split_at(f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len())),
                None => ("", after),
            };
            if int.is_empty() && frac.is_empty() {
                return Err(malformed());
            }
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let scale: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(malformed()),
            };
            // Whole units, exactly; a digit run too long for u128 is too long anyway.
            let whole: u128 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| too_long())?
            };
            let mut part = whole.checked_mul(scale).ok_or_else(too_long)?;
            // The fraction, digit by digit, to nanosecond precision (finer digits are dropped,
            // as Go drops them).
            let mut unit_part = scale;
            for d in frac.bytes() {
                unit_part /= 10;
                if unit_part == 0 {
                    break;
                }
                part += u128::from(d - b'0') * unit_part;
            }
            total = total.checked_add(part).ok_or_else(too_long)?;
            if total > limit {
                return Err(too_long());
            }
            rest = next;
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_long())?;
        Ok(GoDuration(Duration::new(
            secs,
            (total % 1_000_000_000) as u32,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let d = |s: &str| s.parse::<GoDuration>().map(|d| d.0);
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("-1s"), Err(DurationError::Negative));
        assert!(d("10").is_err(), "a unit is required");
        assert!(d("1d").is_err());
        assert!(d("").is_err());
        assert!(d("s").is_err() && d(".s").is_err() && d("1.2.3s").is_err());
        assert_eq!(d(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(d("+1m"), Ok(Duration::from_secs(60)));
        assert_eq!(d("1h0m0s"), Ok(Duration::from_secs(3600)));
        assert_eq!(d("1.000000001s"), Ok(Duration::new(1, 1)));
        assert_eq!(
            d("2562047h47m16.854775807s"),
            Ok(MAX_DURATION),
            "Go's longest"
        );
        for huge in [
            "2562047h47m16.854775808s",
            "9999999999999999h",
            "99999999999999999999999999999999999999999999h",
            "18446744073709551616s",
        ] {
            assert_eq!(d(huge), Err(DurationError::TooLong), "{huge}");
        }
    }
}
