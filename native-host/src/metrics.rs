//! The native host's Prometheus metrics: the families `tollgate_core::metrics` defines, kept
//! with `prometheus-client`, and served on `server.metrics_listen` as `GET /metrics`.
//! Request figures are added as each request ends; the state of limits and keys is read
//! from the store at each scrape.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};
use tollgate_core::exchange::Summary;
use tollgate_core::metrics::{self as m, Family as Def, Kind};

use crate::proxy::Gateway;
use crate::shards;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, shards::Counter>;
type FloatCounters = Family<Labels, shards::FloatCounter>;

/// The series of one twin histogram family (`seconds` and its `milliseconds` twin).
#[derive(Debug)]
struct Twins {
    seconds: &'static Def,
    milliseconds: &'static Def,
    series: RwLock<HashMap<Labels, Arc<shards::Histogram>>>,
}

impl Twins {
    fn new(seconds: &'static Def, milliseconds: &'static Def) -> Self {
        Self {
            seconds,
            milliseconds,
            series: RwLock::new(HashMap::new()),
        }
    }

    /// One histogram, kept once and exported twice: in seconds (the Prometheus convention)
    /// and in milliseconds (the twin Envoy can hold).
    fn get_or_create(&self, labels: Labels) -> Arc<shards::Histogram> {
        if let Some(h) = self
            .series
            .read()
            .ok()
            .and_then(|m| m.get(&labels).cloned())
        {
            return h;
        }
        let mut series = match self.series.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(
            series
                .entry(labels)
                .or_insert_with(|| Arc::new(shards::Histogram::new(self.seconds.buckets))),
        )
    }
}

impl Collector for Twins {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series: Vec<(Labels, Arc<shards::Histogram>)> = match self.series.read() {
            Ok(s) => s.iter().map(|(l, h)| (l.clone(), Arc::clone(h))).collect(),
            Err(_) => return Ok(()),
        };
        for (def, per_second) in [(self.seconds, 1.0), (self.milliseconds, 1_000.0)] {
            let mut family = encoder.encode_descriptor(
                def.name,
                def.help.trim_end_matches('.'),
                None,
                MetricType::Histogram,
            )?;
            for (labels, h) in &series {
                let v = h.values();
                // Per bucket, not cumulative: the encoder adds them up.
                let buckets: Vec<(f64, u64)> = self
                    .seconds
                    .buckets
                    .iter()
                    .zip(&v.buckets)
                    .map(|(bound, n)| (bound * per_second, *n))
                    .collect();
                let (sum, count) = (v.sum_s * per_second, v.count);
                family
                    .encode_family(labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

pub struct Metrics {
    /// Tells this instance's handles from another's in the per-thread cache.
    id: u64,
    registry: Registry,
    requests: Counters,
    tokens: Counters,
    tokens_estimated: Counters,
    cost_usd: FloatCounters,
    cost_micro_usd: Counters,
    duration: Arc<Twins>,
    ttft: Arc<Twins>,
    refusals: Counters,
    failovers: Counters,
    key_attempts: Counters,
    in_flight: Family<Labels, shards::Gauge>,
}

/// A request counted in `tollgate_in_flight` whose exchange may still be dropped without
/// ending: counted out when dropped, unless `keep` says the exchange will end (and `record`
/// count it out).
pub struct Entered<'m> {
    metrics: &'m Metrics,
    consumer: Option<String>,
}

impl Entered<'_> {
    pub fn keep(mut self) {
        self.consumer = None;
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(consumer) = &self.consumer {
            self.metrics.in_flight_of(consumer, |g| g.add(-1));
        }
    }
}

/// One thread's handles of one (consumer, model, provider): clones of the families'
/// metrics, which share their values.
#[derive(Default)]
struct Handles {
    requests: Vec<(&'static str, shards::Counter)>,
    /// Per token kind: (total, estimated).
    tokens: [Option<(shards::Counter, shards::Counter)>; 4],
    cost: Option<(shards::FloatCounter, shards::Counter)>,
    /// Duration, and time to first token.
    latency: Option<[Arc<shards::Histogram>; 2]>,
    in_flight: Option<shards::Gauge>,
}

thread_local! {
    /// The series key being looked up (reused), and the handles by series key.
    static SERIES: RefCell<(String, HashMap<String, Handles>)> = RefCell::new((String::new(), HashMap::new()));
}

fn labels(def: &Def, values: &[&str]) -> Labels {
    def.labels
        .iter()
        .zip(values)
        .map(|(l, v)| (*l, (*v).to_string()))
        .collect()
}

/// Registers `metric` under the family's name: prometheus-client adds a counter's `_total`
/// and the help's full stop itself.
fn register(registry: &mut Registry, def: &Def, metric: impl Metric) {
    let name = match def.kind {
        Kind::Counter => def.name.strip_suffix("_total").unwrap_or(def.name),
        _ => def.name,
    };
    registry.register(name, def.help.trim_end_matches('.'), metric);
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Counters::default();
        let tokens = Counters::default();
        let tokens_estimated = Counters::default();
        let cost_usd = FloatCounters::default();
        let cost_micro_usd = Counters::default();
        let duration = Arc::new(Twins::new(&m::DURATION_SECONDS, &m::DURATION_MILLISECONDS));
        let ttft = Arc::new(Twins::new(&m::TTFT_SECONDS, &m::TTFT_MILLISECONDS));
        let refusals = Counters::default();
        let failovers = Counters::default();
        let key_attempts = Counters::default();
        let in_flight = Family::<Labels, shards::Gauge>::default();
        register(&mut registry, &m::REQUESTS, requests.clone());
        register(&mut registry, &m::TOKENS, tokens.clone());
        register(
            &mut registry,
            &m::TOKENS_ESTIMATED,
            tokens_estimated.clone(),
        );
        register(&mut registry, &m::COST_USD, cost_usd.clone());
        register(&mut registry, &m::COST_MICRO_USD, cost_micro_usd.clone());
        registry.register_collector(Box::new(Arc::clone(&duration)));
        registry.register_collector(Box::new(Arc::clone(&ttft)));
        register(&mut registry, &m::FAILOVERS, failovers.clone());
        register(&mut registry, &m::KEY_ATTEMPTS, key_attempts.clone());
        register(&mut registry, &m::LIMIT_REFUSALS, refusals.clone());
        register(&mut registry, &m::IN_FLIGHT, in_flight.clone());
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            registry,
            requests,
            tokens,
            tokens_estimated,
            cost_usd,
            cost_micro_usd,
            duration,
            ttft,
            refusals,
            failovers,
            key_attempts,
            in_flight,
        }
    }
}

impl Metrics {
    /// A request of `consumer` began (its consumer is known once its head is read). The
    /// request is counted out by `record`, or by the guard if it is dropped first.
    pub fn enter<'m>(&'m self, consumer: Option<&str>) -> Entered<'m> {
        if let Some(consumer) = consumer {
            self.in_flight_of(consumer, |g| g.add(1));
        }
        Entered {
            metrics: self,
            consumer: consumer.map(str::to_string),
        }
    }

    fn in_flight_of(&self, consumer: &str, f: impl FnOnce(&shards::Gauge)) {
        self.with_series(consumer, "", "", |s| {
            f(s.in_flight.get_or_insert_with(|| {
                self.in_flight
                    .get_or_create(&labels(&m::IN_FLIGHT, &[consumer]))
                    .clone()
            }))
        });
    }

    /// A request ended: what it adds. `first_byte`: when its answer's first bytes went out.
    pub fn record(&self, summary: &Summary, started: Instant, first_byte: Option<Instant>) {
        let f = summary.figures();
        if summary.consumer.is_some() {
            // Perhaps on another thread than the one it entered on: the handle is found or
            // made here too.
            self.in_flight_of(f.consumer, |g| {
                g.add(-1);
            });
        }
        self.with_series(f.consumer, f.model, f.provider, |s| {
            let requests = match s.requests.iter().find(|(code, _)| *code == f.code) {
                Some((_, c)) => c.clone(),
                None => {
                    let c = self
                        .requests
                        .get_or_create(&labels(
                            &m::REQUESTS,
                            &[f.consumer, f.model, f.provider, f.code],
                        ))
                        .clone();
                    s.requests.push((f.code, c.clone()));
                    c
                }
            };
            requests.inc_by(1);
            if let Some(tokens) = f.tokens {
                for (i, (kind, n)) in tokens.by_kind().into_iter().enumerate() {
                    if n == 0 {
                        continue;
                    }
                    let Some(slot) = s.tokens.get_mut(i) else {
                        continue;
                    };
                    let (total, estimated) = slot.get_or_insert_with(|| {
                        let l = labels(&m::TOKENS, &[f.consumer, f.model, f.provider, kind]);
                        (
                            self.tokens.get_or_create(&l).clone(),
                            self.tokens_estimated.get_or_create(&l).clone(),
                        )
                    });
                    if tokens.estimated {
                        estimated.inc_by(n);
                    }
                    total.inc_by(n);
                }
            }
            if f.micro_usd > 0 {
                let (usd, micro) = s.cost.get_or_insert_with(|| {
                    let l = labels(&m::COST_USD, &[f.consumer, f.model]);
                    (
                        self.cost_usd.get_or_create(&l).clone(),
                        self.cost_micro_usd.get_or_create(&l).clone(),
                    )
                });
                usd.inc_by(f.usd);
                micro.inc_by(f.micro_usd);
            }
            if summary.provider.is_some() {
                let [duration, ttft] = s.latency.get_or_insert_with(|| {
                    let l = labels(&m::DURATION_SECONDS, &[f.model, f.provider]);
                    [
                        self.duration.get_or_create(l.clone()),
                        self.ttft.get_or_create(l),
                    ]
                });
                duration.observe(started.elapsed());
                if let (true, Some(t)) = (summary.stream, first_byte) {
                    ttft.observe(t.saturating_duration_since(started));
                }
            }
        });
        if let Some(requested) = f.failed_over_from {
            self.failovers
                .get_or_create(&labels(&m::FAILOVERS, &[f.consumer, requested, f.model]))
                .inc_by(1);
        }
        if let Some((scope, limit)) = f.refused_by {
            self.refusals
                .get_or_create(&labels(&m::LIMIT_REFUSALS, &[scope, limit]))
                .inc_by(1);
        }
    }

    /// Runs `f` on this thread's handles of one (consumer, model, provider) series: each
    /// family's labelled metric is looked up (with its label strings built) once per thread,
    /// then reached with one hash lookup and no allocation. Labels are config names, so the
    /// cache is bounded by the config.
    fn with_series(
        &self,
        consumer: &str,
        model: &str,
        provider: &str,
        f: impl FnOnce(&mut Handles),
    ) {
        SERIES.with(|cache| {
            let mut cache = cache.borrow_mut();
            let (key, map) = &mut *cache;
            key.clear();
            let _ = write!(key, "{}\0{consumer}\0{model}\0{provider}", self.id);
            if let Some(handles) = map.get_mut(key.as_str()) {
                f(handles);
                return;
            }
            let mut handles = Handles::default();
            f(&mut handles);
            map.insert(key.clone(), handles);
        });
    }

    /// An attempt with a key, by outcome. Counted by this process, not read from the store:
    /// replicas sharing a store would each show every replica's attempts.
    pub fn key_attempt(
        &self,
        provider: &str,
        key: &str,
        status: Option<u16>,
        class: Option<tollgate_core::providers::refusal::RefusalClass>,
    ) {
        let outcome = m::key_outcome(status, class);
        self.key_attempts
            .get_or_create(&labels(&m::KEY_ATTEMPTS, &[provider, key, outcome]))
            .inc_by(1);
    }

    /// The Prometheus text of every family: those kept here, then the limits' and keys'
    /// standing read from the store now.
    pub fn render(&self, gateway: &Gateway) -> String {
        let mut out = String::new();
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let config = gateway.config();
        let standing = m::standing(&config, &gateway.store, crate::now_ms());
        let mut registry = Registry::default();
        let remaining = Family::<Labels, Gauge>::default();
        let ratio = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let ppm = Family::<Labels, Gauge>::default();
        for l in &standing.limits {
            let at = [l.scope, l.limit];
            remaining
                .get_or_create(&labels(&m::LIMIT_REMAINING, &at))
                .set(clamp(l.remaining));
            if let Some(used) = l.used_ppm {
                ratio
                    .get_or_create(&labels(&m::ALLOWANCE_USED_RATIO, &at))
                    .set(used as f64 / 1_000_000.0);
                ppm.get_or_create(&labels(&m::ALLOWANCE_USED_PPM, &at))
                    .set(clamp(used));
            }
        }
        let state = Family::<Labels, Gauge>::default();
        let until = Family::<Labels, Gauge>::default();
        let learned = Family::<Labels, Gauge>::default();
        let model_until = Family::<Labels, Gauge>::default();
        for k in &standing.keys {
            let (provider, key) = (&k.provider, &k.report);
            let at = [provider.as_str(), key.id.as_str()];
            for (model, until_s) in &k.models {
                model_until
                    .get_or_create(&labels(
                        &m::KEY_MODEL_UNTIL,
                        &[provider.as_str(), key.id.as_str(), model],
                    ))
                    .set(clamp(*until_s));
            }
            state
                .get_or_create(&labels(&m::KEY_STATE, &at))
                .set(clamp(key.state.gauge()));
            until
                .get_or_create(&labels(&m::KEY_UNTIL, &at))
                .set(clamp(key.until_ms.unwrap_or(0) / 1_000));
            learned
                .get_or_create(&labels(&m::KEY_LEARNED_REMAINING, &at))
                .set(clamp(key.learned_remaining.unwrap_or(0)));
        }
        register(&mut registry, &m::LIMIT_REMAINING, remaining);
        register(&mut registry, &m::ALLOWANCE_USED_RATIO, ratio);
        register(&mut registry, &m::ALLOWANCE_USED_PPM, ppm);
        register(&mut registry, &m::KEY_STATE, state);
        register(&mut registry, &m::KEY_UNTIL, until);
        register(&mut registry, &m::KEY_MODEL_UNTIL, model_until);
        register(&mut registry, &m::KEY_LEARNED_REMAINING, learned);
        if let Some(redis) = gateway.store.redis() {
            let up = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
            up.set(i64::from(redis.is_up()));
            let unavailable = Family::<Labels, shards::Counter>::default();
            unavailable
                .get_or_create(&labels(
                    &m::STORE_UNAVAILABLE,
                    &[redis.on_failure().as_str()],
                ))
                .inc_by(redis.unavailable());
            register(&mut registry, &m::STORE_UP, up);
            register(&mut registry, &m::STORE_UNAVAILABLE, unavailable);
        }
        let _ = prometheus_text::encode(&mut out, &registry);
        out
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Serves `GET /metrics` on `listener` until the process ends: Prometheus' scrapes only,
/// on a listener of its own so that the gateway's port never exposes them.
pub async fn serve(gateway: Arc<Gateway>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let gateway = Arc::clone(&gateway);
                async move { Ok::<_, std::convert::Infallible>(answer(&gateway, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            // A scraper that stalls is dropped with its connection.
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

fn answer(gateway: &Gateway, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => (
            200,
            prometheus_text::CONTENT_TYPE,
            gateway.metrics.render(gateway),
        ),
        (_, "/metrics") => (405, "text/plain", "use GET\n".to_string()),
        _ => (404, "text/plain", "metrics are at /metrics\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// Binds `server.metrics_listen` (or the command line's address). A gateway whose metrics
/// port is taken still serves traffic: the failure is logged, and metrics are off.
pub async fn bind(addr: &str) -> Option<tokio::net::TcpListener> {
    if addr.is_empty() {
        return None;
    }
    let parsed: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(address = addr, "metrics are off: {e}");
            return None;
        }
    };
    match tokio::net::TcpListener::bind(parsed).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(address = addr, "metrics are off: cannot listen: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::metrics::Tokens;
    use tollgate_core::providers::openai::usage::Usage;

    fn summary() -> Summary {
        Summary {
            consumer: Some("app".into()),
            model: Some("gpt-4o-mini".into()),
            requested_model: Some("gpt-4o-mini".into()),
            provider: Some("openai".into()),
            status: Some(200),
            code: "2xx",
            tokens: Some(Tokens {
                usage: Usage {
                    prompt_tokens: 10,
                    completion_tokens: 5,
                    ..Usage::default()
                },
                estimated: false,
            }),
            micro_usd: 20,
            usd: 0.00002,
            ..Summary::default()
        }
    }

    fn text(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &m.registry).unwrap();
        out
    }

    #[test]
    fn a_request_that_ends_on_another_thread_leaves_the_in_flight_gauge() {
        let m = Arc::new(Metrics::default());
        m.enter(Some("app")).keep();
        assert!(text(&m).contains("tollgate_in_flight{consumer=\"app\"} 1"));
        let other = Arc::clone(&m);
        std::thread::spawn(move || other.record(&summary(), Instant::now(), None))
            .join()
            .unwrap();
        let out = text(&m);
        assert!(
            out.contains("tollgate_in_flight{consumer=\"app\"} 0"),
            "{out}"
        );
    }

    #[test]
    fn a_request_dropped_before_it_could_end_is_counted_out() {
        let m = Metrics::default();
        drop(m.enter(Some("app")));
        let out = text(&m);
        assert!(
            out.contains("tollgate_in_flight{consumer=\"app\"} 0"),
            "{out}"
        );
    }

    #[test]
    fn repeated_requests_add_to_the_same_series() {
        let m = Metrics::default();
        for _ in 0..3 {
            m.enter(Some("app")).keep();
            m.record(&summary(), Instant::now(), None);
        }
        let out = text(&m);
        for line in [
            "tollgate_requests_total{consumer=\"app\",model=\"gpt-4o-mini\",provider=\"openai\",code=\"2xx\"} 3",
            "tollgate_tokens_total{consumer=\"app\",model=\"gpt-4o-mini\",provider=\"openai\",kind=\"input\"} 30",
            "tollgate_tokens_total{consumer=\"app\",model=\"gpt-4o-mini\",provider=\"openai\",kind=\"output\"} 15",
            "tollgate_cost_micro_usd_total{consumer=\"app\",model=\"gpt-4o-mini\"} 60",
            "tollgate_request_duration_milliseconds_count{model=\"gpt-4o-mini\",provider=\"openai\"} 3",
        ] {
            assert!(out.contains(line), "no `{line}` in\n{out}");
        }
        assert!(!out.contains("kind=\"cached_input\""), "{out}");
        for line in [
            "tollgate_request_duration_seconds_count{model=\"gpt-4o-mini\",provider=\"openai\"} 3",
            "tollgate_request_duration_seconds_bucket{model=\"gpt-4o-mini\",provider=\"openai\",le=\"0.01\"} 3",
            "tollgate_request_duration_milliseconds_bucket{model=\"gpt-4o-mini\",provider=\"openai\",le=\"10\"} 3",
            "tollgate_request_duration_seconds_bucket{model=\"gpt-4o-mini\",provider=\"openai\",le=\"300\"} 3",
            "tollgate_request_duration_seconds_bucket{model=\"gpt-4o-mini\",provider=\"openai\",le=\"+Inf\"} 3",
        ] {
            assert!(out.contains(line), "no `{line}` in\n{out}");
        }
    }
}
