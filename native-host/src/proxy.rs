//! The native host's request path: carries out the core's decisions for one request with
//! hyper — read the body, call the provider with the chosen key, stream the answer back.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, Uri};
use tollgate_core::exchange::{
    is_request_id, Chunk, Forward, OnBody, OnHeaders, OnResponse, REQUEST_ID_HEADER,
};
use tollgate_core::http::{is_gateway_header, HeaderLookup, LocalResponse, RequestHead};
use tollgate_core::keys::{self, attempt_key, Attempted, KeyAttempt, Ticket};
use tollgate_core::limits::{self, Amounts, LeaseMarks, Reservation};
use tollgate_core::providers::refusal::{self, RefusalClass};
use tollgate_core::providers::Scheme;
use tollgate_core::retry::RetryPolicy;
use tollgate_core::{Config, Exchange, GatewayError};

use crate::access_log::{self, Ending};
use crate::admin::{self, AdminKey};
use crate::body::{GatewayBody, UpstreamBody};
use crate::metrics::Metrics;
use crate::request_body::{self, BodyBudget, ReadError};
use crate::store::{DecideOn, Store};
use crate::upstream::{self, ProviderBody};

/// Rounds a decision on Redis may lose to other replicas before it is made key by key.
const DECISION_ROUNDS: usize = 8;

/// What every request shares.
pub struct Gateway {
    /// Swapped whole on reload; requests keep the snapshot they started with.
    config: RwLock<Arc<Config>>,
    /// The same config with this process's share of every limit (`store.on_failure: local`),
    /// served while Redis is down.
    share: RwLock<Option<Arc<Config>>>,
    /// Counters outlive reloads: a limit that did not change keeps its key, so its state.
    pub store: Store,
    admin: AdminKey,
    /// `server.max_body_memory_bytes` as read at start.
    pub body_budget: BodyBudget,
    pub metrics: Metrics,
}

impl Gateway {
    /// The config a request starts with: the running one, or its local share while Redis is
    /// down under `on_failure: local`.
    pub fn config(&self) -> Arc<Config> {
        if self.store.on_local_share() {
            if let Some(share) = read(&self.share).clone() {
                return share;
            }
        }
        Arc::clone(&read(&self.config))
    }

    /// `share`: the same config divided by `store.replicas`, for `on_failure: local`.
    pub fn replace_config(&self, config: Config, share: Option<Config>) {
        let config = Arc::new(config);
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        let share = share.map(Arc::new);
        match self.share.write() {
            Ok(mut s) => *s = share,
            Err(poisoned) => *poisoned.into_inner() = share,
        }
    }

    pub fn new(
        config: Arc<Config>,
        share: Option<Config>,
        store: Store,
    ) -> Result<Self, rustls::Error> {
        // Built per worker thread when first needed; checked here so a bad one stops the start.
        crate::upstream::connector()?;
        let body_budget = BodyBudget::new(config.server.max_body_memory_bytes);
        Ok(Self {
            config: RwLock::new(config),
            share: RwLock::new(share.map(Arc::new)),
            store,
            admin: AdminKey::from_env(),
            body_budget,
            metrics: Metrics::default(),
        })
    }

    /// Runs a decision on the shared state. On Redis, it is a transaction (`store::Tx`):
    /// made on what this process last saw, committed in one round trip, and made again on
    /// the current values when another replica got in first (a few rounds, then key by key
    /// on the store itself). In memory, and while Redis is down (`on_failure`), it runs once
    /// on the store. `decide` must be a function of the store alone: it may run again.
    pub async fn decide<R>(&self, mut decide: impl FnMut(&DecideOn<'_>) -> R) -> R {
        let Some(redis) = self.store.transacting() else {
            return decide(&DecideOn::Left(&self.store));
        };
        for _ in 0..DECISION_ROUNDS {
            let (out, commit) = redis.decide(|tx| decide(&DecideOn::Right(tx)));
            if commit.ops.is_empty() {
                return out;
            }
            match redis.commit(&commit).await {
                Ok(true) => return out,
                Ok(false) => continue,
                // Down now: `on_failure` answers.
                Err(_) => break,
            }
        }
        decide(&DecideOn::Left(&self.store))
    }

    /// Settles a reservation on what was used, at `now_ms`: on Redis queued, to go with the
    /// next batch (the response does not wait); else at once.
    pub fn settle(&self, reservation: Reservation, used: Amounts, now_ms: u64) {
        if reservation.is_empty() {
            return;
        }
        let Some(redis) = self.store.transacting() else {
            let _ = limits::settle(reservation, &self.store, now_ms, used);
            return;
        };
        let marks = LeaseMarks::of(&reservation);
        redis.defer(
            Box::new(move |tx| {
                let _ = limits::settle(reservation.clone(), tx, now_ms, used);
            }),
            marks,
        );
    }

    /// Ends an exchange, however it ended: settles its limits, writes its access log line
    /// and adds it to the metrics. `first_byte`: when a relayed body's first bytes went out.
    pub fn finished(
        &self,
        exchange: &mut Exchange,
        key_id: Option<&str>,
        started: Instant,
        ending: Ending,
        first_byte: Option<Instant>,
    ) {
        let now = crate::now_ms();
        let summary = exchange.finish_with(&mut |reservation, used| {
            self.settle(reservation, used, now);
        });
        access_log::record(&summary, key_id, started, ending, first_byte);
        self.metrics.record(&summary, started, first_byte);
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// hyper's header map seen through the core's lookup trait.
pub struct Headers<'a>(pub &'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), never relayed in either direction.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the headers `drop` names: one pass over the names the map has, then a removal for
/// each one found. Cheaper than removing every name of a list (34 on an answer) by string,
/// each parsed and hashed to find a header that is rarely there.
fn remove_where(headers: &mut HeaderMap, drop: impl Fn(&str) -> bool) {
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|name| drop(name.as_str()))
        .cloned()
        .collect();
    for name in found {
        headers.remove(name);
    }
}

/// The names the `Connection` header lists: hop-by-hop too (RFC 9110 §7.6.1).
fn connection_options(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Removes the hop-by-hop headers and those `also` names (lowercase, as header names are).
fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[&str]) {
    let options = connection_options(headers);
    remove_where(headers, |name| {
        HOP_BY_HOP.contains(&name) || also.contains(&name) || options.iter().any(|o| o == name)
    });
}

/// How long a client may take to send its request body.
const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one request. Every answer carries the request's `x-request-id`: the client's when
/// it sent a usable one, else one made here (also sent to the provider).
pub async fn handle(gw: Arc<Gateway>, mut req: Request<Incoming>) -> Response<GatewayBody> {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_request_id(id))
        .and_then(|id| HeaderValue::from_str(id).ok())
        .unwrap_or_else(new_request_id);
    req.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
    let mut response = serve(gw, req).await;
    response.headers_mut().insert(REQUEST_ID_HEADER, id);
    response
}

/// A new request id: 128 random bits, hex.
fn new_request_id() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    let random = || {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    let id = format!("{:016x}{:016x}", random(), random());
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

async fn serve(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<GatewayBody> {
    let started = Instant::now();
    let config = gw.config();
    let mut exchange = Exchange::new(Arc::clone(&config));
    let (parts, body) = req.into_parts();
    if parts.uri.path() == admin::KEYS_PATH {
        if let Some(r) = admin::keys(&gw.admin, parts.method.as_str(), &parts.headers, &gw) {
            return local(r);
        }
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let head = RequestHead {
        method: parts.method.as_str(),
        path,
        headers: &Headers(&parts.headers),
    };
    // On Redis, each decision is made on a new exchange, as often as it must be (`decide`).
    let transacting = gw.store.transacting().is_some();
    let headers = if transacting {
        let (x, headers) = gw
            .decide(|store| {
                let mut x = Exchange::new(Arc::clone(&config));
                let headers = x.on_request_headers(crate::now_ms(), &head, store);
                (x, headers)
            })
            .await;
        exchange = x;
        headers
    } else {
        exchange.on_request_headers(crate::now_ms(), &head, &gw.store)
    };
    // Every path below ends in `finished`, which counts the request out again, but one: the
    // client leaving while its body is read drops this future there.
    let entered = gw.metrics.enter(exchange.consumer_name());
    let limit = match headers {
        OnHeaders::Respond(r) => {
            entered.keep();
            return conclude(&gw, exchange, r, None, started, Ending::Answered);
        }
        OnHeaders::ReadBody { limit } => limit,
    };
    let read = request_body::read(
        body,
        usize::try_from(limit).unwrap_or(usize::MAX),
        &gw.body_budget,
    );
    // The body's share of `server.max_body_memory_bytes`, held until the response head is
    // sent (the body may be sent to the provider again until then).
    let read = tokio::time::timeout(CLIENT_BODY_TIMEOUT, read).await;
    entered.keep();
    let (body, _memory) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            let r = match e {
                ReadError::TooLarge => exchange.refuse(GatewayError::BodyTooLarge { limit }),
                ReadError::Failed => exchange.refuse(GatewayError::MalformedBody {
                    detail: "the request body could not be read".into(),
                }),
                ReadError::Busy => exchange.refuse(GatewayError::GatewayBusy),
            };
            return conclude(&gw, exchange, r, None, started, Ending::Answered);
        }
        Err(_) => {
            let r = exchange.refuse(GatewayError::RequestTimeout);
            return conclude(&gw, exchange, r, None, started, Ending::Answered);
        }
    };
    let decision = if transacting {
        let (x, decision) = gw
            .decide(|store| {
                let mut x = Exchange::new(Arc::clone(&config));
                let now = crate::now_ms();
                // Its head again (authenticated as before: nothing shared is read).
                let _ = x.on_request_headers(now, &head, store);
                let decision = x.on_request_body(now, &body, store);
                (x, decision)
            })
            .await;
        exchange = x;
        decision
    } else {
        exchange.on_request_body(crate::now_ms(), &body, &gw.store)
    };
    match decision {
        OnBody::Respond(r) => conclude(&gw, exchange, r, None, started, Ending::Answered),
        OnBody::Forward(forward) => {
            forward_upstream(&gw, exchange, &parts.headers, body, forward, started).await
        }
    }
}

/// Ends an exchange with a response of the gateway's own: settles its limits, logs it.
fn conclude(
    gw: &Gateway,
    mut exchange: Exchange,
    r: LocalResponse,
    key: Option<&str>,
    started: Instant,
    ending: Ending,
) -> Response<GatewayBody> {
    gw.finished(&mut exchange, key, started, ending, None);
    local(r)
}

fn local(r: LocalResponse) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::local(r.body));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in r.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

async fn forward_upstream(
    gw: &Arc<Gateway>,
    exchange: Exchange,
    client_headers: &HeaderMap,
    client_body: Bytes,
    forward: Forward,
    started: Instant,
) -> Response<GatewayBody> {
    let config = Arc::clone(exchange.config());
    let (mut forward, mut body, mut ticket) = routed(forward, &client_body);
    // The requested model's provider's policy bounds the whole chain (failover included).
    let retry = config
        .provider_by_name(&ticket.provider)
        .map(|p| p.retry)
        .unwrap_or_default();
    let timeout = Duration::from_millis(config.server.upstream_timeout_ms);
    // If the client goes away while the provider thinks (or between attempts), this future
    // is dropped: the guard settles the exchange and the attempt's key reservation.
    let mut guard = InFlight {
        exchange: Some(exchange),
        key_reservation: Reservation::default(),
        gateway: Arc::clone(gw),
        started,
    };
    let mut key_id: Option<String> = None;
    // While every model of the chain so far had all its keys cooling: the soonest retry.
    let mut all_cooling: Option<u64> = Some(u64::MAX);
    let mut next = pick(gw, &config, &ticket).await;
    loop {
        let mut attempt = match next {
            Ok(a) => a,
            Err(e) if cannot_serve(&e) => {
                // No usable key for this model: on to the next of its chain, if any.
                all_cooling = match (&e, all_cooling) {
                    (GatewayError::KeysCooling { retry_after_ms, .. }, Some(soonest)) => {
                        Some(soonest.min(*retry_after_ms))
                    }
                    _ => None,
                };
                match fail_over(gw, &mut guard, &ticket) {
                    Some(OnBody::Forward(f)) => {
                        (forward, body, ticket) = routed(f, &client_body);
                        next = pick(gw, &config, &ticket).await;
                        continue;
                    }
                    Some(OnBody::Respond(r)) => return guard.answer(r),
                    None => {}
                }
                let e = match (e, all_cooling) {
                    (GatewayError::KeysCooling { provider, .. }, Some(soonest)) => {
                        GatewayError::KeysCooling {
                            provider,
                            retry_after_ms: soonest,
                        }
                    }
                    (e, _) => e,
                };
                return guard.fail(e, key_id.as_deref());
            }
            Err(e) => return guard.fail(e, key_id.as_deref()),
        };
        guard.key_reservation = std::mem::take(&mut attempt.reservation);
        key_id = attempt.key_id().map(str::to_string);
        ticket
            .tried
            .push(key_id.clone().unwrap_or_else(|| "-".to_string()));
        let request = match upstream_request(&attempt, client_headers, body.clone(), &forward) {
            Ok(r) => r,
            Err(e) => return guard.fail(e, key_id.as_deref()),
        };
        let provider = attempt.provider.name.clone();
        let sent = tokio::time::timeout(timeout, upstream::send(request)).await;
        let who = key_id.as_deref().map(|key| Attempted {
            provider: &provider,
            key,
            model: &ticket.model,
        });
        let none = HeaderMap::new();
        let failed = match sent {
            Ok(Ok(response)) => {
                let (mut parts, upstream_body) = response.into_parts();
                // The gateway's internal headers are never the provider's to set.
                remove_where(&mut parts.headers, is_gateway_header);
                let status = parts.status.as_u16();
                if status < 400 {
                    observe(
                        gw,
                        &config,
                        who.as_ref(),
                        Some(status),
                        None,
                        &parts.headers,
                    )
                    .await;
                    return relay(gw, guard, parts, upstream_body, key_id, timeout).await;
                }
                // A failed answer: its body (small, read within the upstream timeout) tells
                // what the refusal means, which decides the key's state and the retry.
                let error_body = read_error_body(upstream_body, timeout).await;
                let class = keys::classify(&config, &provider, status, &error_body);
                observe(
                    gw,
                    &config,
                    who.as_ref(),
                    Some(status),
                    class,
                    &parts.headers,
                )
                .await;
                match class {
                    Some(RefusalClass::TooLarge) => {
                        // No other key would take it (the same limits, normally).
                        let reason = refusal::provider_message(&error_body)
                            .unwrap_or_else(|| format!("status {status}"));
                        let error = GatewayError::RequestTooLargeForProvider { provider, reason };
                        return guard.fail(error, key_id.as_deref());
                    }
                    Some(class) if class.retried() => Failed::Answered(parts, error_body),
                    _ => return relay_read(gw, guard, parts, error_body, key_id),
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(provider = %provider, key = key_id.as_deref().unwrap_or("-"), error = %e, "upstream request failed");
                observe(gw, &config, who.as_ref(), None, None, &none).await;
                let provider = provider.clone();
                Failed::Unreachable(if answered_unreadably(&*e) {
                    GatewayError::UpstreamInvalidAnswer { provider }
                } else {
                    GatewayError::UpstreamUnavailable { provider }
                })
            }
            Err(_) => {
                observe(gw, &config, who.as_ref(), None, None, &none).await;
                Failed::Silent(GatewayError::UpstreamTimeout {
                    provider: provider.clone(),
                })
            }
        };
        all_cooling = None;
        // Nothing has reached the client yet: a failure another key or model may fix is
        // retried, streams included, while attempts and the time budget last.
        let Some(wait) = next_backoff(&retry, &ticket) else {
            return failed.answer(gw, guard, key_id);
        };
        // Another key of this model, unless each was tried (or the provider was silent:
        // waiting as long again on another of its keys is rarely what the client wants);
        // then the next model of the chain.
        let model_spent = ticket.pool_tried(&config) || matches!(failed, Failed::Silent(_));
        if model_spent {
            guard.give_back_key();
            match fail_over(gw, &mut guard, &ticket) {
                Some(OnBody::Forward(f)) => {
                    tracing::warn!(provider = %provider, from = %ticket.model, to = %f.ticket.model, "model failed; failing over");
                    (forward, body, ticket) = routed(f, &client_body);
                    next = pick(gw, &config, &ticket).await;
                    continue;
                }
                Some(OnBody::Respond(r)) => return guard.answer(r),
                // The chain is spent: its last failure is the answer (without a chain,
                // the model's keys are tried again while attempts last).
                None if matches!(failed, Failed::Silent(_)) || has_chain(&guard) => {
                    return failed.answer(gw, guard, key_id)
                }
                None => {}
            }
        }
        drop(failed);
        guard.give_back_key();
        tracing::warn!(provider = %provider, key = key_id.as_deref().unwrap_or("-"), retry_in_ms = wait, "attempt failed; retrying on another key");
        tokio::time::sleep(Duration::from_millis(wait)).await;
        next = pick(gw, &config, &ticket).await;
    }
}

/// The key for the ticket's next attempt (see `Gateway::decide`).
async fn pick<'c>(
    gw: &Gateway,
    config: &'c Config,
    ticket: &Ticket,
) -> Result<KeyAttempt<'c>, GatewayError> {
    gw.decide(|store| attempt_key(config, ticket, store, crate::now_ms()))
        .await
}

/// A routing, with the body it sends (the client's when it needs no other) and the ticket
/// its attempts carry.
fn routed(forward: Forward, client_body: &Bytes) -> (Forward, Bytes, Ticket) {
    let body = forward
        .body
        .clone()
        .map_or_else(|| client_body.clone(), Bytes::from);
    let ticket = forward.ticket.clone();
    (forward, body, ticket)
}

/// Whether an error choosing a key means this model cannot serve the request now (every key
/// cooling, revoked, out of quota or at its own limits), so that another model may.
fn cannot_serve(e: &GatewayError) -> bool {
    matches!(
        e,
        GatewayError::KeysCooling { .. }
            | GatewayError::KeysRevoked { .. }
            | GatewayError::KeysExhausted { .. }
            | GatewayError::RateLimited { .. }
            | GatewayError::QuotaExhausted { .. }
            | GatewayError::ExceedsLimit { .. }
    )
}

fn has_chain(guard: &InFlight) -> bool {
    guard.exchange.as_ref().is_some_and(Exchange::has_chain)
}

/// The next model of the request's chain, routed (`Exchange::fail_over`); `None` when the
/// chain is spent.
fn fail_over(gw: &Gateway, guard: &mut InFlight, ticket: &Ticket) -> Option<OnBody> {
    guard
        .exchange
        .as_mut()?
        .fail_over(crate::now_ms(), &gw.store, ticket)
}

/// Whether a failed upstream request did get an answer, one hyper could not parse (a head
/// too large or not HTTP), rather than none.
fn answered_unreadably(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return h.is_parse() || h.is_parse_too_large() || h.is_parse_status();
        }
        cause = err.source();
    }
    false
}

/// An attempt another key or model may fix.
enum Failed {
    /// The provider refused it (rate limited, quota exhausted, key refused, overloaded,
    /// server error), with the body it read (`read_error_body`).
    Answered(hyper::http::response::Parts, Bytes),
    /// It never answered.
    Unreachable(GatewayError),
    /// It did not answer within the upstream timeout.
    Silent(GatewayError),
}

impl Failed {
    /// The last failure, as the client's answer.
    fn answer(
        self,
        gw: &Arc<Gateway>,
        guard: InFlight,
        key_id: Option<String>,
    ) -> Response<GatewayBody> {
        match self {
            Self::Answered(parts, error_body) => relay_read(gw, guard, parts, error_body, key_id),
            Self::Unreachable(error) | Self::Silent(error) => guard.fail(error, key_id.as_deref()),
        }
    }
}

/// The wait before the ticket's next attempt, if it may have one.
fn next_backoff(retry: &RetryPolicy, ticket: &Ticket) -> Option<u64> {
    use std::hash::{BuildHasher, Hasher};
    // Jitter only needs to differ between requests: a randomly seeded hasher will do.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    retry.backoff(
        ticket.next_attempt(),
        ticket.started_ms,
        crate::now_ms(),
        random,
    )
}

/// Records what an attempt's answer says of its key (health, headroom, counters): `status`
/// `None` when the provider never answered, `class` what its refusal meant. On Redis, a
/// success is recorded in the background; a failure before the next attempt picks its key,
/// so that no replica picks a key this one found cooling.
async fn observe(
    gw: &Arc<Gateway>,
    config: &Arc<Config>,
    who: Option<&Attempted<'_>>,
    status: Option<u16>,
    class: Option<RefusalClass>,
    headers: &HeaderMap,
) {
    let Some(who) = who else { return };
    gw.metrics.key_attempt(who.provider, who.key, status, class);
    let now = crate::now_ms();
    if gw.store.transacting().is_none() {
        let store = &gw.store;
        let recorded = keys::observe(config, who, status, class, &Headers(headers), now, store)
            .and_then(|()| keys::count(config, who, status, class, store));
        if let Err(e) = recorded {
            tracing::warn!(provider = %who.provider, key = who.key, error = %e, "key health not recorded");
        }
        return;
    }
    let (provider, key, model) = (
        who.provider.to_string(),
        who.key.to_string(),
        who.model.to_string(),
    );
    let (config, headers) = (Arc::clone(config), headers.clone());
    let mut record = move |store: &DecideOn<'_>| {
        let who = Attempted {
            provider: &provider,
            key: &key,
            model: &model,
        };
        keys::observe(&config, &who, status, class, &Headers(&headers), now, store)
            .and_then(|()| keys::count(&config, &who, status, class, store))
    };
    match gw.store.transacting() {
        // A success's record goes with the next batch; nothing waits on it.
        Some(redis) if status.is_some_and(|s| s < 400) => redis.defer(
            Box::new(move |tx| {
                let _ = record(&DecideOn::Right(tx));
            }),
            LeaseMarks::default(),
        ),
        _ => {
            if let Err(e) = gw.decide(&mut record).await {
                tracing::warn!(provider = %who.provider, key = who.key, error = %e, "key health not recorded");
            }
        }
    }
}

/// Most bytes of a failed answer's body read to tell what the refusal means (and relayed,
/// if it is the last answer). Error bodies are a few hundred bytes.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A failed answer's body, up to `MAX_ERROR_BODY` bytes and within `timeout`: what came by
/// then (a body that fails or stalls is judged on what came).
async fn read_error_body(mut body: ProviderBody, timeout: Duration) -> Bytes {
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                let room = MAX_ERROR_BODY.saturating_sub(out.len());
                out.extend_from_slice(data.get(..data.len().min(room)).unwrap_or_default());
                if out.len() >= MAX_ERROR_BODY {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(timeout, read).await;
    Bytes::from(out)
}

/// Relays a failed answer whose body was read (`read_error_body`) to the client through the
/// exchange, account identifiers removed from it.
fn relay_read(
    gw: &Arc<Gateway>,
    mut guard: InFlight,
    mut parts: hyper::http::response::Parts,
    body: Bytes,
    key_id: Option<String>,
) -> Response<GatewayBody> {
    let started = guard.started;
    let mut exchange = match guard.take_exchange() {
        Ok(x) => x,
        Err(lost) => return *lost,
    };
    // A failed answer used no tokens of the key, but the provider saw a request.
    guard.give_back_key();
    let body = refusal::scrub_account_ids(&body).map_or(body, Bytes::from);
    let r = match exchange.on_response_headers(
        parts.status.as_u16(),
        &Headers(&parts.headers),
        &gw.store,
    ) {
        OnResponse::Relay {
            status,
            remove_headers,
            add_headers,
            body_rewritten: _,
        } => {
            if let Some(s) = status.and_then(|s| hyper::StatusCode::from_u16(s).ok()) {
                parts.status = s;
            }
            strip_hop_by_hop(&mut parts.headers, remove_headers);
            for (name, value) in add_headers {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    parts.headers.insert(name, v);
                }
            }
            let out = match exchange.on_response_chunk(&body, true) {
                Chunk::Unchanged => body.to_vec(),
                Chunk::Replace(bytes) => bytes,
            };
            parts
                .headers
                .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            gw.finished(
                &mut exchange,
                key_id.as_deref(),
                started,
                Ending::Completed,
                None,
            );
            return Response::from_parts(parts, GatewayBody::local(out));
        }
        OnResponse::Replace(r) => r,
        OnResponse::Collect { .. } => exchange.on_collected(&body),
    };
    conclude(
        gw,
        exchange,
        r,
        key_id.as_deref(),
        started,
        Ending::Answered,
    )
}

/// Relays the provider's answer to the client through the exchange.
async fn relay(
    gw: &Arc<Gateway>,
    mut guard: InFlight,
    mut parts: hyper::http::response::Parts,
    upstream_body: ProviderBody,
    key_id: Option<String>,
    timeout: Duration,
) -> Response<GatewayBody> {
    let started = guard.started;
    let mut exchange = match guard.take_exchange() {
        Ok(x) => x,
        Err(lost) => return *lost,
    };
    if parts.status.is_success() {
        // Settled with the exchange, on the usage the response reports.
        exchange.attach_key_reservation(std::mem::take(&mut guard.key_reservation));
    } else {
        // A failed answer used no tokens of the key, but the provider saw a request (as the
        // key role settles it in Envoy).
        guard.give_back_key();
    }
    match exchange.on_response_headers(parts.status.as_u16(), &Headers(&parts.headers), &gw.store) {
        OnResponse::Relay {
            status,
            remove_headers,
            add_headers,
            body_rewritten,
        } => {
            if let Some(s) = status.and_then(|s| hyper::StatusCode::from_u16(s).ok()) {
                parts.status = s;
            }
            strip_hop_by_hop(&mut parts.headers, remove_headers);
            if body_rewritten {
                parts.headers.remove(hyper::header::CONTENT_LENGTH);
            }
            for (name, value) in add_headers {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    parts.headers.insert(name, v);
                }
            }
        }
        OnResponse::Replace(r) => {
            drop(upstream_body);
            return conclude(
                gw,
                exchange,
                r,
                key_id.as_deref(),
                started,
                Ending::Answered,
            );
        }
        OnResponse::Collect { limit } => {
            // Held by the guard while the body is read: a client leaving still settles.
            guard.exchange = Some(exchange);
            return collect(gw, guard, upstream_body, limit, key_id, timeout).await;
        }
    }
    let body = UpstreamBody::new(
        upstream_body,
        exchange,
        Arc::clone(gw),
        timeout,
        started,
        key_id,
    );
    Response::from_parts(parts, GatewayBody::Upstream(Box::new(body)))
}

/// Reads the provider's whole body (up to `limit` bytes, within the upstream timeout) and
/// answers with what the exchange makes of it (a prompt's shaped answer).
async fn collect(
    gw: &Arc<Gateway>,
    mut guard: InFlight,
    upstream_body: ProviderBody,
    limit: usize,
    key_id: Option<String>,
    timeout: Duration,
) -> Response<GatewayBody> {
    let read = Limited::new(upstream_body, limit).collect();
    let read = tokio::time::timeout(timeout, read).await;
    let started = guard.started;
    let mut exchange = match guard.take_exchange() {
        Ok(x) => x,
        Err(lost) => return *lost,
    };
    let provider = exchange.provider_name().unwrap_or_default();
    let r = match read {
        Ok(Ok(collected)) => exchange.on_collected(&collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            exchange.on_collect_overflow(limit)
        }
        Ok(Err(_)) => exchange.refuse(GatewayError::UpstreamUnavailable { provider }),
        Err(_) => exchange.refuse(GatewayError::UpstreamTimeout { provider }),
    };
    conclude(
        gw,
        exchange,
        r,
        key_id.as_deref(),
        started,
        Ending::Answered,
    )
}

/// Holds an exchange and the current attempt's key reservation across the attempts, and
/// settles them if the wait is abandoned (the request future dropped because the client
/// left).
struct InFlight {
    exchange: Option<Exchange>,
    key_reservation: Reservation,
    gateway: Arc<Gateway>,
    started: Instant,
}

impl InFlight {
    /// The exchange, to carry on with it outside the guard; a 500 if it was lost (a bug).
    fn take_exchange(&mut self) -> Result<Exchange, Box<Response<GatewayBody>>> {
        self.exchange.take().ok_or_else(|| {
            Box::new(local(
                GatewayError::Internal {
                    detail: "the exchange was lost".into(),
                }
                .respond(),
            ))
        })
    }

    /// A failed attempt's key reservation: the provider saw a request, but no tokens.
    fn give_back_key(&mut self) {
        let reservation = std::mem::take(&mut self.key_reservation);
        if !reservation.is_empty() {
            let sent = Amounts {
                requests: 1,
                ..Amounts::default()
            };
            self.gateway.settle(reservation, sent, crate::now_ms());
        }
    }

    /// Ends the exchange with an answer of the gateway's own (a fallback's local answer).
    fn answer(mut self, r: LocalResponse) -> Response<GatewayBody> {
        self.give_back_key();
        let Some(exchange) = self.exchange.take() else {
            return local(r);
        };
        conclude(
            &self.gateway,
            exchange,
            r,
            None,
            self.started,
            Ending::Answered,
        )
    }

    /// Ends the exchange with the gateway's own error.
    fn fail(mut self, error: GatewayError, key: Option<&str>) -> Response<GatewayBody> {
        self.give_back_key();
        let Some(mut exchange) = self.exchange.take() else {
            return local(error.respond());
        };
        let r = exchange.refuse(error);
        conclude(
            &self.gateway,
            exchange,
            r,
            key,
            self.started,
            Ending::UpstreamError,
        )
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.give_back_key();
        if let Some(mut exchange) = self.exchange.take() {
            self.gateway
                .finished(&mut exchange, None, self.started, Ending::ClientGone, None);
        }
    }
}

/// Builds one attempt's request: the client's headers minus the hop's and the consumer's,
/// the provider's host and the injected key.
fn upstream_request(
    attempt: &KeyAttempt<'_>,
    client_headers: &HeaderMap,
    body: Bytes,
    forward: &Forward,
) -> Result<Request<Full<Bytes>>, GatewayError> {
    let internal = |detail: String| GatewayError::Internal { detail };
    let base = attempt.provider.base_url.as_ref().ok_or_else(|| {
        internal(format!(
            "provider `{}` has no base URL",
            attempt.provider.name
        ))
    })?;
    let scheme = match base.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let uri: Uri = format!("{scheme}://{}{}", base.authority(), forward.path)
        .parse()
        .map_err(|e| internal(format!("upstream URI: {e}")))?;
    let mut headers = client_headers.clone();
    let options = connection_options(&headers);
    // `expect` was answered by this hop already; host and length are set below.
    remove_where(&mut headers, |name| {
        HOP_BY_HOP.contains(&name)
            || options.iter().any(|o| o == name)
            || is_gateway_header(name)
            || forward.remove_headers.contains(&name)
            || KeyAttempt::REMOVE_HEADERS.contains(&name)
            || ["expect", "host", "content-length"].contains(&name)
    });
    let host = HeaderValue::from_str(&base.host_header())
        .map_err(|e| internal(format!("host header: {e}")))?;
    headers.insert(hyper::header::HOST, host);
    if let Some((name, value)) = attempt.header() {
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            internal(format!(
                "the key `{}` is not a valid header value",
                attempt.key_id().unwrap_or("-")
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(HeaderName::from_static(name), value);
    }
    for (name, value) in &forward.default_headers {
        if !headers.contains_key(*name) {
            let value = HeaderValue::from_str(value)
                .map_err(|e| internal(format!("header {name}: {e}")))?;
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    headers.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut request = Request::post(uri)
        .body(Full::new(body))
        .map_err(|e| internal(format!("upstream request: {e}")))?;
    *request.headers_mut() = headers;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::exchange::RELAY_REMOVE_HEADERS;
    use tollgate_core::http::FORWARD_REMOVE_HEADERS;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn hop_by_hop_headers_and_the_named_ones_are_removed_others_kept() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Trace-Hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-trace-hop", "1"),
            ("openai-organization", "org-1"),
            ("content-type", "application/json"),
            ("vary", "a"),
            ("vary", "b"),
        ]);
        strip_hop_by_hop(&mut headers, &RELAY_REMOVE_HEADERS);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "vary"]);
        assert_eq!(
            headers.get_all("vary").iter().count(),
            2,
            "every value kept"
        );
    }

    #[test]
    fn the_lists_of_removed_headers_are_lowercase_as_header_names_are() {
        // `remove_where` compares them with hyper's (lowercase) names as they are.
        let lists: [&[&str]; 4] = [
            &RELAY_REMOVE_HEADERS,
            &FORWARD_REMOVE_HEADERS,
            &KeyAttempt::REMOVE_HEADERS,
            &HOP_BY_HOP,
        ];
        for name in lists.into_iter().flatten() {
            assert_eq!(*name, name.to_ascii_lowercase());
        }
    }
}
