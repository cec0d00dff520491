//! Numbers in canonical JSON: which spellings the fingerprint can compare by value, and how a
//! double is written (ECMAScript's `Number.prototype.toString`, as RFC 8785 §3.2.2.3 requires).
//!
//! A number is compared by value only when what the parser keeps of it is exactly what was
//! sent: an integer that fits 64 bits (kept as one), or a number whose digits are the
//! shortest spelling of the double nearest to it (what every double-based JSON writer sends).
//! Anything else, an integer past 64 bits or a decimal with more digits than a double holds,
//! would be merged with its neighbours by a double; [`all_exact`] says so, and the body is
//! then fingerprinted byte for byte.
//!
//! Pure logic: no tower or tokio in here.

use std::fmt::{self, Write as _};

use serde_json::Number;

use super::Sink;

/// The most significant digits a double's shortest spelling has.
const MAX_DIGITS: usize = 17;

/// The fewest digits at which two spellings of one length may both read back as one double.
const TIES_FROM: usize = 16;

/// Whether every number in `json` (a text `serde_json` has already parsed) is kept exactly
/// by the parser: see the module docs.
pub(super) fn all_exact(json: &[u8]) -> bool {
    let mut at = 0;
    while let Some(&byte) = json.get(at) {
        match byte {
            b'"' => at = after_string(json, at + 1),
            b'-' | b'0'..=b'9' => {
                let end = json[at..]
                    .iter()
                    .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .map_or(json.len(), |len| at + len);
                if !is_exact(&json[at..end]) {
                    return false;
                }
                at = end;
            }
            _ => at += 1,
        }
    }
    true
}

/// The position after the string whose contents start at `at`.
fn after_string(json: &[u8], mut at: usize) -> usize {
    while let Some(&byte) = json.get(at) {
        match byte {
            b'\\' => at += 2,
            b'"' => return at + 1,
            _ => at += 1,
        }
    }
    at
}

/// Whether the parser keeps the number `token` (valid JSON number text) exactly.
fn is_exact(token: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(token) else {
        return false;
    };
    let integer = !token.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if integer && (text.parse::<u64>().is_ok() || text.parse::<i64>().is_ok()) {
        return true;
    }
    match (text.parse::<f64>(), Decimal::of_token(token)) {
        (Ok(n), Some(sent)) if n.is_finite() => sent == Decimal::of_double(n),
        _ => false,
    }
}

/// Writes `number`'s canonical text: an integer as its digits, a double as ECMAScript does.
pub(super) fn write(number: &Number, out: &mut impl Sink) {
    let mut text = StackText::default();
    if let Some(n) = number.as_u64() {
        let _ = write!(text, "{n}");
    } else if let Some(n) = number.as_i64() {
        let _ = write!(text, "{n}");
    } else if let Some(n) = number.as_f64() {
        return write_double(n, out);
    }
    out.put(text.as_bytes());
}

/// ECMAScript's `Number.prototype.toString` for a finite double (ECMA-262 §6.1.6.1.20): the
/// fewest digits that round-trip, placed by the exponent.
pub(super) fn write_double(n: f64, out: &mut impl Sink) {
    let decimal = Decimal::of_double(n);
    let digits = decimal.digits.as_bytes();
    if digits.is_empty() {
        // Both zeros.
        return out.put(b"0");
    }
    let (k, point) = (digits.len() as i32, decimal.point);
    let mut text = StackText::default();
    if n.is_sign_negative() {
        text.push(b"-");
    }
    if k <= point && point <= 21 {
        text.push(digits);
        (k..point).for_each(|_| text.push(b"0"));
    } else if 0 < point && point <= 21 {
        let (whole, fraction) = digits.split_at(point as usize);
        text.push(whole);
        text.push(b".");
        text.push(fraction);
    } else if -6 < point && point <= 0 {
        text.push(b"0.");
        (point..0).for_each(|_| text.push(b"0"));
        text.push(digits);
    } else {
        text.push(&digits[..1]);
        if k > 1 {
            text.push(b".");
            text.push(&digits[1..]);
        }
        text.push(if point > 0 { b"e+" } else { b"e-" });
        let _ = write!(text, "{}", (point - 1).unsigned_abs());
    }
    out.put(text.as_bytes());
}

/// A positive decimal `0.d1d2…dk × 10^point`, its digits without leading or trailing zeros
/// (none at all for zero, whose point is 0).
#[derive(PartialEq, Eq)]
struct Decimal {
    digits: StackText,
    point: i32,
}

impl Decimal {
    fn zero() -> Self {
        Self {
            digits: StackText::default(),
            point: 0,
        }
    }

    /// The digits ECMAScript writes for `n`'s magnitude: the fewest that read back as `n`;
    /// among those, the closest to `n`; of two as close, the even one. Rust's `{:e}` gives
    /// the fewest, but breaks a tie upwards (`1424953923781206.3` where RFC 8785 has `.2`);
    /// its exact formatting with as many digits rounds to the closest, ties to even.
    fn of_double(n: f64) -> Self {
        let n = n.abs();
        if n == 0.0 || !n.is_finite() {
            return Self::zero();
        }
        let mut shortest = StackText::default();
        let _ = write!(shortest, "{n:e}");
        let Some(fewest) = Self::of_scientific(shortest.as_bytes()) else {
            return Self::zero();
        };
        if fewest.digits.len() < TIES_FROM {
            // Decimals of 15 digits or fewer are further apart than a double's neighbours:
            // only one of them reads back as `n`, and there is no tie to break.
            return fewest;
        }
        // The closest decimal of as many digits may still not read back: below a power of
        // two the neighbour is twice as near as above it, so what reads back reaches half as
        // far down (2^-24 is `5.960464477539063e-8`, and `…062e-8` is as close but another
        // double).
        let mut closest = StackText::default();
        let _ = write!(closest, "{:.*e}", fewest.digits.len().saturating_sub(1), n);
        let reads_back = std::str::from_utf8(closest.as_bytes())
            .ok()
            .and_then(|text| text.parse::<f64>().ok())
            == Some(n);
        match Self::of_scientific(closest.as_bytes()) {
            Some(closest) if reads_back => closest,
            _ => fewest,
        }
    }

    /// Reads what Rust's `{:e}` writes: `d.ddde-x`.
    fn of_scientific(text: &[u8]) -> Option<Self> {
        let e_at = text.iter().position(|&b| b == b'e')?;
        let exponent: i32 = std::str::from_utf8(&text[e_at + 1..]).ok()?.parse().ok()?;
        let digits = text[..e_at].iter().filter(|b| b.is_ascii_digit());
        let trailing = digits.clone().rev().take_while(|&&d| d == b'0').count();
        let count = digits.clone().count() - trailing;
        let mut decimal = Self::zero();
        for &digit in digits.take(count) {
            decimal.digits.push(&[digit]);
        }
        decimal.point = exponent + 1;
        Some(decimal)
    }

    /// The exact value of JSON number text, `None` when it has more significant digits than
    /// any double's shortest spelling (or an exponent no double comes near).
    fn of_token(token: &[u8]) -> Option<Self> {
        let unsigned = token.strip_prefix(b"-").unwrap_or(token);
        let (mantissa, exponent) = match unsigned.iter().position(|&b| b == b'e' || b == b'E') {
            Some(at) => (&unsigned[..at], exponent(&unsigned[at + 1..])),
            None => (unsigned, 0),
        };
        let (whole, fraction) = match mantissa.iter().position(|&b| b == b'.') {
            Some(at) => (&mantissa[..at], &mantissa[at + 1..]),
            None => (mantissa, &[][..]),
        };
        let digits = || whole.iter().chain(fraction).copied();
        let total = whole.len() + fraction.len();
        let leading = digits().take_while(|&d| d == b'0').count();
        if leading == total {
            return Some(Self::zero());
        }
        let trailing = digits().rev().take_while(|&d| d == b'0').count();
        let significant = total - leading - trailing;
        if significant > MAX_DIGITS {
            return None;
        }
        let point = whole.len() as i64 + exponent - leading as i64;
        let mut decimal = Self::zero();
        decimal.point = i32::try_from(point).ok()?;
        for digit in digits().skip(leading).take(significant) {
            decimal.digits.push(&[digit]);
        }
        Some(decimal)
    }
}

/// An exponent's value, saturated far beyond any double's (a billion).
fn exponent(text: &[u8]) -> i64 {
    let (negative, digits) = match text.first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let magnitude = digits.iter().fold(0i64, |value, &d| {
        (value * 10 + i64::from(d.wrapping_sub(b'0'))).min(1_000_000_000)
    });
    if negative { -magnitude } else { magnitude }
}

/// A short text built on the stack: numbers are at most 26 bytes long, so a bigger one is a
/// bug and is cut rather than allowed to panic.
struct StackText {
    bytes: [u8; 40],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        Self {
            bytes: [0; 40],
            len: 0,
        }
    }
}

impl StackText {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.bytes.len() - self.len;
        let take = bytes.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl PartialEq for StackText {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for StackText {}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(n: f64) -> String {
        let mut out = Vec::new();
        write_double(n, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn of_two_shortest_spellings_equally_close_the_even_one_is_written() {
        // (double, ECMAScript's text, the other shortest spelling). 2^49 + 1/4 lies halfway
        // between two 16-digit decimals that both read back as it (its neighbours are 1/8
        // away); Rust's `{:e}` breaks that tie upwards. 2^49 + 3/4 rounds up to the even
        // digit either way, and the 17-digit tie RFC 8785 names is kept beside them.
        let ties = [
            (
                2f64.powi(49) + 0.25,
                "562949953421312.2",
                "562949953421312.3",
            ),
            (
                2f64.powi(49) + 0.75,
                "562949953421312.8",
                "562949953421312.7",
            ),
            (
                1_424_953_923_781_206.0 + 0.25,
                "1424953923781206.2",
                "1424953923781206.3",
            ),
        ];
        for (n, text, other) in ties {
            assert_eq!(written(n), text);
            assert_eq!(written(-n), format!("-{text}"));
            assert_eq!(
                other.parse::<f64>(),
                Ok(n),
                "{other} is a spelling of {text} too"
            );
            // Only the spelling written back is compared by value: the other one is not
            // what the parser keeps of it, so its body is fingerprinted byte for byte.
            assert!(all_exact(text.as_bytes()), "{text}");
            assert!(!all_exact(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn the_closest_spelling_is_written_only_when_it_reads_back() {
        // (power of two, ECMAScript's text, the closer spelling of as many digits). A power
        // of two has a neighbour below at half the distance of the one above, so the
        // decimal closest to it may lie outside what reads back as it, while a farther one
        // above still does: the farther one is written.
        let powers = [
            (-24, "5.960464477539063e-8", "5.960464477539062e-8"),
            (-44, "5.684341886080802e-14", "5.684341886080801e-14"),
            (89, "6.189700196426902e+26", "6.189700196426901e+26"),
            (976, "6.386688990511104e+293", "6.386688990511103e+293"),
        ];
        for (exponent, text, closer) in powers {
            let n = 2f64.powi(exponent);
            assert_eq!(written(n), text, "2^{exponent}");
            assert_eq!(text.parse::<f64>(), Ok(n), "2^{exponent}");
            assert_ne!(closer.parse::<f64>(), Ok(n), "2^{exponent}");
            assert!(all_exact(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn a_scientific_text_is_read_without_its_trailing_zeros() {
        // `{:.Ne}` pads with zeros to N digits; a decimal's digits never end in one, or
        // two spellings of one value would compare unequal.
        // (double, digits after the point, text, the decimal's digits and point)
        let padded = [
            (1.5, 3, "1.500e0", "15", 1),
            (1200.0, 5, "1.20000e3", "12", 4),
            (5e-7, 15, "5.000000000000000e-7", "5", -6),
        ];
        for (n, precision, text, digits, point) in padded {
            let mut written = StackText::default();
            let _ = write!(written, "{n:.precision$e}");
            assert_eq!(written.as_bytes(), text.as_bytes());
            let decimal = Decimal::of_scientific(written.as_bytes());
            assert_eq!(
                decimal.as_ref().map(|d| (d.digits.as_bytes(), d.point)),
                Some((digits.as_bytes(), point)),
                "{text}"
            );
        }
    }

    #[test]
    fn text_past_the_stack_buffer_is_cut_never_a_panic() {
        let mut text = StackText::default();
        text.push(b"0.000001");
        text.push(&[b'9'; 50]);
        assert_eq!(text.len(), 40);
        assert_eq!(&text.as_bytes()[..8], b"0.000001");
        assert!(text.as_bytes()[8..].iter().all(|&b| b == b'9'));
        text.push(b"more");
        assert_eq!(text.len(), 40);
    }
}
