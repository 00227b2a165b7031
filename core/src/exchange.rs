//! The per-request state machine of the gateway role. A host feeds it the request's head, then
//! its body, then the provider's response head and body chunks, then tells it the exchange
//! ended; each step returns what the host must do next. It does no IO and reads no clock:
//! `now_ms` is passed in.
//!
//! ```text
//! on_request_headers(now, head, store) -> OnHeaders (Respond | ReadBody)
//! on_request_body(now, body, store)   -> OnBody     (Respond | Forward); limits reserved
//! on_response_headers(status, h)      -> OnResponse (Relay | Replace)
//! on_response_chunk(bytes, end)       -> Chunk      (bytes to emit); usage read
//! finish(now, store)                  -> Summary    (for the access log); limits settled
//! ```

use std::sync::Arc;

use crate::auth;
use crate::config::{Config, ConsumerId, ModelId, PromptId, ProviderId};
use crate::decorators::{self, Decorators};
use crate::error::GatewayError;
use crate::error::RefusedBy;
use crate::guard;
use crate::http::{
    FinalAnswer, HeaderLookup, LocalResponse, RequestHead, FORWARD_REMOVE_HEADERS,
    LOCAL_REPLY_HEADER, PROVIDER_HEADER,
};
use crate::keys::{taken_over, Ticket, KEY_RESERVATION_HEADER};
use crate::limits::{self, Amounts, Limit, RateHeaders, Reservation};
use crate::prompts::{self, shape, ResponseMode};
use crate::providers::dialect::{self, ClientDialect, StreamTranslator, UsageReader};
use crate::providers::openai::usage::{self, Usage};
use crate::providers::openai::wire;
use crate::providers::{mock, ProviderKind};
use crate::sse::SseParser;
use crate::store::CounterStore;
use crate::tokens;

/// What to do after the request head.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum OnHeaders {
    /// Send this response and stop; nothing goes upstream.
    Respond(LocalResponse),
    /// Read the whole body, refusing with `BodyTooLarge` past `limit` bytes, and pass it to
    /// `on_request_body`.
    ReadBody { limit: u64 },
}

/// What to do after the request body.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
// One per request, moved once to the host: boxing the forward would cost an allocation on
// the hot path to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
pub enum OnBody {
    /// Send this response and stop; nothing goes upstream.
    Respond(LocalResponse),
    /// Send the request to a provider, edited as described.
    Forward(Forward),
}

/// How the request leaves the gateway role. The key is added per attempt by the key role
/// (`keys::attempt_key`), not here.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward {
    pub provider: ProviderId,
    /// Path to request upstream (the provider's path prefix + endpoint + client's query).
    pub path: String,
    /// Replacement body; `None` forwards the client's body byte for byte.
    pub body: Option<Vec<u8>>,
    /// Request headers to remove: the consumer's credential, `accept-encoding`.
    pub remove_headers: &'static [&'static str],
    /// Request headers to set when the client did not send them (a provider's API version).
    pub default_headers: Vec<(&'static str, String)>,
    /// Header naming the provider (routes the request in Envoy, tells the key role its pool).
    pub route_header: (&'static str, String),
    /// What every attempt needs to pick its key (`keys::attempt_key`); in Envoy it travels
    /// to the key role as filter state.
    pub ticket: Ticket,
}

/// What to do with the provider's response.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum OnResponse {
    /// Pass it on with `status` instead of its own (if set), without `remove_headers` and
    /// with `add_headers`; its body goes through `on_response_chunk`. If `body_rewritten`,
    /// the body's length changes: drop the provider's `content-length`.
    Relay {
        status: Option<u16>,
        remove_headers: &'static [&'static str],
        add_headers: Vec<(&'static str, String)>,
        body_rewritten: bool,
    },
    /// Send this instead, and drop the provider's body.
    Replace(LocalResponse),
    /// Hold the response: read the provider's whole body (up to `limit` bytes) and pass it
    /// to `on_collected`, which says what to send instead (a prompt's `text` or `json`).
    Collect { limit: usize },
}

/// Response headers the client does not see: those that identify the provider account behind
/// a key or its limits (the gateway's own `x-ratelimit-*` replace them), that try to set
/// state on the client, and the key role's internal handover.
pub const RELAY_REMOVE_HEADERS: [&str; 25] = [
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
    "set-cookie",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    KEY_RESERVATION_HEADER,
    LOCAL_REPLY_HEADER,
    SERVED_BY_HEADER,
];

/// What to emit for one chunk of the provider's response body.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Emit the chunk as received.
    Unchanged,
    /// Emit these bytes instead.
    Replace(Vec<u8>),
}

/// What happened, for the access log. Holds names, never keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub consumer: Option<String>,
    /// The public model that served the request (or was to).
    pub model: Option<String>,
    /// The public model the client asked for: another than `model` after a failover.
    pub requested_model: Option<String>,
    /// The request's `x-request-id` (the hosts set one when the client sent none).
    pub request_id: Option<String>,
    pub provider: Option<String>,
    pub status: Option<u16>,
    pub stream: bool,
    /// What the limits were charged: tokens, and millionths of a dollar.
    pub charged: Option<Amounts>,
    /// Whether `charged` comes from the provider's usage (else it is estimated).
    pub usage_reported: bool,
    /// The `code` label of `tollgate_requests_total` (`metrics::CODES`).
    pub code: &'static str,
    /// The tokens the request used, when known (reported, or estimated for a cut stream),
    /// whether or not a limit metered it.
    pub tokens: Option<crate::metrics::Tokens>,
    /// What it cost, in millionths of a dollar rounded up as limits charge (0 for a model
    /// without prices).
    pub micro_usd: u64,
    /// What it cost in dollars, unrounded.
    pub usd: f64,
    /// The limit that refused it: `(scope label, limit name)`.
    pub refused_by: Option<RefusedBy>,
}

/// Most bytes of one unfinished SSE event held back while the usage chunk is being stripped.
const MAX_HELD_EVENT: usize = 256 * 1024;

/// Largest non-streamed response body kept to read its usage; beyond it, the reservation is
/// charged.
const MAX_USAGE_BODY: usize = 4 * 1024 * 1024;

/// A request's standing with its limits, from admission to settlement.
#[derive(Debug, Default)]
struct Metering {
    reservation: Reservation,
    headers: RateHeaders,
    /// What was reserved: charged whole when the usage cannot be known.
    reserved: Amounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Head,
    Body,
    Upstream,
    Done,
}

pub struct Exchange {
    config: Arc<Config>,
    stage: Stage,
    consumer: Option<ConsumerId>,
    model: Option<ModelId>,
    status: Option<u16>,
    stream: bool,
    /// The client's query string, kept for the upstream path.
    query: String,
    metering: Option<Metering>,
    /// The client did not ask for the usage chunk the gateway forced: drop it from the stream.
    strip_usage_chunk: bool,
    /// Streamed responses: events as they complete.
    sse: Option<SseParser>,
    /// Non-streamed responses: the body, to read its usage at the end.
    body: Vec<u8>,
    usage: Option<Usage>,
    /// Estimated tokens of the text streamed so far, for a stream that ends without usage.
    streamed_tokens: u64,
    body_overflowed: bool,
    /// The request went to a provider.
    forwarded: bool,
    /// The provider answered with success (its usage is charged even if the gateway then
    /// answers the client with an error, as for a `json` prompt's unparsable output).
    provider_succeeded: bool,
    /// A call of a prompt template.
    prompt: Option<PromptCall>,
    /// A `text` prompt's stream: each event is reshaped for the client.
    shape_stream: bool,
    /// The provider does not speak the hub shape: its answer is translated into it before
    /// anything else reads it (`providers::dialect`).
    translate_answer: Option<ProviderKind>,
    /// Its stream, being translated into the hub shape.
    stream_to_hub: Option<Box<dyn StreamTranslator>>,
    /// When the request was forwarded, in seconds: the `created` of translated answers.
    created_s: u64,
    /// The API the client called: its refusals and answers are in that dialect.
    client: ClientDialect,
    /// `POST /v1/messages/count_tokens`: answered from the gateway's estimator.
    count_tokens: bool,
    /// A request in the provider's own dialect, passed through: only its usage is read.
    passthrough: Option<Box<dyn UsageReader>>,
    /// A hub stream, being translated for the client.
    stream_to_client: Option<Box<dyn StreamTranslator>>,
    /// An answer read whole to be translated: its retry hints, which the rebuilt answer
    /// keeps (`on_collected`).
    retry_hints: Vec<(&'static str, String)>,
    /// The answer being read whole is the key role's own refusal (Envoy), already in the
    /// hub shape: only the client's dialect is applied.
    key_role_reply: bool,
    /// The model the client asked for; `model` is the one serving it (another after a
    /// failover).
    requested_model: Option<ModelId>,
    /// The models of the requested one's chain not tried yet, in order.
    fallbacks: std::collections::VecDeque<ModelId>,
    /// The client's body, kept to route it again to a fallback (only when there is one).
    client_body: Option<Vec<u8>>,
    /// Routing to this fallback: the consumer's own limits are reserved already.
    failing_over: Option<ModelId>,
    /// The request's `x-request-id`, for the access log.
    request_id: Option<String>,
    /// The gateway's own refusal, if it answered with one: its metric code and the limit
    /// that refused.
    refusal: Option<(&'static str, Option<RefusedBy>)>,
    /// The prompt's estimated tokens, for a stream that ends without usage (also when no
    /// limit meters the request).
    prompt_estimate: u64,
}

/// Response header naming the public model that served the request (another than the one
/// asked for after a failover).
pub const MODEL_HEADER: &str = "x-tollgate-model";

/// Envoy: the internal response header by which the key role tells the gateway role which
/// fallback answered (see `Exchange::serve_as`).
pub const SERVED_BY_HEADER: &str = "x-tollgate-served-by";

/// One limit in `GET /v1/usage`: amounts in its unit (dollars for cost), times in seconds.
fn usage_entry(
    limit: &Limit,
    model: Option<&str>,
    standing: limits::Standing,
    now_ms: u64,
) -> serde_json::Value {
    let (unit, amount): (&str, &dyn Fn(u64) -> serde_json::Value) = match limit.unit {
        limits::Unit::Requests => ("requests", &|n| n.into()),
        limits::Unit::Tokens => ("tokens", &|n| n.into()),
        limits::Unit::MicroUsd => ("usd", &|n| (n as f64 / 1_000_000.0).into()),
    };
    let mut entry = serde_json::json!({
        "name": limit.name,
        "model": model,
        "unit": unit,
        "limit": amount(standing.limit),
        "remaining": amount(standing.remaining),
    });
    if let (Some(map), Some(in_flight)) = (entry.as_object_mut(), standing.in_flight) {
        map.insert("in_flight".into(), in_flight.into());
        return entry;
    }
    if let Some(map) = entry.as_object_mut() {
        map.insert(
            "reset_seconds".into(),
            (standing.reset_ms as f64 / 1_000.0).into(),
        );
        map.insert(
            "resets_at".into(),
            now_ms
                .saturating_add(standing.reset_ms)
                .div_ceil(1_000)
                .into(),
        );
        if let Some((used, period)) = standing.used {
            map.insert("used".into(), amount(used));
            let period = match period {
                crate::limits::quota::Period::Day => "day",
                crate::limits::quota::Period::Month => "month",
            };
            map.insert("period".into(), period.into());
        }
    }
    entry
}

/// What a request asks of the model, for its reservation: the prompt estimate (decorations
/// included), the most output it allows per choice, and how many choices.
struct Demand {
    prompt: u64,
    max_output: Option<u64>,
    choices: u64,
}

/// The request's id: kept from the client when it is one (`is_request_id`), else set by the
/// host, and returned with the response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Whether a client's `x-request-id` is kept as it is: 1 to 128 visible ASCII characters, so
/// that a log line cannot be forged through it.
pub fn is_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The calling consumer's limits and allowances, and where each stands.
pub const USAGE_PATH: &str = "/v1/usage";

/// Anthropic's Messages endpoint and its token counter, on the gateway's front door.
const MESSAGES_PATH: &str = "/v1/messages";
const COUNT_TOKENS_PATH: &str = "/v1/messages/count_tokens";

/// Which template and version a prompt call renders, and how its answer is shaped.
#[derive(Debug, Clone, Copy)]
struct PromptCall {
    id: PromptId,
    version: usize,
    stream: bool,
    response: ResponseMode,
}

impl Exchange {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            stage: Stage::Head,
            consumer: None,
            model: None,
            status: None,
            stream: false,
            query: String::new(),
            metering: None,
            strip_usage_chunk: false,
            sse: None,
            body: Vec::new(),
            usage: None,
            streamed_tokens: 0,
            body_overflowed: false,
            forwarded: false,
            provider_succeeded: false,
            prompt: None,
            shape_stream: false,
            translate_answer: None,
            stream_to_hub: None,
            created_s: 0,
            client: ClientDialect::Chat,
            count_tokens: false,
            passthrough: None,
            stream_to_client: None,
            retry_hints: Vec::new(),
            requested_model: None,
            fallbacks: std::collections::VecDeque::new(),
            client_body: None,
            failing_over: None,
            key_role_reply: false,
            request_id: None,
            refusal: None,
            prompt_estimate: 0,
        }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The consumer's name, once its key was read (with the request's head).
    pub fn consumer_name(&self) -> Option<&str> {
        self.consumer
            .and_then(|c| self.config.consumer(c))
            .map(|c| c.name.as_str())
    }

    /// `store`: the counters `GET /v1/usage` reports.
    pub fn on_request_headers<H: HeaderLookup + ?Sized>(
        &mut self,
        now_ms: u64,
        head: &RequestHead<'_, H>,
        store: &impl CounterStore,
    ) -> OnHeaders {
        let (path, query) = match head.path.split_once('?') {
            Some((p, q)) => (p, q),
            None => (head.path, ""),
        };
        self.request_id = head
            .headers
            .header(REQUEST_ID_HEADER)
            .filter(|id| is_request_id(id))
            .map(str::to_string);
        let decision = match (path, head.method) {
            ("/healthz", "GET") => {
                self.status = Some(200);
                Ok(OnHeaders::Respond(LocalResponse::json(
                    200,
                    br#"{"status":"ok"}"#.to_vec(),
                )))
            }
            ("/v1/chat/completions", "POST") => self.authenticate(head.headers).and_then(|()| {
                let limit = self.config.server.max_body_bytes;
                match declared_length(head.headers) {
                    Some(n) if n > limit => Err(GatewayError::BodyTooLarge { limit }),
                    _ => {
                        self.query = query.to_string();
                        self.stage = Stage::Body;
                        Ok(OnHeaders::ReadBody { limit })
                    }
                }
            }),
            (USAGE_PATH, "GET") => self
                .authenticate(head.headers)
                .and_then(|()| self.usage(now_ms, store))
                .map(OnHeaders::Respond),
            ("/v1/models", "GET") => self.authenticate(head.headers).map(|()| {
                let list = self
                    .consumer
                    .and_then(|c| self.config.consumer(c))
                    .map(|c| c.models_list().to_vec())
                    .unwrap_or_default();
                self.status = Some(200);
                OnHeaders::Respond(LocalResponse::json(200, list))
            }),
            (MESSAGES_PATH | COUNT_TOKENS_PATH, "POST") => {
                self.client = ClientDialect::Messages;
                self.count_tokens = path == COUNT_TOKENS_PATH;
                // Anthropic's SDK marks beta calls with `?beta=true`: passed through.
                self.query = query.to_string();
                self.authenticate(head.headers)
                    .and_then(|()| self.read_body(head.headers))
            }
            (prompts::PROMPTS_PATH, "GET") => self.authenticate(head.headers).map(|()| {
                let list = self
                    .consumer
                    .and_then(|c| self.config.consumer(c))
                    .map(|c| c.prompts_list().to_vec())
                    .unwrap_or_default();
                self.status = Some(200);
                OnHeaders::Respond(LocalResponse::json(200, list))
            }),
            (path, "POST") if self.config.prompt_at(path).is_some() => {
                self.prompt_call(path, query, head.headers)
            }
            (path, method) if self.config.prompt_at(path).is_some() => {
                Err(GatewayError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.to_string(),
                    allowed: "POST",
                })
            }
            (
                known @ ("/healthz"
                | "/v1/chat/completions"
                | "/v1/models"
                | USAGE_PATH
                | prompts::PROMPTS_PATH
                | MESSAGES_PATH
                | COUNT_TOKENS_PATH),
                method,
            ) => {
                if matches!(known, MESSAGES_PATH | COUNT_TOKENS_PATH) {
                    self.client = ClientDialect::Messages;
                }
                Err(GatewayError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.to_string(),
                    allowed: if matches!(
                        known,
                        "/v1/chat/completions" | MESSAGES_PATH | COUNT_TOKENS_PATH
                    ) {
                        "POST"
                    } else {
                        "GET"
                    },
                })
            }
            _ => Err(GatewayError::NotFound {
                path: path.to_string(),
            }),
        };
        decision.unwrap_or_else(|e| OnHeaders::Respond(self.refuse(e)))
    }

    /// Reads the body next, unless it says it is too large.
    fn read_body<H: HeaderLookup + ?Sized>(
        &mut self,
        headers: &H,
    ) -> Result<OnHeaders, GatewayError> {
        let limit = self.config.server.max_body_bytes;
        match declared_length(headers) {
            Some(n) if n > limit => Err(GatewayError::BodyTooLarge { limit }),
            _ => {
                self.stage = Stage::Body;
                Ok(OnHeaders::ReadBody { limit })
            }
        }
    }

    /// A call of the template at `path`: who may call it, which version, streamed or not.
    fn prompt_call<H: HeaderLookup + ?Sized>(
        &mut self,
        path: &str,
        query: &str,
        headers: &H,
    ) -> Result<OnHeaders, GatewayError> {
        self.authenticate(headers)?;
        let config = Arc::clone(&self.config);
        let (Some(id), Some(consumer)) = (
            config.prompt_at(path),
            self.consumer.and_then(|c| config.consumer(c)),
        ) else {
            return Err(GatewayError::NotFound {
                path: path.to_string(),
            });
        };
        let Some(template) = config.prompt(id) else {
            return Err(GatewayError::NotFound {
                path: path.to_string(),
            });
        };
        if !consumer.may_call(id) {
            return Err(GatewayError::PromptNotAllowed {
                prompt: template.name.clone(),
            });
        }
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        let requested = param("version").or_else(|| headers.header(prompts::VERSION_HEADER));
        let version = template.version(requested)?;
        let stream = matches!(param("stream"), Some("true" | "1" | ""));
        if stream && !version.response.streams() {
            return Err(GatewayError::PromptCannotStream {
                prompt: template.name.clone(),
            });
        }
        self.prompt = Some(PromptCall {
            id,
            version: template
                .versions
                .iter()
                .position(|v| v.version == version.version)
                .unwrap_or(0),
            stream,
            response: version.response,
        });
        let limit = self.config.server.max_body_bytes;
        match declared_length(headers) {
            Some(n) if n > limit => Err(GatewayError::BodyTooLarge { limit }),
            _ => {
                self.stage = Stage::Body;
                Ok(OnHeaders::ReadBody { limit })
            }
        }
    }

    pub fn on_request_body(
        &mut self,
        now_ms: u64,
        body: &[u8],
        store: &impl CounterStore,
    ) -> OnBody {
        if self.stage != Stage::Body {
            // A host bug, not a client's: answer rather than panic.
            return OnBody::Respond(self.refuse(GatewayError::MalformedBody {
                detail: "the request has no body to read".into(),
            }));
        }
        match self.route(now_ms, body, store) {
            Ok(decision) => decision,
            Err(e) => OnBody::Respond(self.refuse(e)),
        }
    }

    fn route(
        &mut self,
        now_ms: u64,
        body: &[u8],
        store: &impl CounterStore,
    ) -> Result<OnBody, GatewayError> {
        let limit = self.config.server.max_body_bytes;
        if body.len() as u64 > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        let config = Arc::clone(&self.config);
        let client_body = body;
        let rendered;
        let body = match self.prompt {
            Some(call) => {
                let version = config
                    .prompt(call.id)
                    .and_then(|p| p.versions.get(call.version))
                    .ok_or_else(|| GatewayError::Internal {
                        detail: "a prompt call lost its template".into(),
                    })?;
                rendered = version.render(body, call.stream)?;
                rendered.as_slice()
            }
            None => body,
        };
        if self.client != ClientDialect::Chat {
            if let Some(decision) = self.route_native(now_ms, body, client_body, store)? {
                return Ok(decision);
            }
        }
        // On through the hub shape, and back at the end.
        let hub = self
            .client
            .request_to_hub(body)
            .map_err(|detail| GatewayError::MalformedBody { detail })?;
        let translated_request = hub.is_some();
        let body = hub.as_deref().unwrap_or(body);
        let req = wire::parse_chat_request(body)
            .map_err(|detail| GatewayError::MalformedBody { detail })?;
        self.stream = req.is_stream();
        let model_id = self.allowed_model(&req.model)?;
        let model_id = self.serving(model_id, client_body);
        let consumer = self.consumer.and_then(|c| config.consumer(c));
        let (Some(model), Some(provider)) = (
            config.model(model_id),
            config
                .model(model_id)
                .and_then(|m| config.provider(m.provider)),
        ) else {
            return Err(GatewayError::UnknownModel {
                model: req.model.to_string(),
            });
        };
        // Guard rules see the request's own messages (a template's as rendered), not the
        // decorators the gateway adds.
        refuse_by_guard(model, consumer, || req.guarded_texts())?;
        let no_decorators = Decorators::default();
        let consumer_decorators = consumer.map_or(&no_decorators, |c| &c.decorators);
        let (prepend, append) = decorators::around(&model.decorators, consumer_decorators);
        let decorated_tokens = model.decorators.tokens + consumer_decorators.tokens;
        // Streams report usage only when asked: ask, so that streams are charged what they
        // really used, and hide the extra chunk from a client that did not ask.
        let is_mock = provider.kind == ProviderKind::Mock;
        let speaks_hub = dialect::speaks_hub(provider.kind);
        // A stream translated into the hub shape always ends with a usage chunk: stripped
        // the same way.
        self.strip_usage_chunk = req.is_stream() && !req.wants_stream_usage() && !is_mock;
        self.shape_stream =
            req.is_stream() && matches!(self.prompt, Some(c) if c.response == ResponseMode::Text);
        // Another dialect names its model and asks for usage its own way.
        let rename = (model.upstream_model != req.model && !is_mock && speaks_hub)
            .then_some(model.upstream_model.as_str());
        let edits = wire::Edits {
            model: rename,
            force_stream_usage: self.strip_usage_chunk && speaks_hub,
            prepend,
            append,
        };
        let mut upstream_body = if !edits.is_empty() {
            Some(
                wire::rewrite(body, &edits)
                    .map_err(|detail| GatewayError::MalformedBody { detail })?,
            )
        } else {
            // A template's request is the gateway's own, never the client's body; nor is a
            // translated request.
            (self.prompt.is_some() || translated_request).then(|| body.to_vec())
        };
        let hub_request = upstream_body.as_deref().unwrap_or(body);
        let sent = dialect::provider_request(
            provider,
            hub_request,
            &model.upstream_model,
            model.default_max_tokens,
        )
        .map_err(|u| GatewayError::UnsupportedParameter {
            param: u.param,
            provider_kind: provider.kind.as_str(),
            reason: u.reason,
        })?;
        if sent.body.is_some() {
            upstream_body = sent.body;
        }
        if !speaks_hub {
            self.translate_answer = Some(provider.kind);
        }
        // Reserved once the request is known to be sendable: a request the provider cannot
        // take is refused before it holds anything.
        let demand = self.admit(
            now_ms,
            || Demand {
                prompt: req.estimate_prompt_tokens() + decorated_tokens,
                max_output: req.max_output_tokens(),
                choices: req.choices(),
            },
            model_id,
            provider.has_key_limits(),
            store,
        )?;
        let rate_headers = self.answer_headers();
        if is_mock {
            // Answered here, from the request as a provider would have received it.
            let sent = upstream_body.as_deref().unwrap_or(body);
            let req = wire::parse_chat_request(sent)
                .map_err(|detail| GatewayError::MalformedBody { detail })?;
            self.stage = Stage::Done;
            self.status = Some(200);
            self.provider_succeeded = true;
            self.usage = Some(mock::usage(&req, &mock::reply_text(&req)));
            let mut response = self.shape_local(mock::respond(&req, &model.name, now_ms));
            if self.client != ClientDialect::Chat {
                response = self.local_for_client(response, &model.name);
            }
            response.headers.extend(rate_headers);
            return Ok(OnBody::Respond(response));
        }
        let prefix = provider
            .base_url
            .as_ref()
            .map_or("", |u| u.path_prefix.as_str());
        let mut path = format!("{prefix}{}", sent.endpoint);
        // The client's query string is for an API of its own dialect (Azure's `api-version`,
        // say): it goes only where that dialect is spoken.
        if !self.query.is_empty() && speaks_hub && self.client == ClientDialect::Chat {
            path.push('?');
            path.push_str(&self.query);
        }
        self.stage = Stage::Upstream;
        self.forwarded = true;
        self.created_s = now_ms / 1_000;
        Ok(OnBody::Forward(Forward {
            provider: model.provider,
            path,
            body: upstream_body,
            remove_headers: &FORWARD_REMOVE_HEADERS,
            default_headers: sent.default_headers,
            route_header: (PROVIDER_HEADER, provider.name.clone()),
            ticket: Ticket {
                provider: provider.name.clone(),
                model: model.name.clone(),
                tokens: demand.tokens,
                started_ms: now_ms,
                tried: Vec::new(),
                attempts_before: 0,
                chain: Vec::new(),
                current: None,
                first_provider: None,
            },
        }))
    }

    /// A request in another dialect than the hub's, before it is translated: counted tokens
    /// are answered here, and a request to a provider that speaks the client's own dialect
    /// is passed through as it is (only the model renamed). `None`: translate it.
    fn route_native(
        &mut self,
        now_ms: u64,
        body: &[u8],
        client_body: &[u8],
        store: &impl CounterStore,
    ) -> Result<Option<OnBody>, GatewayError> {
        let config = Arc::clone(&self.config);
        if self.count_tokens {
            return self.count_message_tokens(body).map(Some);
        }
        let req = self
            .client
            .read_request(body)
            .map_err(|detail| GatewayError::MalformedBody { detail })?;
        let model_id = self.allowed_model(req.model())?;
        let model_id = self.serving(model_id, client_body);
        let (Some(model), Some(provider)) = (
            config.model(model_id),
            config
                .model(model_id)
                .and_then(|m| config.provider(m.provider)),
        ) else {
            return Err(GatewayError::UnknownModel {
                model: req.model().to_string(),
            });
        };
        if self.client.native_kind() != Some(provider.kind) {
            return Ok(None);
        }
        self.stream = req.is_stream();
        let consumer = self.consumer.and_then(|c| config.consumer(c));
        refuse_by_guard(model, consumer, || req.guarded_texts())?;
        let no_decorators = Decorators::default();
        let consumer_decorators = consumer.map_or(&no_decorators, |c| &c.decorators);
        let (prepend, append) = decorators::around(&model.decorators, consumer_decorators);
        let decorated_tokens = model.decorators.tokens + consumer_decorators.tokens;
        let demand = self.admit(
            now_ms,
            || Demand {
                prompt: req.estimate_prompt_tokens() + decorated_tokens,
                max_output: Some(req.max_tokens()),
                choices: 1,
            },
            model_id,
            provider.has_key_limits(),
            store,
        )?;
        let sent = dialect::passthrough_request(
            provider,
            body,
            req.model(),
            &model.upstream_model,
            (&prepend, &append),
        )
        .map_err(|detail| GatewayError::MalformedBody { detail })?;
        let prefix = provider
            .base_url
            .as_ref()
            .map_or("", |u| u.path_prefix.as_str());
        self.passthrough = dialect::passthrough_usage(provider.kind);
        self.stage = Stage::Upstream;
        self.forwarded = true;
        self.created_s = now_ms / 1_000;
        let mut path = format!("{prefix}{}", sent.endpoint);
        if !self.query.is_empty() {
            path.push('?');
            path.push_str(&self.query);
        }
        Ok(Some(OnBody::Forward(Forward {
            provider: model.provider,
            path,
            body: sent.body,
            remove_headers: &FORWARD_REMOVE_HEADERS,
            default_headers: sent.default_headers,
            route_header: (PROVIDER_HEADER, provider.name.clone()),
            ticket: Ticket {
                provider: provider.name.clone(),
                model: model.name.clone(),
                tokens: demand.tokens,
                started_ms: now_ms,
                tried: Vec::new(),
                attempts_before: 0,
                chain: Vec::new(),
                current: None,
                first_provider: None,
            },
        })))
    }

    /// `POST /v1/messages/count_tokens`: the gateway's estimate of the prompt, for a model
    /// the consumer may use (the request has no `max_tokens`, which the reader requires).
    fn count_message_tokens(&mut self, body: &[u8]) -> Result<OnBody, GatewayError> {
        let mut value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| GatewayError::MalformedBody {
                detail: e.to_string(),
            })?;
        if let Some(object) = value.as_object_mut() {
            object
                .entry("max_tokens")
                .or_insert(serde_json::Value::from(1));
        }
        let with_max = value.to_string();
        let req = self
            .client
            .read_request(with_max.as_bytes())
            .map_err(|detail| GatewayError::MalformedBody { detail })?;
        self.allowed_model(req.model())?;
        let tokens = req.estimate_prompt_tokens();
        self.stage = Stage::Done;
        self.status = Some(200);
        let answer = serde_json::json!({ "input_tokens": tokens }).to_string();
        Ok(OnBody::Respond(LocalResponse::json(
            200,
            answer.into_bytes(),
        )))
    }

    /// The model that serves a request for `requested`: itself, or the fallback being
    /// routed to. On the first routing, the chain is set up (fallbacks the consumer may not
    /// use are left out) and the client's body kept if there is a fallback to send it to.
    fn serving(&mut self, requested: ModelId, client_body: &[u8]) -> ModelId {
        if let Some(target) = self.failing_over {
            self.model = Some(target);
            return target;
        }
        let config = Arc::clone(&self.config);
        self.requested_model = Some(requested);
        let consumer = self.consumer.and_then(|c| config.consumer(c));
        self.fallbacks = config
            .model(requested)
            .map(|m| m.fallbacks.as_slice())
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|&f| consumer.is_some_and(|c| c.may_use(f)))
            .collect();
        if !self.fallbacks.is_empty() {
            self.client_body = Some(client_body.to_vec());
        }
        requested
    }

    /// The model the request went to cannot serve it (no usable key, or its attempts failed
    /// in a way another provider may not): routes it to the next model of its chain that
    /// takes it — translated to that provider's dialect, under that model's own limits, the
    /// consumer's reserved once — and says how. `previous` is the last attempt's ticket: the
    /// retry budget and attempt count run on over the whole chain. `None` when the chain is
    /// spent; the host then answers with the last failure.
    pub fn fail_over(
        &mut self,
        now_ms: u64,
        store: &impl CounterStore,
        previous: &Ticket,
    ) -> Option<OnBody> {
        let body = self.client_body.clone()?;
        while let Some(next) = self.fallbacks.pop_front() {
            // Routed apart, and taken on only if it takes the request: a fallback that
            // cannot leaves the exchange as it was.
            let mut x = self.routed_apart(next);
            match x.route(now_ms, &body, store) {
                Ok(decision) => {
                    if let Some(from) = self.model {
                        self.release_model_limits(from, now_ms, store);
                    }
                    self.adopt(x);
                    return Some(match decision {
                        OnBody::Forward(mut forward) => {
                            forward.ticket.started_ms = previous.started_ms;
                            forward.ticket.attempts_before = previous.attempts_made();
                            forward.ticket.first_provider =
                                Some(previous.retry_provider().to_string());
                            OnBody::Forward(forward)
                        }
                        answered => answered,
                    });
                }
                // This one cannot take it (its limits, its dialect): what it reserved goes
                // back, and the next is tried.
                Err(_) => {
                    if let Some(m) = x.metering.take() {
                        let _ = limits::settle(m.reservation, store, now_ms, Amounts::default());
                    }
                }
            }
        }
        None
    }

    /// Takes on the routing of `x`, an exchange routed apart to a fallback: how the answer
    /// is read, and what it reserved (its model limits) with the rest.
    fn adopt(&mut self, mut x: Exchange) {
        self.reset_for_forward();
        self.model = x.model;
        self.stage = x.stage;
        self.stream = x.stream;
        self.status = x.status;
        self.usage = x.usage.take();
        self.forwarded = x.forwarded;
        self.provider_succeeded = x.provider_succeeded;
        self.created_s = x.created_s;
        self.prompt_estimate = x.prompt_estimate;
        self.translate_answer = x.translate_answer;
        self.passthrough = x.passthrough.take();
        self.strip_usage_chunk = x.strip_usage_chunk;
        self.shape_stream = x.shape_stream;
        match (self.metering.as_mut(), x.metering.take()) {
            (Some(m), Some(theirs)) => {
                m.reservation.merge(theirs.reservation);
                m.reserved = theirs.reserved;
            }
            (None, theirs) => self.metering = theirs,
            (Some(_), None) => {}
        }
    }

    /// Envoy: every fallback of the request's chain routed as it would be sent (in its
    /// provider's dialect, with its path and headers), for the key role to send when the
    /// router's retry reaches that provider. Nothing is reserved here: the key role
    /// reserves the fallback's keys, and `serve_as` moves the model limits.
    pub fn chain_steps(&self, now_ms: u64) -> Vec<crate::keys::ChainStep> {
        let Some(body) = &self.client_body else {
            return Vec::new();
        };
        self.fallbacks
            .iter()
            .filter_map(|&f| {
                let mut x = self.routed_apart(f);
                match x.route(now_ms, body, &crate::store::LocalStore::default()) {
                    Ok(OnBody::Forward(forward)) => Some(crate::keys::ChainStep {
                        authority: self
                            .config
                            .provider(forward.provider)
                            .and_then(|p| p.base_url.as_ref())
                            .map(|u| u.host_header())?,
                        provider: forward.ticket.provider,
                        model: forward.ticket.model,
                        path: forward.path,
                        body: String::from_utf8(forward.body.unwrap_or_else(|| body.clone()))
                            .ok()?,
                        default_headers: forward
                            .default_headers
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                        tokens: forward.ticket.tokens,
                    }),
                    _ => None,
                }
            })
            .collect()
    }

    /// A copy of this exchange as it was before routing, set to route to `model` (a
    /// fallback), for `chain_steps` and `serve_as`.
    fn routed_apart(&self, model: ModelId) -> Exchange {
        let mut x = Exchange::new(Arc::clone(&self.config));
        x.stage = Stage::Body;
        x.consumer = self.consumer;
        x.query = self.query.clone();
        x.prompt = self.prompt;
        x.client = self.client;
        x.requested_model = self.requested_model;
        x.failing_over = Some(model);
        x
    }

    /// Envoy: the response came from `model`, a fallback the key role failed over to (its
    /// `SERVED_BY_HEADER`): the answer is read as that model's (its dialect, its name), and
    /// its limits take the request's model limits over — charged now, since the key role
    /// could not reserve them (they cannot refuse an answer that came).
    pub fn serve_as(&mut self, model: &str, now_ms: u64, store: &impl CounterStore) {
        let config = Arc::clone(&self.config);
        let Some(target) = config.model_id(model) else {
            return;
        };
        if self.model == Some(target) || !self.fallbacks.contains(&target) {
            return;
        }
        let Some(body) = self.client_body.clone() else {
            return;
        };
        let mut x = self.routed_apart(target);
        if !matches!(
            x.route(now_ms, &body, &crate::store::LocalStore::default()),
            Ok(OnBody::Forward(_))
        ) {
            return;
        }
        let reserved = x.metering.take().map(|m| m.reserved);
        if let Some(from) = self.model {
            self.release_model_limits(from, now_ms, store);
        }
        self.adopt(x);
        // The fallback's model limits, over what the request reserved; when they have no
        // room (the answer came all the same), over nothing, so that settling charges what
        // was used.
        let (Some(consumer), Some(reserved)) = (self.consumer, reserved) else {
            return;
        };
        let limits = || config.model_limits_for(consumer, target);
        let taken = limits::admit(limits(), store, now_ms, reserved)
            .or_else(|_| limits::admit(limits(), store, now_ms, Amounts::default()));
        if let Ok((reservation, _)) = taken {
            match self.metering.as_mut() {
                Some(m) => m.reservation.merge(reservation),
                None => {
                    self.metering = Some(Metering {
                        reservation,
                        reserved,
                        ..Metering::default()
                    })
                }
            }
        }
    }

    /// Whether the request has a chain of models to fail over along (its model has
    /// fallbacks the consumer may use): once a model of it is spent, the next one is tried
    /// rather than the same keys again.
    pub fn has_chain(&self) -> bool {
        self.client_body.is_some()
    }

    /// Gives back what the request reserved against limits of `model` (the model's own, and
    /// the consumer's on that model): that model did not serve it. The request counts as
    /// made; no tokens.
    fn release_model_limits(&mut self, model: ModelId, now_ms: u64, store: &impl CounterStore) {
        let (Some(consumer), Some(metering)) = (self.consumer, self.metering.as_mut()) else {
            return;
        };
        let keys: Vec<Arc<str>> = self
            .config
            .model_limits_for(consumer, model)
            .map(|l| Arc::clone(&l.store_key))
            .collect();
        let released = metering
            .reservation
            .split_off(|l| keys.contains(&l.store_key));
        let _ = limits::settle(released, store, now_ms, Amounts::default());
    }

    /// Forgets what routing to the last model decided, before routing to the next.
    fn reset_for_forward(&mut self) {
        self.stage = Stage::Body;
        self.status = None;
        self.strip_usage_chunk = false;
        self.shape_stream = false;
        self.sse = None;
        self.body.clear();
        self.usage = None;
        self.streamed_tokens = 0;
        self.body_overflowed = false;
        self.forwarded = false;
        self.provider_succeeded = false;
        self.translate_answer = None;
        self.stream_to_hub = None;
        self.passthrough = None;
        self.stream_to_client = None;
        self.retry_hints.clear();
        self.key_role_reply = false;
        self.refusal = None;
    }

    /// `GET /v1/usage`: the authenticated consumer's own limits (and its limits on single
    /// models), each with where it stands now. Never another consumer's; model-wide limits,
    /// shared by every consumer, are not its own.
    fn usage(
        &mut self,
        now_ms: u64,
        store: &impl CounterStore,
    ) -> Result<LocalResponse, GatewayError> {
        let config = Arc::clone(&self.config);
        let consumer = self
            .consumer
            .and_then(|c| config.consumer(c))
            .ok_or(GatewayError::UnknownConsumerKey)?;
        let on_model = consumer.model_limits.iter().flat_map(|(&m, limits)| {
            let model = config.model(m).map(|m| m.name.as_str());
            limits.iter().map(move |l| (model, l))
        });
        let mut entries = Vec::new();
        for (model, limit) in consumer.limits.iter().map(|l| (None, l)).chain(on_model) {
            let state = limits::read(store, &limit.store_key).map_err(|e| {
                GatewayError::SharedStateUnavailable {
                    detail: e.to_string(),
                }
            })?;
            entries.push(usage_entry(
                limit,
                model,
                limit.standing(state, now_ms),
                now_ms,
            ));
        }
        self.status = Some(200);
        let body = serde_json::json!({
            "object": "usage",
            "consumer": consumer.name,
            "limits": entries,
        });
        Ok(LocalResponse::json(200, body.to_string().into_bytes()))
    }

    /// The model called `name`, if it exists and the consumer may use it.
    fn allowed_model(&mut self, name: &str) -> Result<ModelId, GatewayError> {
        let config = Arc::clone(&self.config);
        let model_id = config
            .model_id(name)
            .ok_or_else(|| GatewayError::UnknownModel {
                model: name.to_string(),
            })?;
        let consumer = self.consumer.and_then(|c| config.consumer(c));
        // A template the consumer may call is its own permission to use the template's model.
        let allowed = self.prompt.is_some() || consumer.is_some_and(|c| c.may_use(model_id));
        if !allowed {
            return Err(GatewayError::ModelNotAllowed {
                model: name.to_string(),
            });
        }
        self.model = Some(model_id);
        Ok(model_id)
    }

    /// An answer the gateway made in the hub shape (the mock provider's), for a client of
    /// another dialect.
    fn local_for_client(&mut self, response: LocalResponse, model: &str) -> LocalResponse {
        let body = match self.client.stream_from_hub(model) {
            Some(mut translator) if self.stream => {
                let mut out = Vec::new();
                translator.feed(&response.body, &mut out);
                translator.finish(&mut out);
                out
            }
            _ => match self.client.answer_from_hub(&response.body, model) {
                Some(answer) => answer,
                None => return response,
            },
        };
        LocalResponse { body, ..response }
    }

    /// Reserves the request's estimated cost against every limit that applies, and returns
    /// it (the key role reserves it again against the chosen key). Requests under no limit,
    /// to a pool without key limits, skip the estimate.
    fn admit(
        &mut self,
        now_ms: u64,
        demand: impl FnOnce() -> Demand,
        model_id: ModelId,
        key_limits: bool,
        store: &impl CounterStore,
    ) -> Result<Amounts, GatewayError> {
        let config = Arc::clone(&self.config);
        let (Some(consumer), Some(model)) = (self.consumer, config.model(model_id)) else {
            return Ok(Amounts::default());
        };
        // A fallback: the consumer's own limits hold the request already.
        let failing_over = self.failing_over.is_some();
        let mut limits: Box<dyn Iterator<Item = &Limit>> = if failing_over {
            Box::new(config.model_limits_for(consumer, model_id))
        } else {
            Box::new(config.limits_for(consumer, model_id))
        };
        let mut limits = limits.by_ref().peekable();
        if limits.peek().is_none() && !key_limits {
            if self.stream {
                // Only a stream that ends without usage needs it, to be estimated.
                self.prompt_estimate = demand().prompt;
            }
            return Ok(Amounts {
                requests: 1,
                ..Amounts::default()
            });
        }
        let demand = demand();
        let prompt = demand.prompt;
        self.prompt_estimate = prompt;
        let completion = demand
            .max_output
            .unwrap_or(model.default_max_tokens)
            .saturating_mul(demand.choices);
        let amounts = Amounts {
            requests: 1,
            tokens: prompt.saturating_add(completion),
            micro_usd: model
                .pricing
                .map_or(0, |p| p.micro_usd(prompt, 0, 0, completion)),
        };
        let (reservation, headers) = limits::admit(limits, store, now_ms, amounts)?;
        match self.metering.as_mut() {
            Some(m) if failing_over => {
                m.reservation.merge(reservation);
                m.reserved = amounts;
            }
            _ => {
                self.metering = Some(Metering {
                    reservation,
                    headers,
                    reserved: amounts,
                })
            }
        }
        Ok(amounts)
    }

    /// Adds what the key role reserved against the chosen key, to be settled with the rest.
    pub fn attach_key_reservation(&mut self, reservation: Reservation) {
        if reservation.is_empty() {
            return;
        }
        match &mut self.metering {
            Some(m) => m.reservation.merge(reservation),
            // Unreachable in practice: key limits always make the request metered.
            None => {
                self.metering = Some(Metering {
                    reservation,
                    ..Metering::default()
                })
            }
        }
    }

    fn rate_headers(&self) -> Vec<(&'static str, String)> {
        self.metering
            .as_ref()
            .map(|m| m.headers.to_headers())
            .unwrap_or_default()
    }

    /// The headers of an answer a model gave: the rate headers, and which model it was.
    fn answer_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = self.rate_headers();
        if let Some(model) = self.model.and_then(|m| self.config.model(m)) {
            headers.push((MODEL_HEADER, model.name.clone()));
        }
        headers
    }

    /// `store` takes over the leases of a reservation the key role handed over.
    pub fn on_response_headers<H: HeaderLookup + ?Sized>(
        &mut self,
        status: u16,
        headers: &H,
        store: &impl CounterStore,
    ) -> OnResponse {
        self.status = Some(status);
        if let Some(handover) = headers.header(KEY_RESERVATION_HEADER) {
            if let Some(r) = taken_over(&self.config, handover, store) {
                self.attach_key_reservation(r);
            }
        }
        // Both kinds of final answer went through Envoy's router under a status no retry
        // policy retries; their own comes back here.
        let mut restored = None;
        match headers.header(LOCAL_REPLY_HEADER).map(FinalAnswer::parse) {
            None => {}
            Some(Some(FinalAnswer::Provider(real))) => restored = Some(real),
            // The key role's own refusal: already the error the client should see.
            Some(answer) => {
                let real = answer.map(|(FinalAnswer::KeyRole(s, _) | FinalAnswer::Provider(s))| s);
                if real.is_some() {
                    self.status = real;
                }
                if let Some(FinalAnswer::KeyRole(_, Some(code))) = answer {
                    // Its limit refusals are counted by the key role.
                    self.refusal = Some((code, None));
                }
                if self.client != ClientDialect::Chat {
                    // In the hub shape; read whole to answer in the client's own.
                    self.key_role_reply = true;
                    self.retry_hints = retry_hints(headers);
                    let limit =
                        usize::try_from(self.config.server.max_body_bytes).unwrap_or(usize::MAX);
                    return OnResponse::Collect { limit };
                }
                return OnResponse::Relay {
                    status: real,
                    remove_headers: &[LOCAL_REPLY_HEADER, KEY_RESERVATION_HEADER, SERVED_BY_HEADER],
                    add_headers: self.answer_headers(),
                    body_rewritten: false,
                };
            }
        }
        let status = restored.unwrap_or(status);
        self.status = Some(status);
        if matches!(status, 401 | 403) {
            // The gateway's key was refused: the client's own key is fine, and the
            // provider's message may quote the key, so answer with our own error.
            let provider = self.provider_name().unwrap_or_default();
            let mut response = self.refuse(GatewayError::UpstreamAuthFailed { provider });
            response.headers.extend(self.answer_headers());
            return OnResponse::Replace(response);
        }
        let declared_not_json = headers
            .header("content-type")
            .is_some_and(|t| !t.to_ascii_lowercase().contains("json"));
        if status >= 400 && declared_not_json {
            // An edge's HTML page means nothing to an OpenAI client: say what happened in
            // the shape it parses, under the provider's status.
            let provider = self.provider_name().unwrap_or_default();
            let error = GatewayError::UpstreamErrorNotJson { provider, status };
            let mut response = self.refuse(error);
            response.headers.extend(self.answer_headers());
            return OnResponse::Replace(response);
        }
        let success = (200..300).contains(&status);
        self.provider_succeeded = success;
        let limit = usize::try_from(self.config.server.max_body_bytes).unwrap_or(usize::MAX);
        if self.passthrough.is_some() {
            // Anthropic to an Anthropic client: relayed as it is; only its usage is read.
            if success && self.stream {
                self.sse = Some(SseParser::new());
            }
            return OnResponse::Relay {
                status: restored,
                remove_headers: &RELAY_REMOVE_HEADERS,
                add_headers: self.answer_headers(),
                body_rewritten: false,
            };
        }
        let translated = self.translate_answer.is_some() || self.client != ClientDialect::Chat;
        if translated && !(success && self.stream) {
            // An answer or error in another dialect than the client's, read whole and
            // translated (`on_collected`); its retry hints go with the new answer.
            self.retry_hints = retry_hints(headers);
            return OnResponse::Collect { limit };
        }
        if success
            && !self.stream
            && matches!(self.prompt, Some(c) if c.response != ResponseMode::Raw)
        {
            // Envoy holds the body in a buffer no larger than the connection's, which is
            // sized from `max_body_bytes`: the same bound in both hosts.
            return OnResponse::Collect { limit };
        }
        if success && self.stream {
            self.sse = Some(SseParser::new());
            let model = self.public_model_name();
            self.stream_to_hub = self
                .translate_answer
                .and_then(|kind| dialect::stream_to_hub(kind, &model, self.created_s));
            self.stream_to_client = self.client.stream_from_hub(&model);
        }
        OnResponse::Relay {
            status: restored,
            remove_headers: &RELAY_REMOVE_HEADERS,
            add_headers: self.answer_headers(),
            body_rewritten: success && (self.strip_usage_chunk || translated),
        }
    }

    /// The model's public name, as the client asked for it.
    fn public_model_name(&self) -> String {
        self.model
            .and_then(|m| self.config.model(m))
            .map(|m| m.name.clone())
            .unwrap_or_default()
    }

    /// The provider the request went to, once routed.
    pub fn provider_name(&self) -> Option<String> {
        let model = self.config.model(self.model?)?;
        Some(self.config.provider(model.provider)?.name.clone())
    }

    /// The provider's whole body, after `OnResponse::Collect`: what to send the client
    /// instead (a prompt's `text` or `json` answer, or 502 when it cannot be shaped; the
    /// usage is read and charged either way).
    pub fn on_collected(&mut self, body: &[u8]) -> LocalResponse {
        self.stage = Stage::Done;
        let mut response = if self.key_role_reply {
            let status = self.status.unwrap_or(502);
            LocalResponse::json(status, self.client.error_from_hub(status, body))
        } else {
            self.collected_answer(body)
        };
        response.headers.append(&mut self.retry_hints);
        response.headers.extend(self.answer_headers());
        response
    }

    /// A whole answer, through the hub shape: from the provider's dialect, its usage read,
    /// shaped as a prompt's answer where it is one, into the client's dialect.
    fn collected_answer(&mut self, body: &[u8]) -> LocalResponse {
        let status = self.status.unwrap_or(502);
        let success = (200..300).contains(&status);
        let provider = self.provider_name().unwrap_or_default();
        let model = self.public_model_name();
        let kind = self.translate_answer.unwrap_or(ProviderKind::OpenAi);
        let Some(hub) = dialect::answer_to_hub(kind, status, body, &model, self.created_s) else {
            return self.refuse(if success {
                GatewayError::UpstreamInvalidAnswer { provider }
            } else {
                GatewayError::UpstreamErrorNotJson { provider, status }
            });
        };
        self.status = Some(hub.status);
        if !success {
            let error = self.client.error_from_hub(hub.status, &hub.body);
            return LocalResponse::json(hub.status, error);
        }
        self.usage = hub.usage;
        if self.client == ClientDialect::Chat {
            return self.shape(&hub.body);
        }
        match self.client.answer_from_hub(&hub.body, &model) {
            Some(answer) => LocalResponse::json(200, answer),
            None => self.refuse(GatewayError::UpstreamInvalidAnswer { provider }),
        }
    }

    /// After `OnResponse::Collect`, when the provider's body is larger than the limit: 502
    /// (its usage cannot be read, so the reservation is charged).
    pub fn on_collect_overflow(&mut self, limit: usize) -> LocalResponse {
        self.stage = Stage::Done;
        self.body_overflowed = true;
        let detail = format!("the provider's answer is larger than {limit} bytes");
        let error = match self.prompt {
            Some(_) => GatewayError::PromptOutputInvalid {
                prompt: self.prompt_name(),
                detail,
            },
            // An answer read whole only to be translated.
            None => GatewayError::UpstreamAnswerTooLarge {
                provider: self.provider_name().unwrap_or_default(),
                limit,
            },
        };
        let mut response = self.refuse(error);
        response.headers.extend(self.answer_headers());
        response
    }

    fn prompt_name(&self) -> String {
        self.prompt
            .and_then(|c| self.config.prompt(c.id))
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    /// A prompt's answer in its response mode, from a chat completion.
    fn shape(&mut self, completion: &[u8]) -> LocalResponse {
        let Some(call) = self.prompt else {
            return LocalResponse::json(200, completion.to_vec());
        };
        let shaped = match call.response {
            ResponseMode::Raw => Ok(completion.to_vec()),
            ResponseMode::Text => shape::text(completion),
            ResponseMode::Json => shape::json(completion),
        };
        match shaped {
            Ok(body) => {
                self.status = Some(200);
                LocalResponse::json(200, body)
            }
            Err(detail) => {
                let prompt = self.prompt_name();
                self.refuse(GatewayError::PromptOutputInvalid { prompt, detail })
            }
        }
    }

    /// The mock provider's answer, shaped as a prompt's would be.
    fn shape_local(&mut self, response: LocalResponse) -> LocalResponse {
        if self.prompt.is_none_or(|c| c.response == ResponseMode::Raw) {
            return response;
        }
        if !self.stream {
            return self.shape(&response.body);
        }
        let mut out = Vec::new();
        let mut sse = SseParser::new();
        let mut reshape = |e: crate::sse::SseEvent| {
            out.extend(shape::text_event(&e.data).unwrap_or_default());
        };
        sse.feed(&response.body, &mut reshape);
        let _ = sse.finish(&mut reshape);
        LocalResponse {
            body: out,
            ..response
        }
    }

    /// One chunk of the provider's response body, in order; `end_of_stream` on the last.
    pub fn on_response_chunk(&mut self, chunk: &[u8], end_of_stream: bool) -> Chunk {
        if end_of_stream {
            self.stage = Stage::Done;
        }
        if let Some(mut reader) = self.passthrough.take() {
            self.observe_passthrough(reader.as_mut(), chunk, end_of_stream);
            self.passthrough = Some(reader);
            return Chunk::Unchanged;
        }
        if self.stream_to_hub.is_none() && self.stream_to_client.is_none() {
            return self.on_hub_chunk(chunk, end_of_stream);
        }
        // Into the hub shape first: everything after reads chat completion chunks; then
        // into the client's dialect.
        let translated;
        let hub_chunk = match &mut self.stream_to_hub {
            Some(translator) => {
                translated = translate(translator.as_mut(), chunk, end_of_stream);
                translated.as_slice()
            }
            None => chunk,
        };
        let hub = match self.on_hub_chunk(hub_chunk, end_of_stream) {
            Chunk::Unchanged => hub_chunk.to_vec(),
            Chunk::Replace(bytes) => bytes,
        };
        // The provider's own counts (cache writes too, and a cut stream's input and output
        // so far) beat what its translated usage chunk can say.
        if let Some(usage) = self.stream_to_hub.as_ref().and_then(|t| t.usage()) {
            self.usage = Some(usage);
        }
        Chunk::Replace(match &mut self.stream_to_client {
            Some(translator) => translate(translator.as_mut(), &hub, end_of_stream),
            None => hub,
        })
    }

    /// Reads the usage of a passed-through Messages answer (a stream's events, or the whole
    /// body), without changing a byte.
    fn observe_passthrough(
        &mut self,
        observer: &mut dyn UsageReader,
        chunk: &[u8],
        end_of_stream: bool,
    ) {
        if !self.provider_succeeded {
            return;
        }
        if let Some(mut sse) = self.sse.take() {
            sse.feed(chunk, |e| observer.observe(&e.data));
            if sse.pending() > MAX_HELD_EVENT {
                // No Messages event is this large: read none of it (it is relayed as it is).
                sse.abandon();
            }
            if end_of_stream {
                let _ = sse.finish(|e| observer.observe(&e.data));
            } else {
                self.sse = Some(sse);
            }
            self.usage = observer.usage();
            self.streamed_tokens = observer.streamed_tokens();
            return;
        }
        if self.body_overflowed || self.body.len() + chunk.len() > MAX_USAGE_BODY {
            // Too large to keep: the reservation is charged instead (see `used`).
            self.body_overflowed = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
        if end_of_stream {
            self.usage = observer.answer_usage(&self.body);
        }
    }

    /// One chunk of a response in the hub shape (the provider's own, or translated).
    fn on_hub_chunk(&mut self, chunk: &[u8], end_of_stream: bool) -> Chunk {
        let Some(mut sse) = self.sse.take() else {
            if self.metering.is_some() && !self.stream && !self.body_overflowed {
                if self.body.len() + chunk.len() <= MAX_USAGE_BODY {
                    self.body.extend_from_slice(chunk);
                    if end_of_stream {
                        self.usage = usage::from_completion(&self.body);
                    }
                } else {
                    // Too large to keep: the reservation is charged instead (see `used`).
                    self.body_overflowed = true;
                    self.body = Vec::new();
                }
            }
            return Chunk::Unchanged;
        };
        let strip = self.strip_usage_chunk;
        let reshape = self.shape_stream;
        let mut out = Vec::new();
        let mut handle = |event: crate::sse::SseEvent, out: &mut Vec<u8>| {
            let mut drop = false;
            if let Some(info) = usage::inspect_chunk(&event.data) {
                if info.usage.is_some() {
                    self.usage = info.usage;
                }
                self.streamed_tokens += tokens::estimate_text(&info.text);
                drop = strip && info.usage_only;
            }
            if strip && !drop {
                if reshape {
                    out.extend(shape::text_event(&event.data).unwrap_or_default());
                } else {
                    out.extend_from_slice(&event.raw);
                }
            }
        };
        sse.feed(chunk, |e| handle(e, &mut out));
        if strip {
            // Keep-alive comments go out now, not with the next event: clients and proxies
            // time out on silence while the model thinks.
            out.extend(sse.take_idle());
        }
        if sse.pending() > MAX_HELD_EVENT {
            // An "event" this large is no OpenAI stream: hold none of it, whatever the
            // provider sends (the parser finds its feet at the next blank line). What was
            // held back goes out, and stripping stops; a reshaped (`text` prompt) stream only
            // ever sends what it reshaped: the oversized event is dropped, reshaping goes on.
            // Unstripped, the bytes were relayed as they came.
            let held = sse.abandon();
            if strip && !reshape {
                out.extend(held);
                self.strip_usage_chunk = false;
            }
        }
        if end_of_stream {
            let tail = sse.finish(|e| handle(e, &mut out));
            if strip && !reshape {
                out.extend_from_slice(&tail);
            }
        } else {
            self.sse = Some(sse);
        }
        if strip && out != chunk {
            // `strip` is what this chunk was handled with, even if stripping stopped now.
            Chunk::Replace(out)
        } else {
            // Whole events, none dropped (nearly every chunk of a stripped stream): the
            // host relays the bytes it has rather than copy them back in.
            Chunk::Unchanged
        }
    }

    /// The exchange ended, however it ended (completed, refused, client gone, upstream reset):
    /// settles the limits on what was really used and frees concurrency slots.
    pub fn finish(&mut self, now_ms: u64, store: &impl CounterStore) -> Summary {
        self.finish_with(&mut |reservation, used| {
            // A store that fails now leaves counters high until their windows pass: the safe
            // side. Nothing else can be done at the end of a request.
            let _ = limits::settle(reservation, store, now_ms, used);
        })
    }

    /// `finish`, where `settle` settles the request's reservation on what it used: a host
    /// whose store commits remotely settles it later (Envoy on Redis).
    pub fn finish_with(&mut self, settle: &mut dyn FnMut(Reservation, Amounts)) -> Summary {
        self.stage = Stage::Done;
        let tokens = self.tokens_used();
        let charged = self.metering.take().map(|m| {
            let used = self.used(tokens, m.reserved);
            settle(m.reservation, used);
            used
        });
        let micro_usd = match charged {
            Some(c) => c.micro_usd,
            None => tokens.map_or(0, |t| self.price(&t.usage)),
        };
        // Unrounded where the usage is known; else what was charged.
        let usd = match tokens {
            Some(t) => self.exact_price(&t.usage) / 1_000_000.0,
            None => micro_usd as f64 / 1_000_000.0,
        };
        let (code, refused_by) = match self.refusal.take() {
            Some((code, by)) => (code, by),
            None => (
                self.status
                    .map_or("cancelled", crate::metrics::status_class),
                None,
            ),
        };
        let config = &self.config;
        Summary {
            consumer: self
                .consumer
                .and_then(|c| config.consumer(c))
                .map(|c| c.name.clone()),
            model: self
                .model
                .and_then(|m| config.model(m))
                .map(|m| m.name.clone()),
            request_id: self.request_id.clone(),
            requested_model: self
                .requested_model
                .or(self.model)
                .and_then(|m| config.model(m))
                .map(|m| m.name.clone()),
            provider: self.provider_name(),
            status: self.status,
            stream: self.stream,
            charged,
            usage_reported: self.usage.is_some(),
            code,
            tokens,
            micro_usd,
            usd,
            refused_by,
        }
    }

    /// The tokens the request used, when they can be known: the provider's usage; an
    /// estimate of a stream that ended without it; none when the provider answered with an
    /// error (not billed), or a non-streamed answer had no readable usage.
    fn tokens_used(&self) -> Option<crate::metrics::Tokens> {
        let status = self.status?;
        if !(200..300).contains(&status) && !self.provider_succeeded {
            return None;
        }
        match self.usage {
            Some(usage) => Some(crate::metrics::Tokens {
                usage,
                estimated: false,
            }),
            None if self.stream => Some(crate::metrics::Tokens {
                usage: Usage {
                    prompt_tokens: self.prompt_estimate,
                    completion_tokens: self.streamed_tokens,
                    ..Usage::default()
                },
                estimated: true,
            }),
            None => None,
        }
    }

    /// What `usage` costs at the serving model's prices, in millionths of a dollar.
    fn price(&self, usage: &Usage) -> u64 {
        self.exact_price(usage).ceil().max(0.0) as u64
    }

    /// `price` unrounded.
    fn exact_price(&self, usage: &Usage) -> f64 {
        self.model
            .and_then(|m| self.config.model(m))
            .and_then(|m| m.pricing)
            .map_or(0.0, |p| {
                p.exact_micro_usd(
                    usage.prompt_tokens,
                    usage.cached_prompt_tokens,
                    usage.cache_write_tokens,
                    usage.completion_tokens,
                )
            })
    }

    /// What the request used, for settlement: the provider's usage when it reported it; an
    /// estimate of what was streamed when a stream ended without it (cut or abandoned); the
    /// whole reservation when the usage cannot be known (the client left before the answer,
    /// which the provider still bills, or a body too large to read); nothing when the
    /// provider answered with an error (providers do not bill refused or failed requests).
    fn used(&self, tokens: Option<crate::metrics::Tokens>, reserved: Amounts) -> Amounts {
        let Some(status) = self.status else {
            return if self.forwarded {
                reserved
            } else {
                Amounts::default()
            };
        };
        if !(200..300).contains(&status) && !self.provider_succeeded {
            return Amounts::default();
        }
        let Some(tokens) = tokens else {
            return reserved;
        };
        Amounts {
            requests: 1,
            tokens: tokens.usage.total(),
            micro_usd: self.price(&tokens.usage),
        }
    }

    fn authenticate<H: HeaderLookup + ?Sized>(&mut self, headers: &H) -> Result<(), GatewayError> {
        let key = auth::presented_key(headers).ok_or(GatewayError::MissingConsumerKey)?;
        let id = self
            .config
            .authenticate(key)
            .ok_or(GatewayError::UnknownConsumerKey)?;
        self.consumer = Some(id);
        Ok(())
    }

    /// Ends the exchange with an error of the gateway's own — the core's refusals, and the
    /// hosts' (body too large or too slow, provider unreachable or silent): the response to send.
    pub fn refuse(&mut self, e: GatewayError) -> LocalResponse {
        self.stage = Stage::Done;
        self.status = Some(e.status());
        self.refusal = Some((e.metric_code(), e.refused_by()));
        let mut response = e.respond();
        // In the client's own error shape; the headers (retry-after) stay.
        response.body = self.client.error_from_hub(response.status, &response.body);
        response
    }
}

/// The provider's hints of when to come back (`retry-after`, `retry-after-ms`), kept when its
/// answer is rebuilt in another dialect.
fn retry_hints<H: HeaderLookup + ?Sized>(headers: &H) -> Vec<(&'static str, String)> {
    ["retry-after", "retry-after-ms"]
        .into_iter()
        .filter_map(|name| headers.header(name).map(|v| (name, v.to_string())))
        .collect()
}

/// Refuses a request a guard rule of its model or consumer denies; the texts are only
/// gathered when a rule applies.
fn refuse_by_guard<'t>(
    model: &crate::config::Model,
    consumer: Option<&crate::config::Consumer>,
    texts: impl FnOnce() -> Vec<std::borrow::Cow<'t, str>>,
) -> Result<(), GatewayError> {
    let consumer_guard = consumer.map(|c| c.guard.as_slice()).unwrap_or_default();
    if model.guard.is_empty() && consumer_guard.is_empty() {
        return Ok(());
    }
    match guard::first_denial(model.guard.iter().chain(consumer_guard), &texts()) {
        Some(rule) => Err(GatewayError::ContentRejected {
            rule: rule.to_string(),
        }),
        None => Ok(()),
    }
}

/// Feeds one chunk to a stream translator (and ends it on the last): what it emits.
fn translate(translator: &mut dyn StreamTranslator, chunk: &[u8], end_of_stream: bool) -> Vec<u8> {
    let mut out = Vec::new();
    translator.feed(chunk, &mut out);
    if end_of_stream {
        translator.finish(&mut out);
    }
    out
}

fn declared_length<H: HeaderLookup + ?Sized>(headers: &H) -> Option<u64> {
    headers.header("content-length")?.trim().parse().ok()
}

#[cfg(test)]
mod tests;
