//! The Prometheus metrics both hosts export: one list of families (names, help, labels,
//! buckets), what one finished request adds to them (`RequestFigures`), and the gauges read
//! from the shared store (`standing`). The native host serves them on `GET /metrics`; Envoy
//! defines them as filter stats whose names carry their labels (`envoy_stat_name`), which the
//! bootstrap's tag extractors (`envoy_tag_extractors`) turn back into labels.
//!
//! Labels are config names only (consumer, model, provider, key id, limit scope) and codes
//! from fixed lists: never a secret, never text a client chose.
//!
//! Envoy's stats are integers, so every figure with a fraction has an integer twin that both
//! hosts export: `…_milliseconds` histograms beside `…_seconds`, `tollgate_cost_micro_usd_total`
//! beside `tollgate_cost_usd_total`, `tollgate_allowance_used_ppm` beside
//! `tollgate_allowance_used_ratio` (docs/metrics.md). Envoy exports the twins only.

use crate::config::Config;
use crate::keys::report::{self, KeyReport};
use crate::keys::KeyCounter;
use crate::limits::{self, Meter};
use crate::providers::openai::usage::Usage;
use crate::providers::refusal::RefusalClass;
use crate::store::CounterStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Family {
    /// The exported name (counters end in `_total`).
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    /// Exported by Envoy too (the others have a fraction Envoy cannot hold).
    pub in_envoy: bool,
    /// Histograms: the bucket bounds.
    pub buckets: &'static [f64],
}

const fn family(
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
) -> Family {
    Family {
        name,
        help,
        kind,
        labels,
        in_envoy: true,
        buckets: &[],
    }
}

const fn native_only(f: Family) -> Family {
    Family {
        in_envoy: false,
        ..f
    }
}

const fn with_buckets(f: Family, buckets: &'static [f64]) -> Family {
    Family { buckets, ..f }
}

const REQUEST_LABELS: &[&str] = &["consumer", "model", "provider", "code"];
const TOKEN_LABELS: &[&str] = &["consumer", "model", "provider", "kind"];
const LATENCY_LABELS: &[&str] = &["model", "provider"];
const LIMIT_LABELS: &[&str] = &["scope", "limit"];
const KEY_LABELS: &[&str] = &["provider", "key"];

/// Whole requests, from a few milliseconds to long generations.
const DURATION_S: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
const DURATION_MS: &[f64] = &[
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 20_000.0, 30_000.0,
    60_000.0, 120_000.0, 300_000.0,
];
/// A stream's first bytes: from milliseconds to a slow model's long think.
const TTFT_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];
const TTFT_MS: &[f64] = &[
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0, 30_000.0,
];

pub const REQUESTS: Family = family(
    "tollgate_requests_total",
    "Requests by consumer, model, provider and outcome (`2xx`, `4xx`, `5xx` for answers relayed or made, the refusal's code for the gateway's own refusals, `cancelled` when the client left first).",
    Kind::Counter,
    REQUEST_LABELS,
);
pub const TOKENS: Family = family(
    "tollgate_tokens_total",
    "Tokens by kind (input, output, cached_input, cache_write): the provider's usage, or the gateway's estimate where a stream ended without it.",
    Kind::Counter,
    TOKEN_LABELS,
);
pub const TOKENS_ESTIMATED: Family = family(
    "tollgate_tokens_estimated_total",
    "The part of tollgate_tokens_total the gateway estimated (streams that ended without the provider's usage).",
    Kind::Counter,
    TOKEN_LABELS,
);
pub const COST_USD: Family = native_only(family(
    "tollgate_cost_usd_total",
    "What requests cost in US dollars, at the model's configured prices.",
    Kind::Counter,
    &["consumer", "model"],
));
pub const COST_MICRO_USD: Family = family(
    "tollgate_cost_micro_usd_total",
    "What requests cost in millionths of a US dollar (tollgate_cost_usd_total in integers, as Envoy counts).",
    Kind::Counter,
    &["consumer", "model"],
);
pub const DURATION_SECONDS: Family = native_only(with_buckets(
    family(
        "tollgate_request_duration_seconds",
        "From the request's arrival to the end of its answer.",
        Kind::Histogram,
        LATENCY_LABELS,
    ),
    DURATION_S,
));
pub const DURATION_MILLISECONDS: Family = with_buckets(
    family(
        "tollgate_request_duration_milliseconds",
        "tollgate_request_duration_seconds in milliseconds, as Envoy counts.",
        Kind::Histogram,
        LATENCY_LABELS,
    ),
    DURATION_MS,
);
pub const TTFT_SECONDS: Family = native_only(with_buckets(
    family(
        "tollgate_time_to_first_token_seconds",
        "Streams: from the request's arrival to the first bytes of the answer sent to the client.",
        Kind::Histogram,
        LATENCY_LABELS,
    ),
    TTFT_S,
));
pub const TTFT_MILLISECONDS: Family = with_buckets(
    family(
        "tollgate_time_to_first_token_milliseconds",
        "tollgate_time_to_first_token_seconds in milliseconds, as Envoy counts.",
        Kind::Histogram,
        LATENCY_LABELS,
    ),
    TTFT_MS,
);
pub const FAILOVERS: Family = family(
    "tollgate_failovers_total",
    "Requests served by another model of the requested one's chain (models[].fallbacks).",
    Kind::Counter,
    &["consumer", "requested_model", "model"],
);
pub const LIMIT_REFUSALS: Family = family(
    "tollgate_limit_refusals_total",
    "Requests refused by a limit: its owner (`consumer:a`, `model:m`, `consumer:a/model:m`, `key:p/k`, `keys:p` for a whole pool) and its name.",
    Kind::Counter,
    LIMIT_LABELS,
);
pub const IN_FLIGHT: Family = family(
    "tollgate_in_flight",
    "Requests of a consumer being served now.",
    Kind::Gauge,
    &["consumer"],
);
pub const LIMIT_REMAINING: Family = family(
    "tollgate_limit_remaining",
    "What a limit has left now, in its unit (requests, tokens, millionths of a dollar for cost budgets).",
    Kind::Gauge,
    LIMIT_LABELS,
);
pub const ALLOWANCE_USED_RATIO: Family = native_only(family(
    "tollgate_allowance_used_ratio",
    "How much of a daily or monthly token or cost allowance this period has used, from 0 to 1.",
    Kind::Gauge,
    LIMIT_LABELS,
));
pub const ALLOWANCE_USED_PPM: Family = family(
    "tollgate_allowance_used_ppm",
    "tollgate_allowance_used_ratio in millionths (0 to 1000000), as Envoy counts.",
    Kind::Gauge,
    LIMIT_LABELS,
);
pub const KEY_STATE: Family = family(
    "tollgate_key_state",
    "A provider key's state: 0 healthy, 1 cooling (after a 429, key-wide or for some models), 2 revoked (401/403), 3 exhausted (its account's quota).",
    Kind::Gauge,
    KEY_LABELS,
);
pub const KEY_ATTEMPTS: Family = family(
    "tollgate_key_attempts_total",
    "Attempts sent with a provider key, by outcome (succeeded, rate_limited, exhausted, refused, server_errors, unreachable, other).",
    Kind::Counter,
    &["provider", "key", "outcome"],
);
pub const KEY_UNTIL: Family = family(
    "tollgate_key_until_seconds",
    "Unix time when a cooling or exhausted key is usable again, or a revoked key is probed (0 when healthy).",
    Kind::Gauge,
    KEY_LABELS,
);
pub const KEY_MODEL_UNTIL: Family = family(
    "tollgate_key_model_until_seconds",
    "Providers whose limits are per model: Unix time when a key cooling for one upstream model is usable for it again (0 when it is not cooling for it).",
    Kind::Gauge,
    &["provider", "key", "upstream_model"],
);
pub const KEY_LEARNED_REMAINING: Family = family(
    "tollgate_key_learned_remaining",
    "What the provider last said a key has left (0 when unknown or expired).",
    Kind::Gauge,
    KEY_LABELS,
);

/// Every family, in the order they are exported.
pub const FAMILIES: [&Family; 23] = [
    &REQUESTS,
    &TOKENS,
    &TOKENS_ESTIMATED,
    &COST_USD,
    &COST_MICRO_USD,
    &DURATION_SECONDS,
    &DURATION_MILLISECONDS,
    &TTFT_SECONDS,
    &TTFT_MILLISECONDS,
    &FAILOVERS,
    &LIMIT_REFUSALS,
    &IN_FLIGHT,
    &LIMIT_REMAINING,
    &ALLOWANCE_USED_RATIO,
    &ALLOWANCE_USED_PPM,
    &KEY_STATE,
    &KEY_ATTEMPTS,
    &KEY_UNTIL,
    &KEY_MODEL_UNTIL,
    &KEY_LEARNED_REMAINING,
    &STORE_UP,
    &STORE_UNAVAILABLE,
    &VM_MEMORY,
];

/// On Redis (`store.kind: redis`): whether Redis answers (in Envoy, through the
/// store-server).
pub const STORE_UP: Family = family(
    "tollgate_store_up",
    "store.kind redis: 1 while Redis answers, 0 while it is down (requests then get store.on_failure's answer).",
    Kind::Gauge,
    &[],
);
pub const STORE_UNAVAILABLE: Family = family(
    "tollgate_store_unavailable_total",
    "store.kind redis: operations on shared state answered by store.on_failure because Redis was down, slow or failing.",
    Kind::Counter,
    &["on_failure"],
);

/// Envoy only: a worker VM's linear memory (the last worker to publish stands for all).
pub const VM_MEMORY: Family = family(
    "tollgate_vm_memory_bytes",
    "Envoy: the linear memory of a worker's Wasm VM.",
    Kind::Gauge,
    &[],
);

/// The token kinds of `TOKENS`, in the order of `Tokens::by_kind`.
pub const TOKEN_KINDS: [&str; 4] = ["input", "output", "cached_input", "cache_write"];

/// The `code` label's values besides the status classes: the gateway's own refusals
/// (`GatewayError::metric_code`), and `cancelled`.
pub const CODES: [&str; 34] = [
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "cancelled",
    "rate_limited",
    "quota_exhausted",
    "exceeds_limit",
    "keys_cooling",
    "keys_revoked",
    "keys_exhausted",
    "upstream_error",
    "unauthenticated",
    "model_not_allowed",
    "model_not_found",
    "invalid_request_body",
    "unsupported_parameter",
    "request_too_large_for_provider",
    "request_too_large",
    "not_found",
    "method_not_allowed",
    "request_timeout",
    "invalid_prompt_variable",
    "prompt_version_not_found",
    "prompt_not_allowed",
    "prompt_cannot_stream",
    "prompt_output_invalid",
    "content_rejected",
    "not_routed_by_gateway",
    "shared_state_unavailable",
    "gateway_busy",
    "internal_error",
    "upstream_timeout",
    "upstream_unavailable",
];

/// A `code` read back (Envoy's key role names its refusal to the gateway role): the known
/// value, or none.
pub fn known_code(code: &str) -> Option<&'static str> {
    CODES.iter().copied().find(|c| *c == code)
}

/// The status class label of an answer's status.
pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A request's tokens as its metrics count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    pub usage: Usage,
    /// Estimated by the gateway: the stream ended without the provider's usage.
    pub estimated: bool,
}

impl Tokens {
    /// `(kind, tokens)` for each of `TOKEN_KINDS`. Input excludes the cached and written
    /// parts, so that the kinds add up to what the provider billed.
    pub fn by_kind(&self) -> [(&'static str, u64); 4] {
        let u = &self.usage;
        let input = u
            .prompt_tokens
            .saturating_sub(u.cached_prompt_tokens)
            .saturating_sub(u.cache_write_tokens);
        [
            (TOKEN_KINDS[0], input),
            (TOKEN_KINDS[1], u.completion_tokens),
            (TOKEN_KINDS[2], u.cached_prompt_tokens),
            (TOKEN_KINDS[3], u.cache_write_tokens),
        ]
    }
}

/// What one finished request adds to the metrics, from its `Summary`. Empty labels stand
/// for "none" (a request refused before its consumer or model was known).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestFigures<'a> {
    pub consumer: &'a str,
    pub model: &'a str,
    /// The model the client asked for, when another one served it.
    pub failed_over_from: Option<&'a str>,
    pub provider: &'a str,
    pub code: &'static str,
    pub tokens: Option<Tokens>,
    /// The cost in millionths of a dollar, rounded up (Envoy's integer counter).
    pub micro_usd: u64,
    /// The cost in dollars, unrounded.
    pub usd: f64,
    /// The limit that refused it: `(scope label, limit name)`.
    pub refused_by: Option<(&'a str, &'static str)>,
}

impl crate::exchange::Summary {
    pub fn figures(&self) -> RequestFigures<'_> {
        RequestFigures {
            consumer: self.consumer.as_deref().unwrap_or(""),
            model: self.model.as_deref().unwrap_or(""),
            failed_over_from: self
                .requested_model
                .as_deref()
                .filter(|r| self.model.as_deref().is_some_and(|m| m != *r)),
            provider: self.provider.as_deref().unwrap_or(""),
            code: self.code,
            tokens: self.tokens,
            micro_usd: self.micro_usd,
            usd: self.usd,
            refused_by: self
                .refused_by
                .as_ref()
                .map(|(scope, limit)| (&**scope, *limit)),
        }
    }
}

/// One gauge value read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub family: &'static Family,
    pub labels: Vec<&'a str>,
    pub value: f64,
}

/// The gauges that describe shared state now: each limit's remaining room and each
/// allowance's use, each key's state, cooldown end and learned headroom, and the key
/// attempt counters (which the native host keeps in the store). Read at scrape time by the
/// native host, on the root tick by Envoy.
pub fn standing<'c>(config: &'c Config, store: &impl CounterStore, now_ms: u64) -> StandingSet<'c> {
    let mut limits = Vec::new();
    for limit in config.all_limits() {
        // A counter the store cannot read now is left out, not shown as untouched.
        let Ok(state) = limits::read(store, &limit.store_key) else {
            continue;
        };
        let standing = limit.standing(state, now_ms);
        let used_ppm = match (limit.meter, standing.used) {
            (Meter::Quota(q), Some((used, _))) if q.limit > 0 => {
                Some(used.min(q.limit).saturating_mul(1_000_000) / q.limit)
            }
            _ => None,
        };
        limits.push(LimitStanding {
            scope: &limit.label,
            limit: limit.name,
            remaining: standing.remaining,
            used_ppm,
        });
    }
    let mut keys = Vec::new();
    for pool in report::pools(config, store, now_ms) {
        let Some((pi, provider)) = config
            .providers()
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == pool.provider)
        else {
            continue;
        };
        for report in pool.keys {
            let Some(ki) = provider.keys.iter().position(|k| k.id == report.id) else {
                continue;
            };
            // Every upstream model the key keeps a per-model record for, cooling or not,
            // so that a gauge goes back to 0 when its cooldown ends.
            let mut models: Vec<(String, u64)> = config
                .models()
                .iter()
                .filter(|m| m.provider == pi && !m.key_model_health.is_empty())
                .filter(|m| m.pool.contains(&ki))
                .map(|m| {
                    let until = report.cooling_models.get(&m.upstream_model).copied();
                    (m.upstream_model.clone(), until.unwrap_or(0) / 1_000)
                })
                .collect();
            models.sort();
            models.dedup();
            keys.push(KeyStanding {
                provider: pool.provider.clone(),
                report,
                models,
            });
        }
    }
    StandingSet { limits, keys }
}

/// A key as its gauges show it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStanding {
    pub provider: String,
    pub report: KeyReport,
    /// `(upstream model, Unix seconds its cooldown for that model ends or 0)`, for providers
    /// whose limits are per model.
    pub models: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LimitStanding<'c> {
    pub scope: &'c str,
    pub limit: &'static str,
    pub remaining: u64,
    /// Allowances: the period's use in millionths of the allowance.
    pub used_ppm: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StandingSet<'c> {
    pub limits: Vec<LimitStanding<'c>>,
    pub keys: Vec<KeyStanding>,
}

/// The `outcome` label values of `KEY_ATTEMPTS`, with the counter each reads.
pub const KEY_OUTCOMES: [(&str, KeyCounter); 6] = [
    ("succeeded", KeyCounter::Succeeded),
    ("rate_limited", KeyCounter::RateLimited),
    ("exhausted", KeyCounter::Exhausted),
    ("refused", KeyCounter::Refused),
    ("server_errors", KeyCounter::ServerErrors),
    ("unreachable", KeyCounter::Unreachable),
];

/// The `outcome` label of one attempt with a key (`status` `None`: the provider never
/// answered; `class`: what its refusal meant): `other` for an answer that says nothing of
/// the key (a 4xx that is no refusal of it).
pub fn key_outcome(status: Option<u16>, class: Option<RefusalClass>) -> &'static str {
    KeyCounter::of(status, class)
        .and_then(|c| KEY_OUTCOMES.iter().find(|(_, k)| *k == c))
        .map_or("other", |(label, _)| label)
}

/// Envoy: the stat name of one series, its labels inside the name
/// (`tollgate_requests_total.consumer=app;.model=gpt-4o;…`) for `envoy_tag_extractors` to take
/// out again. `=` and `;` in a value become `_`, so the form is unambiguous.
pub fn envoy_stat_name(family: &Family, values: &[&str]) -> String {
    let mut name = String::with_capacity(64);
    name.push_str(family.name);
    for (label, value) in family.labels.iter().zip(values) {
        name.push('.');
        name.push_str(label);
        name.push('=');
        // The form's own marks cannot be in a value (model names may hold them).
        name.extend(
            value
                .chars()
                .map(|c| if matches!(c, '=' | ';') { '_' } else { c }),
        );
        name.push(';');
    }
    name
}

/// Envoy: the `stats_config.stats_tags` that turn `envoy_stat_name`'s labels into tags:
/// `(tag name, regex)`; the regex's first group is cut from the name, its second is the value.
pub fn envoy_tag_extractors() -> Vec<(&'static str, String)> {
    let mut labels: Vec<&'static str> = FAMILIES
        .iter()
        .filter(|f| f.in_envoy)
        .flat_map(|f| f.labels.iter().copied())
        .collect();
    labels.sort_unstable();
    labels.dedup();
    labels
        .into_iter()
        .map(|l| (l, format!(r"(\.{l}=([^;]*);)")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GatewayError;

    #[test]
    fn every_refusal_code_is_known() {
        let errors = [
            GatewayError::MissingConsumerKey,
            GatewayError::UnknownConsumerKey,
            GatewayError::ModelNotAllowed { model: "m".into() },
            GatewayError::UnknownModel { model: "m".into() },
            GatewayError::MalformedBody { detail: "d".into() },
            GatewayError::BodyTooLarge { limit: 1 },
            GatewayError::UnsupportedParameter {
                param: "p".into(),
                provider_kind: "k",
                reason: "r".into(),
            },
            GatewayError::UpstreamInvalidAnswer {
                provider: "p".into(),
            },
            GatewayError::UpstreamAnswerTooLarge {
                provider: "p".into(),
                limit: 1,
            },
            GatewayError::NotFound { path: "/".into() },
            GatewayError::MethodNotAllowed {
                method: "GET".into(),
                path: "/".into(),
                allowed: "POST",
            },
            GatewayError::RequestTimeout,
            GatewayError::UpstreamUnavailable {
                provider: "p".into(),
            },
            GatewayError::UpstreamAuthFailed {
                provider: "p".into(),
            },
            GatewayError::UpstreamTimeout {
                provider: "p".into(),
            },
            GatewayError::UpstreamErrorNotJson {
                provider: "p".into(),
                status: 502,
            },
            GatewayError::NotRoutedByGateway,
            GatewayError::RateLimited {
                limit: "l",
                scope: "s".into(),
                label: "consumer:s".into(),
                retry_after_ms: 1,
            },
            GatewayError::QuotaExhausted {
                limit: "l",
                scope: "s".into(),
                label: "consumer:s".into(),
                retry_after_ms: 1,
            },
            GatewayError::ExceedsLimit {
                limit: "l",
                scope: "s".into(),
                label: "consumer:s".into(),
                requested: 2,
                capacity: 1,
            },
            GatewayError::KeysCooling {
                provider: "p".into(),
                retry_after_ms: 1,
            },
            GatewayError::KeysRevoked {
                provider: "p".into(),
            },
            GatewayError::KeysExhausted {
                provider: "p".into(),
                retry_after_ms: 1,
            },
            GatewayError::RequestTooLargeForProvider {
                provider: "p".into(),
                reason: "r".into(),
            },
            GatewayError::RetryBudgetSpent {
                provider: "p".into(),
                attempts: 2,
            },
            GatewayError::InvalidPromptVariable {
                variable: "v".into(),
                problem: "p".into(),
            },
            GatewayError::PromptVersionNotFound {
                prompt: "p".into(),
                requested: "9".into(),
                available: vec![1],
            },
            GatewayError::PromptNotAllowed { prompt: "p".into() },
            GatewayError::PromptCannotStream { prompt: "p".into() },
            GatewayError::PromptOutputInvalid {
                prompt: "p".into(),
                detail: "d".into(),
            },
            GatewayError::ContentRejected { rule: "r".into() },
            GatewayError::SharedStateUnavailable { detail: "d".into() },
            GatewayError::GatewayBusy,
            GatewayError::Internal { detail: "d".into() },
        ];
        for e in &errors {
            assert_eq!(known_code(e.metric_code()), Some(e.metric_code()), "{e:?}");
        }
    }

    #[test]
    fn envoy_names_carry_their_labels_for_the_extractors() {
        let name = envoy_stat_name(&REQUESTS, &["app", "gpt-4.1", "openai", "2xx"]);
        assert_eq!(
            name,
            "tollgate_requests_total.consumer=app;.model=gpt-4.1;.provider=openai;.code=2xx;"
        );
        let extractors = envoy_tag_extractors();
        let tags: Vec<&str> = extractors.iter().map(|(t, _)| *t).collect();
        for label in [
            "consumer", "model", "provider", "code", "scope", "limit", "key",
        ] {
            assert!(tags.contains(&label), "{label}");
        }
    }

    #[test]
    fn token_kinds_add_up_to_what_was_billed() {
        let t = Tokens {
            usage: Usage {
                prompt_tokens: 100,
                completion_tokens: 20,
                cached_prompt_tokens: 30,
                cache_write_tokens: 10,
            },
            estimated: false,
        };
        let kinds = t.by_kind();
        assert_eq!(kinds[0], ("input", 60));
        assert_eq!(kinds.iter().map(|(_, n)| n).sum::<u64>(), 120);
    }

    #[test]
    fn millisecond_twins_have_the_same_buckets() {
        for (s, ms) in [
            (&DURATION_SECONDS, &DURATION_MILLISECONDS),
            (&TTFT_SECONDS, &TTFT_MILLISECONDS),
        ] {
            let scaled: Vec<f64> = s.buckets.iter().map(|b| (b * 1_000.0).round()).collect();
            assert_eq!(scaled, ms.buckets, "{}", ms.name);
        }
    }

    #[test]
    fn twins_are_exported_by_envoy_and_fractions_are_not() {
        for f in FAMILIES {
            let fractional = f.name.ends_with("_seconds") && f.kind == Kind::Histogram
                || f.name.ends_with("_ratio")
                || f.name == "tollgate_cost_usd_total";
            assert_eq!(f.in_envoy, !fractional, "{}", f.name);
            assert_eq!(
                f.kind == Kind::Histogram,
                !f.buckets.is_empty(),
                "{}",
                f.name
            );
        }
    }
}
