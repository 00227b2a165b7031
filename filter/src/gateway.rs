//! The gateway role: runs the core's `Exchange` for one downstream request in Envoy's
//! listener filter chain. Envoy routes on the `x-tollgate-provider` header it sets.

use std::sync::Arc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};
use tollgate_core::exchange::{Chunk, OnBody, OnHeaders, OnResponse, SERVED_BY_HEADER};
use tollgate_core::http::{is_gateway_header, LocalResponse, RequestHead};
use tollgate_core::keys;
use tollgate_core::limits;
use tollgate_core::store::{Commit, CounterStore};
use tollgate_core::{Config, Exchange, GatewayError};

use crate::host::{self, SharedStore};
use crate::metrics;
use crate::remote::{self, AnyStore, Backing, Outcome};

/// What the exchange decided on the request so far.
enum Decision {
    Headers(OnHeaders),
    Body(Box<OnBody>),
}

/// A decision waiting for its commit on Redis.
struct Pending {
    token: u32,
    commit: Commit,
    /// The phase it was made in: the head alone, or the whole body of this size.
    body_size: Option<usize>,
    decision: Decision,
}

/// The request header that crashes a test build of the module (feature `test-trap`).
#[cfg(feature = "test-trap")]
const TEST_TRAP_HEADER: &str = "x-tollgate-test-trap";

pub struct GatewayFlow {
    /// The config requests start on (the one the exchange runs on, unless it was admitted
    /// by this Envoy's share of the limits).
    config: Arc<Config>,
    exchange: Exchange,
    /// Where the request's decisions were made: its settlement goes there.
    admitted_on: Backing,
    /// A decision waiting for its commit on Redis.
    pending: Option<Pending>,
    /// Rounds the request's decision lost to other replicas' writes.
    rounds: u32,
    /// The request's head ended the stream; its body ended (while a decision waited).
    headers_ended: bool,
    body_ended: bool,

    /// Set while the request body is being read, to the largest size accepted.
    body_limit: Option<u64>,
    /// Bytes of request body buffered so far.
    body_size: usize,
    /// The fallbacks of the request's chain, routed, until they are put in filter state.
    chain: Vec<keys::ChainStep>,
    /// Whether the response body goes through the core (only for forwarded requests: local
    /// replies are already final).
    forwarded: bool,
    /// A body that replaces the provider's; taken by the first body callback.
    replacement: Option<Vec<u8>>,
    replacing: bool,
    /// The request's headers as the client sent them (minus the gateway's own).
    request_headers: Vec<(String, String)>,
    /// The response is held until its whole body is here (a prompt's shaped answer), up to
    /// this many bytes.
    collecting: Option<usize>,
    /// Bytes of response body buffered so far while collecting.
    collected: usize,
    /// When the request came, and when the first bytes of the answer went out (ms).
    started_ms: u64,
    first_byte_ms: Option<u64>,
    /// Crash the VM at the response (`TEST_TRAP_HEADER`).
    #[cfg(feature = "test-trap")]
    trap: bool,
}

impl GatewayFlow {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            exchange: Exchange::new(Arc::clone(&config)),
            config,
            admitted_on: Backing::Local,
            pending: None,
            rounds: 0,
            headers_ended: false,
            body_ended: false,

            body_limit: None,
            body_size: 0,
            chain: Vec::new(),
            forwarded: false,
            replacement: None,
            replacing: false,
            request_headers: Vec::new(),
            collecting: None,
            collected: 0,
            started_ms: 0,
            first_byte_ms: None,
            #[cfg(feature = "test-trap")]
            trap: false,
        }
    }

    /// Ends the request with a reply of the gateway's own.
    fn respond(&mut self, response: &LocalResponse) -> Action {
        self.body_limit = None;
        host::send(response);
        Action::Pause
    }

    fn fail(&mut self, error: GatewayError) -> Action {
        host::log(LogLevel::Error, &format!("tollgate gateway: {error}"));
        let response = self.exchange.refuse(error);
        self.respond(&response)
    }

    fn on_headers(&mut self, end_of_stream: bool) -> Result<Action, GatewayError> {
        let map = MapType::HttpRequestHeaders;
        let mut headers = host::headers(map)?;
        #[cfg(feature = "test-trap")]
        {
            self.trap = header_value(&headers, TEST_TRAP_HEADER) == "1";
        }
        // A client must never pick a route itself, nor steer Envoy's router.
        for (name, _) in &headers {
            if is_gateway_header(name) {
                host::remove_header(map, name)?;
            }
        }
        headers.retain(|(name, _)| !is_gateway_header(name));
        self.request_headers = headers;
        self.headers_ended = end_of_stream;
        let action = self.decide(None, false);
        if let Some(consumer) = self.exchange.consumer_name() {
            metrics::enter(consumer);
        }
        action
    }

    /// Decides on the request so far (its head; with `body_size`, its whole body too) on the
    /// store it is admitted on. On Redis, a decision that read shared state waits for its
    /// commit (`on_http_call_response`); `fresh` starts over from a new exchange (a rerun).
    fn decide(&mut self, body_size: Option<usize>, fresh: bool) -> Result<Action, GatewayError> {
        let body = match body_size {
            Some(size) => Some(host::body(BufferType::HttpRequestBody, size)?),
            None => None,
        };
        let body = body.as_deref();
        let now = host::now_ms();
        let backing = remote::backing(now);
        self.admitted_on = backing;
        let decision = match backing {
            Backing::Local => {
                let config = fresh.then(|| Arc::clone(&self.config));
                self.run(now, &SharedStore, config, body)
            }
            Backing::Redis => {
                let config = fresh.then(|| Arc::clone(&self.config));
                let (decision, commit) =
                    remote::decide(|tx| self.run(now, &AnyStore::Tx(tx), config, body));
                // Reading the body needs nothing shared; every other decision waits for
                // what it read to be confirmed and what it wrote to land.
                let waits = !commit.ops.is_empty()
                    && !matches!(decision, Decision::Headers(OnHeaders::ReadBody { .. }));
                if waits {
                    match remote::send(&commit) {
                        Ok(token) => {
                            self.pending = Some(Pending {
                                token,
                                commit,
                                body_size,
                                decision,
                            });
                            return Ok(Action::Pause);
                        }
                        Err(e) => {
                            remote::went_down(&e);
                            return self.decide(body_size, true);
                        }
                    }
                }
                decision
            }
            Backing::Failed(_) => {
                let (store, config) = backing.decide_on(&self.config);
                self.run(now, &store, Some(config), body)
            }
        };
        self.act(decision, body_size.unwrap_or(0))
    }

    /// Runs the exchange over the request so far on `store`; from a new exchange on
    /// `fresh`'s config when given.
    fn run(
        &mut self,
        now: u64,
        store: &impl CounterStore,
        fresh: Option<Arc<Config>>,
        body: Option<&[u8]>,
    ) -> Decision {
        self.chain.clear();
        if let Some(config) = fresh {
            self.exchange = Exchange::new(config);
            let head = self.run_head(now, store);
            if body.is_none() || matches!(head, OnHeaders::Respond(_)) {
                return Decision::Headers(head);
            }
        }
        let Some(body) = body else {
            return Decision::Headers(self.run_head(now, store));
        };
        let mut decision = self.exchange.on_request_body(now, body, store);
        // A model none of whose keys is usable now: straight to the next of its chain, as
        // the native host does when it finds no key (the key role could only refuse).
        while let OnBody::Forward(forward) = &decision {
            if !self.exchange.has_chain()
                || keys::pool_usable(self.exchange.config(), &forward.ticket, store, now)
            {
                break;
            }
            match self.exchange.fail_over(now, store, &forward.ticket) {
                Some(next) => decision = next,
                None => break,
            }
        }
        if let OnBody::Forward(forward) = &mut decision {
            // The rest of the chain, routed for the key roles of the fallbacks' clusters.
            self.chain = self.exchange.chain_steps(now);
            forward.ticket.chain = keys::ChainLink::to(&self.chain);
        }
        Decision::Body(Box::new(decision))
    }

    fn run_head(&mut self, now: u64, store: &impl CounterStore) -> OnHeaders {
        let headers = &self.request_headers;
        let head = RequestHead {
            method: header_value(headers, ":method"),
            path: header_value(headers, ":path"),
            headers,
        };
        self.exchange.on_request_headers(now, &head, store)
    }

    /// Carries a decision out.
    fn act(&mut self, decision: Decision, size: usize) -> Result<Action, GatewayError> {
        match decision {
            Decision::Headers(OnHeaders::Respond(r)) => Ok(self.respond(&r)),
            Decision::Headers(OnHeaders::ReadBody { limit }) => {
                self.body_limit = Some(limit);
                if self.headers_ended {
                    self.decide(Some(0), false)
                } else if self.body_ended {
                    // The body came while the head's decision was being committed.
                    self.decide(Some(self.body_size), false)
                } else {
                    // Hold the headers until the body is complete: the route depends on it.
                    Ok(Action::Pause)
                }
            }
            Decision::Body(body) => self.act_on_body(*body, size),
        }
    }

    /// Carries out a decision on the whole request: a reply of the gateway's own, or the
    /// request forwarded as routed.
    fn act_on_body(&mut self, decision: OnBody, size: usize) -> Result<Action, GatewayError> {
        match decision {
            OnBody::Respond(r) => Ok(self.respond(&r)),
            OnBody::Forward(forward) => {
                self.body_limit = None;
                let map = MapType::HttpRequestHeaders;
                host::remove_present(map, &self.request_headers, forward.remove_headers)?;
                if header_value(&self.request_headers, ":path") != forward.path {
                    host::set_header(map, ":path", &forward.path)?;
                }
                for (name, value) in &forward.default_headers {
                    let sent = self
                        .request_headers
                        .iter()
                        .any(|(k, _)| k.eq_ignore_ascii_case(name));
                    if !sent {
                        host::set_header(map, name, value)?;
                    }
                }
                // For every attempt's key role: the pool, the demand, the keys tried, and
                // apart, for an attempt that fails over, the fallbacks as routed.
                for (n, step) in std::mem::take(&mut self.chain).iter().enumerate() {
                    host::set_chain_step(n, step)?;
                }
                host::set_ticket(&forward.ticket)?;
                if let Some(new_body) = &forward.body {
                    host::replace_body(BufferType::HttpRequestBody, size, new_body)?;
                    host::set_header(map, "content-length", &new_body.len().to_string())?;
                }
                // Set last: changing a request header clears Envoy's route cache, so the
                // router picks the provider's cluster from this header.
                host::set_header(map, forward.route_header.0, &forward.route_header.1)?;
                self.forwarded = true;
                Ok(Action::Continue)
            }
        }
    }

    /// Ends a held response with the exchange's answer for the body collected so far
    /// (`size` bytes; past `limit`, the answer says the body was too large).
    fn finish_collect(&mut self, size: usize, limit: usize) {
        self.collecting = None;
        // Whatever follows is dropped: the answer is ours.
        self.replacing = true;
        let result = host::body(BufferType::HttpResponseBody, size.min(limit)).and_then(|body| {
            let response = if size > limit {
                self.exchange.on_collect_overflow(limit)
            } else {
                self.exchange.on_collected(&body)
            };
            let headers = host::headers(MapType::HttpResponseHeaders)?;
            replace_response_headers(&headers, &response)?;
            host::replace_body(BufferType::HttpResponseBody, size, &response.body)
        });
        if let Err(e) = result {
            host::log(LogLevel::Error, &format!("tollgate gateway: {e}"));
        }
    }
}

/// Turns the response head into `response`'s: the provider's headers go, ours come.
fn replace_response_headers(
    headers: &[(String, String)],
    response: &LocalResponse,
) -> Result<(), GatewayError> {
    let map = MapType::HttpResponseHeaders;
    for (name, _) in headers {
        if !name.starts_with(':') {
            host::remove_header(map, name)?;
        }
    }
    host::set_header(map, ":status", &response.status.to_string())?;
    for (name, value) in &response.headers {
        host::set_header(map, name, value)?;
    }
    Ok(())
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

impl Context for GatewayFlow {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let Some(pending) = self.pending.take_if(|p| p.token == token) else {
            return;
        };
        let action = match remote::outcome(&pending.commit, body_size) {
            Outcome::Committed => self.act(pending.decision, pending.body_size.unwrap_or(0)),
            Outcome::Conflict if self.rounds < remote::MAX_ROUNDS => {
                // Another replica wrote first: decide again on what Redis holds now.
                self.rounds += 1;
                self.decide(pending.body_size, true)
            }
            Outcome::Conflict => Err(GatewayError::SharedStateUnavailable {
                detail: format!(
                    "the decision lost {} rounds to other replicas",
                    remote::MAX_ROUNDS
                ),
            }),
            // Redis is taken as down: `on_failure` decides.
            Outcome::Failed => self.decide(pending.body_size, true),
        };
        match action {
            Ok(Action::Continue) => {
                let _ = proxy_wasm::hostcalls::resume_http_request();
            }
            Ok(_) => {}
            Err(e) => {
                self.fail(e);
            }
        }
    }
}

impl HttpContext for GatewayFlow {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.started_ms = host::now_ms();
        self.on_headers(end_of_stream)
            .unwrap_or_else(|e| self.fail(e))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(limit) = self.body_limit else {
            return Action::Continue;
        };
        self.body_size = body_size;
        if body_size as u64 > limit {
            let response = self.exchange.refuse(GatewayError::BodyTooLarge { limit });
            return self.respond(&response);
        }
        if !end_of_stream {
            // Buffer until the whole body is here.
            return Action::Pause;
        }
        self.body_ended = true;
        if self.pending.is_some() {
            // The head's decision is being committed: the body is read once it lands.
            return Action::Pause;
        }
        self.decide(Some(body_size), false)
            .unwrap_or_else(|e| self.fail(e))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // A body followed by trailers ends here, not with an end-of-stream body callback.
        if self.body_limit.is_none() {
            return Action::Continue;
        }
        self.body_ended = true;
        if self.pending.is_some() {
            return Action::Pause;
        }
        self.decide(Some(self.body_size), false)
            .unwrap_or_else(|e| self.fail(e))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Test builds only (`make wasm-trap`): crash the VM while this request holds its
        // slots, as a bug would, to show that a reloaded VM gets them back.
        #[cfg(feature = "test-trap")]
        if self.trap {
            #[allow(clippy::panic)] // the point of the test build
            {
                panic!("{TEST_TRAP_HEADER}: trapping on purpose");
            }
        }
        if !self.forwarded {
            return Action::Continue;
        }
        let map = MapType::HttpResponseHeaders;
        let result = host::headers(map).and_then(|headers| {
            let status = header_value(&headers, ":status").parse().unwrap_or(0);
            let served_by = header_value(&headers, SERVED_BY_HEADER);
            // On Redis, the key role's leases join the book renewed there, and a fallback's
            // model limits are not charged at its answer (docs/redis.md, "Envoy").
            let store = self.admitted_on.after();
            if !served_by.is_empty() {
                self.exchange.serve_as(served_by, host::now_ms(), &store);
            }
            match self.exchange.on_response_headers(status, &headers, &store) {
                OnResponse::Relay {
                    status,
                    remove_headers,
                    add_headers,
                    body_rewritten,
                } => {
                    if let Some(status) = status {
                        host::set_header(map, ":status", &status.to_string())?;
                    }
                    // A header set below replaces the provider's of that name: no removal.
                    let removed: Vec<&str> = remove_headers
                        .iter()
                        .copied()
                        .filter(|name| !add_headers.iter().any(|(added, _)| added == name))
                        .collect();
                    host::remove_present(map, &headers, &removed)?;
                    if body_rewritten {
                        host::remove_header(map, "content-length")?;
                    }
                    for (name, value) in &add_headers {
                        host::set_header(map, name, value)?;
                    }
                }
                OnResponse::Replace(response) => {
                    replace_response_headers(&headers, &response)?;
                    self.replacing = true;
                    self.replacement = Some(response.body);
                }
                OnResponse::Collect { limit } => {
                    self.collecting = Some(limit);
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            host::log(LogLevel::Error, &format!("tollgate gateway: {e}"));
        }
        if self.collecting.is_some() {
            if end_of_stream {
                // Nothing to wait for: a success with no body cannot be shaped.
                self.collecting = None;
                let response = self.exchange.on_collected(&[]);
                host::send(&response);
                return Action::Pause;
            }
            // Held (headers included) until the body is complete: its answer may differ.
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.forwarded {
            return Action::Continue;
        }
        if self.first_byte_ms.is_none() && body_size > 0 {
            self.first_byte_ms = Some(host::now_ms());
        }
        if let Some(limit) = self.collecting {
            self.collected = body_size;
            if !end_of_stream && body_size <= limit {
                return Action::Pause;
            }
            self.finish_collect(body_size, limit);
            return Action::Continue;
        }
        let result = if self.replacing {
            // The provider's body is dropped; ours goes out in its place, once.
            let ours = self.replacement.take().unwrap_or_default();
            host::replace_body(BufferType::HttpResponseBody, body_size, &ours)
        } else {
            host::body(BufferType::HttpResponseBody, body_size).and_then(|chunk| {
                match self.exchange.on_response_chunk(&chunk, end_of_stream) {
                    Chunk::Unchanged => Ok(()),
                    Chunk::Replace(bytes) => {
                        host::replace_body(BufferType::HttpResponseBody, body_size, &bytes)
                    }
                }
            })
        };
        if let Err(e) = result {
            host::log(LogLevel::Error, &format!("tollgate gateway: {e}"));
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the body without an end-of-stream body callback: tell the exchange,
        // so that it reads the usage of what it kept. Nothing can be emitted after them.
        if let Some(limit) = self.collecting {
            // A held response ends here: answer from what was buffered.
            self.finish_collect(self.collected, limit);
            return Action::Continue;
        }
        if self.forwarded && !self.replacing {
            let _ = self.exchange.on_response_chunk(&[], true);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Called on every ending, client aborts and upstream resets included: settles the
        // limits and frees concurrency slots.
        let now = host::now_ms();
        let summary = match self.admitted_on {
            // Ended while its decision's commit was out: what that decision reserved may
            // never have landed, so nothing is given back (if it landed, it stays taken until
            // the limits' windows pass: the cautious side).
            Backing::Redis if self.pending.take().is_some() => {
                self.exchange.finish_with(&mut |_, _| {})
            }
            Backing::Redis => self.exchange.finish_with(&mut |reservation, used| {
                remote::defer(move |tx| {
                    let _ = limits::settle(reservation.clone(), tx, now, used);
                })
            }),
            other => self.exchange.finish(now, &other.after()),
        };
        let first_byte_ms = self
            .first_byte_ms
            .map(|t| t.saturating_sub(self.started_ms));
        metrics::request_ended(&summary, now.saturating_sub(self.started_ms), first_byte_ms);
        if !host::logs_at(LogLevel::Debug) {
            return;
        }
        host::log(
            LogLevel::Debug,
            &format!(
                "tollgate: request_id={} consumer={} model={} requested_model={} provider={} status={} stream={} tokens={} cost_micro_usd={} usage={} first_byte_ms={}",
                summary.request_id.as_deref().unwrap_or("-"),
                summary.consumer.as_deref().unwrap_or("-"),
                summary.model.as_deref().unwrap_or("-"),
                summary.requested_model.as_deref().unwrap_or("-"),
                summary.provider.as_deref().unwrap_or("-"),
                summary.status.map_or("-".to_string(), |s| s.to_string()),
                summary.stream,
                summary.charged.map_or(0, |c| c.tokens),
                summary.charged.map_or(0, |c| c.micro_usd),
                if summary.usage_reported { "reported" } else { "estimated" },
                self.first_byte_ms
                    .map_or("-".to_string(), |t| t.saturating_sub(self.started_ms).to_string()),
            ),
        );
    }
}
