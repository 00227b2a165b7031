//! What a provider's response headers say about the key that was used: when it may be used
//! again, and how much capacity it has left. Every format here is one that OpenAI, Azure
//! OpenAI or Anthropic send; times become absolute Unix milliseconds against `now_ms`.

use crate::calendar::days_from_civil;
use crate::http::HeaderLookup;

/// The rate-limit signals of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeySignals {
    /// An explicit "retry after" (`retry-after-ms`, `x-ms-retry-after-ms`, `retry-after` as
    /// seconds or an HTTP date), absolute.
    pub retry_at_ms: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    /// When the request and token windows refill (OpenAI's `x-ratelimit-reset-*` durations,
    /// Anthropic's `anthropic-ratelimit-*-reset` RFC 3339 times), absolute.
    pub requests_reset_at_ms: Option<u64>,
    pub tokens_reset_at_ms: Option<u64>,
}

impl KeySignals {
    pub fn read<H: HeaderLookup + ?Sized>(headers: &H, now_ms: u64) -> Self {
        let number = |name: &str| {
            headers
                .header(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let first_number = |names: &[&str]| names.iter().find_map(|n| number(n));
        let after_ms = |ms: u64| now_ms.saturating_add(ms);
        let retry_at_ms = number("retry-after-ms")
            .or_else(|| number("x-ms-retry-after-ms"))
            .map(after_ms)
            .or_else(|| {
                headers
                    .header("retry-after")
                    .and_then(|v| retry_after(v, now_ms))
            });
        let reset = |openai: &str, anthropic: &[&str]| {
            headers
                .header(openai)
                .and_then(parse_duration_ms)
                .map(after_ms)
                .or_else(|| {
                    // Anthropic reports input and output token windows apart: the later
                    // reset is when the key has room for both.
                    anthropic
                        .iter()
                        .filter_map(|n| headers.header(n).and_then(parse_rfc3339_ms))
                        .max()
                })
        };
        Self {
            retry_at_ms,
            remaining_requests: first_number(&[
                "x-ratelimit-remaining-requests",
                "anthropic-ratelimit-requests-remaining",
            ]),
            remaining_tokens: first_number(&[
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-tokens-remaining",
            ])
            .or_else(|| {
                // Only input/output windows given: the smaller one bounds the next request.
                [
                    "anthropic-ratelimit-input-tokens-remaining",
                    "anthropic-ratelimit-output-tokens-remaining",
                ]
                .iter()
                .filter_map(|n| number(n))
                .min()
            }),
            requests_reset_at_ms: reset(
                "x-ratelimit-reset-requests",
                &["anthropic-ratelimit-requests-reset"],
            ),
            tokens_reset_at_ms: reset(
                "x-ratelimit-reset-tokens",
                &[
                    "anthropic-ratelimit-tokens-reset",
                    "anthropic-ratelimit-input-tokens-reset",
                    "anthropic-ratelimit-output-tokens-reset",
                ],
            ),
        }
    }

    /// When a key that got 429 may be tried again: the explicit retry time if the provider
    /// gave one; else the reset of an exhausted window (the later, if both are); else
    /// `default_ms` from now. Never further than `cap_ms` from now.
    pub fn cooldown_until(&self, now_ms: u64, default_ms: u64, cap_ms: u64) -> u64 {
        let exhausted = |remaining: Option<u64>, reset: Option<u64>| {
            reset.filter(|_| remaining.is_none_or(|r| r == 0))
        };
        let until = self
            .retry_at_ms
            .or_else(|| {
                exhausted(self.remaining_requests, self.requests_reset_at_ms)
                    .max(exhausted(self.remaining_tokens, self.tokens_reset_at_ms))
            })
            .unwrap_or(now_ms.saturating_add(default_ms));
        until.clamp(now_ms, now_ms.saturating_add(cap_ms))
    }
}

/// `retry-after`: delay seconds (fractions allowed) or an HTTP date.
fn retry_after(value: &str, now_ms: u64) -> Option<u64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| now_ms.saturating_add((secs * 1_000.0).ceil() as u64));
    }
    parse_http_date_ms(v)
}

/// A Go-style duration as OpenAI writes it: `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3.5s`.
pub fn parse_duration_ms(value: &str) -> Option<u64> {
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at_checked(split)?;
        let number: f64 = number.parse().ok()?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at_checked(unit_len)?;
        let scale = match unit {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        total += number * scale;
        rest = next;
    }
    (total.is_finite() && total >= 0.0).then(|| total.ceil() as u64)
}

/// RFC 3339 / ISO 8601 UTC or offset time, e.g. `2026-11-22T10:00:05Z` or
/// `2026-11-22T10:00:05.250+01:00`.
pub fn parse_rfc3339_ms(value: &str) -> Option<u64> {
    let v = value.trim();
    let (date, time) = v.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let (y, mo, day) = (
        d.next()?.parse::<u64>().ok()?,
        d.next()?.parse::<u64>().ok()?,
        d.next()?.parse::<u64>().ok()?,
    );
    // Split the offset off the time of day.
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0i64)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at_checked(at)?;
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off.get(1..)?.split_once(':')?;
        let (oh, om) = (oh.parse::<i64>().ok()?, om.parse::<i64>().ok()?);
        // Real offsets are within a day; anything else is no time (and could overflow).
        if !(0..=23).contains(&oh) || !(0..=59).contains(&om) {
            return None;
        }
        (c, sign * (oh * 3_600 + om * 60))
    };
    let mut t = clock.split(':');
    let (h, mi) = (
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
    );
    let secs: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&day)
        || h > 23
        || mi > 59
        || !(0.0..61.0).contains(&secs)
        || !(1970..=9999).contains(&y)
    {
        return None;
    }
    let day_ms = days_from_civil(y, mo, day) as i64 * 86_400_000;
    let ms = day_ms + (h * 3_600_000 + mi * 60_000) as i64 + (secs * 1_000.0).round() as i64
        - offset_secs * 1_000;
    u64::try_from(ms).ok()
}

/// An HTTP date in its preferred form (IMF-fixdate): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn parse_http_date_ms(value: &str) -> Option<u64> {
    let (_, rest) = value.trim().split_once(", ")?;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u64 = parts.next()?.parse().ok()?;
    let clock = parts.next()?;
    if parts.next()? != "GMT" {
        return None;
    }
    parse_rfc3339_ms(&format!("{year:04}-{month:02}-{day:02}T{clock}Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-22T10:00:00Z
    const NOW: u64 = 1_795_341_600_000;

    use crate::http::test_headers as h;

    #[test]
    fn every_retry_after_format() {
        let at = |pairs: &[(&str, &str)]| KeySignals::read(&h(pairs), NOW).retry_at_ms;
        assert_eq!(at(&[("retry-after-ms", "1500")]), Some(NOW + 1_500));
        assert_eq!(at(&[("x-ms-retry-after-ms", "250")]), Some(NOW + 250));
        assert_eq!(at(&[("retry-after", "2")]), Some(NOW + 2_000));
        assert_eq!(at(&[("retry-after", "0.5")]), Some(NOW + 500));
        assert_eq!(
            at(&[("retry-after", "Sun, 22 Nov 2026 10:00:07 GMT")]),
            Some(NOW + 7_000)
        );
        // The most precise header wins.
        assert_eq!(
            at(&[("retry-after", "2"), ("retry-after-ms", "1500")]),
            Some(NOW + 1_500)
        );
        assert_eq!(at(&[("retry-after", "soon")]), None);
        assert_eq!(at(&[("retry-after", "-3")]), None);
        assert_eq!(at(&[]), None);
    }

    #[test]
    fn openai_durations() {
        for (text, ms) in [
            ("20ms", 20),
            ("1s", 1_000),
            ("1.5s", 1_500),
            ("6m0s", 360_000),
            ("1h2m3.5s", 3_723_500),
            ("0s", 0),
        ] {
            assert_eq!(parse_duration_ms(text), Some(ms), "{text}");
        }
        for bad in ["", "5", "1x", "s", "1.2.3s"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_and_http_dates() {
        assert_eq!(parse_rfc3339_ms("2026-11-22T10:00:05Z"), Some(NOW + 5_000));
        assert_eq!(
            parse_rfc3339_ms("2026-11-22T10:00:05.250Z"),
            Some(NOW + 5_250)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-22T11:00:05+01:00"),
            Some(NOW + 5_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-22T09:30:05-00:30"),
            Some(NOW + 5_000)
        );
        assert_eq!(parse_rfc3339_ms("2026-13-22T10:00:05Z"), None);
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
        assert_eq!(
            parse_http_date_ms("Sun, 22 Nov 2026 10:00:00 GMT"),
            Some(NOW)
        );
        assert_eq!(parse_http_date_ms("Sun, 22 Foo 2026 10:00:00 GMT"), None);
    }

    #[test]
    fn openai_remaining_and_resets() {
        let s = KeySignals::read(
            &h(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-remaining-tokens", "15000"),
                ("x-ratelimit-reset-requests", "6m0s"),
                ("x-ratelimit-reset-tokens", "250ms"),
            ]),
            NOW,
        );
        assert_eq!(
            (s.remaining_requests, s.remaining_tokens),
            (Some(0), Some(15_000))
        );
        assert_eq!(s.requests_reset_at_ms, Some(NOW + 360_000));
        assert_eq!(s.tokens_reset_at_ms, Some(NOW + 250));
        // The request window is the exhausted one: cool down until it refills.
        assert_eq!(s.cooldown_until(NOW, 1_000, 3_600_000), NOW + 360_000);
    }

    #[test]
    fn anthropic_remaining_and_resets() {
        let s = KeySignals::read(
            &h(&[
                ("anthropic-ratelimit-requests-remaining", "12"),
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                ("anthropic-ratelimit-output-tokens-remaining", "8000"),
                ("anthropic-ratelimit-requests-reset", "2026-11-22T10:00:30Z"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2026-11-22T10:00:20Z",
                ),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2026-11-22T10:00:10Z",
                ),
            ]),
            NOW,
        );
        assert_eq!(
            (s.remaining_requests, s.remaining_tokens),
            (Some(12), Some(0))
        );
        assert_eq!(s.tokens_reset_at_ms, Some(NOW + 20_000));
        assert_eq!(s.cooldown_until(NOW, 1_000, 3_600_000), NOW + 20_000);
    }

    #[test]
    fn cooldowns_default_and_are_capped() {
        let none = KeySignals::default();
        assert_eq!(none.cooldown_until(NOW, 5_000, 60_000), NOW + 5_000);
        let far = KeySignals {
            retry_at_ms: Some(NOW + 10 * 3_600_000),
            ..Default::default()
        };
        assert_eq!(far.cooldown_until(NOW, 5_000, 60_000), NOW + 60_000);
        let past = KeySignals {
            retry_at_ms: Some(NOW - 1),
            ..Default::default()
        };
        assert_eq!(past.cooldown_until(NOW, 5_000, 60_000), NOW);
    }
}

#[cfg(test)]
mod overflow_tests {
    use super::*;

    /// Regressions the fuzzer found: absurd years and offsets in a provider's time headers
    /// overflowed the arithmetic (a panic in debug builds, a wrong time in release).
    #[test]
    fn absurd_times_are_no_times() {
        for value in [
            "1999999999999-01-01T00:00:00Z",
            "2026-01-01T00:00:00+9999999999999999:00",
            "2026-01-01T00:00:00+00:999999999999999999",
            "2026-01-01T00:00:00+99999999999999:00",
            "2026-01-01T00:00:00-2562047788015:00",
            "18446744073709551615-01-01T00:00:00Z",
            "2026-01-01T00:00:00+24:00",
        ] {
            assert_eq!(parse_rfc3339_ms(value), None, "{value}");
        }
        assert_eq!(
            parse_http_date_ms("Sun, 06 Nov 199888888884 08:48:37 GMT"),
            None
        );
        // Ordinary ones still read.
        assert_eq!(
            parse_rfc3339_ms("2026-01-01T01:00:00+01:00"),
            parse_rfc3339_ms("2026-01-01T00:00:00Z")
        );
        assert!(parse_rfc3339_ms("9999-12-31T23:59:59Z").is_some());
    }
}
