//! Compiles the `limits` blocks of the config into `Limit`s, with their store keys.

use super::raw::{RawLimits, RawPricing};
use super::Errors;
use crate::limits::concurrency::{self, Concurrency};
use crate::limits::gcra::Rate;
use crate::limits::quota::{Period, Quota};
use crate::limits::{Limit, Meter, Unit};

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// A model's price in millionths of a dollar per token (= dollars per million tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pricing {
    pub input: f64,
    pub output: f64,
    pub cached_input: f64,
    pub cache_write: f64,
}

impl Pricing {
    /// Cost in millionths of a dollar, rounded up (what limits charge). `cached_prompt`
    /// (read from the provider's cache) and `cache_write` (written to it) are parts of
    /// `prompt`, each priced apart.
    pub fn micro_usd(
        &self,
        prompt: u64,
        cached_prompt: u64,
        cache_write: u64,
        completion: u64,
    ) -> u64 {
        self.exact_micro_usd(prompt, cached_prompt, cache_write, completion)
            .ceil()
            .max(0.0) as u64
    }

    /// `micro_usd` before rounding (what metrics add up).
    pub fn exact_micro_usd(
        &self,
        prompt: u64,
        cached_prompt: u64,
        cache_write: u64,
        completion: u64,
    ) -> f64 {
        let cached = cached_prompt.min(prompt);
        let written = cache_write.min(prompt - cached);
        (prompt - cached - written) as f64 * self.input
            + cached as f64 * self.cached_input
            + written as f64 * self.cache_write
            + completion as f64 * self.output
    }
}

/// `cache_write_factor`: the cache write price as a multiple of the input price, when the
/// config names none (it depends on the provider).
pub(super) fn compile_pricing(
    raw: &RawPricing,
    path: &str,
    cache_write_factor: f64,
    errors: &mut Errors,
) -> Pricing {
    let mut check = |field: &str, v: f64| {
        if !(v.is_finite() && v >= 0.0) {
            errors.at(format!("{path}.{field}"), "must be a price of 0 or more");
        }
        v
    };
    let input = check("input_per_million", raw.input_per_million);
    let output = check("output_per_million", raw.output_per_million);
    let cached_input = check(
        "cached_input_per_million",
        raw.cached_input_per_million
            .unwrap_or(raw.input_per_million),
    );
    let cache_write = check(
        "cache_write_per_million",
        raw.cache_write_per_million
            .unwrap_or(raw.input_per_million * cache_write_factor),
    );
    Pricing {
        input,
        output,
        cached_input,
        cache_write,
    }
}

/// `scope` names the owner for messages (``consumer `a` ``); `label` for metrics
/// (`consumer:a`); `key` for the store (`c/a`).
#[allow(clippy::too_many_arguments)]
pub(super) fn compile_limits(
    raw: &RawLimits,
    path: &str,
    scope: &str,
    label: &str,
    key: &str,
    lease_ms: u64,
    errors: &mut Errors,
) -> Vec<Limit> {
    let rate = |limit: u64, window_ms: u64| {
        Meter::Rate(Rate {
            limit,
            window_ns: window_ms * 1_000_000,
        })
    };
    let quota = |limit: u64, period: Period| Meter::Quota(Quota { limit, period });
    type MeterOf<'a> = &'a dyn Fn(u64) -> Meter;
    let counts: [(&'static str, Option<u64>, Unit, MeterOf); 10] = [
        (
            "requests_per_second",
            raw.requests_per_second,
            Unit::Requests,
            &|l| rate(l, SECOND_MS),
        ),
        (
            "requests_per_minute",
            raw.requests_per_minute,
            Unit::Requests,
            &|l| rate(l, MINUTE_MS),
        ),
        (
            "requests_per_hour",
            raw.requests_per_hour,
            Unit::Requests,
            &|l| rate(l, HOUR_MS),
        ),
        (
            "requests_per_day",
            raw.requests_per_day,
            Unit::Requests,
            &|l| rate(l, DAY_MS),
        ),
        (
            "tokens_per_minute",
            raw.tokens_per_minute,
            Unit::Tokens,
            &|l| rate(l, MINUTE_MS),
        ),
        ("tokens_per_hour", raw.tokens_per_hour, Unit::Tokens, &|l| {
            rate(l, HOUR_MS)
        }),
        ("tokens_per_day", raw.tokens_per_day, Unit::Tokens, &|l| {
            rate(l, DAY_MS)
        }),
        ("concurrency", raw.concurrency, Unit::Requests, &|max| {
            Meter::Concurrency(Concurrency { max, lease_ms })
        }),
        ("daily_tokens", raw.daily_tokens, Unit::Tokens, &|l| {
            quota(l, Period::Day)
        }),
        ("monthly_tokens", raw.monthly_tokens, Unit::Tokens, &|l| {
            quota(l, Period::Month)
        }),
    ];
    let label: std::sync::Arc<str> = label.into();
    let mut out = Vec::new();
    for (name, value, unit, meter) in counts {
        let Some(limit) = value else { continue };
        let max = if name == "concurrency" {
            concurrency::MAX_SLOTS
        } else {
            Quota::MAX_LIMIT
        };
        if limit == 0 || limit > max {
            errors.at(
                format!("{path}.{name}"),
                format!("must be between 1 and {max}"),
            );
            continue;
        }
        let meter = meter(limit);
        // The store key names what the counter's state means: the limit, and for slots
        // their lease (the epochs it counts in).
        let store_key = match meter {
            Meter::Concurrency(c) => format!("tollgate/limit/{key}/{name}/{limit}/{}", c.lease_ms),
            _ => format!("tollgate/limit/{key}/{name}/{limit}"),
        };
        out.push(Limit {
            name,
            scope: scope.into(),
            label: label.clone(),
            unit,
            meter,
            store_key: store_key.into(),
        });
    }
    for (name, value, period) in [
        ("daily_cost_usd", raw.daily_cost_usd, Period::Day),
        ("monthly_cost_usd", raw.monthly_cost_usd, Period::Month),
    ] {
        let Some(usd) = value else { continue };
        let micro = usd * 1_000_000.0;
        if !(micro.is_finite() && micro >= 1.0 && micro <= Quota::MAX_LIMIT as f64) {
            errors.at(
                format!("{path}.{name}"),
                "must be a positive amount of US dollars",
            );
            continue;
        }
        let micro = micro.round() as u64;
        out.push(Limit {
            name,
            scope: scope.into(),
            label: label.clone(),
            unit: Unit::MicroUsd,
            meter: quota(micro, period),
            store_key: format!("tollgate/limit/{key}/{name}/{micro}").into(),
        });
    }
    out
}
