//! The key role: in a provider cluster's upstream HTTP filters, once per upstream attempt
//! (Envoy's route `retry_policy` makes the retries), picks a key from the pool the gateway
//! role routed to — one this request has not tried yet — and injects it; then records what
//! the provider's answer says of the key. A failed answer's headers are held until its body
//! is read (the router decides retries on the headers): the body tells a rate limit from an
//! exhausted quota or a request too large for the key's limits (see
//! `providers::refusal`), which decides the key's state and whether the router may retry.

use std::sync::Arc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};
use tollgate_core::exchange::SERVED_BY_HEADER;
use tollgate_core::http::{
    FinalAnswer, HeaderLookup, CONSUMER_CREDENTIAL_HEADERS, LOCAL_REPLY_CARRIER_STATUS,
    LOCAL_REPLY_HEADER, PROVIDER_HEADER,
};
use tollgate_core::keys::{self, attempt_key, Attempted, Handover, KEY_RESERVATION_HEADER};
use tollgate_core::limits::{self, Amounts, Reservation};
use tollgate_core::providers::refusal::{self, RefusalClass};
use tollgate_core::retry::{is_retryable, RetryPolicy};
use tollgate_core::roles::provider_of_cluster;
use tollgate_core::{Config, GatewayError};

use crate::host::{self, SharedStore};
use crate::metrics;
use crate::remote::{self, AnyStore, Backing, Outcome};
use tollgate_core::store::Commit;

/// Most bytes of a failed answer's body held to read what the refusal means. Error bodies
/// are a few hundred bytes; past this the answer is judged on its status and what came.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The status a refusal another key may fix travels under when its own is one the router
/// does not retry (an account out of credit answering 400): one the retry policy retries.
const RETRIED_CARRIER_STATUS: u16 = 429;

/// The attempt in flight.
struct Attempt {
    provider: String,
    /// `None` when the provider takes no key.
    key: Option<String>,
    /// The public model the request is for (rate limits may be per upstream model).
    model: String,
    /// Its number (1 for the first), to know whether the router may retry it.
    number: u32,
}

/// What a key attempt decided, owned (it may wait for its commit).
struct Picked {
    handover: Option<Handover>,
    provider: String,
    key: Option<String>,
    header: Option<(&'static str, String)>,
    reservation: Reservation,
}

fn picked(attempt: Result<keys::KeyAttempt<'_>, GatewayError>) -> Result<Picked, GatewayError> {
    let mut attempt = attempt?;
    Ok(Picked {
        handover: attempt.handover(),
        provider: attempt.provider.name.clone(),
        key: attempt.key_id().map(str::to_string),
        header: attempt
            .header()
            .map(|(name, value)| (name, value.to_string())),
        reservation: std::mem::take(&mut attempt.reservation),
    })
}

/// A failed answer held while what it says of the key is committed (`observe_first`).
struct Observed {
    provider: String,
    key: String,
    model: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    whole: bool,
    at_ms: u64,
}

/// A pick waiting for its commit on Redis.
struct PendingPick {
    token: u32,
    commit: Commit,
    ticket: keys::Ticket,
    picked: Result<Picked, GatewayError>,
}

pub struct KeyFlow {
    /// Where the attempt's key was picked: its updates go there.
    admitted_on: Backing,
    pending: Option<PendingPick>,
    /// A failed answer waiting for what it says of the key to land on Redis.
    observing: Option<(u32, Commit, Box<Observed>)>,
    rounds: u32,
    /// The whole request body's size, when it came while the pick waited.
    body_held: Option<usize>,
    config: Arc<Config>,
    /// What this attempt took from the key's own limits, until it is handed to the gateway
    /// role (with a successful response) or given back (on any other ending).
    reservation: Reservation,
    handover: Option<Handover>,
    /// The key role answered this attempt itself (its reply carries its own marker).
    replied: bool,
    /// The attempt, once a key (or none) was picked.
    attempt: Option<Attempt>,
    /// The provider answered (else, at the end, the key counts as unreachable).
    answered: bool,
    /// A failed answer whose headers are held until its body is read: its status and
    /// headers.
    held: Option<(u16, Vec<(String, String)>)>,
    /// The provider's retry policy and when the request was forwarded: an answer after the
    /// budget is final, as in the native host.
    retry: Option<(RetryPolicy, u64)>,
    /// A failover attempt: the fallback's request body, sent instead of the one buffered.
    replacement: Option<Vec<u8>>,
    /// A failover attempt: the fallback model, named to the gateway role with the answer.
    served_by: Option<String>,
    /// The last model of the chain, every key of its pool tried: its answer is final (as in
    /// the native host), not retried on the same keys.
    chain_spent: bool,
}

impl KeyFlow {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            admitted_on: Backing::Local,
            pending: None,
            observing: None,
            rounds: 0,
            body_held: None,
            config,
            reservation: Reservation::default(),
            handover: None,
            replied: false,
            attempt: None,
            answered: false,
            held: None,
            retry: None,
            replacement: None,
            served_by: None,
            chain_spent: false,
        }
    }

    /// Picks this attempt's key and injects it: `Ok(false)` when the pick waits for its
    /// commit on Redis (`on_http_call_response` carries on).
    fn inject(&mut self) -> Result<bool, GatewayError> {
        let ticket = self.prepare()?;
        self.pick(ticket)
    }

    /// Checks the attempt against the gateway role's ticket and the retry budget; turns a
    /// failover attempt into the fallback's.
    fn prepare(&mut self) -> Result<keys::Ticket, GatewayError> {
        let map = MapType::HttpRequestHeaders;
        // The pool is the cluster's own; the gateway role's ticket must agree with it, so a
        // route that skipped the gateway role (no ticket) never gets a key.
        let cluster = host::cluster_name();
        let pool = cluster.as_deref().and_then(provider_of_cluster);
        let mut ticket = host::ticket().ok_or(GatewayError::NotRoutedByGateway)?;
        let step = if Some(ticket.provider.as_str()) != pool {
            // A retry the router sent to another cluster: the next model of the chain,
            // routed by the gateway role for this provider (docs/envoy.md, "Failover").
            pool.and_then(|p| ticket.fail_over_to(p, host::chain_step))
                .ok_or(GatewayError::NotRoutedByGateway)
                .map(Some)?
        } else {
            // Every attempt on a fallback's pool sends the fallback's request: the router
            // replays the first model's.
            match ticket.current {
                Some(n) => Some(
                    host::chain_step(n)
                        .filter(|s| s.provider == ticket.provider)
                        .ok_or(GatewayError::NotRoutedByGateway)?,
                ),
                None => None,
            }
        };
        if let Some(step) = step {
            self.fail_over(map, step)?;
        }
        let now = host::now_ms();
        // The requested model's provider's policy bounds the whole chain, as in the native
        // host.
        let provider = self.config.provider_by_name(ticket.retry_provider());
        self.retry = provider.map(|p| (p.retry, ticket.started_ms));
        if ticket.attempts_made() > 0 {
            // A retry Envoy scheduled: Envoy bounds attempts, the time budget is ours. Only a
            // budget that ran out during Envoy's backoff gets here: an answer that came after
            // it was made final (see `on_answer`).
            if provider.is_some_and(|p| !p.retry.within_budget(ticket.started_ms, now)) {
                return Err(GatewayError::RetryBudgetSpent {
                    provider: ticket.provider.clone(),
                    attempts: u32::try_from(ticket.tried.len()).unwrap_or(u32::MAX),
                });
            }
        }
        Ok(ticket)
    }

    /// Picks the key on the store the attempt runs on (a rerun after a lost race on Redis
    /// starts over on what Redis holds now).
    fn pick(&mut self, ticket: keys::Ticket) -> Result<bool, GatewayError> {
        let now = host::now_ms();
        let backing = remote::backing(now);
        self.admitted_on = backing;
        let picked = match backing {
            Backing::Local => picked(attempt_key(&self.config, &ticket, &SharedStore, now)),
            Backing::Redis => {
                let config = Arc::clone(&self.config);
                let (picked, commit) = remote::decide(|tx| {
                    picked(attempt_key(&config, &ticket, &AnyStore::Tx(tx), now))
                });
                if !commit.ops.is_empty() {
                    match remote::send(&commit) {
                        Ok(token) => {
                            self.pending = Some(PendingPick {
                                token,
                                commit,
                                ticket,
                                picked,
                            });
                            return Ok(false);
                        }
                        Err(e) => {
                            remote::went_down(&e);
                            return self.pick(ticket);
                        }
                    }
                }
                picked
            }
            Backing::Failed(_) => {
                let (store, config) = backing.decide_on(&self.config);
                picked(attempt_key(&config, &ticket, &store, now))
            }
        };
        self.apply(ticket, picked?)?;
        Ok(true)
    }

    /// Injects the picked key and tells the router where a retry goes.
    fn apply(&mut self, mut ticket: keys::Ticket, picked: Picked) -> Result<(), GatewayError> {
        let map = MapType::HttpRequestHeaders;
        self.handover = picked.handover;
        self.attempt = Some(Attempt {
            provider: picked.provider,
            key: picked.key.clone(),
            model: ticket.model.clone(),
            number: ticket.next_attempt(),
        });
        self.reservation = picked.reservation;
        ticket
            .tried
            .push(picked.key.unwrap_or_else(|| "-".to_string()));
        host::set_ticket(&ticket)?;
        self.chain_spent =
            self.served_by.is_some() && ticket.chain.is_empty() && ticket.pool_tried(&self.config);
        match next_provider(&self.config, &ticket) {
            // The cluster of the router's retry, should there be one (`refresh_cluster_on_
            // retry` reads it again): this pool while it has untried keys, then the chain's
            // next model, else this pool again. It goes upstream too: one header map serves
            // every attempt.
            Some(next) => host::set_header(map, PROVIDER_HEADER, next)?,
            // The routing header goes (on a retry it is gone already: the first attempt
            // removed it from the one header map all attempts share).
            None => host::remove_header(map, PROVIDER_HEADER)?,
        }
        // The consumer's credential went with the gateway role, whose ticket this request
        // carries.
        if let Some((name, value)) = &picked.header {
            host::set_header(map, name, value)?;
        }
        Ok(())
    }
}

/// Where the router's next attempt must go when routes pick their cluster per attempt (a
/// config with chains): the chain's next provider once this pool was tried through, else
/// this one. `None` when routes name their cluster.
fn next_provider<'t>(config: &Config, ticket: &'t keys::Ticket) -> Option<&'t str> {
    if !config.has_chains() {
        return None;
    }
    Some(match ticket.chain.first() {
        Some(next) if ticket.pool_tried(config) => next.provider.as_str(),
        _ => ticket.provider.as_str(),
    })
}

impl KeyFlow {
    /// Turns this attempt into one on `step`, the fallback the router's retry reached: its
    /// path, headers and body (the body is swapped as it passes, `on_http_request_body`).
    fn fail_over(&mut self, map: MapType, step: keys::ChainStep) -> Result<(), GatewayError> {
        // The last attempt's key is in the one header map every attempt shares, under its
        // provider's header: never sent to another provider.
        for name in CONSUMER_CREDENTIAL_HEADERS {
            host::remove_header(map, name)?;
        }
        host::set_header(map, ":path", &step.path)?;
        host::set_header(map, ":authority", &step.authority)?;
        let present = host::headers(map)?;
        for (name, value) in &step.default_headers {
            if !present.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)) {
                host::set_header(map, name, value)?;
            }
        }
        host::set_header(map, "content-length", &step.body.len().to_string())?;
        self.served_by = Some(step.model);
        self.replacement = Some(step.body.into_bytes());
        Ok(())
    }
}

impl KeyFlow {
    /// Answers the attempt with the key role's own refusal.
    fn refuse(&mut self, e: GatewayError) -> Action {
        host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
        if let Some((scope, limit)) = e.refused_by() {
            metrics::limit_refused(&scope, limit);
        }
        let mut response = e.respond();
        // Marks the reply as ours and carries its status; it travels under a status Envoy's
        // retry policy leaves alone, and the gateway role restores it.
        response.headers.push((
            LOCAL_REPLY_HEADER,
            FinalAnswer::KeyRole(response.status, Some(e.metric_code())).marker(),
        ));
        // Even without the gateway role (which would restore the status), a refusal that can
        // never succeed must not be retried by whatever route sent it here.
        response.status = LOCAL_REPLY_CARRIER_STATUS;
        self.replied = true;
        host::send(&response);
        Action::Pause
    }
}

impl Context for KeyFlow {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        if let Some((_, commit, observed)) = self.observing.take_if(|(t, _, _)| *t == token) {
            if remote::outcome(&commit, body_size) == Outcome::Conflict
                && self.rounds < remote::MAX_ROUNDS
            {
                self.rounds += 1;
                match self.send_observed(observed) {
                    Ok(()) => return,
                    // Could not send: judged as it is (Redis is taken as down).
                    Err(observed) => {
                        let o = observed;
                        self.judge(o.status, &o.headers, &o.body, o.whole, true);
                    }
                }
            } else {
                let o = observed;
                self.judge(o.status, &o.headers, &o.body, o.whole, true);
            }
            let _ = proxy_wasm::hostcalls::resume_http_response();
            return;
        }
        let Some(pending) = self.pending.take_if(|p| p.token == token) else {
            return;
        };
        let result = match remote::outcome(&pending.commit, body_size) {
            Outcome::Committed => pending
                .picked
                .and_then(|picked| self.apply(pending.ticket, picked))
                .map(|()| true),
            Outcome::Conflict if self.rounds < remote::MAX_ROUNDS => {
                // Another replica wrote first: pick again on what Redis holds now.
                self.rounds += 1;
                self.pick(pending.ticket)
            }
            Outcome::Conflict => Err(GatewayError::SharedStateUnavailable {
                detail: format!(
                    "the key pick lost {} rounds to other replicas",
                    remote::MAX_ROUNDS
                ),
            }),
            // Redis is taken as down: `on_failure` decides.
            Outcome::Failed => self.pick(pending.ticket),
        };
        match result {
            Ok(true) => {
                // A failover attempt's body came whole while the pick waited: swapped now.
                if let (Some(size), Some(body)) = (self.body_held, self.replacement.as_ref()) {
                    if let Err(e) = host::replace_body(BufferType::HttpRequestBody, size, body) {
                        host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
                    }
                    self.replacement = None;
                }
                let _ = proxy_wasm::hostcalls::resume_http_request();
            }
            Ok(false) => {}
            Err(e) => {
                self.refuse(e);
            }
        }
    }

    fn on_done(&mut self) -> bool {
        // Envoy does not call `on_log` for an attempt its router abandons for a retry, but
        // every context is done at its end.
        self.conclude();
        true
    }
}

impl HttpContext for KeyFlow {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.inject() {
            Ok(true) => Action::Continue,
            // Waits for the pick's commit on Redis.
            Ok(false) => Action::Pause,
            Err(e) => self.refuse(e),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.pending.is_some() {
            // The key is not picked yet: the headers must not go up with the body.
            self.body_held = end_of_stream.then_some(body_size);
            return Action::Pause;
        }
        if self.replacement.is_none() || self.replied {
            return Action::Continue;
        }
        if !end_of_stream {
            // Held whole, then replaced by the fallback's body.
            return Action::Pause;
        }
        if let Some(body) = self.replacement.take() {
            if let Err(e) = host::replace_body(BufferType::HttpRequestBody, body_size, &body) {
                host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let map = MapType::HttpResponseHeaders;
        if self.replied {
            return Action::Continue;
        }
        let mut headers = host::headers(map).unwrap_or_default();
        // A provider's response must not carry the gateway's internal markers.
        let forged = [KEY_RESERVATION_HEADER, LOCAL_REPLY_HEADER, SERVED_BY_HEADER];
        let _ = host::remove_present(map, &headers, &forged);
        headers.retain(|(k, _)| !forged.iter().any(|f| k.eq_ignore_ascii_case(f)));
        // A fallback answered: the gateway role reads the answer as that model's.
        if let Some(model) = &self.served_by {
            let _ = host::set_header(map, SERVED_BY_HEADER, model);
        }
        let Some(status) = headers
            .header(":status")
            .and_then(|v| v.parse::<u16>().ok())
        else {
            return Action::Continue;
        };
        self.answered = true;
        if status >= 400 && !end_of_stream {
            // Held until the body tells what the refusal means (`on_http_response_body`):
            // the router decides on the headers whether to retry.
            self.held = Some((status, headers));
            return Action::Pause;
        }
        self.on_answer(status, &headers, &[], false);
        let success = (200..300).contains(&status);
        // A successful response reaches the gateway role, which sees its usage: hand it the
        // reservation to settle. Anything else (a retry, an error) is settled here.
        if let (true, Some(handover)) = (success, self.handover.take()) {
            // Written now, with the epochs its slots were renewed to since.
            let header = handover.header(&self.reservation);
            if host::set_header(map, KEY_RESERVATION_HEADER, &header).is_ok() {
                self.reservation = Reservation::default();
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.held.is_none() {
            return Action::Continue;
        }
        if !end_of_stream && body_size <= MAX_ERROR_BODY {
            // Buffered until the end.
            return Action::Pause;
        }
        let Some((status, headers)) = self.held.take() else {
            return Action::Continue;
        };
        let body = host::body(BufferType::HttpResponseBody, body_size.min(MAX_ERROR_BODY))
            .unwrap_or_default();
        // The body may be rewritten only when it is whole.
        let whole = end_of_stream && body.len() == body_size;
        if let Some(waiting) = self.observe_first(status, headers.clone(), body.clone(), whole) {
            return waiting;
        }
        self.on_answer(status, &headers, &body, whole);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.conclude();
    }
}

impl KeyFlow {
    /// What the provider's answer means, once its status, headers and (for a failed answer,
    /// up to `MAX_ERROR_BODY`) body are known: records it of the key (every worker sees
    /// it), then makes the answer what the router and the client should see. `whole`: the
    /// body is all there and the headers are still held, so both may be rewritten.
    fn on_answer(&mut self, status: u16, headers: &[(String, String)], body: &[u8], whole: bool) {
        self.judge(status, headers, body, whole, false);
    }

    /// A failed answer on Redis: what it says of the key is committed before the router
    /// sees the answer (the response waits), so that no replica's next request picks a key
    /// this one found cooling. `Some(action)` when it waits.
    fn observe_first(
        &mut self,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        whole: bool,
    ) -> Option<Action> {
        let attempt = self.attempt.as_ref()?;
        let key = attempt.key.as_ref()?;
        if self.admitted_on != Backing::Redis || remote::backing(host::now_ms()) != Backing::Redis {
            return None;
        }
        let class = keys::classify(&self.config, &attempt.provider, status, &body);
        let counted = (attempt.provider.clone(), key.clone());
        let observed = Box::new(Observed {
            provider: attempt.provider.clone(),
            key: key.clone(),
            model: attempt.model.clone(),
            status,
            headers,
            body,
            whole,
            at_ms: host::now_ms(),
        });
        self.send_observed(observed).ok()?;
        metrics::key_attempt(&counted.0, &counted.1, Some(status), class);
        Some(Action::Pause)
    }

    fn send_observed(&mut self, observed: Box<Observed>) -> Result<(), Box<Observed>> {
        let class = keys::classify(
            &self.config,
            &observed.provider,
            observed.status,
            &observed.body,
        );
        let ((), commit) = remote::decide(|tx| {
            let who = Attempted {
                provider: &observed.provider,
                key: &observed.key,
                model: &observed.model,
            };
            let _ = keys::observe(
                &self.config,
                &who,
                Some(observed.status),
                class,
                &observed.headers,
                observed.at_ms,
                tx,
            );
        });
        match remote::send(&commit) {
            Ok(token) => {
                self.observing = Some((token, commit, observed));
                Ok(())
            }
            Err(e) => {
                remote::went_down(&e);
                Err(observed)
            }
        }
    }

    /// `on_answer`; `observed`: what the answer says of the key is recorded already.
    fn judge(
        &mut self,
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
        whole: bool,
        observed: bool,
    ) {
        let Some(attempt) = &self.attempt else {
            return;
        };
        let class = keys::classify(&self.config, &attempt.provider, status, body);
        if let (Some(key), false) = (&attempt.key, observed) {
            // Counted as Envoy stats (every worker adds to the same counter); the shared
            // store's counters are the native host's admin view.
            metrics::key_attempt(&attempt.provider, key, Some(status), class);
            let who = Attempted {
                provider: &attempt.provider,
                key,
                model: &attempt.model,
            };
            let now = host::now_ms();
            if self.admitted_on == Backing::Redis {
                // What the answer says of the key reaches Redis with the next batch.
                let config = Arc::clone(&self.config);
                let (provider, key, model) =
                    (attempt.provider.clone(), key.clone(), attempt.model.clone());
                let headers = headers.to_vec();
                remote::defer(move |tx| {
                    let who = Attempted {
                        provider: &provider,
                        key: &key,
                        model: &model,
                    };
                    let _ = keys::observe(&config, &who, Some(status), class, &headers, now, tx);
                });
            } else {
                let store = self.admitted_on.after();
                let recorded = keys::observe(
                    &self.config,
                    &who,
                    Some(status),
                    class,
                    headers,
                    now,
                    &store,
                );
                if let Err(e) = recorded {
                    host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
                }
            }
        }
        let Some(class) = class else {
            return;
        };
        let map = MapType::HttpResponseHeaders;
        if class == RefusalClass::TooLarge {
            // No other key would take it (the same limits, normally): final either way.
            if whole {
                let error = GatewayError::RequestTooLargeForProvider {
                    provider: attempt.provider.clone(),
                    reason: refusal::provider_message(body)
                        .unwrap_or_else(|| format!("status {status}")),
                };
                self.replace_answer(headers, body.len(), &error);
            } else if is_retryable(status) {
                let marker = FinalAnswer::Provider(status).marker();
                if host::set_header(map, LOCAL_REPLY_HEADER, &marker).is_ok() {
                    let _ =
                        host::set_header(map, ":status", &LOCAL_REPLY_CARRIER_STATUS.to_string());
                }
            }
            return;
        }
        if whole {
            // Relayed provider messages never name the account behind a key.
            if let Some(scrubbed) = refusal::scrub_account_ids(body) {
                if host::replace_body(BufferType::HttpResponseBody, body.len(), &scrubbed).is_ok() {
                    let _ = host::set_header(map, "content-length", &scrubbed.len().to_string());
                }
            }
        }
        if class.retried() && !is_retryable(status) {
            // Another key may do (an account out of credit that answers 400), but the
            // router retries only the statuses of the retry policy: when it has an attempt
            // left, carry the answer under one it retries, marked with its own status.
            if self.may_retry() {
                let marker = FinalAnswer::Provider(status).marker();
                if host::set_header(map, LOCAL_REPLY_HEADER, &marker).is_ok() {
                    let _ = host::set_header(map, ":status", &RETRIED_CARRIER_STATUS.to_string());
                }
            }
            return;
        }
        self.make_final_past_budget(map, status);
    }

    /// Whether the router may still retry this attempt: it has attempts left, and the
    /// retry budget is not spent.
    fn may_retry(&self) -> bool {
        let (Some((policy, started_ms)), Some(attempt)) = (self.retry, &self.attempt) else {
            return false;
        };
        attempt.number < policy.attempts && policy.within_budget(started_ms, host::now_ms())
    }

    /// Answers the client with the key role's own error instead of the provider's answer
    /// (whose headers are still held and whose whole body, `body_len` bytes, is buffered):
    /// the provider's headers go, the error's status travels as the key role's refusals do
    /// (marked, under a status the router never retries), the body is replaced.
    fn replace_answer(&self, headers: &[(String, String)], body_len: usize, error: &GatewayError) {
        let map = MapType::HttpResponseHeaders;
        let response = error.respond();
        for (name, _) in headers.iter().filter(|(k, _)| !k.starts_with(':')) {
            let _ = host::remove_header(map, name);
        }
        let marker = FinalAnswer::KeyRole(response.status, Some(error.metric_code())).marker();
        let _ = host::set_header(map, ":status", &LOCAL_REPLY_CARRIER_STATUS.to_string());
        let _ = host::set_header(map, LOCAL_REPLY_HEADER, &marker);
        for (name, value) in &response.headers {
            let _ = host::set_header(map, name, value);
        }
        let _ = host::set_header(map, "content-length", &response.body.len().to_string());
        if let Err(e) = host::replace_body(BufferType::HttpResponseBody, body_len, &response.body) {
            host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
        }
    }

    /// A failed answer that Envoy's router would retry, arriving when no attempt may start
    /// any more: the client should get it, as the native host relays a provider's last answer
    /// (not the next attempt's refusal). It travels under a status the router never retries,
    /// marked with its own, which the gateway role restores.
    fn make_final_past_budget(&self, map: MapType, status: u16) {
        let Some((policy, started_ms)) = self.retry else {
            return;
        };
        if policy.attempts < 2
            || !is_retryable(status)
            || (policy.within_budget(started_ms, host::now_ms()) && !self.chain_spent)
        {
            return;
        }
        let marker = FinalAnswer::Provider(status).marker();
        if host::set_header(map, LOCAL_REPLY_HEADER, &marker).is_ok() {
            let _ = host::set_header(map, ":status", &LOCAL_REPLY_CARRIER_STATUS.to_string());
        }
    }

    /// Ends the attempt, once: counts a key that never answered, and gives back what the
    /// attempt reserved on it unless the gateway role took it over.
    fn conclude(&mut self) {
        if let Some((status, headers)) = self.held.take() {
            // The stream ended before the failed answer's body did: judged on its status.
            self.on_answer(status, &headers, &[], false);
        }
        let attempt = self.attempt.take();
        if let (
            false,
            false,
            Some(Attempt {
                provider,
                key: Some(key),
                ..
            }),
        ) = (self.answered, self.replied, attempt)
        {
            // Sent with this key, never answered: connection failure, reset or timeout.
            metrics::key_attempt(&provider, &key, None, None);
        }
        let reservation = std::mem::take(&mut self.reservation);
        if !reservation.is_empty() {
            // The provider saw a request, but it used no tokens of the key.
            let sent = Amounts {
                requests: 1,
                ..Amounts::default()
            };
            let now = host::now_ms();
            match self.admitted_on {
                Backing::Redis => remote::defer(move |tx| {
                    let _ = limits::settle(reservation.clone(), tx, now, sent);
                }),
                other => {
                    let _ = limits::settle(reservation, &other.after(), now, sent);
                }
            }
        }
    }
}
