//! The native host's Prometheus metrics: the families `tollgate_core::metrics` defines, kept
//! with `prometheus-client`, and served on `server.metrics_listen` as `GET /metrics`.
//! Request figures are added as each request ends; the state of limits and keys is read
//! from the store at each scrape.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use tollgate_core::exchange::Summary;
use tollgate_core::metrics::{self as m, Family as Def, Kind};

use crate::proxy::Gateway;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type FloatCounters = Family<Labels, Counter<f64, AtomicU64>>;
type Histograms = Family<Labels, Histogram, Buckets>;

/// Makes each series' histogram with its family's buckets.
#[derive(Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Counters,
    tokens: Counters,
    tokens_estimated: Counters,
    cost_usd: FloatCounters,
    cost_micro_usd: Counters,
    duration_s: Histograms,
    duration_ms: Histograms,
    ttft_s: Histograms,
    ttft_ms: Histograms,
    refusals: Counters,
    failovers: Counters,
    in_flight: Family<Labels, Gauge>,
}

fn labels(def: &Def, values: &[&str]) -> Labels {
    def.labels
        .iter()
        .zip(values)
        .map(|(l, v)| (*l, (*v).to_string()))
        .collect()
}

fn histograms(def: &'static Def) -> Histograms {
    Family::new_with_constructor(Buckets(def.buckets))
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
        let duration_s = histograms(&m::DURATION_SECONDS);
        let duration_ms = histograms(&m::DURATION_MILLISECONDS);
        let ttft_s = histograms(&m::TTFT_SECONDS);
        let ttft_ms = histograms(&m::TTFT_MILLISECONDS);
        let refusals = Counters::default();
        let failovers = Counters::default();
        let in_flight = Family::<Labels, Gauge>::default();
        register(&mut registry, &m::REQUESTS, requests.clone());
        register(&mut registry, &m::TOKENS, tokens.clone());
        register(
            &mut registry,
            &m::TOKENS_ESTIMATED,
            tokens_estimated.clone(),
        );
        register(&mut registry, &m::COST_USD, cost_usd.clone());
        register(&mut registry, &m::COST_MICRO_USD, cost_micro_usd.clone());
        register(&mut registry, &m::DURATION_SECONDS, duration_s.clone());
        register(
            &mut registry,
            &m::DURATION_MILLISECONDS,
            duration_ms.clone(),
        );
        register(&mut registry, &m::TTFT_SECONDS, ttft_s.clone());
        register(&mut registry, &m::TTFT_MILLISECONDS, ttft_ms.clone());
        register(&mut registry, &m::FAILOVERS, failovers.clone());
        register(&mut registry, &m::LIMIT_REFUSALS, refusals.clone());
        register(&mut registry, &m::IN_FLIGHT, in_flight.clone());
        Self {
            registry,
            requests,
            tokens,
            tokens_estimated,
            cost_usd,
            cost_micro_usd,
            duration_s,
            duration_ms,
            ttft_s,
            ttft_ms,
            refusals,
            failovers,
            in_flight,
        }
    }
}

impl Metrics {
    /// A request of `consumer` began (its consumer is known once its head is read).
    pub fn enter(&self, consumer: &str) {
        self.in_flight
            .get_or_create(&labels(&m::IN_FLIGHT, &[consumer]))
            .inc();
    }

    /// A request ended: what it adds. `first_byte`: when its answer's first bytes went out.
    pub fn record(&self, summary: &Summary, started: Instant, first_byte: Option<Instant>) {
        let f = summary.figures();
        if summary.consumer.is_some() {
            self.in_flight
                .get_or_create(&labels(&m::IN_FLIGHT, &[f.consumer]))
                .dec();
        }
        self.requests
            .get_or_create(&labels(
                &m::REQUESTS,
                &[f.consumer, f.model, f.provider, f.code],
            ))
            .inc();
        if let Some(tokens) = f.tokens {
            for (kind, n) in tokens.by_kind().into_iter().filter(|(_, n)| *n > 0) {
                let l = labels(&m::TOKENS, &[f.consumer, f.model, f.provider, kind]);
                if tokens.estimated {
                    self.tokens_estimated.get_or_create(&l).inc_by(n);
                }
                self.tokens.get_or_create(&l).inc_by(n);
            }
        }
        if f.micro_usd > 0 {
            let l = labels(&m::COST_USD, &[f.consumer, f.model]);
            self.cost_usd.get_or_create(&l).inc_by(f.usd);
            self.cost_micro_usd.get_or_create(&l).inc_by(f.micro_usd);
        }
        if let Some(requested) = f.failed_over_from {
            self.failovers
                .get_or_create(&labels(&m::FAILOVERS, &[f.consumer, requested, f.model]))
                .inc();
        }
        if let Some((scope, limit)) = f.refused_by {
            self.refusals
                .get_or_create(&labels(&m::LIMIT_REFUSALS, &[scope, limit]))
                .inc();
        }
        if summary.provider.is_some() {
            let l = labels(&m::DURATION_SECONDS, &[f.model, f.provider]);
            let took = started.elapsed();
            self.duration_s
                .get_or_create(&l)
                .observe(took.as_secs_f64());
            self.duration_ms
                .get_or_create(&l)
                .observe(took.as_secs_f64() * 1_000.0);
            if let (true, Some(t)) = (summary.stream, first_byte) {
                let ttft = t.saturating_duration_since(started).as_secs_f64();
                self.ttft_s.get_or_create(&l).observe(ttft);
                self.ttft_ms.get_or_create(&l).observe(ttft * 1_000.0);
            }
        }
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
        let attempts = Counters::default();
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
            for (outcome, n) in m::key_attempts(key) {
                attempts
                    .get_or_create(&labels(
                        &m::KEY_ATTEMPTS,
                        &[provider.as_str(), key.id.as_str(), outcome],
                    ))
                    .inc_by(n);
            }
        }
        register(&mut registry, &m::LIMIT_REMAINING, remaining);
        register(&mut registry, &m::ALLOWANCE_USED_RATIO, ratio);
        register(&mut registry, &m::ALLOWANCE_USED_PPM, ppm);
        register(&mut registry, &m::KEY_STATE, state);
        register(&mut registry, &m::KEY_ATTEMPTS, attempts);
        register(&mut registry, &m::KEY_UNTIL, until);
        register(&mut registry, &m::KEY_MODEL_UNTIL, model_until);
        register(&mut registry, &m::KEY_LEARNED_REMAINING, learned);
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
