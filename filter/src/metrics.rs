//! tollgate's metrics as Envoy stats: the families of `tollgate_core::metrics`, each series
//! a stat whose name carries its labels (`metrics::envoy_stat_name`). The bootstrap's tag
//! extractors turn those into labels, and Envoy exports the stats on `/stats/prometheus`
//! under the families' own names (it strips its `wasmcustom.` namespace from filter stats).
//!
//! Counters and histograms are process-wide in Envoy: each worker's VM adds to the same
//! stat. Gauges of shared state (limits, keys) are set from the shared store every second
//! by the gateway role; `tollgate_in_flight` is moved up and down by each request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use tollgate_core::exchange::Summary;
use tollgate_core::metrics::{self as m, Family, Kind};
use tollgate_core::providers::refusal::RefusalClass;
use tollgate_core::Config;

use tollgate_core::store::CounterStore;

thread_local! {
    /// Each series' stat id in this VM. Envoy hands out a new id for every definition, so
    /// each is defined once; label values come from the config, so the map is bounded by it.
    /// Looked up by a hash of the family and the values, so that a request's metrics build
    /// no stat name (`envoy_stat_name`) once their series exist.
    static IDS: RefCell<HashMap<u64, Vec<Series>, BuildHasherDefault<Identity>>> =
        RefCell::new(HashMap::default());
}

/// One defined series: what identifies it, and its stat id.
struct Series {
    family: &'static str,
    values: Box<[Box<str>]>,
    id: u32,
}

impl Series {
    fn is(&self, family: &Family, values: &[&str]) -> bool {
        self.family == family.name
            && self.values.len() == values.len()
            && self.values.iter().zip(values).all(|(a, b)| **a == **b)
    }
}

/// FNV-1a over the family's name and the values, each ended by a byte UTF-8 never holds.
fn series_hash(family: &Family, values: &[&str]) -> u64 {
    fn add(mut hash: u64, part: &str) -> u64 {
        for &byte in part.as_bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        (hash ^ 0xff).wrapping_mul(0x0100_0000_01b3)
    }
    values
        .iter()
        .fold(add(0xcbf2_9ce4_8422_2325, family.name), |hash, v| {
            add(hash, v)
        })
}

/// The map's keys are hashes already.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The stat id of one series, defined on first use.
fn id(family: &Family, values: &[&str]) -> Option<u32> {
    let hash = series_hash(family, values);
    IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        let same_hash = ids.entry(hash).or_default();
        if let Some(series) = same_hash.iter().find(|s| s.is(family, values)) {
            return Some(series.id);
        }
        let kind = match family.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        };
        let id = hostcalls::define_metric(kind, &m::envoy_stat_name(family, values)).ok()?;
        same_hash.push(Series {
            family: family.name,
            values: values.iter().map(|v| Box::from(*v)).collect(),
            id,
        });
        Some(id)
    })
}

/// Adds `n` to a counter, or moves a gauge by `n`.
fn add(family: &Family, values: &[&str], n: i64) {
    if let Some(id) = id(family, values) {
        let _ = hostcalls::increment_metric(id, n);
    }
}

/// Sets a gauge, or records one value of a histogram.
fn record(family: &Family, values: &[&str], value: u64) {
    if let Some(id) = id(family, values) {
        let _ = hostcalls::record_metric(id, value);
    }
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A request of `consumer` began.
pub fn enter(consumer: &str) {
    add(&m::IN_FLIGHT, &[consumer], 1);
}

/// A request ended: what it adds. Times in milliseconds; `first_byte_ms` from the request's
/// start to its answer's first bytes.
pub fn request_ended(summary: &Summary, duration_ms: u64, first_byte_ms: Option<u64>) {
    let f = summary.figures();
    if summary.consumer.is_some() {
        add(&m::IN_FLIGHT, &[f.consumer], -1);
    }
    add(&m::REQUESTS, &[f.consumer, f.model, f.provider, f.code], 1);
    if let Some(tokens) = f.tokens {
        for (kind, n) in tokens.by_kind().into_iter().filter(|(_, n)| *n > 0) {
            let at = [f.consumer, f.model, f.provider, kind];
            if tokens.estimated {
                add(&m::TOKENS_ESTIMATED, &at, count(n));
            }
            add(&m::TOKENS, &at, count(n));
        }
    }
    if f.micro_usd > 0 {
        add(
            &m::COST_MICRO_USD,
            &[f.consumer, f.model],
            count(f.micro_usd),
        );
    }
    if let Some(requested) = f.failed_over_from {
        add(&m::FAILOVERS, &[f.consumer, requested, f.model], 1);
    }
    if let Some((scope, limit)) = f.refused_by {
        limit_refused(scope, limit);
    }
    if summary.provider.is_some() {
        let at = [f.model, f.provider];
        record(&m::DURATION_MILLISECONDS, &at, duration_ms);
        if let (true, Some(ttft)) = (summary.stream, first_byte_ms) {
            record(&m::TTFT_MILLISECONDS, &at, ttft);
        }
    }
}

/// A limit refused a request (the key role counts its own, the gateway role the rest).
pub fn limit_refused(scope: &str, limit: &str) {
    add(&m::LIMIT_REFUSALS, &[scope, limit], 1);
}

/// Counts an attempt with a key by its outcome (`status` `None`: the provider never
/// answered; `class`: what its refusal meant).
pub fn key_attempt(provider: &str, key: &str, status: Option<u16>, class: Option<RefusalClass>) {
    let outcome = m::key_outcome(status, class);
    add(&m::KEY_ATTEMPTS, &[provider, key, outcome], 1);
}

/// Sets the gauges of shared state from the shared store: each limit's remaining room and
/// each allowance's use, each key's state, cooldown end and learned headroom; and this VM's
/// memory.
pub fn publish(config: &Config, now_ms: u64, store: &impl CounterStore) {
    record(&m::VM_MEMORY, &[], linear_memory_bytes());
    let standing = m::standing(config, store, now_ms);
    for l in &standing.limits {
        let at = [l.scope, l.limit];
        record(&m::LIMIT_REMAINING, &at, l.remaining);
        if let Some(used) = l.used_ppm {
            record(&m::ALLOWANCE_USED_PPM, &at, used);
        }
    }
    for k in &standing.keys {
        let key = &k.report;
        let at = [k.provider.as_str(), key.id.as_str()];
        record(&m::KEY_STATE, &at, key.state.gauge());
        record(&m::KEY_UNTIL, &at, key.until_ms.unwrap_or(0) / 1_000);
        record(
            &m::KEY_LEARNED_REMAINING,
            &at,
            key.learned_remaining.unwrap_or(0),
        );
        for (model, until_s) in &k.models {
            record(
                &m::KEY_MODEL_UNTIL,
                &[k.provider.as_str(), key.id.as_str(), model],
                *until_s,
            );
        }
    }
}

/// The size of this VM's linear memory: all the memory the filter's VM holds.
fn linear_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * 65_536
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

/// One more operation answered by `store.on_failure` (Redis down, slow or failing).
pub fn store_unavailable(on_failure: &str) {
    add(&m::STORE_UNAVAILABLE, &[on_failure], 1);
}

/// Whether Redis answers, as this worker last found (gateway role's gauge tick).
pub fn store_up(up: bool) {
    record(&m::STORE_UP, &[], u64::from(up));
}
