//! A mock LLM provider, used as the upstream of the gateway in end-to-end
//! tests and as the target of load benchmarks. It speaks two dialects:
//!
//! - OpenAI's: `POST /v1/chat/completions` (plain and SSE streaming, text
//!   or tool calls, see [`MockProvider::set_tool_input`]) and
//!   `GET /v1/models`;
//! - Anthropic's Messages API: `POST /v1/messages` (plain and SSE streaming,
//!   text or tool use, see [`MockProvider::set_tool_input`]) and
//!   `POST /v1/messages/count_tokens`, requiring `anthropic-version` and
//!   `max_tokens` as Anthropic does, answering errors in Anthropic's shape
//!   with a `request-id`, and reporting usage with its cache fields (see
//!   [`MockProvider::set_anthropic_usage`]).
//!
//! It records every request it receives, and behaves like a real provider in
//! the ways a gateway has to cope with:
//!
//! - every response to a request carrying a provider key reports that key's
//!   rate limits, in OpenAI's `x-ratelimit-*` headers or, on Anthropic's
//!   endpoints, in Anthropic's `anthropic-ratelimit-*` headers, from a
//!   one-minute window per key (see [`KeyLimits`]; the mock reports, it never
//!   enforces);
//! - requests carrying a given key can be made to misbehave (see [`Fault`]):
//!   429s in each of the forms OpenAI sends (and in Anthropic's form), 401s,
//!   5xx and 529s with JSON or with a CDN's HTML page, slow heads and slow
//!   bodies, streams that are cut or held;
//! - streams to a given key can be shaped as other servers and proxies shape
//!   them (see [`StreamStyle`]): CRLF line endings, keep-alive comments,
//!   events coalesced into or split across reads, no `[DONE]`, an error event
//!   mid-stream;
//! - each key can be given extra response headers.
//!
//! The ordinary path is kept cheap because benchmarks hammer it: the shared
//! state it touches is an atomic counter, an uncontended read lock on the
//! reply template, one short mutex on the per-key table for the rate-limit
//! window (skipped for requests without a key, and while the table is empty
//! when rate-limit headers are off) and, when recording, one short mutex push.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER,
};
use hyper::http::request;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Sleep;

/// Reply text of successful completions (and Anthropic messages) until
/// [`MockProvider::set_reply`] is called.
pub const DEFAULT_CONTENT: &str = "Hello from the mock provider.";

/// Usage reported by successful completions until [`MockProvider::set_reply`] is called.
pub const DEFAULT_USAGE: MockUsage = MockUsage {
    prompt_tokens: 10,
    completion_tokens: 5,
};

/// Model echoed back when a request does not name one.
const DEFAULT_MODEL: &str = "mock-model";

/// The `created` timestamp of every response; any fixed value will do.
const CREATED: u64 = 1_700_000_000;

/// Room for a few SSE events between a stream's producer task and its body.
const STREAM_CHANNEL_CAPACITY: usize = 8;

/// The length of a rate-limit window.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// How many frames a [`Fault::Slow`] non-streamed completion is sent in.
const SLOW_BODY_FRAMES: usize = 4;

/// The payload of the error event OpenAI sends when a stream fails after it
/// has started.
const STREAM_ERROR_DATA: &str = r#"data: {"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#;

/// The payload of the error event Anthropic sends when a stream fails after
/// it has started (its `event: error` line aside).
const ANTHROPIC_STREAM_ERROR_DATA: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

/// Usage reported by successful Anthropic Messages replies until
/// [`MockProvider::set_anthropic_usage`] is called.
pub const DEFAULT_ANTHROPIC_USAGE: AnthropicUsage = AnthropicUsage {
    input_tokens: 10,
    output_tokens: 5,
    cache_creation_input_tokens: 0,
    cache_read_input_tokens: 0,
};

/// The `input` of the tool calls of Anthropic Messages replies, and the
/// `arguments` of those of chat completions, as JSON, until
/// [`MockProvider::set_tool_input`] is called.
pub const DEFAULT_TOOL_INPUT: &str = r#"{"location":"Paris"}"#;

/// The text block a tool-calling Anthropic reply starts with, as Claude
/// often says a sentence before calling a tool (see
/// [`MockProvider::set_tool_input`]).
pub const TOOL_USE_PREAMBLE: &str = "Let me check.";

/// The Messages endpoint.
const MESSAGES: &str = "/v1/messages";

/// The token-counting endpoint of the Messages API.
const COUNT_TOKENS: &str = "/v1/messages/count_tokens";

/// How many bytes of a tool call's input JSON each `input_json_delta` of a
/// streamed Anthropic reply, and each arguments chunk of a streamed chat
/// completion, carries, at most (fewer where a character would be cut).
const INPUT_JSON_PIECE: usize = 6;

/// What Anthropic answers, with a 400, when the account's credit is spent.
const CREDIT_TOO_LOW: &str = "Your credit balance is too low to access the Anthropic API. \
                              Please go to Plans & Billing to upgrade or purchase credits.";

/// How a [`MockProvider`] is started.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Keep every request for [`MockProvider::requests`]. Turn it off for load
    /// runs so that memory stays flat.
    pub record: bool,
    /// Where to listen; the default, `127.0.0.1:0`, picks a free port.
    pub listen: SocketAddr,
    /// Send OpenAI's `x-ratelimit-*` headers (Anthropic's
    /// `anthropic-ratelimit-*` on its endpoints) on every response to a
    /// request carrying a provider key (see [`KeyLimits`]). On by default, since real
    /// providers always send them; turn it off to measure the mock without
    /// its one mutex per keyed request.
    pub rate_limit_headers: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            record: true,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            rate_limit_headers: true,
        }
    }
}

/// The rate limits of one provider key, as reported in the
/// `x-ratelimit-limit-*` headers. The remaining counts are these minus what
/// the key used in its current one-minute window, which starts with the
/// key's first request and restarts with the first request after it ended.
/// A chat completion uses one request and, from its arrival, the tokens of
/// the reply's usage (see [`MockProvider::set_reply`]), whatever its
/// outcome; an Anthropic message likewise uses one request and the tokens of
/// [`MockProvider::set_anthropic_usage`]'s usage (its input tokens and cache
/// writes as input, its output tokens as output; cache reads are free, as
/// they are for Anthropic's input limits); other endpoints use one request
/// and no tokens. Both dialects count in the same window. The mock only
/// reports: it answers normally past the limits (use [`Fault`] for 429s).
///
/// On Anthropic's endpoints the same window is reported as Anthropic reports
/// it: `anthropic-ratelimit-requests-*` from `requests_per_minute`;
/// `anthropic-ratelimit-input-tokens-*` and `-output-tokens-*` from a split
/// of `tokens_per_minute`, a fifth of it (rounded down) for output tokens and
/// the rest for input tokens, about the ratio of Anthropic's tiers (the
/// default gives 1,600,000 and 400,000); `anthropic-ratelimit-tokens-*` from
/// their sum, `tokens_per_minute` itself. As Anthropic does, the token
/// counts remaining are rounded to the nearest thousand (never above the
/// limit), so only usage in the thousands shows, and every `-reset` is the
/// RFC 3339 time (UTC, whole seconds, rounded up) at which the window ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
}

impl Default for KeyLimits {
    /// 10,000 requests and 2,000,000 tokens per minute.
    fn default() -> Self {
        KeyLimits {
            requests_per_minute: 10_000,
            tokens_per_minute: 2_000_000,
        }
    }
}

/// How the lines of a stream end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LineEnding {
    /// `\n`, as OpenAI sends.
    #[default]
    Lf,
    /// `\r\n`, which the SSE spec allows and some servers and proxies send.
    CrLf,
}

/// How a stream's bytes are cut into body frames (each one chunk of the
/// chunked encoding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Writes {
    /// One frame per event, as OpenAI sends.
    #[default]
    PerEvent,
    /// All the stream's events in one frame (one per run between pauses,
    /// when a fault pauses the stream), so that one read holds several.
    Coalesced,
    /// The stream's bytes cut into frames of `bytes` bytes (the last one
    /// shorter) regardless of event boundaries, so that events arrive split
    /// across reads. Each frame is flushed to the socket before the next is
    /// taken. When a fault pauses the stream, each run between pauses is cut
    /// on its own. 0 counts as 1.
    Split { bytes: usize },
}

/// The shape of the SSE streams sent to a key (see
/// [`MockProvider::set_stream_style`]). The default is OpenAI's own.
///
/// Stream faults count data events, never keep-alive comments:
/// [`Fault::CutStreamAfter`] sends that many data events (each with the
/// comment before it) in frames as `writes` says, then aborts;
/// [`Fault::HoldStream`] and [`Fault::Slow`] pause before the second data
/// event and before every data event after the first respectively, each
/// pause coming before the comment that precedes the event.
///
/// Streams of Anthropic's Messages API take the style too: the `event:` and
/// `data:` lines of each event end as `line_ending` says, and `keep_alive`,
/// `writes` and `error_after` apply alike (there `message_start` is the
/// first event, and `ping` counts); `done` does not apply, since those
/// streams end with `message_stop`, never `[DONE]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamStyle {
    /// The end of every line in the stream: the `data:` line's and the blank
    /// line's after it.
    pub line_ending: LineEnding,
    /// A `: keep-alive` comment event before the first event and between
    /// every two events, as proxies and some providers send to keep idle
    /// connections open.
    pub keep_alive: bool,
    pub writes: Writes,
    /// End with `data: [DONE]`, as OpenAI does; false ends the body right
    /// after the last chunk, as some compatible servers do.
    pub done: bool,
    /// After this many chunk events (the role chunk counts as the first),
    /// send OpenAI's mid-stream error event (`data: {"error":{…}}`), then end
    /// the body cleanly: no finish chunk, no usage, no `[DONE]`. A count past
    /// the content events sends all of those first.
    ///
    /// In an Anthropic stream: after this many events, Anthropic's mid-stream
    /// error event (`event: error`, an `overloaded_error`), then the body
    /// ends cleanly: no `message_delta`, no `message_stop`. A count past the
    /// content blocks' events sends all of those first.
    pub error_after: Option<usize>,
}

impl Default for StreamStyle {
    fn default() -> Self {
        StreamStyle {
            line_ending: LineEnding::Lf,
            keep_alive: false,
            writes: Writes::PerEvent,
            done: true,
            error_after: None,
        }
    }
}

impl StreamStyle {
    /// What ends each event: its line's end and a blank line.
    fn event_end(&self) -> &'static str {
        match self.line_ending {
            LineEnding::Lf => "\n\n",
            LineEnding::CrLf => "\r\n\r\n",
        }
    }

    /// What ends each line.
    fn line_end(&self) -> &'static str {
        match self.line_ending {
            LineEnding::Lf => "\n",
            LineEnding::CrLf => "\r\n",
        }
    }

    /// The keep-alive comment to send before each event, if any.
    fn keep_alive_comment(&self) -> Option<Bytes> {
        self.keep_alive.then(|| {
            Bytes::from_static(match self.line_ending {
                LineEnding::Lf => b": keep-alive\n\n",
                LineEnding::CrLf => b": keep-alive\r\n\r\n",
            })
        })
    }
}

/// A running mock provider. Dropping it stops the server, including open
/// connections and responses still streaming.
pub struct MockProvider {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl MockProvider {
    /// Binds `127.0.0.1:0` on the current tokio runtime and serves until
    /// dropped.
    ///
    /// # Panics
    /// If the socket cannot be bound, or outside a tokio runtime.
    pub async fn start() -> MockProvider {
        Self::start_with(MockOptions::default()).await
    }

    /// Like [`MockProvider::start`], with options.
    ///
    /// # Panics
    /// If the socket cannot be bound, or outside a tokio runtime.
    pub async fn start_with(options: MockOptions) -> MockProvider {
        let listen = options.listen;
        match Self::try_start_with(options).await {
            Ok(provider) => provider,
            Err(e) => panic!("mock provider: cannot listen on {listen}: {e}"),
        }
    }

    /// Like [`MockProvider::start_with`], but reports a bind failure instead
    /// of panicking.
    pub async fn try_start_with(options: MockOptions) -> std::io::Result<MockProvider> {
        let listener = TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::new(&options));
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Ok(MockProvider {
            addr,
            state,
            server,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of this provider: `http://127.0.0.1:PORT/v1`, for
    /// OpenAI's paths (`/chat/completions`) and Anthropic's (`/messages`)
    /// alike.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in arrival order (empty when recording
    /// is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// Forgets the requests recorded so far.
    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }

    /// Makes requests carrying provider key `key` misbehave as `fault`
    /// describes, replacing any fault set before for that key.
    pub fn set_fault(&self, key: &str, fault: Fault) {
        self.state
            .update_key(key, |entry| entry.behaviour.fault = Some(fault));
    }

    /// Lets requests carrying `key` be answered normally again.
    pub fn clear_fault(&self, key: &str) {
        self.state
            .update_key(key, |entry| entry.behaviour.fault = None);
    }

    /// Adds these headers to every response (faulty or not) to a request
    /// carrying `key`, replacing headers of the same names (the rate-limit
    /// headers included). An empty list removes them.
    ///
    /// # Panics
    /// If a name or value is not a valid HTTP header name or value.
    pub fn set_key_headers(&self, key: &str, headers: Vec<(String, String)>) {
        let headers: Arc<[(HeaderName, HeaderValue)]> = headers
            .into_iter()
            .map(|(name, value)| {
                let parsed_name = HeaderName::from_bytes(name.as_bytes())
                    .unwrap_or_else(|e| panic!("invalid header name {name:?}: {e}"));
                let parsed_value = HeaderValue::from_str(&value)
                    .unwrap_or_else(|e| panic!("invalid value {value:?} for header {name}: {e}"));
                (parsed_name, parsed_value)
            })
            .collect();
        self.state
            .update_key(key, |entry| entry.behaviour.headers = headers);
    }

    /// Sets the limits reported for `key` from now on. The key's current
    /// window and what it used in it are kept.
    pub fn set_key_limits(&self, key: &str, limits: KeyLimits) {
        self.state
            .update_key(key, |entry| entry.limits = Some(limits));
    }

    /// Shapes the streams sent to requests carrying `key` as `style` says,
    /// replacing any style set before for that key.
    pub fn set_stream_style(&self, key: &str, style: StreamStyle) {
        self.state
            .update_key(key, |entry| entry.behaviour.stream_style = Some(style));
    }

    /// Lets streams to `key` take OpenAI's shape again.
    pub fn clear_stream_style(&self, key: &str) {
        self.state
            .update_key(key, |entry| entry.behaviour.stream_style = None);
    }

    /// Sets the reply text and usage of all successful completions from now
    /// on. Defaults: [`DEFAULT_CONTENT`] and [`DEFAULT_USAGE`]. The text is
    /// also that of Anthropic Messages replies (whose usage is set by
    /// [`MockProvider::set_anthropic_usage`]).
    pub fn set_reply(&self, content: &str, usage: MockUsage) {
        let reply = Arc::new(Reply::new(content, usage));
        *self
            .state
            .reply
            .write()
            .unwrap_or_else(PoisonError::into_inner) = reply;
        self.state
            .update_anthropic(|anthropic| anthropic.content = content.to_owned());
    }

    /// Sets the usage reported by all successful Anthropic Messages replies
    /// from now on, and charged to their keys' rate-limit windows (see
    /// [`KeyLimits`]). Default: [`DEFAULT_ANTHROPIC_USAGE`].
    pub fn set_anthropic_usage(&self, usage: AnthropicUsage) {
        self.state
            .update_anthropic(|anthropic| anthropic.usage = usage);
    }

    /// Sets the `input` of the tool calls of Anthropic Messages replies, and
    /// the `arguments` of those of chat completions, from now on (meant to be
    /// an object, as tool inputs are). Default: [`DEFAULT_TOOL_INPUT`].
    ///
    /// A Messages request is answered with a tool call when it has `tools`,
    /// its `tool_choice` is not `none`, and its last message is a user turn
    /// carrying no `tool_result` block: the reply is a text block saying
    /// [`TOOL_USE_PREAMBLE`], then a `tool_use` block (id `toolu_mock_N`)
    /// calling the first tool (or the one `tool_choice` names) with this
    /// input, and stops with `tool_use`. A `tool_choice` of `any` or `tool`
    /// forces the call, and Anthropic then sends no text before it, so
    /// neither does the mock. Otherwise (after a `tool_result`, say) the
    /// reply is the text of [`MockProvider::set_reply`].
    ///
    /// Likewise, as OpenAI does, a chat completion request is answered with a
    /// tool call when it has `tools` of type `function`, its `tool_choice`
    /// is not `"none"`, and its last message is a `user` message (not a
    /// `tool` result): the message has `content: null` and one entry in
    /// `tool_calls` (id `call_mock_N`, type `function`) calling the first
    /// function (or the one a `tool_choice` of type `function` names) with
    /// this input, serialized, as its `arguments` string, and the finish
    /// reason is `tool_calls`. Streamed, the first chunk carries the role,
    /// `content: null` and the call with empty `arguments`, the next ones
    /// the `arguments` in pieces of a few bytes (never cutting a
    /// character), then comes the finish chunk (and the usage chunk, if
    /// asked for). The usage is that of [`MockProvider::set_reply`].
    /// Otherwise (after a `tool` message, say) the reply is text.
    pub fn set_tool_input(&self, input: serde_json::Value) {
        let input = input.to_string();
        self.state
            .update_anthropic(|anthropic| anthropic.tool_input = input);
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        // The accept loop owns every connection task (see `accept_loop`), so
        // aborting it tears the whole server down.
        self.server.abort();
    }
}

/// A request as the provider received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The URI path, without the query string.
    pub path: String,
    /// In arrival order; names are lower-case. Values that are not UTF-8 are
    /// converted lossily.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The provider key the request carried (see [`MockProvider::set_fault`]).
    pub key: Option<String>,
}

impl RecordedRequest {
    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; `Value::Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Token usage reported by successful completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MockUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl MockUsage {
    /// `prompt_tokens + completion_tokens`, as reported in `total_tokens`.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Token usage reported by successful Anthropic Messages replies, in
/// Anthropic's fields (see [`MockProvider::set_anthropic_usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnthropicUsage {
    /// Input tokens that were neither read from nor written to the cache.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input tokens written to the cache.
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the cache.
    pub cache_read_input_tokens: u64,
}

impl AnthropicUsage {
    /// What a message with this usage uses of its key's rate limits: cache
    /// writes count as input, cache reads do not.
    fn charge(&self) -> Charge {
        Charge {
            input: self
                .input_tokens
                .saturating_add(self.cache_creation_input_tokens),
            output: self.output_tokens,
        }
    }
}

/// How to misbehave for requests carrying a given provider key. Faults apply
/// to every endpoint; the request is recorded (and counted in the key's
/// rate-limit window) first either way. On Anthropic's endpoints
/// (`/v1/messages…`) the errors take Anthropic's shape,
/// `{"type":"error","error":{"type":…,"message":…},"request_id":…}`, as each
/// variant says.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 with OpenAI's body for a requests-per-minute limit, type
    /// `requests`, code `rate_limit_exceeded`, saying to try again in
    /// `retry_after_secs` (in OpenAI's duration format, e.g. `20s`, `1m30s`;
    /// `1s` when `None`), and `x-ratelimit-remaining-requests: 0`. With
    /// `Some(n)`, also `retry-after: n`; with `None` no `retry-after`, as
    /// OpenAI often does.
    ///
    /// Anthropic: 429 `rate_limit_error` with Anthropic's message for a
    /// requests-per-minute limit, `anthropic-ratelimit-requests-remaining: 0`,
    /// and `retry-after` as above.
    TooManyRequests { retry_after_secs: Option<u64> },
    /// 429 with OpenAI's body for an exhausted quota (type and code
    /// `insufficient_quota`), no `retry-after`: retrying will not help.
    ///
    /// Anthropic, which has no such 429: what it sends when the account's
    /// credit is spent, 400 `invalid_request_error` "Your credit balance is
    /// too low to access the Anthropic API. …".
    QuotaExhausted,
    /// 429 with OpenAI's body for a request larger than the tokens-per-minute
    /// limit (type `tokens`, code `rate_limit_exceeded`), no `retry-after`:
    /// this request will never fit.
    ///
    /// Anthropic: 413 `request_too_large`, "Request exceeds the maximum
    /// allowed number of bytes.", as its CDN answers (so the body has no
    /// `request_id`); the numbers are not used.
    RequestTooLarge { limit: u64, requested: u64 },
    /// 401 with an OpenAI-shaped `invalid_api_key` error body.
    ///
    /// Anthropic: 401 `authentication_error` "invalid x-api-key".
    Unauthorized,
    /// That status (meant for 5xx) with an OpenAI-shaped `server_error` body;
    /// a number that is not an HTTP status becomes 500.
    ///
    /// Anthropic: that status with an `api_error` "Internal server error",
    /// except 529, which is [`Fault::Overloaded`]'s answer.
    ServerError { status: u16 },
    /// Anthropic: 529 `overloaded_error` "Overloaded", Anthropic's answer
    /// when its API is overloaded.
    ///
    /// OpenAI, which has no 529: 503 with a `server_error` body saying "The
    /// engine is currently overloaded, please try again later."
    Overloaded,
    /// That status with `content-type: text/html` and a CDN edge's error page
    /// as the body, as when Cloudflare answers instead of the provider; a
    /// number that is not an HTTP status becomes 500. The same on both
    /// dialects' endpoints.
    HtmlError { status: u16 },
    /// Wait `delay_ms` before answering headers, then answer normally, but
    /// wait `gap_ms` before every SSE event after the first of a stream, and
    /// send a non-streamed completion's (or message's) body in 4 frames with
    /// `gap_ms` before each after the first. Other bodies are sent at once.
    Slow { delay_ms: u64, gap_ms: u64 },
    /// Streaming: send this many SSE events (the role chunk counts as the
    /// first; in an Anthropic stream, `message_start`, and `ping` counts),
    /// then abort the connection, so the body ends in an error rather than
    /// cleanly. The finish chunk, usage chunk and `[DONE]` (Anthropic's
    /// `message_delta` and `message_stop`) are never sent, so a count past
    /// the content events just sends all of those.
    /// Anything else: send the response headers, then abort.
    CutStreamAfter { chunks: usize },
    /// Streaming: send the first SSE event (the role chunk, or Anthropic's
    /// `message_start`), then wait for `release` before sending the rest.
    /// `notify_one` and `notify_waiters` both work once the first event has
    /// reached the client; `notify_one` also works before that, since it
    /// stores a permit.
    /// Anything else: wait for `release` before answering at all (use
    /// `notify_one` there, as nothing tells the client when the wait began).
    HoldStream { release: Arc<Notify> },
    /// 200 `text/event-stream` whose body is one event that never ends: `data: ` and then
    /// `bytes` bytes of `x` in 64 KiB frames, with no line end, then the body ends. What a
    /// broken or hostile provider can send to grow a gateway's buffers.
    EndlessEvent { bytes: u64 },
    /// 200 `text/event-stream`, whatever was asked and on both dialects' endpoints: a chat
    /// completion stream (role chunk, one content chunk, finish chunk, `[DONE]`, one frame per
    /// event) whose content delta carries the bytes `0xff 0xfe`, not UTF-8, inside its JSON
    /// string. See [`INVALID_UTF8_CONTENT`].
    InvalidUtf8Stream,
    /// 200 `application/json` whose body is `{"choices": [`: JSON cut short, with a correct
    /// `content-length`. The same on both dialects' endpoints.
    TruncatedJson,
    /// Written on the socket, bypassing the HTTP server: a 200 `application/json` head
    /// declaring `content-length: declared`, then `sent` bytes of body (the start of a JSON
    /// object), then the connection closes. Meant for `sent < declared`: a body shorter than
    /// its length. The same on both dialects' endpoints.
    ShortBody { declared: u64, sent: usize },
    /// Written on the socket, bypassing the HTTP server: a 200 `application/json` head with a
    /// header `x-huge` whose value is `bytes` bytes of `a`, then a small JSON body
    /// (`{"ok":true}`), then the connection closes. The same on both dialects' endpoints.
    HugeHeader { bytes: usize },
}

/// The content of [`Fault::InvalidUtf8Stream`]'s content delta: `ok ` then `0xff 0xfe`.
pub const INVALID_UTF8_CONTENT: &[u8] = b"ok \xff\xfe";

/// What is configured for one provider key and copied out per request.
#[derive(Clone, Default)]
struct KeyBehaviour {
    fault: Option<Fault>,
    headers: Arc<[(HeaderName, HeaderValue)]>,
    stream_style: Option<StreamStyle>,
}

impl KeyBehaviour {
    fn is_default(&self) -> bool {
        self.fault.is_none() && self.headers.is_empty() && self.stream_style.is_none()
    }
}

/// Everything known about one provider key.
#[derive(Default)]
struct KeyEntry {
    behaviour: KeyBehaviour,
    /// `None`: the defaults.
    limits: Option<KeyLimits>,
    /// `None` until the key's first request (with rate-limit headers on).
    window: Option<Window>,
}

impl KeyEntry {
    fn is_unused(&self) -> bool {
        self.behaviour.is_default() && self.limits.is_none() && self.window.is_none()
    }

    /// The behaviour to apply, unless there is nothing to apply.
    fn configured(&self) -> Option<KeyBehaviour> {
        (!self.behaviour.is_default()).then(|| self.behaviour.clone())
    }

    /// Counts a request arriving `now` that uses `charge`, and returns the
    /// key's state for its headers.
    fn charge(&mut self, now: Instant, charge: Charge) -> RateLimit {
        let mut window = match self.window {
            Some(window) if now.saturating_duration_since(window.started) < RATE_WINDOW => window,
            _ => Window {
                started: now,
                requests: 0,
                input_tokens: 0,
                output_tokens: 0,
            },
        };
        window.requests = window.requests.saturating_add(1);
        window.input_tokens = window.input_tokens.saturating_add(charge.input);
        window.output_tokens = window.output_tokens.saturating_add(charge.output);
        self.window = Some(window);
        RateLimit {
            limits: self.limits.unwrap_or_default(),
            requests: window.requests,
            input_tokens: window.input_tokens,
            output_tokens: window.output_tokens,
            reset: RATE_WINDOW.saturating_sub(now.saturating_duration_since(window.started)),
        }
    }
}

/// What one request uses of its key's token limits.
#[derive(Clone, Copy, Default)]
struct Charge {
    input: u64,
    output: u64,
}

/// What one key used in its current rate-limit window.
#[derive(Clone, Copy)]
struct Window {
    started: Instant,
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
}

/// A key's rate-limit state as one response reports it.
struct RateLimit {
    limits: KeyLimits,
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    /// Until the window restarts.
    reset: Duration,
}

impl RateLimit {
    /// The tokens used in the window, input and output.
    fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Adds the `x-ratelimit-*` headers, except those the response already
    /// has (a fault's own).
    fn add_openai(&self, headers: &mut HeaderMap) {
        let reset = HeaderValue::try_from(go_duration(self.reset))
            .unwrap_or(HeaderValue::from_static("0s"));
        let limits = self.limits;
        let values = [
            (
                "x-ratelimit-limit-requests",
                HeaderValue::from(limits.requests_per_minute),
            ),
            (
                "x-ratelimit-limit-tokens",
                HeaderValue::from(limits.tokens_per_minute),
            ),
            (
                "x-ratelimit-remaining-requests",
                HeaderValue::from(limits.requests_per_minute.saturating_sub(self.requests)),
            ),
            (
                "x-ratelimit-remaining-tokens",
                HeaderValue::from(limits.tokens_per_minute.saturating_sub(self.tokens())),
            ),
            ("x-ratelimit-reset-requests", reset.clone()),
            ("x-ratelimit-reset-tokens", reset),
        ];
        for (name, value) in values {
            headers.entry(name).or_insert(value);
        }
    }

    /// Adds the `anthropic-ratelimit-*` headers (see [`KeyLimits`]) for a
    /// request that arrived at `arrived`, except those the response already
    /// has (a fault's own).
    fn add_anthropic(&self, headers: &mut HeaderMap, arrived: SystemTime) {
        let reset = HeaderValue::try_from(rfc3339(arrived + self.reset))
            .unwrap_or(HeaderValue::from_static("1970-01-01T00:00:00Z"));
        let limits = self.limits;
        let output_limit = limits.tokens_per_minute / 5;
        let input_limit = limits.tokens_per_minute - output_limit;
        // Remaining tokens as Anthropic reports them: to the nearest
        // thousand, and never more than the limit.
        let remaining =
            |limit: u64, used: u64| nearest_thousand(limit.saturating_sub(used)).min(limit);
        let groups = [
            (
                "requests",
                limits.requests_per_minute,
                limits.requests_per_minute.saturating_sub(self.requests),
            ),
            (
                "tokens",
                limits.tokens_per_minute,
                remaining(limits.tokens_per_minute, self.tokens()),
            ),
            (
                "input-tokens",
                input_limit,
                remaining(input_limit, self.input_tokens),
            ),
            (
                "output-tokens",
                output_limit,
                remaining(output_limit, self.output_tokens),
            ),
        ];
        for (group, limit, left) in groups {
            let values = [
                ("limit", HeaderValue::from(limit)),
                ("remaining", HeaderValue::from(left)),
                ("reset", reset.clone()),
            ];
            for (field, value) in values {
                let name = format!("anthropic-ratelimit-{group}-{field}");
                if let Ok(name) = HeaderName::try_from(name) {
                    headers.entry(name).or_insert(value);
                }
            }
        }
    }
}

/// `n` rounded to the nearest thousand (halves up).
fn nearest_thousand(n: u64) -> u64 {
    n.saturating_add(500) / 1000 * 1000
}

/// `time` in RFC 3339, in UTC, to the second, rounded up (so never before
/// `time`): `2025-02-24T22:25:32Z`, as Anthropic writes its reset times.
fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs() + u64::from(since_epoch.subsec_nanos() > 0);
    let (days, secs_of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

/// The proleptic Gregorian date (year, month, day) `days` days after
/// 1970-01-01, by Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Count from 0000-03-01, so that leap days end each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March.
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// `d` as Go's `time.Duration` prints it, as OpenAI's reset headers and
/// messages do (`6ms`, `20s`, `1m0s`, `1m30.5s`), to the millisecond.
fn go_duration(d: Duration) -> String {
    let millis = d.as_millis();
    if millis < 1000 {
        return if millis == 0 {
            "0s".to_owned()
        } else {
            format!("{millis}ms")
        };
    }
    let (secs, fraction) = (millis / 1000, millis % 1000);
    let (hours, minutes, secs) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    // Writing to a String cannot fail.
    if hours > 0 {
        let _ = write!(out, "{hours}h{minutes}m");
    } else if minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    if fraction > 0 {
        let digits = format!("{fraction:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

struct State {
    record: bool,
    rate_limit_headers: bool,
    requests: Mutex<Vec<RecordedRequest>>,
    /// False while `keys` is empty, so that, with rate-limit headers off,
    /// ordinary requests never lock it.
    any_keyed: AtomicBool,
    /// With rate-limit headers on, every key ever seen keeps its entry (its
    /// window); fine, since a gateway under test holds few keys.
    keys: Mutex<HashMap<String, KeyEntry>>,
    reply: RwLock<Arc<Reply>>,
    anthropic: RwLock<Arc<AnthropicReply>>,
    next_id: AtomicU64,
}

impl State {
    fn new(options: &MockOptions) -> State {
        State {
            record: options.record,
            rate_limit_headers: options.rate_limit_headers,
            requests: Mutex::new(Vec::new()),
            any_keyed: AtomicBool::new(false),
            keys: Mutex::new(HashMap::new()),
            reply: RwLock::new(Arc::new(Reply::new(DEFAULT_CONTENT, DEFAULT_USAGE))),
            anthropic: RwLock::new(Arc::new(AnthropicReply {
                content: DEFAULT_CONTENT.to_owned(),
                usage: DEFAULT_ANTHROPIC_USAGE,
                tool_input: DEFAULT_TOOL_INPUT.to_owned(),
            })),
            next_id: AtomicU64::new(1),
        }
    }

    fn update_key(&self, key: &str, update: impl FnOnce(&mut KeyEntry)) {
        let mut keys = lock(&self.keys);
        let entry = keys.entry(key.to_owned()).or_default();
        update(entry);
        if entry.is_unused() {
            keys.remove(key);
        }
        self.any_keyed.store(!keys.is_empty(), Ordering::Release);
    }

    /// A request carrying `key` and using `charge` arrived: counts it in the
    /// key's window (with rate-limit headers on), and returns the behaviour
    /// configured for the key and the state of its window.
    fn arrive(&self, key: &str, charge: Charge) -> (Option<KeyBehaviour>, Option<RateLimit>) {
        if !self.rate_limit_headers {
            if !self.any_keyed.load(Ordering::Acquire) {
                return (None, None);
            }
            return (
                lock(&self.keys).get(key).and_then(KeyEntry::configured),
                None,
            );
        }
        let now = Instant::now();
        let mut keys = lock(&self.keys);
        // Look up before inserting, so that known keys are not copied.
        if !keys.contains_key(key) {
            keys.insert(key.to_owned(), KeyEntry::default());
            self.any_keyed.store(true, Ordering::Release);
        }
        match keys.get_mut(key) {
            Some(entry) => (entry.configured(), Some(entry.charge(now, charge))),
            None => (None, None),
        }
    }

    fn record(&self, parts: &request::Parts, body: &Bytes, key: Option<&str>) {
        let request = RecordedRequest {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.as_str().to_owned(), value)
                })
                .collect(),
            body: body.clone(),
            key: key.map(str::to_owned),
        };
        lock(&self.requests).push(request);
    }

    fn reply(&self) -> Arc<Reply> {
        Arc::clone(&self.reply.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn anthropic(&self) -> Arc<AnthropicReply> {
        Arc::clone(
            &self
                .anthropic
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Changes the Anthropic reply; under the write lock, so that concurrent
    /// changes of different parts all stick.
    fn update_anthropic(&self, update: impl FnOnce(&mut AnthropicReply)) {
        let mut guard = self
            .anthropic
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut reply = AnthropicReply::clone(&guard);
        update(&mut reply);
        *guard = Arc::new(reply);
    }
}

/// Locks `mutex`, ignoring poisoning: the data behind it stays consistent
/// even if a holder panicked, and the server must not panic in turn.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reply of successful completions, serialized as far as possible ahead
/// of time so that each request only splices in its id and model. Tool
/// calls (see [`MockProvider::set_tool_input`]) are serialized per request.
struct Reply {
    /// Everything after `"model":…,` in a text `chat.completion` object.
    completion_tail: String,
    /// The `choices` arrays of the streamed chunks of a text reply, in
    /// order: the role chunk, one chunk per word, the finish chunk.
    chunk_choices: Vec<String>,
    /// The `usage` object.
    usage: String,
    /// What a completion uses of its key's token limits.
    charge: Charge,
}

impl Reply {
    fn new(content: &str, usage: MockUsage) -> Reply {
        let total_tokens = usage.total_tokens();
        let usage_json = format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{total_tokens}}}"#,
            usage.prompt_tokens, usage.completion_tokens,
        );
        let content_json = json_string(content);
        let completion_tail = format!(
            r#""choices":[{{"index":0,"message":{{"role":"assistant","content":{content_json},"refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{usage_json}}}"#
        );

        let chunk = Self::chunk_choices;
        let mut chunk_choices = vec![chunk(r#"{"role":"assistant","content":""}"#, "null")];
        chunk_choices.extend(
            split_words(content)
                .into_iter()
                .map(|word| chunk(&format!(r#"{{"content":{}}}"#, json_string(word)), "null")),
        );
        chunk_choices.push(chunk("{}", r#""stop""#));

        Reply {
            completion_tail,
            chunk_choices,
            usage: usage_json,
            charge: Charge {
                input: usage.prompt_tokens,
                output: usage.completion_tokens,
            },
        }
    }

    /// The `choices` array of a streamed chunk.
    fn chunk_choices(delta: &str, finish_reason: &str) -> String {
        format!(
            r#"[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish_reason}}}]"#
        )
    }

    /// A non-streamed reply: a `chat.completion` object, calling `call`'s
    /// function if there is one.
    fn completion(&self, id: u64, model: &str, call: Option<&FunctionCall<'_>>) -> Bytes {
        let model = json_string(model);
        let tool_call_tail;
        let tail = match call {
            None => &self.completion_tail,
            Some(call) => {
                let tool_call = call.json(id);
                let usage = &self.usage;
                tool_call_tail = format!(
                    r#""choices":[{{"index":0,"message":{{"role":"assistant","content":null,"tool_calls":[{tool_call}],"refusal":null}},"logprobs":null,"finish_reason":"tool_calls"}}],"usage":{usage}}}"#
                );
                &tool_call_tail
            }
        };
        Bytes::from(format!(
            r#"{{"id":"chatcmpl-mock-{id}","object":"chat.completion","created":{CREATED},"model":{model},{tail}"#
        ))
    }

    /// The `choices` arrays of the streamed chunks of a reply calling
    /// `call`'s function, as OpenAI sends them: the role chunk, which names
    /// the function and carries empty arguments, one chunk per piece of the
    /// arguments, the finish chunk.
    fn tool_call_chunk_choices(id: u64, call: &FunctionCall<'_>) -> Vec<String> {
        let chunk = Self::chunk_choices;
        let name = json_string(call.name);
        let mut choices = vec![chunk(
            &format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{{"index":0,"id":"call_mock_{id}","type":"function","function":{{"name":{name},"arguments":""}}}}]}}"#
            ),
            "null",
        )];
        choices.extend(
            split_at_most(call.arguments, INPUT_JSON_PIECE)
                .into_iter()
                .map(|piece| {
                    let piece = json_string(piece);
                    chunk(
                        &format!(
                            r#"{{"tool_calls":[{{"index":0,"function":{{"arguments":{piece}}}}}]}}"#
                        ),
                        "null",
                    )
                }),
        );
        choices.push(chunk("{}", r#""tool_calls""#));
        choices
    }

    /// The data events of a streamed reply in `style` (`[DONE]` and the
    /// error event included, keep-alive comments not), calling `call`'s
    /// function if there is one, and how many of them carry content (the
    /// role chunk and the words or the pieces of the arguments; the rest
    /// only terminate the stream).
    fn stream_events(
        &self,
        id: u64,
        model: &str,
        call: Option<&FunctionCall<'_>>,
        include_usage: bool,
        style: &StreamStyle,
    ) -> (Vec<Bytes>, usize) {
        let tool_call_choices;
        let choices = match call {
            None => &self.chunk_choices,
            Some(call) => {
                tool_call_choices = Self::tool_call_chunk_choices(id, call);
                &tool_call_choices
            }
        };
        let content_events = choices.len() - 1;
        let model = json_string(model);
        let head = format!(
            r#"data: {{"id":"chatcmpl-mock-{id}","object":"chat.completion.chunk","created":{CREATED},"model":{model},"choices":"#
        );
        let end = style.event_end();
        // Like OpenAI: once usage is requested, every other chunk says
        // `"usage":null`.
        let tail = if include_usage {
            ",\"usage\":null}"
        } else {
            "}"
        };
        let chunk =
            |choices: &String| Bytes::from([head.as_str(), choices.as_str(), tail, end].concat());
        if let Some(after) = style.error_after {
            let sent = after.min(content_events);
            let mut events: Vec<Bytes> = choices[..sent].iter().map(chunk).collect();
            events.push(Bytes::from([STREAM_ERROR_DATA, end].concat()));
            return (events, content_events);
        }
        let mut events: Vec<Bytes> = choices.iter().map(chunk).collect();
        if include_usage {
            let usage = &self.usage;
            events.push(Bytes::from(format!("{head}[],\"usage\":{usage}}}{end}")));
        }
        if style.done {
            events.push(Bytes::from_static(match style.line_ending {
                LineEnding::Lf => b"data: [DONE]\n\n",
                LineEnding::CrLf => b"data: [DONE]\r\n\r\n",
            }));
        }
        (events, content_events)
    }
}

/// A function call an OpenAI reply makes.
struct FunctionCall<'a> {
    name: &'a str,
    /// The arguments, as JSON (see [`MockProvider::set_tool_input`]).
    arguments: &'a str,
}

impl FunctionCall<'_> {
    /// The call as an element of a message's `tool_calls`, its id
    /// `call_mock_{id}`.
    fn json(&self, id: u64) -> String {
        let name = json_string(self.name);
        let arguments = json_string(self.arguments);
        format!(
            r#"{{"id":"call_mock_{id}","type":"function","function":{{"name":{name},"arguments":{arguments}}}}}"#
        )
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Splits `text` into one piece per word, each carrying the whitespace before
/// it (the first also any leading whitespace, the last any trailing), so that
/// the pieces concatenate back to `text`.
fn split_words(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut whitespace_from = None;
    let mut seen_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            whitespace_from.get_or_insert(i);
        } else {
            if let Some(from) = whitespace_from.take() {
                if seen_word {
                    pieces.push(&text[start..from]);
                    start = from;
                }
            }
            seen_word = true;
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Connection tasks live in this set so that aborting this task (when the
    // provider is dropped) aborts them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&state)));
                }
                // Typically out of file descriptors under load: back off
                // rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connections so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    // SSE events are small writes that must leave at once.
    let _ = stream.set_nodelay(true);
    let slot = Arc::new(RawSlot::default());
    let io = RawSwitch {
        inner: stream,
        slot: Arc::clone(&slot),
        writing: None,
    };
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        let slot = Arc::clone(&slot);
        async move {
            let mut response = handle(&state, request).await;
            if let Some(RawReply(bytes)) = response.extensions_mut().remove::<RawReply>() {
                *lock(&slot.bytes) = Some(bytes);
                slot.armed.store(true, Ordering::Release);
            }
            Ok::<_, Infallible>(response)
        }
    });
    // Errors here are clients going away or deliberate cuts: nothing to do.
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// Raw bytes for a connection to write in place of its next response (see [`RawReply`]).
#[derive(Default)]
struct RawSlot {
    /// Set once `bytes` holds them: the one check on the ordinary path.
    armed: AtomicBool,
    bytes: Mutex<Option<Bytes>>,
}

/// A connection's socket, which, once its [`RawSlot`] is armed, writes the slot's bytes
/// instead of what the HTTP server writes, then shuts its sending side and fails every
/// write, so that the server drops the connection.
struct RawSwitch {
    inner: TcpStream,
    slot: Arc<RawSlot>,
    /// What is left to write of the raw bytes, once armed.
    writing: Option<Bytes>,
}

impl RawSwitch {
    /// `None` while not armed; else writes the raw bytes, shuts down, and fails.
    fn poll_raw(&mut self, cx: &mut Context<'_>) -> Option<Poll<std::io::Result<usize>>> {
        use tokio::io::AsyncWrite as _;
        if self.writing.is_none() {
            if !self.slot.armed.load(Ordering::Acquire) {
                return None;
            }
            self.writing = Some(lock(&self.slot.bytes).take().unwrap_or_default());
        }
        let rest = self.writing.as_mut()?;
        while !rest.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Pending => return Some(Poll::Pending),
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => *rest = rest.slice(n..),
            }
        }
        if Pin::new(&mut self.inner).poll_shutdown(cx).is_pending() {
            return Some(Poll::Pending);
        }
        Some(Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "raw reply sent",
        ))))
    }
}

impl tokio::io::AsyncRead for RawSwitch {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for RawSwitch {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_raw(cx) {
            Some(poll) => poll,
            None => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_raw(cx) {
            Some(poll) => poll,
            None => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Faults that shape the response body rather than replace the response.
enum BodyFault {
    Cut {
        chunks: usize,
    },
    Hold {
        release: Arc<Notify>,
    },
    /// [`Fault::Slow`]'s pause between body pieces; never zero.
    Gap(Duration),
}

const CHAT_COMPLETIONS: &str = "/v1/chat/completions";

/// Which provider's API a path belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    fn of(path: &str) -> Api {
        let anthropic = path
            .strip_prefix(MESSAGES)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if anthropic {
            Api::Anthropic
        } else {
            Api::OpenAi
        }
    }
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = request.into_parts();
    let api = Api::of(parts.uri.path());
    let reply = state.reply();
    let anthropic = match api {
        Api::OpenAi => None,
        Api::Anthropic => Some(state.anthropic()),
    };
    // Anthropic's reset times are wall-clock times, reckoned from arrival.
    let arrived = anthropic.is_some().then(SystemTime::now);
    let key = provider_key(&parts.headers);
    // Charged on arrival, before the body is read, as a real provider counts
    // a request against its limits whatever becomes of it.
    let (behaviour, rate_limit) = match key {
        Some(key) => {
            let charge = match (&parts.method, parts.uri.path(), &anthropic) {
                (&Method::POST, CHAT_COMPLETIONS, _) => reply.charge,
                (&Method::POST, MESSAGES, Some(anthropic)) => anthropic.usage.charge(),
                _ => Charge::default(),
            };
            state.arrive(key, charge)
        }
        None => (None, None),
    };
    let (fault, stream_style, extra_headers) = match behaviour {
        Some(behaviour) => (
            behaviour.fault,
            behaviour.stream_style,
            Some(behaviour.headers),
        ),
        None => (None, None, None),
    };
    // Every response of Anthropic's API carries one; its error bodies too.
    let request_id = anthropic.is_some().then(|| {
        let n = state.next_id.fetch_add(1, Ordering::Relaxed);
        format!("req_mock_{n}")
    });

    let mut response = match body.collect().await {
        Ok(collected) => {
            let body = collected.to_bytes();
            if state.record {
                state.record(&parts, &body, key);
            }
            match (&anthropic, &request_id) {
                (Some(anthropic), Some(request_id)) => {
                    let exchange = Exchange {
                        parts: &parts,
                        body: &body,
                        key,
                        request_id,
                    };
                    respond_anthropic(state, anthropic, &exchange, fault, stream_style).await
                }
                _ => respond(state, &reply, &parts, &body, fault, stream_style).await,
            }
        }
        Err(_) => match &request_id {
            Some(request_id) => anthropic_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "Could not read the request body.",
                Some(request_id),
            ),
            None => error_response(
                StatusCode::BAD_REQUEST,
                "Could not read the request body.",
                "invalid_request_error",
                None,
            ),
        },
    };

    let headers = response.headers_mut();
    if let Some(rate_limit) = rate_limit {
        match arrived {
            Some(arrived) => rate_limit.add_anthropic(headers, arrived),
            None => rate_limit.add_openai(headers),
        }
    }
    if let Some(request_id) = request_id {
        if let Ok(value) = HeaderValue::try_from(request_id) {
            headers.entry("request-id").or_insert(value);
        }
    }
    if let Some(extra) = extra_headers {
        for (name, _) in extra.iter() {
            headers.remove(name);
        }
        for (name, value) in extra.iter() {
            headers.append(name.clone(), value.clone());
        }
    }
    response
}

/// The provider key: the token of `Authorization: Bearer K`, else the value
/// of `x-api-key`, else that of `api-key`.
fn provider_key(headers: &HeaderMap) -> Option<&str> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|value| !value.is_empty())
    };
    let bearer = header(AUTHORIZATION.as_str())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty());
    bearer
        .or_else(|| header("x-api-key"))
        .or_else(|| header("api-key"))
}

async fn respond(
    state: &State,
    reply: &Reply,
    parts: &request::Parts,
    body: &Bytes,
    fault: Option<Fault>,
    stream_style: Option<StreamStyle>,
) -> Response<MockBody> {
    let body_fault = match fault {
        None => None,
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            return too_many_requests(retry_after_secs)
        }
        Some(Fault::QuotaExhausted) => {
            return error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "You exceeded your current quota, please check your plan and billing details. \
                 For more information on this error, read the docs: \
                 https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "insufficient_quota",
                Some("insufficient_quota"),
            )
        }
        Some(Fault::RequestTooLarge { limit, requested }) => {
            let message = format!(
                "Request too large for gpt-4o in organization org-mock on tokens per min (TPM): \
                 Limit {limit}, Requested {requested}. The input or output tokens must be \
                 reduced in order to run successfully. \
                 Visit https://platform.openai.com/account/rate-limits to learn more."
            );
            return error_response(
                StatusCode::TOO_MANY_REQUESTS,
                &message,
                "tokens",
                Some("rate_limit_exceeded"),
            );
        }
        Some(Fault::Unauthorized) => {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided.",
                "invalid_request_error",
                Some("invalid_api_key"),
            )
        }
        Some(Fault::ServerError { status }) => {
            return error_response(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            )
        }
        Some(Fault::Overloaded) => {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
            )
        }
        Some(Fault::HtmlError { status }) => return html_error(status),
        Some(Fault::EndlessEvent { bytes }) => return endless_event(bytes),
        Some(Fault::InvalidUtf8Stream) => return invalid_utf8_stream(),
        Some(Fault::TruncatedJson) => {
            return json_response(StatusCode::OK, Bytes::from_static(b"{\"choices\": ["))
        }
        Some(Fault::ShortBody { declared, sent }) => return short_body(declared, sent),
        Some(Fault::HugeHeader { bytes }) => return huge_header(bytes),
        Some(
            fault @ (Fault::Slow { .. } | Fault::CutStreamAfter { .. } | Fault::HoldStream { .. }),
        ) => body_fault(fault).await,
    };

    match (&parts.method, parts.uri.path()) {
        (&Method::POST, CHAT_COMPLETIONS) => {
            chat_completions(state, reply, body, body_fault, stream_style).await
        }
        (&Method::GET, "/v1/models") => {
            const MODELS: &str = r#"{"object":"list","data":[{"id":"mock-model","object":"model","created":0,"owned_by":"mock"}]}"#;
            let models = json_response(StatusCode::OK, Bytes::from_static(MODELS.as_bytes()));
            deliver(models, body_fault).await
        }
        (method, path) => {
            let message = format!("Invalid URL ({method} {path})");
            let not_found = error_response(
                StatusCode::NOT_FOUND,
                &message,
                "invalid_request_error",
                None,
            );
            deliver(not_found, body_fault).await
        }
    }
}

/// The part of a fault that shapes the body of an otherwise normal answer,
/// after [`Fault::Slow`]'s delay; `None` for the other faults.
async fn body_fault(fault: Fault) -> Option<BodyFault> {
    match fault {
        Fault::Slow { delay_ms, gap_ms } => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            (gap_ms > 0).then(|| BodyFault::Gap(Duration::from_millis(gap_ms)))
        }
        Fault::CutStreamAfter { chunks } => Some(BodyFault::Cut { chunks }),
        Fault::HoldStream { release } => Some(BodyFault::Hold { release }),
        _ => None,
    }
}

/// [`Fault::TooManyRequests`]'s response.
fn too_many_requests(retry_after_secs: Option<u64>) -> Response<MockBody> {
    let wait = go_duration(Duration::from_secs(retry_after_secs.unwrap_or(1)));
    let message = format!(
        "Rate limit reached for gpt-4o in organization org-mock on requests per min (RPM): \
         Limit 3, Used 3, Requested 1. Please try again in {wait}. \
         Visit https://platform.openai.com/account/rate-limits to learn more."
    );
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        &message,
        "requests",
        Some("rate_limit_exceeded"),
    );
    let headers = response.headers_mut();
    if let Some(secs) = retry_after_secs {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    headers.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("0"),
    );
    response
}

/// See [`Fault::EndlessEvent`].
fn endless_event(bytes: u64) -> Response<MockBody> {
    const FRAME: usize = 64 * 1024;
    let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CAPACITY);
    tokio::spawn(async move {
        let frame = Bytes::from(vec![b'x'; FRAME]);
        let frames = (0..bytes.div_ceil(FRAME as u64)).map(|i| {
            let n = bytes.saturating_sub(i * FRAME as u64).min(FRAME as u64);
            frame.slice(..usize::try_from(n).unwrap_or(FRAME))
        });
        send_pieces(
            &tx,
            std::iter::once(Bytes::from_static(b"data: ")).chain(frames),
        )
        .await;
    });
    let mut response = Response::new(MockBody::channel(rx, false));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response
}

/// See [`Fault::InvalidUtf8Stream`].
fn invalid_utf8_stream() -> Response<MockBody> {
    let chunk = |delta: &[u8], finish: &str| {
        let mut event =
            b"data: {\"id\":\"chatcmpl-mock-utf8\",\"object\":\"chat.completion.chunk\",\
\"created\":1700000000,\"model\":\"mock-model\",\"choices\":[{\"index\":0,\"delta\":"
                .to_vec();
        event.extend_from_slice(delta);
        event.extend_from_slice(format!(",\"finish_reason\":{finish}}}]}}\n\n").as_bytes());
        Bytes::from(event)
    };
    let mut content = b"{\"content\":\"".to_vec();
    content.extend_from_slice(INVALID_UTF8_CONTENT);
    content.extend_from_slice(b"\"}");
    let events = vec![
        chunk(br#"{"role":"assistant","content":""}"#, "null"),
        chunk(&content, "null"),
        chunk(b"{}", "\"stop\""),
        Bytes::from_static(b"data: [DONE]\n\n"),
    ];
    let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CAPACITY);
    tokio::spawn(async move {
        send_pieces(&tx, events).await;
    });
    let mut response = Response::new(MockBody::channel(rx, true));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response
}

/// Bytes a connection writes on its socket in place of the response this rides on, before
/// closing (see [`RawSwitch`]).
#[derive(Clone)]
struct RawReply(Bytes);

/// A response whose place `bytes` take on the wire.
fn raw_reply(bytes: Bytes) -> Response<MockBody> {
    let mut response = Response::new(MockBody::full(Bytes::new()));
    response.extensions_mut().insert(RawReply(bytes));
    response
}

/// See [`Fault::ShortBody`].
fn short_body(declared: u64, sent: usize) -> Response<MockBody> {
    let mut bytes = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    )
    .into_bytes();
    bytes.extend(
        br#"{"id":"chatcmpl-mock-short","object":"chat.completion","choices":["#
            .iter()
            .chain(std::iter::repeat(&b' '))
            .take(sent),
    );
    raw_reply(Bytes::from(bytes))
}

/// See [`Fault::HugeHeader`].
fn huge_header(bytes: usize) -> Response<MockBody> {
    const BODY: &[u8] = br#"{"ok":true}"#;
    let mut raw = Vec::with_capacity(bytes + 200);
    raw.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-huge: ");
    raw.resize(raw.len() + bytes, b'a');
    raw.extend_from_slice(format!("\r\ncontent-length: {}\r\n\r\n", BODY.len()).as_bytes());
    raw.extend_from_slice(BODY);
    raw_reply(Bytes::from(raw))
}

fn html_error(status: u16) -> Response<MockBody> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = status.as_u16();
    let title = match status.canonical_reason() {
        Some(reason) => format!("{code} {reason}"),
        None => code.to_string(),
    };
    let page = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n\
         <center><h1>{title}</h1></center>\r\n<hr><center>cloudflare</center>\r\n\
         </body>\r\n</html>\r\n"
    );
    let mut response = Response::new(MockBody::full(Bytes::from(page)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
}

/// The fields of a chat completion request the mock cares about.
#[derive(Deserialize)]
struct ChatRequest<'a> {
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// Left unparsed unless the request has tools, so that the ordinary path
    /// stays cheap.
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_choice: Option<&'a RawValue>,
}

impl ChatRequest<'_> {
    /// The name of the function to call, if the reply is to be a tool call
    /// (see [`MockProvider::set_tool_input`]).
    fn function_to_call(&self) -> Option<String> {
        let tools: Vec<serde_json::Value> = serde_json::from_str(self.tools?.get()).ok()?;
        let first = tools
            .iter()
            .find(|tool| tool["type"] == "function")
            .and_then(|tool| tool["function"]["name"].as_str())?;
        let choice: serde_json::Value = match self.tool_choice {
            Some(choice) => serde_json::from_str(choice.get()).ok()?,
            None => serde_json::Value::Null,
        };
        if choice == "none" {
            return None;
        }
        let messages: Vec<&RawValue> = serde_json::from_str(self.messages?.get()).ok()?;
        let last: serde_json::Value = serde_json::from_str(messages.last()?.get()).ok()?;
        if last["role"] != "user" {
            return None;
        }
        let named = match choice["type"].as_str() {
            Some("function") => choice["function"]["name"].as_str(),
            _ => None,
        };
        Some(named.unwrap_or(first).to_owned())
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

async fn chat_completions(
    state: &State,
    reply: &Reply,
    body: &Bytes,
    body_fault: Option<BodyFault>,
    stream_style: Option<StreamStyle>,
) -> Response<MockBody> {
    let request: ChatRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("We could not parse the JSON body of your request: {e}");
            let invalid = error_response(
                StatusCode::BAD_REQUEST,
                &message,
                "invalid_request_error",
                None,
            );
            return deliver(invalid, body_fault).await;
        }
    };
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let model = request.model.as_deref().unwrap_or(DEFAULT_MODEL);
    let function = request.function_to_call();
    // The tool input lives with the Anthropic reply; read only for calls.
    let tool_reply = function.as_ref().map(|_| state.anthropic());
    let call = match (&function, &tool_reply) {
        (Some(name), Some(tool_reply)) => Some(FunctionCall {
            name,
            arguments: &tool_reply.tool_input,
        }),
        _ => None,
    };

    if !request.stream.unwrap_or(false) {
        let completion = reply.completion(id, model, call.as_ref());
        if let Some(BodyFault::Gap(gap)) = body_fault {
            let mut response = json_response(StatusCode::OK, Bytes::new());
            *response.body_mut() = MockBody::paced(completion, SLOW_BODY_FRAMES, gap);
            return response;
        }
        return deliver(json_response(StatusCode::OK, completion), body_fault).await;
    }

    let include_usage = request
        .stream_options
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    let style = stream_style.unwrap_or_default();
    let (events, content_events) =
        reply.stream_events(id, model, call.as_ref(), include_usage, &style);
    let stream = StreamPlan {
        events,
        content_events,
        keep_alive: style.keep_alive_comment(),
        writes: style.writes,
    };
    event_stream(stream, body_fault, "text/event-stream")
}

/// Starts feeding `stream` to a body (see [`produce_stream`]) and returns
/// the response with that body.
fn event_stream(
    stream: StreamPlan,
    body_fault: Option<BodyFault>,
    content_type: &'static str,
) -> Response<MockBody> {
    let flush_each = matches!(stream.writes, Writes::Split { .. });
    let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CAPACITY);
    tokio::spawn(produce_stream(tx, stream, body_fault));

    let mut response = Response::new(MockBody::channel(rx, flush_each));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// An Anthropic request as its handlers see it.
struct Exchange<'a> {
    parts: &'a request::Parts,
    body: &'a Bytes,
    key: Option<&'a str>,
    /// The `request-id` of the response.
    request_id: &'a str,
}

impl Exchange<'_> {
    /// An error response in Anthropic's shape, carrying this request's id.
    fn error(&self, status: StatusCode, error_type: &str, message: &str) -> Response<MockBody> {
        anthropic_error(status, error_type, message, Some(self.request_id))
    }

    /// The answer to a request lacking what Anthropic requires of every
    /// request: a key and an `anthropic-version`.
    fn missing_headers(&self) -> Option<Response<MockBody>> {
        if self.key.is_none() {
            return Some(self.error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "x-api-key header is required",
            ));
        }
        let version = self
            .parts
            .headers
            .get("anthropic-version")
            .is_some_and(|value| !value.as_bytes().trim_ascii().is_empty());
        (!version).then(|| {
            self.error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "anthropic-version: header is required",
            )
        })
    }

    /// The body as JSON of type `T`.
    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.body)
    }

    /// Anthropic's answer to a body that is not JSON (of the expected shape).
    fn invalid_json(&self, error: &serde_json::Error) -> Response<MockBody> {
        let message = format!("The request body is not valid JSON: {error}");
        self.error(StatusCode::BAD_REQUEST, "invalid_request_error", &message)
    }

    /// Anthropic's answer to a request missing the required field `field`.
    fn field_required(&self, field: &str) -> Response<MockBody> {
        let message = format!("{field}: Field required");
        self.error(StatusCode::BAD_REQUEST, "invalid_request_error", &message)
    }
}

async fn respond_anthropic(
    state: &State,
    reply: &AnthropicReply,
    exchange: &Exchange<'_>,
    fault: Option<Fault>,
    stream_style: Option<StreamStyle>,
) -> Response<MockBody> {
    let body_fault = match fault {
        None => None,
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            return anthropic_too_many_requests(retry_after_secs, exchange)
        }
        Some(Fault::QuotaExhausted) => {
            return exchange.error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                CREDIT_TOO_LOW,
            )
        }
        Some(Fault::RequestTooLarge { .. }) => {
            // Cloudflare's answer, before the request reaches Anthropic's
            // servers: no request id in the body.
            return anthropic_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes.",
                None,
            );
        }
        Some(Fault::Unauthorized) => {
            return exchange.error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            )
        }
        Some(Fault::ServerError { status }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return if status.as_u16() == 529 {
                anthropic_overloaded(exchange)
            } else {
                exchange.error(status, "api_error", "Internal server error")
            };
        }
        Some(Fault::Overloaded) => return anthropic_overloaded(exchange),
        Some(Fault::HtmlError { status }) => return html_error(status),
        Some(Fault::EndlessEvent { bytes }) => return endless_event(bytes),
        Some(Fault::InvalidUtf8Stream) => return invalid_utf8_stream(),
        Some(Fault::TruncatedJson) => {
            return json_response(StatusCode::OK, Bytes::from_static(b"{\"choices\": ["))
        }
        Some(Fault::ShortBody { declared, sent }) => return short_body(declared, sent),
        Some(Fault::HugeHeader { bytes }) => return huge_header(bytes),
        Some(
            fault @ (Fault::Slow { .. } | Fault::CutStreamAfter { .. } | Fault::HoldStream { .. }),
        ) => body_fault(fault).await,
    };

    let answer = match (&exchange.parts.method, exchange.parts.uri.path()) {
        (&Method::POST, MESSAGES) => match exchange.missing_headers() {
            Some(refused) => refused,
            None => return messages(state, reply, exchange, body_fault, stream_style).await,
        },
        (&Method::POST, COUNT_TOKENS) => match exchange.missing_headers() {
            Some(refused) => refused,
            None => count_tokens(exchange),
        },
        _ => exchange.error(StatusCode::NOT_FOUND, "not_found_error", "Not Found"),
    };
    deliver(answer, body_fault).await
}

/// [`Fault::TooManyRequests`]'s response on Anthropic's endpoints.
fn anthropic_too_many_requests(
    retry_after_secs: Option<u64>,
    exchange: &Exchange<'_>,
) -> Response<MockBody> {
    let mut response = exchange.error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization \
         (00000000-0000-4000-8000-000000000000) of 50 requests per minute. \
         For details, refer to: https://docs.claude.com/en/api/rate-limits. \
         You can see the response headers for current usage. \
         Please reduce the prompt length or the maximum tokens requested, or try again later. \
         You may also contact sales at https://www.anthropic.com/contact-sales \
         to discuss your options for a rate limit increase.",
    );
    let headers = response.headers_mut();
    if let Some(secs) = retry_after_secs {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    headers.insert(
        "anthropic-ratelimit-requests-remaining",
        HeaderValue::from_static("0"),
    );
    response
}

/// Anthropic's 529.
fn anthropic_overloaded(exchange: &Exchange<'_>) -> Response<MockBody> {
    let status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    exchange.error(status, "overloaded_error", "Overloaded")
}

/// An error response with Anthropic's error body, byte for byte:
/// `{"type":"error","error":{"type":…,"message":…},"request_id":…}`, without
/// the `request_id` when `request_id` is `None`.
fn anthropic_error(
    status: StatusCode,
    error_type: &str,
    message: &str,
    request_id: Option<&str>,
) -> Response<MockBody> {
    let error_type = json_string(error_type);
    let message = json_string(message);
    let request_id = request_id.map_or_else(String::new, |id| {
        format!(r#","request_id":{}"#, json_string(id))
    });
    let body = format!(
        r#"{{"type":"error","error":{{"type":{error_type},"message":{message}}}{request_id}}}"#
    );
    json_response(status, Bytes::from(body))
}

/// The reply of successful Anthropic messages.
#[derive(Clone)]
struct AnthropicReply {
    /// The text of text replies (see [`MockProvider::set_reply`]).
    content: String,
    usage: AnthropicUsage,
    /// The input of tool calls, as JSON; also the arguments of the tool
    /// calls of chat completions.
    tool_input: String,
}

/// A tool call an Anthropic reply makes.
struct ToolCall<'a> {
    name: &'a str,
    /// Whether [`TOOL_USE_PREAMBLE`]'s text block comes first.
    preamble: bool,
}

impl AnthropicReply {
    /// The `usage` object, reporting `output_tokens` output tokens, in the
    /// fields and order Anthropic sends.
    fn usage_json(&self, output_tokens: u64) -> String {
        let AnthropicUsage {
            input_tokens,
            cache_creation_input_tokens,
            cache_read_input_tokens,
            ..
        } = self.usage;
        format!(
            r#"{{"input_tokens":{input_tokens},"cache_creation_input_tokens":{cache_creation_input_tokens},"cache_read_input_tokens":{cache_read_input_tokens},"cache_creation":{{"ephemeral_5m_input_tokens":{cache_creation_input_tokens},"ephemeral_1h_input_tokens":0}},"output_tokens":{output_tokens},"service_tier":"standard"}}"#
        )
    }

    /// A `message` object up to its `content` (excluded): `{"id":…,…,"model":…,`.
    fn message_head(id: u64, model: &str) -> String {
        let model = json_string(model);
        format!(r#"{{"id":"msg_mock_{id}","type":"message","role":"assistant","model":{model},"#)
    }

    fn tool_use_block(id: u64, call: &ToolCall<'_>, input: &str) -> String {
        let name = json_string(call.name);
        format!(r#"{{"type":"tool_use","id":"toolu_mock_{id}","name":{name},"input":{input}}}"#)
    }

    /// The text of the reply's text block, if it has one.
    fn text<'a>(&'a self, call: Option<&ToolCall<'_>>) -> Option<&'a str> {
        match call {
            None => Some(&self.content),
            Some(call) => call.preamble.then_some(TOOL_USE_PREAMBLE),
        }
    }

    fn stop_reason(call: Option<&ToolCall<'_>>) -> &'static str {
        match call {
            None => "end_turn",
            Some(_) => "tool_use",
        }
    }

    /// A non-streamed reply: a `message` object.
    fn message(&self, id: u64, model: &str, call: Option<&ToolCall<'_>>) -> Bytes {
        let mut blocks = Vec::new();
        if let Some(text) = self.text(call) {
            blocks.push(format!(r#"{{"type":"text","text":{}}}"#, json_string(text)));
        }
        if let Some(call) = call {
            blocks.push(Self::tool_use_block(id, call, &self.tool_input));
        }
        let head = Self::message_head(id, model);
        let content = blocks.join(",");
        let stop_reason = Self::stop_reason(call);
        let usage = self.usage_json(self.usage.output_tokens);
        Bytes::from(format!(
            r#"{head}"content":[{content}],"stop_reason":"{stop_reason}","stop_sequence":null,"usage":{usage}}}"#
        ))
    }

    /// A streamed reply's events in `style` (the error event included,
    /// keep-alive comments not), and how many of them come before
    /// `message_delta`.
    fn stream_events(
        &self,
        id: u64,
        model: &str,
        call: Option<&ToolCall<'_>>,
        style: &StreamStyle,
    ) -> (Vec<Bytes>, usize) {
        let nl = style.line_end();
        let event =
            |name: &str, data: &str| Bytes::from(format!("event: {name}{nl}data: {data}{nl}{nl}"));
        let block_start = |index: usize, block: &str| {
            event(
                "content_block_start",
                &format!(
                    r#"{{"type":"content_block_start","index":{index},"content_block":{block}}}"#
                ),
            )
        };
        let block_delta = |index: usize, delta: &str| {
            event(
                "content_block_delta",
                &format!(r#"{{"type":"content_block_delta","index":{index},"delta":{delta}}}"#),
            )
        };
        let block_stop = |index: usize| {
            event(
                "content_block_stop",
                &format!(r#"{{"type":"content_block_stop","index":{index}}}"#),
            )
        };
        let ping = || event("ping", r#"{"type":"ping"}"#);

        let head = Self::message_head(id, model);
        let usage = self.usage_json(1);
        let mut events = vec![event(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{head}"content":[],"stop_reason":null,"stop_sequence":null,"usage":{usage}}}}}"#
            ),
        )];
        let mut index = 0;
        if let Some(text) = self.text(call) {
            events.push(block_start(index, r#"{"type":"text","text":""}"#));
            events.push(ping());
            for word in split_words(text) {
                let delta = format!(r#"{{"type":"text_delta","text":{}}}"#, json_string(word));
                events.push(block_delta(index, &delta));
            }
            events.push(block_stop(index));
            index += 1;
        }
        if let Some(call) = call {
            events.push(block_start(index, &Self::tool_use_block(id, call, "{}")));
            if index == 0 {
                events.push(ping());
            }
            // Anthropic's first input delta is empty.
            let pieces =
                std::iter::once("").chain(split_at_most(&self.tool_input, INPUT_JSON_PIECE));
            for piece in pieces {
                let delta = format!(
                    r#"{{"type":"input_json_delta","partial_json":{}}}"#,
                    json_string(piece)
                );
                events.push(block_delta(index, &delta));
            }
            events.push(block_stop(index));
        }
        let content_events = events.len();

        if let Some(after) = style.error_after {
            events.truncate(after.min(content_events));
            events.push(event("error", ANTHROPIC_STREAM_ERROR_DATA));
            return (events, content_events);
        }
        let stop_reason = Self::stop_reason(call);
        let output_tokens = self.usage.output_tokens;
        events.push(event(
            "message_delta",
            &format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"{stop_reason}","stop_sequence":null}},"usage":{{"output_tokens":{output_tokens}}}}}"#
            ),
        ));
        events.push(event("message_stop", r#"{"type":"message_stop"}"#));
        (events, content_events)
    }
}

/// Cuts `text` into pieces of at most `bytes` bytes (but at least one
/// character each: a character is never cut), which concatenate back to
/// `text`.
fn split_at_most(text: &str, bytes: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(first) = rest.chars().next() {
        // The end of the first character is a boundary, so this stops there
        // at the latest.
        let mut end = bytes.min(rest.len()).max(first.len_utf8());
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// The fields of a Messages request the mock cares about.
#[derive(Deserialize)]
struct MessagesRequest {
    model: Option<String>,
    max_tokens: Option<serde_json::Value>,
    messages: Option<Vec<serde_json::Value>>,
    stream: Option<bool>,
    tools: Option<Vec<serde_json::Value>>,
    tool_choice: Option<serde_json::Value>,
}

impl MessagesRequest {
    /// The tool call to answer with, if any (see
    /// [`MockProvider::set_tool_input`]).
    fn tool_call(&self) -> Option<ToolCall<'_>> {
        let tools = self.tools.as_deref().filter(|tools| !tools.is_empty())?;
        let choice = self.tool_choice.as_ref();
        let choice_type = choice.and_then(|choice| choice["type"].as_str());
        if choice_type == Some("none") {
            return None;
        }
        let last = self.messages.as_deref()?.last()?;
        if last["role"] != "user" {
            return None;
        }
        let answers_a_call = last["content"]
            .as_array()
            .is_some_and(|blocks| blocks.iter().any(|block| block["type"] == "tool_result"));
        if answers_a_call {
            return None;
        }
        let named = match choice_type {
            Some("tool") => choice.and_then(|choice| choice["name"].as_str()),
            _ => None,
        };
        Some(ToolCall {
            name: named
                .or_else(|| tools[0]["name"].as_str())
                .unwrap_or("tool"),
            preamble: !matches!(choice_type, Some("any" | "tool")),
        })
    }
}

async fn messages(
    state: &State,
    reply: &AnthropicReply,
    exchange: &Exchange<'_>,
    body_fault: Option<BodyFault>,
    stream_style: Option<StreamStyle>,
) -> Response<MockBody> {
    let request: MessagesRequest = match exchange.parse() {
        Ok(request) => request,
        Err(e) => return deliver(exchange.invalid_json(&e), body_fault).await,
    };
    let required = [
        ("model", request.model.is_some()),
        ("max_tokens", request.max_tokens.is_some()),
        ("messages", request.messages.is_some()),
    ];
    if let Some((field, _)) = required.into_iter().find(|(_, present)| !present) {
        return deliver(exchange.field_required(field), body_fault).await;
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let model = request.model.as_deref().unwrap_or(DEFAULT_MODEL);
    let call = request.tool_call();

    if !request.stream.unwrap_or(false) {
        let message = reply.message(id, model, call.as_ref());
        if let Some(BodyFault::Gap(gap)) = body_fault {
            let mut response = json_response(StatusCode::OK, Bytes::new());
            *response.body_mut() = MockBody::paced(message, SLOW_BODY_FRAMES, gap);
            return response;
        }
        return deliver(json_response(StatusCode::OK, message), body_fault).await;
    }

    let style = stream_style.unwrap_or_default();
    let (events, content_events) = reply.stream_events(id, model, call.as_ref(), &style);
    let stream = StreamPlan {
        events,
        content_events,
        keep_alive: style.keep_alive_comment(),
        writes: style.writes,
    };
    event_stream(stream, body_fault, "text/event-stream; charset=utf-8")
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens":N}`, N estimated as a
/// quarter of the bytes of the request's `system` and `messages` as compact
/// JSON, at least 1.
fn count_tokens(exchange: &Exchange<'_>) -> Response<MockBody> {
    let request: serde_json::Value = match exchange.parse() {
        Ok(request) => request,
        Err(e) => return exchange.invalid_json(&e),
    };
    for field in ["model", "messages"] {
        if request.get(field).is_none_or(serde_json::Value::is_null) {
            return exchange.field_required(field);
        }
    }
    let bytes: usize = ["system", "messages"]
        .into_iter()
        .filter_map(|field| request.get(field))
        .map(|value| value.to_string().len())
        .sum();
    let tokens = (bytes / 4).max(1);
    json_response(
        StatusCode::OK,
        Bytes::from(format!(r#"{{"input_tokens":{tokens}}}"#)),
    )
}

/// One streamed reply, ready to send.
struct StreamPlan {
    /// The data events, in order.
    events: Vec<Bytes>,
    /// How many of the leading events carry content; the rest only
    /// terminate the stream (see [`Reply::stream_events`]).
    content_events: usize,
    /// The comment to send before each data event, if any.
    keep_alive: Option<Bytes>,
    writes: Writes,
}

/// Feeds a streamed reply to its body, framed as `stream.writes` says,
/// misbehaving as `fault` says. Dropping `tx` at the end ends the body
/// cleanly.
async fn produce_stream(
    tx: mpsc::Sender<StreamItem>,
    stream: StreamPlan,
    fault: Option<BodyFault>,
) {
    let StreamPlan {
        mut events,
        content_events,
        keep_alive,
        writes,
    } = stream;
    let (abort, release, gap) = match fault {
        None => (false, None, None),
        Some(BodyFault::Cut { chunks }) => {
            events.truncate(chunks.min(content_events));
            (true, None, None)
        }
        Some(BodyFault::Hold { release }) => (false, Some(release), None),
        Some(BodyFault::Gap(gap)) => (false, None, Some(gap)),
    };

    // OpenAI's shape, unpaused: each event straight to the body.
    if keep_alive.is_none() && writes == Writes::PerEvent && release.is_none() && gap.is_none() {
        if send_pieces(&tx, events).await && abort {
            let _ = tx.send(StreamItem::Abort).await;
        }
        return;
    }

    // Start listening before the first event goes out: a client that reacts
    // to it with `notify_waiters` must find us already waiting.
    let mut released = pin!(release.as_ref().map(|release| release.notified()));
    if let Some(released) = released.as_mut().as_pin_mut() {
        released.enable();
    }
    // The pieces (events and comments) sent at the next pause or at the end.
    let mut pending = Vec::new();
    for (i, event) in events.into_iter().enumerate() {
        if i > 0 {
            if let Some(gap) = gap {
                if !send_framed(&tx, writes, &mut pending).await {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(gap) => {}
                    () = tx.closed() => return,
                }
            }
            if i == 1 {
                if let Some(released) = released.as_mut().as_pin_mut() {
                    if !send_framed(&tx, writes, &mut pending).await {
                        return;
                    }
                    tokio::select! {
                        () = released => {}
                        // The client went away: do not wait for a release forever.
                        () = tx.closed() => return,
                    }
                }
            }
        }
        pending.extend(keep_alive.clone());
        pending.push(event);
    }
    if send_framed(&tx, writes, &mut pending).await && abort {
        let _ = tx.send(StreamItem::Abort).await;
    }
}

/// Sends `pending` (and empties it) in frames as `writes` says; false once
/// the body has gone away.
async fn send_framed(
    tx: &mpsc::Sender<StreamItem>,
    writes: Writes,
    pending: &mut Vec<Bytes>,
) -> bool {
    if pending.is_empty() {
        return true;
    }
    let pieces = std::mem::take(pending);
    let joined = || match pieces.as_slice() {
        [one] => one.clone(),
        many => Bytes::from(many.concat()),
    };
    match writes {
        Writes::PerEvent => send_pieces(tx, pieces).await,
        Writes::Coalesced => send_pieces(tx, [joined()]).await,
        Writes::Split { bytes } => {
            let all = joined();
            let size = bytes.max(1);
            let frames = (0..all.len())
                .step_by(size)
                .map(|start| all.slice(start..all.len().min(start + size)));
            send_pieces(tx, frames).await
        }
    }
}

/// Sends each piece as its own frame; false once the body has gone away.
async fn send_pieces(
    tx: &mpsc::Sender<StreamItem>,
    pieces: impl IntoIterator<Item = Bytes>,
) -> bool {
    for piece in pieces {
        if tx.send(StreamItem::Data(piece)).await.is_err() {
            return false;
        }
    }
    true
}

/// Applies a body fault to a response that is not streamed.
async fn deliver(response: Response<MockBody>, fault: Option<BodyFault>) -> Response<MockBody> {
    match fault {
        None | Some(BodyFault::Gap(_)) => response,
        Some(BodyFault::Hold { release }) => {
            release.notified().await;
            response
        }
        Some(BodyFault::Cut { .. }) => response.map(|_| MockBody::cut()),
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<MockBody> {
    let mut response = Response::new(MockBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An error response with OpenAI's error body, byte for byte: compact, its
/// fields in OpenAI's order whatever serde_json's features.
fn error_response(
    status: StatusCode,
    message: &str,
    error_type: &str,
    code: Option<&str>,
) -> Response<MockBody> {
    let message = json_string(message);
    let error_type = json_string(error_type);
    let code = code.map_or_else(|| "null".to_owned(), json_string);
    let body = format!(
        r#"{{"error":{{"message":{message},"type":{error_type},"param":null,"code":{code}}}}}"#
    );
    json_response(status, Bytes::from(body))
}

/// What a stream's producer task sends to its body.
enum StreamItem {
    Data(Bytes),
    /// End the body with an error, after what was sent so far has reached the
    /// client.
    Abort,
}

/// The error a deliberately cut body ends with; hyper answers it by closing
/// the connection mid-response.
#[derive(Debug)]
struct Aborted;

impl fmt::Display for Aborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("response deliberately cut short by a mock provider fault")
    }
}

impl std::error::Error for Aborted {}

/// A response body: complete up front, fed frame by frame from a channel, or
/// paced by a timer.
struct MockBody {
    state: BodyState,
}

enum BodyState {
    Full(Option<Bytes>),
    Channel {
        rx: mpsc::Receiver<StreamItem>,
        /// Write each frame to the socket before taking the next (see
        /// `AbortAfterFlush` for how).
        flush_each: bool,
        /// A frame went out and has not been flushed yet.
        unflushed: bool,
    },
    Paced(Paced),
    /// Return `Pending` once before failing. hyper writes frames into a buffer
    /// and flushes it when the body is pending; failing straight away would
    /// drop the frames (and headers) still buffered instead of sending them.
    AbortAfterFlush,
    Abort,
    Done,
}

/// A body sent in frames with a pause before each after the first.
struct Paced {
    frames: VecDeque<Bytes>,
    /// The bytes of `frames`.
    remaining: u64,
    gap: Duration,
    /// The pause under way, before the next frame.
    pause: Option<Pin<Box<Sleep>>>,
}

impl MockBody {
    fn full(bytes: Bytes) -> MockBody {
        MockBody {
            state: BodyState::Full(Some(bytes)),
        }
    }

    fn channel(rx: mpsc::Receiver<StreamItem>, flush_each: bool) -> MockBody {
        MockBody {
            state: BodyState::Channel {
                rx,
                flush_each,
                unflushed: false,
            },
        }
    }

    /// `bytes` in `frames` roughly equal frames, `gap` apart. The exact size
    /// is known, so the response still has a `content-length`.
    fn paced(bytes: Bytes, frames: usize, gap: Duration) -> MockBody {
        let size = bytes.len().div_ceil(frames.max(1)).max(1);
        let frames: VecDeque<Bytes> = (0..bytes.len())
            .step_by(size)
            .map(|start| bytes.slice(start..bytes.len().min(start + size)))
            .collect();
        MockBody {
            state: BodyState::Paced(Paced {
                frames,
                remaining: bytes.len() as u64,
                gap,
                pause: None,
            }),
        }
    }

    /// A body that fails right after the headers have been sent.
    fn cut() -> MockBody {
        MockBody {
            state: BodyState::AbortAfterFlush,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Aborted>>> {
        let this = self.get_mut();
        match &mut this.state {
            BodyState::Full(bytes) => {
                let frame = bytes.take().map(|bytes| Ok(Frame::data(bytes)));
                this.state = BodyState::Done;
                Poll::Ready(frame)
            }
            BodyState::Channel {
                rx,
                flush_each,
                unflushed,
            } => {
                if *unflushed {
                    *unflushed = false;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                match ready!(rx.poll_recv(cx)) {
                    Some(StreamItem::Data(bytes)) => {
                        *unflushed = *flush_each;
                        Poll::Ready(Some(Ok(Frame::data(bytes))))
                    }
                    Some(StreamItem::Abort) => {
                        this.state = BodyState::Abort;
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    None => {
                        this.state = BodyState::Done;
                        Poll::Ready(None)
                    }
                }
            }
            BodyState::Paced(paced) => {
                if let Some(pause) = &mut paced.pause {
                    ready!(pause.as_mut().poll(cx));
                    paced.pause = None;
                }
                match paced.frames.pop_front() {
                    Some(frame) => {
                        paced.remaining = paced.remaining.saturating_sub(frame.len() as u64);
                        if !paced.frames.is_empty() {
                            paced.pause = Some(Box::pin(tokio::time::sleep(paced.gap)));
                        }
                        Poll::Ready(Some(Ok(Frame::data(frame))))
                    }
                    None => {
                        this.state = BodyState::Done;
                        Poll::Ready(None)
                    }
                }
            }
            BodyState::AbortAfterFlush => {
                this.state = BodyState::Abort;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            BodyState::Abort => {
                this.state = BodyState::Done;
                Poll::Ready(Some(Err(Aborted)))
            }
            BodyState::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Full(None) | BodyState::Done => true,
            BodyState::Paced(paced) => paced.frames.is_empty(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            BodyState::Full(None) | BodyState::Done => SizeHint::with_exact(0),
            BodyState::Paced(paced) => SizeHint::with_exact(paced.remaining),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::{poll_fn, Future};

    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use serde_json::{json, Value};

    use super::*;

    type HttpClient = Client<HttpConnector, Full<Bytes>>;

    /// Only a guard against hangs: no assertion depends on timing.
    async fn guard<F: Future>(future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("timed out")
    }

    fn client() -> HttpClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn send(
        client: &HttpClient,
        method: Method,
        url: String,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Response<Incoming> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).expect("request");
        guard(client.request(request)).await.expect("response")
    }

    async fn chat(
        client: &HttpClient,
        mock: &MockProvider,
        key: &str,
        body: Value,
    ) -> Response<Incoming> {
        let url = format!("{}/chat/completions", mock.base_url());
        let auth = format!("Bearer {key}");
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        send(client, Method::POST, url, &headers, body.to_string()).await
    }

    fn stream_request(include_usage: bool) -> Value {
        let mut body = json!({
            "model": "gpt-test",
            "stream": true,
            "messages": [{"role": "user", "content": "hi"}],
        });
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }

    /// Reads the body to its end; the error, if it failed, comes with what
    /// had arrived before.
    async fn read_body(body: &mut Incoming) -> (String, Option<hyper::Error>) {
        let mut text = String::new();
        while let Some(frame) = guard(body.frame()).await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        text.push_str(std::str::from_utf8(&data).expect("utf-8"));
                    }
                }
                Err(e) => return (text, Some(e)),
            }
        }
        (text, None)
    }

    async fn json_body(response: Response<Incoming>) -> Value {
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "body failed: {error:?}");
        serde_json::from_str(&text).expect("JSON body")
    }

    /// The payloads of the SSE events in `text`.
    fn sse_events(text: &str) -> Vec<&str> {
        text.split_terminator("\n\n")
            .map(|event| event.strip_prefix("data: ").expect("data event"))
            .collect()
    }

    /// Checks a complete streamed reply and returns its chunks (`[DONE]`
    /// excluded).
    fn check_stream(text: &str, content: &str, usage: Option<MockUsage>) -> Vec<Value> {
        let events = sse_events(text);
        assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|event| serde_json::from_str(event).expect("JSON chunk"))
            .collect();
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "gpt-test");
            assert_eq!(chunk["id"], chunks[0]["id"]);
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );

        let (usage_chunks, choice_chunks): (Vec<&Value>, Vec<&Value>) = chunks
            .iter()
            .partition(|chunk| chunk["choices"].as_array().is_some_and(Vec::is_empty));
        let streamed: String = choice_chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, content);

        let finish_reasons: Vec<&Value> = choice_chunks
            .iter()
            .map(|chunk| &chunk["choices"][0]["finish_reason"])
            .collect();
        let (last, earlier) = finish_reasons.split_last().expect("chunks");
        assert_eq!(*last, "stop");
        assert!(earlier.iter().all(|reason| reason.is_null()));
        assert_eq!(
            choice_chunks.last().expect("chunks")["choices"][0]["delta"],
            json!({})
        );

        match usage {
            Some(usage) => {
                assert_eq!(usage_chunks.len(), 1, "{text}");
                assert!(std::ptr::eq(
                    usage_chunks[0],
                    chunks.last().expect("chunks")
                ));
                assert_eq!(
                    usage_chunks[0]["usage"],
                    json!({
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens(),
                    })
                );
                assert!(choice_chunks.iter().all(|chunk| chunk["usage"].is_null()));
            }
            None => {
                assert!(usage_chunks.is_empty(), "{text}");
                assert!(
                    chunks.iter().all(|chunk| chunk.get("usage").is_none()),
                    "{text}"
                );
            }
        }
        chunks
    }

    #[test]
    fn words_keep_their_whitespace() {
        assert_eq!(
            split_words("Hello from  the mock."),
            ["Hello", " from", "  the", " mock."]
        );
        assert_eq!(
            split_words("  lead and trail \n"),
            ["  lead", " and", " trail \n"]
        );
        assert_eq!(split_words("   "), ["   "]);
        assert!(split_words("").is_empty());
    }

    #[tokio::test]
    async fn plain_completion_is_an_openai_chat_completion() {
        let mock = MockProvider::start().await;
        let client = client();
        let request = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});

        let response = chat(&client, &mock, "sk-plain", request.clone()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let completion = json_body(response).await;

        assert!(completion["id"]
            .as_str()
            .expect("id")
            .starts_with("chatcmpl-mock-"));
        assert_eq!(completion["object"], "chat.completion");
        assert!(completion["created"].is_u64());
        assert_eq!(completion["model"], "gpt-test");
        let choice = &completion["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], DEFAULT_CONTENT);
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(
            completion["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
        );

        let requests = mock.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].method, "POST");
        assert_eq!(requests[0].path, "/v1/chat/completions");
        assert_eq!(requests[0].key.as_deref(), Some("sk-plain"));
        assert_eq!(requests[0].header("Content-Type"), Some("application/json"));
        assert_eq!(requests[0].json(), request);

        mock.clear_requests();
        assert!(mock.requests().is_empty());
    }

    #[tokio::test]
    async fn set_reply_changes_content_and_usage() {
        let mock = MockProvider::start().await;
        let client = client();
        let content = "  Two  words,\n \"quoted\" ü ";
        let usage = MockUsage {
            prompt_tokens: 3,
            completion_tokens: 4,
        };
        mock.set_reply(content, usage);

        let request = json!({"model": "gpt-test", "messages": []});
        let completion = json_body(chat(&client, &mock, "k", request).await).await;
        assert_eq!(completion["choices"][0]["message"]["content"], content);
        assert_eq!(completion["usage"]["total_tokens"], 7);

        let response = chat(&client, &mock, "k", stream_request(true)).await;
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        check_stream(&text, content, Some(usage));
    }

    #[tokio::test]
    async fn stream_without_usage() {
        let mock = MockProvider::start().await;
        let client = client();
        let response = chat(&client, &mock, "k", stream_request(false)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        let chunks = check_stream(&text, DEFAULT_CONTENT, None);
        // Role chunk, one per word, finish chunk.
        assert_eq!(chunks.len(), 1 + split_words(DEFAULT_CONTENT).len() + 1);
    }

    #[tokio::test]
    async fn stream_with_usage() {
        let mock = MockProvider::start().await;
        let client = client();
        let response = chat(&client, &mock, "k", stream_request(true)).await;
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        check_stream(&text, DEFAULT_CONTENT, Some(DEFAULT_USAGE));
    }

    #[tokio::test]
    async fn rate_limit_fault_is_recorded_with_its_key() {
        let mock = MockProvider::start().await;
        let client = client();
        mock.set_fault(
            "sk-limited",
            Fault::TooManyRequests {
                retry_after_secs: Some(7),
            },
        );
        mock.set_key_headers(
            "sk-limited",
            vec![("x-ratelimit-remaining-tokens".into(), "0".into())],
        );

        let response = chat(&client, &mock, "sk-limited", stream_request(false)).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "7");
        assert_eq!(response.headers()["x-ratelimit-remaining-tokens"], "0");
        let error = json_body(response).await;
        assert_eq!(error["error"]["code"], "rate_limit_exceeded");
        assert!(error["error"]["message"].is_string());
        assert!(error["error"]["param"].is_null());

        // Other keys, given the other ways, are unaffected.
        let url = format!("{}/chat/completions", mock.base_url());
        let body = json!({"model": "m", "messages": []}).to_string();
        let other = send(
            &client,
            Method::POST,
            url.clone(),
            &[("x-api-key", "sk-other")],
            body.clone(),
        )
        .await;
        assert_eq!(other.status(), StatusCode::OK);
        // The window's own count: the default 2,000,000 less this request's
        // 15 tokens.
        assert_eq!(
            other.headers()["x-ratelimit-remaining-tokens"],
            (KeyLimits::default().tokens_per_minute - DEFAULT_USAGE.total_tokens()).to_string()
        );
        let azure = send(&client, Method::POST, url, &[("api-key", "sk-azure")], body).await;
        assert_eq!(azure.status(), StatusCode::OK);

        let keys: Vec<Option<String>> = mock.requests().into_iter().map(|r| r.key).collect();
        assert_eq!(
            keys,
            [
                Some("sk-limited".into()),
                Some("sk-other".into()),
                Some("sk-azure".into())
            ]
        );

        mock.clear_fault("sk-limited");
        let response = chat(&client, &mock, "sk-limited", json!({"model": "m"})).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-ratelimit-remaining-tokens"], "0");
    }

    #[tokio::test]
    async fn status_faults() {
        let mock = MockProvider::start().await;
        let client = client();
        mock.set_fault("sk-bad", Fault::Unauthorized);
        mock.set_fault("sk-down", Fault::ServerError { status: 503 });

        let response = chat(&client, &mock, "sk-bad", json!({"model": "m"})).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            json_body(response).await["error"]["code"],
            "invalid_api_key"
        );

        let response = chat(&client, &mock, "sk-down", json!({"model": "m"})).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json_body(response).await["error"]["type"], "server_error");
    }

    #[tokio::test]
    async fn hold_stream_waits_for_release() {
        let mock = MockProvider::start().await;
        let client = client();
        let release = Arc::new(Notify::new());
        mock.set_fault(
            "sk-held",
            Fault::HoldStream {
                release: Arc::clone(&release),
            },
        );

        let response = chat(&client, &mock, "sk-held", stream_request(false)).await;
        let mut body = response.into_body();
        let mut first = String::new();
        while !first.contains("\n\n") {
            let frame = guard(body.frame())
                .await
                .expect("first event")
                .expect("frame");
            first.push_str(std::str::from_utf8(frame.data_ref().expect("data")).expect("utf-8"));
        }
        let events = sse_events(&first);
        assert_eq!(events.len(), 1, "{first}");
        let role: Value = serde_json::from_str(events[0]).expect("JSON chunk");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");

        // A full round trip to the server gives a wrongly unheld stream time
        // to arrive; then nothing more may be waiting.
        let other = chat(&client, &mock, "sk-other", json!({"model": "m"})).await;
        assert_eq!(other.status(), StatusCode::OK);
        let next = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        assert!(next.is_pending(), "the stream went on before release");

        release.notify_waiters();
        let (rest, error) = read_body(&mut body).await;
        assert!(error.is_none(), "{error:?}");
        check_stream(&(first + &rest), DEFAULT_CONTENT, None);
    }

    #[tokio::test]
    async fn cut_stream_ends_in_an_error() {
        let mock = MockProvider::start().await;
        let client = client();
        mock.set_fault("sk-cut", Fault::CutStreamAfter { chunks: 2 });

        let response = chat(&client, &mock, "sk-cut", stream_request(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_some(), "the body ended cleanly: {text}");
        let events = sse_events(&text);
        assert_eq!(events.len(), 2, "{text}");
        for event in events {
            let chunk: Value = serde_json::from_str(event).expect("JSON chunk");
            assert!(chunk["choices"][0]["finish_reason"].is_null());
        }

        // Not streaming: headers, then the connection drops.
        let response = chat(&client, &mock, "sk-cut", json!({"model": "m"})).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_some(), "the body ended cleanly: {text}");
        assert!(text.is_empty());
    }

    #[tokio::test]
    async fn other_endpoints_and_bad_requests() {
        let mock = MockProvider::start_with(MockOptions {
            record: false,
            ..MockOptions::default()
        })
        .await;
        let client = client();
        let base = mock.base_url();

        let models = send(&client, Method::GET, format!("{base}/models"), &[], "").await;
        assert_eq!(models.status(), StatusCode::OK);
        assert_eq!(
            json_body(models).await,
            json!({"object": "list", "data": [
                {"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}
            ]})
        );

        let missing = send(&client, Method::GET, format!("{base}/nope"), &[], "").await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            json_body(missing).await["error"]["type"],
            "invalid_request_error"
        );

        let url = format!("{base}/chat/completions");
        let invalid = send(&client, Method::POST, url, &[], "{not json").await;
        assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
        let error = json_body(invalid).await;
        // Compare as a set: key order depends on serde_json's `preserve_order` feature.
        let mut keys: Vec<String> = error["error"]
            .as_object()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(keys, ["code", "message", "param", "type"]);
        assert_eq!(error["error"]["type"], "invalid_request_error");

        assert!(mock.requests().is_empty(), "recording was off");
    }

    #[tokio::test]
    async fn slow_fault_still_answers() {
        let mock = MockProvider::start().await;
        let client = client();
        mock.set_fault(
            "sk-slow",
            Fault::Slow {
                delay_ms: 20,
                gap_ms: 0,
            },
        );
        let response = chat(&client, &mock, "sk-slow", stream_request(false)).await;
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        check_stream(&text, DEFAULT_CONTENT, None);
    }

    /// Reads the body to its end frame by frame; the error, if it failed,
    /// comes with the frames that had arrived before.
    async fn read_frames(body: &mut Incoming) -> (Vec<Bytes>, Option<hyper::Error>) {
        let mut frames = Vec::new();
        while let Some(frame) = guard(body.frame()).await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        frames.push(data);
                    }
                }
                Err(e) => return (frames, Some(e)),
            }
        }
        (frames, None)
    }

    fn text_of(frames: &[Bytes]) -> String {
        String::from_utf8(frames.concat()).expect("utf-8")
    }

    /// `text` with every completion id made the same, so that two replies can
    /// be compared byte for byte.
    fn normalize_ids(text: &str) -> String {
        const ID: &str = "chatcmpl-mock-";
        let mut out = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(ID) {
            out.push_str(&rest[..at + ID.len()]);
            out.push('N');
            rest = rest[at + ID.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
        }
        out.push_str(rest);
        out
    }

    /// A whole stream to `key`, asking for usage, as frames; it must end
    /// cleanly.
    async fn stream_frames(client: &HttpClient, mock: &MockProvider, key: &str) -> Vec<Bytes> {
        let response = chat(client, mock, key, stream_request(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
        let (frames, error) = read_frames(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        frames
    }

    /// The stream of OpenAI's shape to compare styled streams with.
    async fn openai_stream(client: &HttpClient, mock: &MockProvider) -> String {
        let text = text_of(&stream_frames(client, mock, "sk-openai-shape").await);
        check_stream(&text, DEFAULT_CONTENT, Some(DEFAULT_USAGE));
        normalize_ids(&text)
    }

    fn header<'a, B>(response: &'a Response<B>, name: &str) -> &'a str {
        response
            .headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .expect("visible ASCII")
    }

    /// The rate-limit headers of `response`, in a fixed order: limit, remaining
    /// and reset, requests before tokens.
    fn rate_headers<B>(response: &Response<B>) -> [&str; 6] {
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
        ]
        .map(|name| header(response, name))
    }

    /// Parses what `go_duration` writes.
    fn parse_go_duration(text: &str) -> Duration {
        if let Some(millis) = text.strip_suffix("ms") {
            return Duration::from_millis(millis.parse().expect("millis"));
        }
        let text = text.strip_suffix('s').expect("ends in s");
        let (minutes, secs) = text.split_once('m').unwrap_or(("0", text));
        let minutes: u64 = minutes.parse().expect("minutes");
        let secs: f64 = secs.parse().expect("seconds");
        Duration::from_secs(minutes * 60) + Duration::from_secs_f64(secs)
    }

    #[test]
    fn durations_are_written_as_go_writes_them() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(999), "0s"),
            (Duration::from_millis(6), "6ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_secs(20), "20s"),
            (Duration::from_millis(59_999), "59.999s"),
            (Duration::from_millis(1_500), "1.5s"),
            (Duration::from_millis(1_050), "1.05s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_millis(90_500), "1m30.5s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_secs(3_600), "1h0m0s"),
            (Duration::from_secs(3_661), "1h1m1s"),
        ];
        for (duration, text) in cases {
            assert_eq!(go_duration(duration), text, "{duration:?}");
        }
    }

    #[tokio::test]
    async fn rate_limit_headers_count_requests_and_tokens_per_key() {
        let mock = MockProvider::start().await;
        let client = client();
        let base = mock.base_url();

        // The key's first request starts its window: a whole minute to go.
        let first = chat(&client, &mock, "sk-a", json!({"model": "m"})).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(
            rate_headers(&first),
            ["10000", "2000000", "9999", "1999985", "1m0s", "1m0s"]
        );

        // A stream is charged the same, and reports before its body.
        let second = chat(&client, &mock, "sk-a", stream_request(true)).await;
        let [_, _, requests, tokens, reset_requests, reset_tokens] = rate_headers(&second);
        assert_eq!([requests, tokens], ["9998", "1999970"]);
        assert_eq!(reset_requests, reset_tokens);
        let reset = parse_go_duration(reset_requests);
        assert!(reset > Duration::ZERO && reset <= RATE_WINDOW, "{reset:?}");
        let (text, error) = read_body(&mut second.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        check_stream(&text, DEFAULT_CONTENT, Some(DEFAULT_USAGE));

        // Other endpoints use a request but no tokens.
        let bearer = [("authorization", "Bearer sk-a")];
        let models = send(&client, Method::GET, format!("{base}/models"), &bearer, "").await;
        assert_eq!(rate_headers(&models)[2..4], ["9997", "1999970"]);
        let missing = send(&client, Method::GET, format!("{base}/nope"), &bearer, "").await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(rate_headers(&missing)[2..4], ["9996", "1999970"]);

        // Error responses carry them too, and each key has its own window.
        mock.set_fault("sk-b", Fault::ServerError { status: 500 });
        let failed = chat(&client, &mock, "sk-b", json!({"model": "m"})).await;
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            rate_headers(&failed)[..4],
            ["10000", "2000000", "9999", "1999985"]
        );

        // The charge follows the reply's usage.
        mock.set_reply(
            "ok",
            MockUsage {
                prompt_tokens: 300,
                completion_tokens: 33,
            },
        );
        let larger = chat(&client, &mock, "sk-a", json!({"model": "m"})).await;
        assert_eq!(rate_headers(&larger)[2..4], ["9995", "1999637"]);

        // No key, no headers.
        let anonymous = send(
            &client,
            Method::POST,
            format!("{base}/chat/completions"),
            &[],
            json!({"model": "m"}).to_string(),
        )
        .await;
        assert_eq!(anonymous.status(), StatusCode::OK);
        assert!(
            !anonymous
                .headers()
                .keys()
                .any(|name| name.as_str().starts_with("x-ratelimit-")),
            "{:?}",
            anonymous.headers()
        );
    }

    #[tokio::test]
    async fn key_limits_bottom_out_at_zero_and_key_headers_win() {
        let mock = MockProvider::start().await;
        let client = client();
        mock.set_key_limits(
            "sk-small",
            KeyLimits {
                requests_per_minute: 2,
                tokens_per_minute: 20,
            },
        );
        let mut seen = Vec::new();
        for _ in 0..3 {
            let response = chat(&client, &mock, "sk-small", json!({"model": "m"})).await;
            // Reported, not enforced.
            assert_eq!(response.status(), StatusCode::OK);
            let [limit_requests, limit_tokens, requests, tokens, ..] = rate_headers(&response);
            assert_eq!([limit_requests, limit_tokens], ["2", "20"]);
            seen.push((requests.to_owned(), tokens.to_owned()));
        }
        let expected = [("1", "5"), ("0", "0"), ("0", "0")].map(|(r, t)| (r.into(), t.into()));
        assert_eq!(seen, expected);

        // New limits keep what the window used.
        mock.set_key_limits(
            "sk-small",
            KeyLimits {
                requests_per_minute: 100,
                tokens_per_minute: 1_000,
            },
        );
        let response = chat(&client, &mock, "sk-small", json!({"model": "m"})).await;
        assert_eq!(rate_headers(&response)[..4], ["100", "1000", "96", "940"]);

        mock.set_key_headers(
            "sk-small",
            vec![
                ("x-ratelimit-remaining-tokens".into(), "42".into()),
                ("x-extra".into(), "yes".into()),
            ],
        );
        let response = chat(&client, &mock, "sk-small", json!({"model": "m"})).await;
        let remaining: Vec<&HeaderValue> = response
            .headers()
            .get_all("x-ratelimit-remaining-tokens")
            .iter()
            .collect();
        assert_eq!(remaining, ["42"]);
        assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "95");
        assert_eq!(header(&response, "x-extra"), "yes");
    }

    #[tokio::test]
    async fn rate_limit_headers_can_be_turned_off() {
        let mock = MockProvider::start_with(MockOptions {
            rate_limit_headers: false,
            ..MockOptions::default()
        })
        .await;
        let client = client();
        let response = chat(&client, &mock, "sk-quiet", json!({"model": "m"})).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response
            .headers()
            .get("x-ratelimit-remaining-requests")
            .is_none());

        // Per-key behaviour still applies.
        mock.set_key_headers("sk-quiet", vec![("x-extra".into(), "yes".into())]);
        mock.set_fault("sk-quiet", Fault::QuotaExhausted);
        let response = chat(&client, &mock, "sk-quiet", json!({"model": "m"})).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&response, "x-extra"), "yes");
        assert!(response
            .headers()
            .get("x-ratelimit-limit-requests")
            .is_none());
    }

    /// The status, the `retry-after` header and the exact body of a 429.
    async fn too_many(
        client: &HttpClient,
        mock: &MockProvider,
        key: &str,
    ) -> (Option<String>, String, String) {
        let response = chat(client, mock, key, stream_request(false)).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .map(|value| value.to_str().expect("ASCII").to_owned());
        let remaining = header(&response, "x-ratelimit-remaining-requests").to_owned();
        let (body, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        (retry_after, remaining, body)
    }

    #[tokio::test]
    async fn rate_limit_errors_in_each_of_openais_forms() {
        let mock = MockProvider::start().await;
        let client = client();
        let rpm = |wait: &str| {
            format!(
                r#"{{"error":{{"message":"Rate limit reached for gpt-4o in organization org-mock on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in {wait}. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"requests","param":null,"code":"rate_limit_exceeded"}}}}"#
            )
        };

        mock.set_fault(
            "sk-rpm",
            Fault::TooManyRequests {
                retry_after_secs: Some(20),
            },
        );
        let (retry_after, remaining, body) = too_many(&client, &mock, "sk-rpm").await;
        assert_eq!(retry_after.as_deref(), Some("20"));
        // The window says 9999; the fault says otherwise.
        assert_eq!(remaining, "0");
        assert_eq!(body, rpm("20s"));

        // Longer waits are written as OpenAI writes durations.
        mock.set_fault(
            "sk-rpm",
            Fault::TooManyRequests {
                retry_after_secs: Some(90),
            },
        );
        let (retry_after, _, body) = too_many(&client, &mock, "sk-rpm").await;
        assert_eq!(retry_after.as_deref(), Some("90"));
        assert_eq!(body, rpm("1m30s"));

        mock.set_fault(
            "sk-rpm",
            Fault::TooManyRequests {
                retry_after_secs: None,
            },
        );
        let (retry_after, remaining, body) = too_many(&client, &mock, "sk-rpm").await;
        assert_eq!(retry_after, None);
        assert_eq!(remaining, "0");
        assert_eq!(body, rpm("1s"));

        mock.set_fault("sk-broke", Fault::QuotaExhausted);
        let (retry_after, remaining, body) = too_many(&client, &mock, "sk-broke").await;
        assert_eq!(retry_after, None);
        assert_eq!(remaining, "9999");
        assert_eq!(
            body,
            r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#
        );

        mock.set_fault(
            "sk-big",
            Fault::RequestTooLarge {
                limit: 30_000,
                requested: 36_512,
            },
        );
        let (retry_after, _, body) = too_many(&client, &mock, "sk-big").await;
        assert_eq!(retry_after, None);
        assert_eq!(
            body,
            r#"{"error":{"message":"Request too large for gpt-4o in organization org-mock on tokens per min (TPM): Limit 30000, Requested 36512. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#
        );
    }

    #[tokio::test]
    async fn html_errors_look_like_a_cdn_page() {
        let mock = MockProvider::start().await;
        let client = client();
        let page = |title: &str| {
            format!(
                "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
            )
        };
        for (status, title) in [
            (502, "502 Bad Gateway"),
            (503, "503 Service Unavailable"),
            (520, "520"),
        ] {
            mock.set_fault("sk-edge", Fault::HtmlError { status });
            let response = chat(&client, &mock, "sk-edge", stream_request(true)).await;
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[CONTENT_TYPE], "text/html");
            assert!(response
                .headers()
                .contains_key("x-ratelimit-remaining-requests"));
            let (body, error) = read_body(&mut response.into_body()).await;
            assert!(error.is_none(), "{error:?}");
            assert_eq!(body, page(title));
        }
    }

    #[tokio::test]
    async fn crlf_streams_are_the_same_stream_with_crlf() {
        let mock = MockProvider::start().await;
        let client = client();
        let openai = openai_stream(&client, &mock).await;
        let style = StreamStyle {
            line_ending: LineEnding::CrLf,
            ..StreamStyle::default()
        };
        mock.set_stream_style("sk-crlf", style);

        let text = text_of(&stream_frames(&client, &mock, "sk-crlf").await);
        assert!(text.ends_with("data: [DONE]\r\n\r\n"), "{text}");
        assert_eq!(text.matches('\n').count(), text.matches("\r\n").count());
        let normalized = text.replace("\r\n", "\n");
        assert_eq!(normalize_ids(&normalized), openai);
        check_stream(&normalized, DEFAULT_CONTENT, Some(DEFAULT_USAGE));

        // Cleared, the key gets OpenAI's shape again.
        mock.clear_stream_style("sk-crlf");
        let text = text_of(&stream_frames(&client, &mock, "sk-crlf").await);
        assert_eq!(normalize_ids(&text), openai);
    }

    #[tokio::test]
    async fn keep_alive_comments_come_before_every_event() {
        let mock = MockProvider::start().await;
        let client = client();
        let openai = openai_stream(&client, &mock).await;
        mock.set_stream_style(
            "sk-ping",
            StreamStyle {
                keep_alive: true,
                ..StreamStyle::default()
            },
        );

        let frames = stream_frames(&client, &mock, "sk-ping").await;
        let text = text_of(&frames);
        let expected: String = openai
            .split_inclusive("\n\n")
            .flat_map(|event| [": keep-alive\n\n", event])
            .collect();
        assert_eq!(normalize_ids(&text), expected);
        // Each comment is an event of its own, so a frame of its own.
        assert!(frames
            .iter()
            .any(|frame| frame[..] == b": keep-alive\n\n"[..]));
    }

    #[tokio::test]
    async fn split_writes_cut_events_across_frames() {
        let mock = MockProvider::start().await;
        let client = client();
        let openai = openai_stream(&client, &mock).await;
        mock.set_stream_style(
            "sk-split",
            StreamStyle {
                writes: Writes::Split { bytes: 7 },
                ..StreamStyle::default()
            },
        );

        let frames = stream_frames(&client, &mock, "sk-split").await;
        assert!(
            frames
                .iter()
                .all(|frame| !frame.is_empty() && frame.len() <= 7),
            "{frames:?}"
        );
        assert_eq!(normalize_ids(&text_of(&frames)), openai);
    }

    #[tokio::test]
    async fn coalesced_writes_put_several_events_in_a_frame() {
        let mock = MockProvider::start().await;
        let client = client();
        let openai = openai_stream(&client, &mock).await;
        mock.set_stream_style(
            "sk-lump",
            StreamStyle {
                writes: Writes::Coalesced,
                ..StreamStyle::default()
            },
        );

        let frames = stream_frames(&client, &mock, "sk-lump").await;
        assert_eq!(normalize_ids(&text_of(&frames)), openai);
        // A frame never holds more than one chunk of the chunked encoding, so
        // fewer frames than events means some frame held several events.
        let events = openai.matches("\n\n").count();
        assert!(frames.len() < events, "{} frames", frames.len());
    }

    #[tokio::test]
    async fn streams_can_end_without_done() {
        let mock = MockProvider::start().await;
        let client = client();
        let openai = openai_stream(&client, &mock).await;
        mock.set_stream_style(
            "sk-nodone",
            StreamStyle {
                done: false,
                ..StreamStyle::default()
            },
        );

        let text = text_of(&stream_frames(&client, &mock, "sk-nodone").await);
        let expected = openai.strip_suffix("data: [DONE]\n\n").expect("[DONE]");
        assert_eq!(normalize_ids(&text), expected);
    }

    #[tokio::test]
    async fn mid_stream_error_events_end_the_stream_cleanly() {
        let mock = MockProvider::start().await;
        let client = client();
        let openai = openai_stream(&client, &mock).await;
        let error_event = "data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";

        mock.set_stream_style(
            "sk-fail",
            StreamStyle {
                error_after: Some(2),
                ..StreamStyle::default()
            },
        );
        let text = text_of(&stream_frames(&client, &mock, "sk-fail").await);
        let first_two: String = openai.split_inclusive("\n\n").take(2).collect();
        assert_eq!(normalize_ids(&text), first_two + error_event);

        // Past the content events: all of them, never the finish chunk.
        mock.set_stream_style(
            "sk-fail",
            StreamStyle {
                error_after: Some(100),
                ..StreamStyle::default()
            },
        );
        let text = text_of(&stream_frames(&client, &mock, "sk-fail").await);
        let content_events = 1 + split_words(DEFAULT_CONTENT).len();
        let content: String = openai
            .split_inclusive("\n\n")
            .take(content_events)
            .collect();
        assert_eq!(normalize_ids(&text), content + error_event);
    }

    #[tokio::test]
    async fn cut_stream_with_a_style_sends_its_events_styled() {
        let mock = MockProvider::start().await;
        let client = client();
        let openai = openai_stream(&client, &mock).await;
        mock.set_stream_style(
            "sk-cut",
            StreamStyle {
                line_ending: LineEnding::CrLf,
                keep_alive: true,
                writes: Writes::Coalesced,
                ..StreamStyle::default()
            },
        );
        mock.set_fault("sk-cut", Fault::CutStreamAfter { chunks: 2 });

        let response = chat(&client, &mock, "sk-cut", stream_request(true)).await;
        let (frames, error) = read_frames(&mut response.into_body()).await;
        assert!(error.is_some(), "the body ended cleanly");
        let expected: String = openai
            .split_inclusive("\n\n")
            .take(2)
            .flat_map(|event| [": keep-alive\n\n", event])
            .collect();
        let text = text_of(&frames).replace("\r\n", "\n");
        assert_eq!(normalize_ids(&text), expected);
    }

    #[tokio::test]
    async fn hold_stream_with_split_writes_holds_after_the_first_event() {
        let mock = MockProvider::start().await;
        let client = client();
        let openai = openai_stream(&client, &mock).await;
        let release = Arc::new(Notify::new());
        mock.set_stream_style(
            "sk-held",
            StreamStyle {
                writes: Writes::Split { bytes: 5 },
                ..StreamStyle::default()
            },
        );
        mock.set_fault(
            "sk-held",
            Fault::HoldStream {
                release: Arc::clone(&release),
            },
        );

        let response = chat(&client, &mock, "sk-held", stream_request(true)).await;
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while !text_of(&frames).contains("\n\n") {
            let frame = guard(body.frame())
                .await
                .expect("first event")
                .expect("frame");
            frames.push(frame.into_data().expect("data"));
        }
        let first_event = openai.split_inclusive("\n\n").next().expect("event");
        assert_eq!(normalize_ids(&text_of(&frames)), first_event);

        let other = chat(&client, &mock, "sk-other", json!({"model": "m"})).await;
        assert_eq!(other.status(), StatusCode::OK);
        let next = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        assert!(next.is_pending(), "the stream went on before release");

        release.notify_waiters();
        let (rest, error) = read_frames(&mut body).await;
        assert!(error.is_none(), "{error:?}");
        frames.extend(rest);
        assert!(frames.iter().all(|frame| frame.len() <= 5), "{frames:?}");
        assert_eq!(normalize_ids(&text_of(&frames)), openai);
    }

    #[tokio::test]
    async fn slow_fault_gaps_events_and_body_frames() {
        const GAP_MS: u64 = 30;
        let mock = MockProvider::start().await;
        let client = client();
        mock.set_fault(
            "sk-slow",
            Fault::Slow {
                delay_ms: 0,
                gap_ms: GAP_MS,
            },
        );

        let started = std::time::Instant::now();
        let response = chat(&client, &mock, "sk-slow", stream_request(false)).await;
        let (text, error) = read_body(&mut response.into_body()).await;
        let elapsed = started.elapsed();
        assert!(error.is_none(), "{error:?}");
        check_stream(&text, DEFAULT_CONTENT, None);
        let events = sse_events(&text).len() as u32;
        let least = Duration::from_millis(GAP_MS) * (events - 1);
        assert!(elapsed >= least, "{elapsed:?} < {least:?}");

        // Not streamed: the completion in 4 frames, a gap before each but the
        // first, and still a content-length.
        let started = std::time::Instant::now();
        let response = chat(&client, &mock, "sk-slow", json!({"model": "gpt-test"})).await;
        let length: usize = header(&response, "content-length").parse().expect("length");
        let (text, error) = read_body(&mut response.into_body()).await;
        let elapsed = started.elapsed();
        assert!(error.is_none(), "{error:?}");
        assert_eq!(text.len(), length);
        let completion: Value = serde_json::from_str(&text).expect("JSON body");
        assert_eq!(
            completion["choices"][0]["message"]["content"],
            DEFAULT_CONTENT
        );
        let least = Duration::from_millis(GAP_MS) * (SLOW_BODY_FRAMES as u32 - 1);
        assert!(elapsed >= least, "{elapsed:?} < {least:?}");
    }

    // Anthropic's Messages API.

    const ANTHROPIC_VERSION: &str = "2023-06-01";

    /// A Messages request from `key`, with Anthropic's headers.
    async fn anthropic(
        client: &HttpClient,
        mock: &MockProvider,
        key: &str,
        body: Value,
    ) -> Response<Incoming> {
        let url = format!("{}/messages", mock.base_url());
        let headers = [
            ("x-api-key", key),
            ("anthropic-version", ANTHROPIC_VERSION),
            ("content-type", "application/json"),
        ];
        send(client, Method::POST, url, &headers, body.to_string()).await
    }

    fn messages_request(stream: bool) -> Value {
        json!({
            "model": "claude-test",
            "max_tokens": 256,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        })
    }

    fn tool_request(stream: bool) -> Value {
        let mut body = messages_request(stream);
        body["tools"] = json!([
            {
                "name": "get_weather",
                "description": "Get the current weather in a given location",
                "input_schema": {
                    "type": "object",
                    "properties": {"location": {"type": "string"}},
                    "required": ["location"],
                },
            },
            {"name": "get_time", "input_schema": {"type": "object"}},
        ]);
        body["messages"] = json!([{"role": "user", "content": "Weather in Paris?"}]);
        body
    }

    /// `text` with the numbers of the mock's ids (`msg_mock_N`,
    /// `toolu_mock_N`, `req_mock_N`) made `N`.
    fn normalize_anthropic_ids(text: &str) -> String {
        let mut out = text.to_owned();
        for prefix in ["msg_mock_", "toolu_mock_", "req_mock_"] {
            let mut normalized = String::new();
            let mut rest = out.as_str();
            while let Some(at) = rest.find(prefix) {
                normalized.push_str(&rest[..at + prefix.len()]);
                normalized.push('N');
                rest = rest[at + prefix.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
            }
            normalized.push_str(rest);
            out = normalized;
        }
        out
    }

    /// The events of an Anthropic stream as (name, data); each event must be
    /// an `event:` line and a `data:` line whose `type` is the name.
    fn anthropic_events(text: &str) -> Vec<(String, Value)> {
        text.split_terminator("\n\n")
            .map(|event| {
                let (name, data) = event.split_once('\n').expect("two lines");
                let name = name.strip_prefix("event: ").expect("event line");
                let data = data.strip_prefix("data: ").expect("data line");
                let data: Value = serde_json::from_str(data).expect("JSON data");
                assert_eq!(data["type"], name, "{event}");
                (name.to_owned(), data)
            })
            .collect()
    }

    /// Folds a whole stream into the message it describes, as Anthropic's
    /// SDKs do, checking the order of its events on the way.
    fn accumulate(events: &[(String, Value)]) -> Value {
        let ((first, start), rest) = events.split_first().expect("events");
        assert_eq!(first, "message_start");
        let mut message = start["message"].clone();
        assert_eq!(message["content"], json!([]));
        assert!(message["stop_reason"].is_null());
        let (last, _) = events.last().expect("events");
        assert_eq!(last, "message_stop");
        let mut partial_json: Vec<String> = Vec::new();
        let mut open: Option<usize> = None;
        for (name, data) in rest {
            let index = data["index"].as_u64().map(|i| i as usize);
            match name.as_str() {
                "ping" | "message_stop" => {}
                "content_block_start" => {
                    assert_eq!(open, None, "a block is still open");
                    let content = message["content"].as_array_mut().expect("content");
                    assert_eq!(index, Some(content.len()));
                    content.push(data["content_block"].clone());
                    partial_json.push(String::new());
                    open = index;
                }
                "content_block_delta" => {
                    assert_eq!(index, open);
                    let index = index.expect("index");
                    let block = &mut message["content"][index];
                    let delta = &data["delta"];
                    match delta["type"].as_str() {
                        Some("text_delta") => {
                            let text = format!(
                                "{}{}",
                                block["text"].as_str().expect("text block"),
                                delta["text"].as_str().expect("text")
                            );
                            block["text"] = Value::from(text);
                        }
                        Some("input_json_delta") => {
                            assert_eq!(block["type"], "tool_use");
                            partial_json[index]
                                .push_str(delta["partial_json"].as_str().expect("partial_json"));
                        }
                        other => panic!("unexpected delta {other:?}"),
                    }
                }
                "content_block_stop" => {
                    assert_eq!(index, open);
                    let index = index.expect("index");
                    let block = &mut message["content"][index];
                    if block["type"] == "tool_use" {
                        assert_eq!(block["input"], json!({}));
                        block["input"] =
                            serde_json::from_str(&partial_json[index]).expect("input JSON");
                    }
                    open = None;
                }
                "message_delta" => {
                    assert_eq!(open, None);
                    message["stop_reason"] = data["delta"]["stop_reason"].clone();
                    message["stop_sequence"] = data["delta"]["stop_sequence"].clone();
                    message["usage"]["output_tokens"] = data["usage"]["output_tokens"].clone();
                }
                other => panic!("unexpected event {other}"),
            }
        }
        message
    }

    /// The whole body of `response`, which must end cleanly.
    async fn text_body(response: Response<Incoming>) -> String {
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        text
    }

    /// The usage object Anthropic sends, as the mock writes it.
    fn usage_json(usage: AnthropicUsage, output_tokens: u64) -> String {
        format!(
            r#"{{"input_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{},"cache_creation":{{"ephemeral_5m_input_tokens":{},"ephemeral_1h_input_tokens":0}},"output_tokens":{output_tokens},"service_tier":"standard"}}"#,
            usage.input_tokens,
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens,
        )
    }

    /// The text stream of [`DEFAULT_CONTENT`] with `usage`, byte for byte
    /// (ids normalized).
    fn expected_text_stream(usage: AnthropicUsage) -> String {
        let mut expected = format!(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_mock_N\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-test\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{}}}}}\n\n",
            usage_json(usage, 1)
        );
        expected.push_str("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
        expected.push_str("event: ping\ndata: {\"type\":\"ping\"}\n\n");
        for word in ["Hello", " from", " the", " mock", " provider."] {
            expected.push_str(&format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{word}\"}}}}\n\n"));
        }
        expected.push_str(
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        );
        expected.push_str(&format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{}}}}}\n\n", usage.output_tokens));
        expected.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        expected
    }

    #[tokio::test]
    async fn anthropic_message_is_a_messages_response() {
        let mock = MockProvider::start().await;
        let client = client();
        let request = messages_request(false);

        let response = anthropic(&client, &mock, "sk-ant-plain", request.clone()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let request_id = header(&response, "request-id").to_owned();
        assert!(request_id.starts_with("req_mock_"), "{request_id}");
        let body = text_body(response).await;
        let expected = format!(
            r#"{{"id":"msg_mock_N","type":"message","role":"assistant","model":"claude-test","content":[{{"type":"text","text":"Hello from the mock provider."}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{}}}"#,
            usage_json(DEFAULT_ANTHROPIC_USAGE, 5)
        );
        assert_eq!(normalize_anthropic_ids(&body), expected);

        // `set_reply`'s text is the text of Anthropic replies too.
        mock.set_reply("Bonjour  à tous", DEFAULT_USAGE);
        let message =
            json_body(anthropic(&client, &mock, "sk-ant-plain", request.clone()).await).await;
        assert_eq!(
            message["content"],
            json!([{"type": "text", "text": "Bonjour  à tous"}])
        );

        let requests = mock.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].path, "/v1/messages");
        assert_eq!(requests[0].key.as_deref(), Some("sk-ant-plain"));
        assert_eq!(requests[0].header("x-api-key"), Some("sk-ant-plain"));
        assert_eq!(
            requests[0].header("anthropic-version"),
            Some(ANTHROPIC_VERSION)
        );
        assert_eq!(requests[0].json(), request);
    }

    #[tokio::test]
    async fn anthropic_stream_is_anthropics_event_sequence() {
        let mock = MockProvider::start().await;
        let client = client();
        let response = anthropic(&client, &mock, "sk-ant", messages_request(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/event-stream; charset=utf-8"
        );
        assert!(header(&response, "request-id").starts_with("req_mock_"));
        let text = text_body(response).await;
        assert_eq!(
            normalize_anthropic_ids(&text),
            expected_text_stream(DEFAULT_ANTHROPIC_USAGE)
        );
        assert!(!text.contains("[DONE]"));

        // Folded, the stream is the non-streamed message.
        let streamed = accumulate(&anthropic_events(&text));
        let message =
            json_body(anthropic(&client, &mock, "sk-ant", messages_request(false)).await).await;
        assert_eq!(
            normalize_anthropic_ids(&streamed.to_string()),
            normalize_anthropic_ids(&message.to_string())
        );
    }

    #[tokio::test]
    async fn anthropic_tool_use_streams_its_input_in_pieces() {
        let mock = MockProvider::start().await;
        let client = client();
        let input = json!({"location": "Zürich, CH", "units": ["celsius"], "days": 3});
        mock.set_tool_input(input.clone());

        let response = anthropic(&client, &mock, "sk-ant", tool_request(true)).await;
        let text = text_body(response).await;
        let events = anthropic_events(&text);
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        let pieces: Vec<&str> = events
            .iter()
            .filter(|(_, data)| data["delta"]["type"] == "input_json_delta")
            .map(|(_, data)| {
                data["delta"]["partial_json"]
                    .as_str()
                    .expect("partial_json")
            })
            .collect();
        let mut expected_names = vec!["message_start", "content_block_start", "ping"];
        expected_names.extend(["content_block_delta"; 3]); // "Let", " me", " check."
        expected_names.extend(["content_block_stop", "content_block_start"]);
        expected_names.extend(vec!["content_block_delta"; pieces.len()]);
        expected_names.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, expected_names);

        // As Anthropic does: an empty first piece, then pieces of a few bytes
        // that join into the input.
        assert_eq!(pieces[0], "");
        assert!(pieces.len() > 3, "{pieces:?}");
        assert!(
            pieces[1..]
                .iter()
                .all(|piece| !piece.is_empty() && piece.len() <= 6),
            "{pieces:?}"
        );
        assert_eq!(pieces.concat(), input.to_string());

        let tool_start = &events[7].1;
        assert_eq!(tool_start["index"], 1);
        let id = tool_start["content_block"]["id"].as_str().expect("id");
        assert!(id.starts_with("toolu_mock_"), "{id}");
        assert_eq!(
            tool_start["content_block"],
            json!({"type": "tool_use", "id": id, "name": "get_weather", "input": {}})
        );

        let message = accumulate(&events);
        assert_eq!(message["stop_reason"], "tool_use");
        assert_eq!(message["stop_sequence"], Value::Null);
        assert_eq!(
            message["content"],
            json!([
                {"type": "text", "text": TOOL_USE_PREAMBLE},
                {"type": "tool_use", "id": id, "name": "get_weather", "input": input},
            ])
        );
        assert_eq!(message["usage"]["output_tokens"], 5);

        // The same message, not streamed.
        let plain = json_body(anthropic(&client, &mock, "sk-ant", tool_request(false)).await).await;
        assert_eq!(
            normalize_anthropic_ids(&plain.to_string()),
            normalize_anthropic_ids(&message.to_string())
        );
    }

    #[tokio::test]
    async fn anthropic_tool_use_follows_the_conversation() {
        let mock = MockProvider::start().await;
        let client = client();
        let ask = |body: Value| {
            let client = client.clone();
            let mock = &mock;
            async move { json_body(anthropic(&client, mock, "sk-ant", body).await).await }
        };
        let kinds = |message: &Value| -> Vec<String> {
            message["content"]
                .as_array()
                .expect("content")
                .iter()
                .map(|block| block["type"].as_str().expect("type").to_owned())
                .collect()
        };

        // A question with tools: a sentence, then a call of the first tool.
        let message = ask(tool_request(false)).await;
        assert_eq!(kinds(&message), ["text", "tool_use"]);
        assert_eq!(message["content"][0]["text"], TOOL_USE_PREAMBLE);
        assert_eq!(message["content"][1]["name"], "get_weather");
        assert_eq!(message["content"][1]["input"], json!({"location": "Paris"}));
        assert_eq!(message["stop_reason"], "tool_use");
        let call_id = message["content"][1]["id"].as_str().expect("id").to_owned();

        // The tool's result: the answer is text.
        let mut answered = tool_request(false);
        answered["messages"] = json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": message["content"].clone()},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call_id, "content": "18°C, sunny"},
            ]},
        ]);
        let message = ask(answered).await;
        assert_eq!(kinds(&message), ["text"]);
        assert_eq!(message["content"][0]["text"], DEFAULT_CONTENT);
        assert_eq!(message["stop_reason"], "end_turn");

        // A user turn of blocks without a result still calls.
        let mut blocks = tool_request(false);
        blocks["messages"] =
            json!([{"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]);
        assert_eq!(kinds(&ask(blocks).await), ["text", "tool_use"]);

        // `tool_choice`: `none` never calls; `any` calls without a sentence;
        // `tool` calls the tool it names.
        let mut none = tool_request(false);
        none["tool_choice"] = json!({"type": "none"});
        assert_eq!(kinds(&ask(none).await), ["text"]);
        let mut any = tool_request(false);
        any["tool_choice"] = json!({"type": "any"});
        let message = ask(any).await;
        assert_eq!(kinds(&message), ["tool_use"]);
        assert_eq!(message["content"][0]["name"], "get_weather");
        let mut named = tool_request(false);
        named["tool_choice"] = json!({"type": "tool", "name": "get_time"});
        let message = ask(named).await;
        assert_eq!(kinds(&message), ["tool_use"]);
        assert_eq!(message["content"][0]["name"], "get_time");

        // No tools, or an assistant turn last (a prefill): text.
        assert_eq!(kinds(&ask(messages_request(false)).await), ["text"]);
        let mut prefill = tool_request(false);
        prefill["messages"] = json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "The weather"},
        ]);
        assert_eq!(kinds(&ask(prefill).await), ["text"]);
    }

    #[tokio::test]
    async fn forced_tool_use_streams_only_the_call() {
        let mock = MockProvider::start().await;
        let client = client();
        let mut request = tool_request(true);
        request["tool_choice"] = json!({"type": "any"});
        let text = text_body(anthropic(&client, &mock, "sk-ant", request).await).await;
        let events = anthropic_events(&text);
        let names: Vec<&str> = events
            .iter()
            .take(4)
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta"
            ]
        );
        assert_eq!(events[1].1["index"], 0);
        assert_eq!(events[1].1["content_block"]["type"], "tool_use");
        let message = accumulate(&events);
        assert_eq!(message["content"][0]["input"], json!({"location": "Paris"}));
        assert_eq!(message["content"].as_array().map(Vec::len), Some(1));
    }

    #[tokio::test]
    async fn anthropic_usage_reports_the_cache() {
        let mock = MockProvider::start().await;
        let client = client();
        let usage = AnthropicUsage {
            input_tokens: 3,
            output_tokens: 7,
            cache_creation_input_tokens: 1_200,
            cache_read_input_tokens: 4_800,
        };
        mock.set_anthropic_usage(usage);

        let message =
            json_body(anthropic(&client, &mock, "sk-ant", messages_request(false)).await).await;
        assert_eq!(
            message["usage"],
            json!({
                "input_tokens": 3,
                "cache_creation_input_tokens": 1_200,
                "cache_read_input_tokens": 4_800,
                "cache_creation": {"ephemeral_5m_input_tokens": 1_200, "ephemeral_1h_input_tokens": 0},
                "output_tokens": 7,
                "service_tier": "standard",
            })
        );

        let text =
            text_body(anthropic(&client, &mock, "sk-ant", messages_request(true)).await).await;
        assert_eq!(normalize_anthropic_ids(&text), expected_text_stream(usage));
        let events = anthropic_events(&text);
        assert_eq!(
            events[0].1["message"]["usage"]["cache_read_input_tokens"],
            4_800
        );
        assert_eq!(events[0].1["message"]["usage"]["output_tokens"], 1);
        let delta = &events[events.len() - 2].1;
        assert_eq!(delta["usage"], json!({"output_tokens": 7}));
    }

    #[tokio::test]
    async fn anthropic_requires_its_headers_and_fields() {
        let mock = MockProvider::start().await;
        let client = client();
        let url = format!("{}/messages", mock.base_url());
        let body = messages_request(false).to_string();

        /// The status, and the body with its request id checked against the
        /// `request-id` header and normalized.
        async fn refusal(response: Response<Incoming>) -> (StatusCode, String) {
            let status = response.status();
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            let request_id = header(&response, "request-id").to_owned();
            let body = text_body(response).await;
            assert!(
                body.contains(&format!(r#""request_id":"{request_id}""#)),
                "{body}"
            );
            (status, normalize_anthropic_ids(&body))
        }
        let error = |error_type: &str, message: &str| {
            format!(
                r#"{{"type":"error","error":{{"type":"{error_type}","message":"{message}"}},"request_id":"req_mock_N"}}"#
            )
        };

        let no_version = send(
            &client,
            Method::POST,
            url.clone(),
            &[("x-api-key", "sk-ant")],
            body.clone(),
        )
        .await;
        assert_eq!(
            refusal(no_version).await,
            (
                StatusCode::BAD_REQUEST,
                error(
                    "invalid_request_error",
                    "anthropic-version: header is required"
                )
            )
        );

        let no_key = send(
            &client,
            Method::POST,
            url.clone(),
            &[("anthropic-version", ANTHROPIC_VERSION)],
            body.clone(),
        )
        .await;
        assert_eq!(
            refusal(no_key).await,
            (
                StatusCode::UNAUTHORIZED,
                error("authentication_error", "x-api-key header is required")
            )
        );

        // A bearer token is taken as the key, as the mock does everywhere.
        let bearer = send(
            &client,
            Method::POST,
            url.clone(),
            &[
                ("authorization", "Bearer sk-ant-bearer"),
                ("anthropic-version", ANTHROPIC_VERSION),
            ],
            body,
        )
        .await;
        assert_eq!(bearer.status(), StatusCode::OK);

        for field in ["model", "max_tokens", "messages"] {
            let mut request = messages_request(false);
            request.as_object_mut().expect("object").remove(field);
            let response = anthropic(&client, &mock, "sk-ant", request).await;
            let message = format!("{field}: Field required");
            assert_eq!(
                refusal(response).await,
                (
                    StatusCode::BAD_REQUEST,
                    error("invalid_request_error", &message)
                )
            );
        }

        let headers = [
            ("x-api-key", "sk-ant"),
            ("anthropic-version", ANTHROPIC_VERSION),
        ];
        let invalid = send(&client, Method::POST, url.clone(), &headers, "{not json").await;
        let (status, body) = refusal(invalid).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let error_body: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(error_body["error"]["type"], "invalid_request_error");
        assert!(
            error_body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("The request body is not valid JSON: ")),
            "{body}"
        );

        for (method, path) in [(Method::GET, "/messages"), (Method::POST, "/messages/nope")] {
            let url = format!("{}{path}", mock.base_url());
            let missing = send(&client, method, url, &headers, "").await;
            assert_eq!(
                refusal(missing).await,
                (StatusCode::NOT_FOUND, error("not_found_error", "Not Found"))
            );
        }
    }

    #[tokio::test]
    async fn count_tokens_estimates_the_prompt() {
        let mock = MockProvider::start().await;
        let client = client();
        let url = format!("{}/messages/count_tokens", mock.base_url());
        let headers = [
            ("x-api-key", "sk-ant"),
            ("anthropic-version", ANTHROPIC_VERSION),
        ];
        let request = json!({
            "model": "claude-test",
            "system": "You are terse.",
            "messages": [{"role": "user", "content": "How many tokens is this?"}],
        });
        let response = send(
            &client,
            Method::POST,
            url.clone(),
            &headers,
            request.to_string(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(header(&response, "request-id").starts_with("req_mock_"));
        // (16 bytes of system + 54 of messages) / 4.
        assert_eq!(text_body(response).await, r#"{"input_tokens":17}"#);

        let tiny = json!({"model": "m", "messages": []});
        let response = send(
            &client,
            Method::POST,
            url.clone(),
            &headers,
            tiny.to_string(),
        )
        .await;
        assert_eq!(json_body(response).await, json!({"input_tokens": 1}));

        let no_messages = json!({"model": "m"});
        let response = send(
            &client,
            Method::POST,
            url.clone(),
            &headers,
            no_messages.to_string(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            json_body(response).await["error"]["message"],
            "messages: Field required"
        );

        let response = send(
            &client,
            Method::POST,
            url,
            &[("x-api-key", "sk-ant")],
            request.to_string(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            json_body(response).await["error"]["message"],
            "anthropic-version: header is required"
        );
        assert_eq!(mock.requests()[0].path, "/v1/messages/count_tokens");
    }

    #[tokio::test]
    async fn anthropic_faults_take_anthropics_shapes() {
        let mock = MockProvider::start().await;
        let client = client();
        /// Status, `retry-after`, `request-id` and body (ids normalized).
        async fn fault(
            client: &HttpClient,
            mock: &MockProvider,
            key: &str,
        ) -> (u16, Option<String>, Option<String>, String) {
            let response = anthropic(client, mock, key, messages_request(true)).await;
            let status = response.status().as_u16();
            let get = |name| {
                response
                    .headers()
                    .get(name)
                    .map(|value: &HeaderValue| value.to_str().expect("ASCII").to_owned())
            };
            let (retry_after, request_id) = (get("retry-after"), get("request-id"));
            let body = text_body(response).await;
            let request_id = request_id.map(|id| normalize_anthropic_ids(&id));
            (
                status,
                retry_after,
                request_id,
                normalize_anthropic_ids(&body),
            )
        }
        let error = |error_type: &str, message: &str| {
            format!(
                r#"{{"type":"error","error":{{"type":"{error_type}","message":"{message}"}},"request_id":"req_mock_N"}}"#
            )
        };
        let id = Some("req_mock_N".to_owned());

        mock.set_fault(
            "sk-rate",
            Fault::TooManyRequests {
                retry_after_secs: Some(12),
            },
        );
        let response = anthropic(&client, &mock, "sk-rate", messages_request(false)).await;
        // The fault's own header wins over the window's.
        assert_eq!(
            header(&response, "anthropic-ratelimit-requests-remaining"),
            "0"
        );
        drop(response);
        let rate_limited = "This request would exceed the rate limit for your organization (00000000-0000-4000-8000-000000000000) of 50 requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.";
        assert_eq!(
            fault(&client, &mock, "sk-rate").await,
            (
                429,
                Some("12".into()),
                id.clone(),
                error("rate_limit_error", rate_limited)
            )
        );
        mock.set_fault(
            "sk-rate",
            Fault::TooManyRequests {
                retry_after_secs: None,
            },
        );
        assert_eq!(fault(&client, &mock, "sk-rate").await.1, None);

        let cases = [
            (Fault::Unauthorized, 401, error("authentication_error", "invalid x-api-key")),
            (
                Fault::QuotaExhausted,
                400,
                error(
                    "invalid_request_error",
                    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
                ),
            ),
            (Fault::ServerError { status: 500 }, 500, error("api_error", "Internal server error")),
            (Fault::ServerError { status: 503 }, 503, error("api_error", "Internal server error")),
            (Fault::ServerError { status: 529 }, 529, error("overloaded_error", "Overloaded")),
            (Fault::Overloaded, 529, error("overloaded_error", "Overloaded")),
        ];
        for (case, status, body) in cases {
            mock.set_fault("sk-fault", case.clone());
            assert_eq!(
                fault(&client, &mock, "sk-fault").await,
                (status, None, id.clone(), body),
                "{case:?}"
            );
        }

        // Cloudflare's 413 has no request id in its body.
        mock.set_fault(
            "sk-fault",
            Fault::RequestTooLarge {
                limit: 1,
                requested: 2,
            },
        );
        assert_eq!(
            fault(&client, &mock, "sk-fault").await,
            (
                413,
                None,
                id.clone(),
                r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum allowed number of bytes."}}"#.to_owned()
            )
        );

        mock.set_fault("sk-fault", Fault::HtmlError { status: 502 });
        let response = anthropic(&client, &mock, "sk-fault", messages_request(false)).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/html");
        assert!(text_body(response).await.contains("cloudflare"));

        // Faults come first, as on the OpenAI side: even a request Anthropic
        // would refuse for its headers gets the fault.
        mock.set_fault("sk-fault", Fault::Overloaded);
        let url = format!("{}/messages", mock.base_url());
        let bare = send(&client, Method::POST, url, &[("x-api-key", "sk-fault")], "").await;
        assert_eq!(bare.status().as_u16(), 529);

        // The OpenAI side's Overloaded.
        let response = chat(&client, &mock, "sk-fault", json!({"model": "m"})).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            text_body(response).await,
            r#"{"error":{"message":"The engine is currently overloaded, please try again later.","type":"server_error","param":null,"code":null}}"#
        );
    }

    /// The `anthropic-ratelimit-*` headers of `response`: limit, remaining
    /// and reset of requests, tokens, input tokens and output tokens.
    fn anthropic_rate_headers<B>(response: &Response<B>) -> Vec<[&str; 3]> {
        ["requests", "tokens", "input-tokens", "output-tokens"]
            .into_iter()
            .map(|group| {
                ["limit", "remaining", "reset"]
                    .map(|field| header(response, &format!("anthropic-ratelimit-{group}-{field}")))
            })
            .collect()
    }

    #[tokio::test]
    async fn anthropic_rate_limit_headers_report_the_keys_window() {
        let mock = MockProvider::start().await;
        let client = client();
        mock.set_key_limits(
            "sk-ant",
            KeyLimits {
                requests_per_minute: 100,
                tokens_per_minute: 10_000,
            },
        );
        // Input 1,500 plus 500 written to the cache; reads are free.
        mock.set_anthropic_usage(AnthropicUsage {
            input_tokens: 1_500,
            output_tokens: 400,
            cache_creation_input_tokens: 500,
            cache_read_input_tokens: 9_999,
        });

        let before = rfc3339(SystemTime::now());
        let first = anthropic(&client, &mock, "sk-ant", messages_request(false)).await;
        let after = rfc3339(SystemTime::now() + RATE_WINDOW);
        let headers = anthropic_rate_headers(&first);
        let counts: Vec<[&str; 2]> = headers
            .iter()
            .map(|[limit, left, _]| [*limit, *left])
            .collect();
        // Input: 8,000 less 2,000; output: 2,000 less 400, to the nearest
        // thousand; tokens: 10,000 less 2,400, likewise.
        assert_eq!(
            counts,
            [
                ["100", "99"],
                ["10000", "8000"],
                ["8000", "6000"],
                ["2000", "2000"]
            ]
        );
        // One window, one reset: an RFC 3339 time within the minute ahead.
        let reset = headers[0][2];
        assert!(
            headers.iter().all(|[_, _, other]| *other == reset),
            "{headers:?}"
        );
        assert_eq!(reset.len(), "2025-02-24T22:25:32Z".len(), "{reset}");
        assert!(
            reset.ends_with('Z') && reset.as_bytes()[10] == b'T',
            "{reset}"
        );
        assert!(
            before.as_str() <= reset && reset <= after.as_str(),
            "{before} {reset} {after}"
        );
        assert!(first
            .headers()
            .keys()
            .all(|name| !name.as_str().starts_with("x-ratelimit-")));

        let second = anthropic(&client, &mock, "sk-ant", messages_request(true)).await;
        let counts: Vec<[&str; 2]> = anthropic_rate_headers(&second)
            .iter()
            .map(|[limit, left, _]| [*limit, *left])
            .collect();
        assert_eq!(
            counts,
            [
                ["100", "98"],
                ["10000", "5000"],
                ["8000", "4000"],
                ["2000", "1000"]
            ]
        );
        text_body(second).await;

        // Counting tokens uses a request and no tokens; the OpenAI side shares
        // the window.
        let url = format!("{}/messages/count_tokens", mock.base_url());
        let headers = [
            ("x-api-key", "sk-ant"),
            ("anthropic-version", ANTHROPIC_VERSION),
        ];
        let body = json!({"model": "m", "messages": []}).to_string();
        let counted = send(&client, Method::POST, url, &headers, body).await;
        assert_eq!(anthropic_rate_headers(&counted)[0][1], "97");
        assert_eq!(anthropic_rate_headers(&counted)[1][1], "5000");
        let chat = chat(&client, &mock, "sk-ant", json!({"model": "m"})).await;
        // 10,000 less 4,800 of Anthropic's and 15 of this completion.
        assert_eq!(rate_headers(&chat)[2..4], ["96", "5185"]);
    }

    #[test]
    fn reset_times_are_rfc_3339() {
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        let cases = [
            (at(0), "1970-01-01T00:00:00Z"),
            (at(1_700_000_000), "2023-11-14T22:13:20Z"),
            (at(951_782_400), "2000-02-29T00:00:00Z"),
            (at(1_709_251_199), "2024-02-29T23:59:59Z"),
            (at(4_107_542_400), "2100-03-01T00:00:00Z"),
            (at(253_402_300_799), "9999-12-31T23:59:59Z"),
            // Rounded up to the second.
            (
                at(1_700_000_000) + Duration::from_nanos(1),
                "2023-11-14T22:13:21Z",
            ),
        ];
        for (time, text) in cases {
            assert_eq!(rfc3339(time), text);
        }
    }

    #[test]
    fn remaining_tokens_round_to_the_nearest_thousand() {
        let cases = [
            (0, 0),
            (499, 0),
            (500, 1_000),
            (1_499, 1_000),
            (7_600, 8_000),
            (u64::MAX, u64::MAX / 1000 * 1000),
        ];
        for (n, rounded) in cases {
            assert_eq!(nearest_thousand(n), rounded, "{n}");
        }
    }

    #[test]
    fn input_json_is_cut_at_character_boundaries() {
        assert_eq!(
            split_at_most(r#"{"a":"bcd"}"#, 4),
            [r#"{"a""#, r#":"bc"#, r#"d"}"#]
        );
        // "é" is two bytes, "€" three: never cut, even past the size.
        assert_eq!(split_at_most("aéb€c", 2), ["a", "é", "b", "€", "c"]);
        assert_eq!(split_at_most("€", 1), ["€"]);
        assert!(split_at_most("", 6).is_empty());
    }

    /// A whole Anthropic stream to `key`, as frames; it must end cleanly.
    async fn anthropic_frames(client: &HttpClient, mock: &MockProvider, key: &str) -> Vec<Bytes> {
        let response = anthropic(client, mock, key, tool_request(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (frames, error) = read_frames(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        frames
    }

    #[tokio::test]
    async fn stream_styles_shape_anthropic_streams() {
        let mock = MockProvider::start().await;
        let client = client();
        let plain = normalize_anthropic_ids(&text_of(
            &anthropic_frames(&client, &mock, "sk-plain").await,
        ));
        accumulate(&anthropic_events(&plain));

        mock.set_stream_style(
            "sk-crlf",
            StreamStyle {
                line_ending: LineEnding::CrLf,
                ..StreamStyle::default()
            },
        );
        let text = text_of(&anthropic_frames(&client, &mock, "sk-crlf").await);
        assert_eq!(text.matches('\n').count(), text.matches("\r\n").count());
        assert_eq!(normalize_anthropic_ids(&text.replace("\r\n", "\n")), plain);

        mock.set_stream_style(
            "sk-ping",
            StreamStyle {
                keep_alive: true,
                ..StreamStyle::default()
            },
        );
        let text = text_of(&anthropic_frames(&client, &mock, "sk-ping").await);
        let expected: String = plain
            .split_inclusive("\n\n")
            .flat_map(|event| [": keep-alive\n\n", event])
            .collect();
        assert_eq!(normalize_anthropic_ids(&text), expected);

        mock.set_stream_style(
            "sk-split",
            StreamStyle {
                writes: Writes::Split { bytes: 7 },
                ..StreamStyle::default()
            },
        );
        let frames = anthropic_frames(&client, &mock, "sk-split").await;
        assert!(frames
            .iter()
            .all(|frame| !frame.is_empty() && frame.len() <= 7));
        assert_eq!(normalize_anthropic_ids(&text_of(&frames)), plain);

        mock.set_stream_style(
            "sk-lump",
            StreamStyle {
                writes: Writes::Coalesced,
                // Not Anthropic's: ignored.
                done: false,
                ..StreamStyle::default()
            },
        );
        let frames = anthropic_frames(&client, &mock, "sk-lump").await;
        assert_eq!(normalize_anthropic_ids(&text_of(&frames)), plain);
        assert!(frames.len() < plain.matches("\n\n").count());

        // An error event after three events, then a clean end.
        mock.set_stream_style(
            "sk-fail",
            StreamStyle {
                error_after: Some(3),
                ..StreamStyle::default()
            },
        );
        let text = text_of(&anthropic_frames(&client, &mock, "sk-fail").await);
        let first_three: String = plain.split_inclusive("\n\n").take(3).collect();
        let error_event = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        assert_eq!(normalize_anthropic_ids(&text), first_three + error_event);

        // Past the blocks: all their events, never message_delta.
        mock.set_stream_style(
            "sk-fail",
            StreamStyle {
                error_after: Some(1_000),
                ..StreamStyle::default()
            },
        );
        let text = text_of(&anthropic_frames(&client, &mock, "sk-fail").await);
        let events: Vec<&str> = plain.split_inclusive("\n\n").collect();
        let blocks = events[..events.len() - 2].concat();
        assert!(events[events.len() - 2].starts_with("event: message_delta\n"));
        assert_eq!(normalize_anthropic_ids(&text), blocks + error_event);
    }

    #[tokio::test]
    async fn stream_faults_apply_to_anthropic_streams() {
        let mock = MockProvider::start().await;
        let client = client();
        let plain = normalize_anthropic_ids(&text_of(
            &anthropic_frames(&client, &mock, "sk-plain").await,
        ));

        mock.set_fault("sk-cut", Fault::CutStreamAfter { chunks: 4 });
        let response = anthropic(&client, &mock, "sk-cut", tool_request(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (frames, error) = read_frames(&mut response.into_body()).await;
        assert!(error.is_some(), "the body ended cleanly");
        let first_four: String = plain.split_inclusive("\n\n").take(4).collect();
        assert_eq!(normalize_anthropic_ids(&text_of(&frames)), first_four);

        // Not streamed: headers, then the connection drops.
        let response = anthropic(&client, &mock, "sk-cut", tool_request(false)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_some() && text.is_empty(), "{text}");

        let release = Arc::new(Notify::new());
        mock.set_fault(
            "sk-held",
            Fault::HoldStream {
                release: Arc::clone(&release),
            },
        );
        let response = anthropic(&client, &mock, "sk-held", tool_request(true)).await;
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while !text_of(&frames).contains("\n\n") {
            let frame = guard(body.frame())
                .await
                .expect("first event")
                .expect("frame");
            frames.push(frame.into_data().expect("data"));
        }
        let first = plain.split_inclusive("\n\n").next().expect("event");
        assert!(first.starts_with("event: message_start\n"));
        assert_eq!(normalize_anthropic_ids(&text_of(&frames)), first);
        let other = chat(&client, &mock, "sk-other", json!({"model": "m"})).await;
        assert_eq!(other.status(), StatusCode::OK);
        let next = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        assert!(next.is_pending(), "the stream went on before release");
        release.notify_waiters();
        let (rest, error) = read_frames(&mut body).await;
        assert!(error.is_none(), "{error:?}");
        frames.extend(rest);
        assert_eq!(normalize_anthropic_ids(&text_of(&frames)), plain);

        // Slow: the same stream, and the same message in several frames with a
        // content-length.
        mock.set_fault(
            "sk-slow",
            Fault::Slow {
                delay_ms: 0,
                gap_ms: 1,
            },
        );
        let text = text_of(&anthropic_frames(&client, &mock, "sk-slow").await);
        assert_eq!(normalize_anthropic_ids(&text), plain);
        let response = anthropic(&client, &mock, "sk-slow", tool_request(false)).await;
        let length: usize = header(&response, "content-length").parse().expect("length");
        let (frames, error) = read_frames(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(text_of(&frames).len(), length);
        let message: Value = serde_json::from_str(&text_of(&frames)).expect("JSON");
        assert_eq!(message["stop_reason"], "tool_use");
    }

    /// A chat completion request with two functions (and a tool of another
    /// type first), its last message a question.
    fn function_request(stream: bool) -> Value {
        let mut body = stream_request(true);
        body["stream"] = json!(stream);
        if !stream {
            body.as_object_mut()
                .expect("object")
                .remove("stream_options");
        }
        body["tools"] = json!([
            {"type": "custom", "custom": {"name": "grammar_tool"}},
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Get the current weather in a given location",
                    "parameters": {
                        "type": "object",
                        "properties": {"location": {"type": "string"}},
                        "required": ["location"],
                    },
                },
            },
            {"type": "function", "function": {"name": "get_time", "parameters": {}}},
        ]);
        body["messages"] = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
        ]);
        body
    }

    /// The one tool call of a completion's message.
    fn only_tool_call(completion: &Value) -> &Value {
        let calls = completion["choices"][0]["message"]["tool_calls"]
            .as_array()
            .expect("tool_calls");
        assert_eq!(calls.len(), 1, "{completion}");
        &calls[0]
    }

    #[tokio::test]
    async fn openai_tool_call_carries_the_input_as_arguments() {
        let mock = MockProvider::start().await;
        let client = client();
        let input = json!({"location": "Zürich, CH", "units": ["celsius"], "days": 3});
        mock.set_tool_input(input.clone());

        let completion = json_body(chat(&client, &mock, "k", function_request(false)).await).await;
        assert_eq!(completion["object"], "chat.completion");
        assert_eq!(completion["model"], "gpt-test");
        let choice = &completion["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        let message = &choice["message"];
        assert_eq!(message["role"], "assistant");
        assert_eq!(message["content"], Value::Null);
        assert!(message
            .as_object()
            .expect("message")
            .contains_key("content"));
        let call = only_tool_call(&completion);
        let id = call["id"].as_str().expect("id");
        assert!(id.starts_with("call_mock_"), "{id}");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        let arguments = call["function"]["arguments"].as_str().expect("string");
        assert_eq!(arguments, input.to_string());
        assert_eq!(
            completion["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
        );
    }

    #[tokio::test]
    async fn openai_tool_call_streams_its_arguments_in_pieces() {
        let mock = MockProvider::start().await;
        let client = client();
        let input = json!({"location": "Zürich, CH", "note": "€ and \"quotes\"", "days": 3});
        mock.set_tool_input(input.clone());

        let response = chat(&client, &mock, "k", function_request(true)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
        let text = text_body(response).await;
        let events = sse_events(&text);
        assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|event| serde_json::from_str(event).expect("JSON chunk"))
            .collect();
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], chunks[0]["id"]);
        }

        // The role chunk names the call, with empty arguments.
        let first = &chunks[0]["choices"][0];
        let id = first["delta"]["tool_calls"][0]["id"]
            .as_str()
            .expect("id")
            .to_owned();
        assert!(id.starts_with("call_mock_"), "{id}");
        assert_eq!(
            first["delta"],
            json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "index": 0,
                    "id": id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }],
            })
        );
        assert!(first["finish_reason"].is_null());

        // Then the arguments in pieces of a few bytes, then the finish chunk,
        // then the usage chunk.
        let (usage, rest) = chunks.split_last().expect("chunks");
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 15);
        let (finish, pieces) = rest[1..].split_last().expect("chunks");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        let pieces: Vec<&str> = pieces
            .iter()
            .map(|chunk| {
                let choice = &chunk["choices"][0];
                assert!(choice["finish_reason"].is_null());
                assert!(chunk["usage"].is_null());
                let delta = choice["delta"].as_object().expect("delta");
                assert_eq!(delta.keys().collect::<Vec<_>>(), ["tool_calls"]);
                let call = &choice["delta"]["tool_calls"][0];
                assert_eq!(call.as_object().map(|call| call.len()), Some(2), "{call}");
                assert_eq!(call["index"], 0);
                call["function"]["arguments"].as_str().expect("arguments")
            })
            .collect();
        assert!(pieces.len() > 3, "{pieces:?}");
        assert!(
            pieces
                .iter()
                .all(|piece| !piece.is_empty() && piece.len() <= INPUT_JSON_PIECE),
            "{pieces:?}"
        );
        let arguments = pieces.concat();
        assert_eq!(arguments, input.to_string());
        let parsed: Value = serde_json::from_str(&arguments).expect("JSON arguments");
        assert_eq!(parsed, input);

        // The same call, not streamed.
        let completion = json_body(chat(&client, &mock, "k", function_request(false)).await).await;
        let call = only_tool_call(&completion);
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], arguments.as_str());
    }

    #[tokio::test]
    async fn openai_tool_calls_follow_the_conversation() {
        let mock = MockProvider::start().await;
        let client = client();
        let ask = |body: Value| {
            let client = client.clone();
            let mock = &mock;
            async move { json_body(chat(&client, mock, "k", body).await).await }
        };
        let is_text = |completion: &Value| {
            let choice = &completion["choices"][0];
            choice["finish_reason"] == "stop"
                && choice["message"]["content"] == DEFAULT_CONTENT
                && choice["message"].get("tool_calls").is_none()
        };

        // A question with tools: a call of the first function, with the
        // default input.
        let completion = ask(function_request(false)).await;
        let call = only_tool_call(&completion).clone();
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], DEFAULT_TOOL_INPUT);

        // The tool's result: the answer is text.
        let mut answered = function_request(false);
        answered["messages"] = json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
            {"role": "tool", "tool_call_id": call["id"].clone(), "content": "18°C, sunny"},
        ]);
        assert!(is_text(&ask(answered.clone()).await));
        answered["stream"] = json!(true);
        let response = chat(&client, &mock, "k", answered).await;
        check_stream(&text_body(response).await, DEFAULT_CONTENT, None);

        // `tool_choice`: `none` never calls; `auto` and `required` call the
        // first function; a named function is the one called.
        let mut none = function_request(false);
        none["tool_choice"] = json!("none");
        assert!(is_text(&ask(none).await));
        let mut none_streamed = function_request(true);
        none_streamed["tool_choice"] = json!("none");
        let response = chat(&client, &mock, "k", none_streamed).await;
        check_stream(
            &text_body(response).await,
            DEFAULT_CONTENT,
            Some(DEFAULT_USAGE),
        );
        for choice in ["auto", "required"] {
            let mut request = function_request(false);
            request["tool_choice"] = json!(choice);
            let completion = ask(request).await;
            assert_eq!(
                only_tool_call(&completion)["function"]["name"],
                "get_weather"
            );
        }
        let mut named = function_request(false);
        named["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
        let completion = ask(named).await;
        assert_eq!(only_tool_call(&completion)["function"]["name"], "get_time");

        // No tools, no function among them, or an assistant turn last: text.
        let mut no_tools = function_request(false);
        no_tools["tools"] = json!([]);
        assert!(is_text(&ask(no_tools).await));
        let mut no_functions = function_request(false);
        no_functions["tools"] = json!([{"type": "custom", "custom": {"name": "grammar_tool"}}]);
        assert!(is_text(&ask(no_functions).await));
        let mut assistant_last = function_request(false);
        assistant_last["messages"] = json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "The weather"},
        ]);
        assert!(is_text(&ask(assistant_last).await));
    }

    /// `text` with the numbers of completion and tool call ids
    /// (`chatcmpl-mock-N`, `call_mock_N`) made `N`.
    fn normalize_call_ids(text: &str) -> String {
        const ID: &str = "call_mock_";
        let text = normalize_ids(text);
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(ID) {
            out.push_str(&rest[..at + ID.len()]);
            out.push('N');
            rest = rest[at + ID.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
        }
        out.push_str(rest);
        out
    }

    #[tokio::test]
    async fn stream_styles_and_faults_apply_to_openai_tool_calls() {
        let mock = MockProvider::start().await;
        let client = client();
        let streamed = |key: &'static str| {
            let client = client.clone();
            let mock = &mock;
            async move { chat(&client, mock, key, function_request(true)).await }
        };
        let plain = normalize_call_ids(&text_body(streamed("sk-plain").await).await);
        let plain_events: Vec<&str> = plain.split_inclusive("\n\n").collect();
        let pieces = split_at_most(DEFAULT_TOOL_INPUT, INPUT_JSON_PIECE).len();
        // Role chunk, pieces, finish chunk, usage chunk, `[DONE]`.
        assert_eq!(plain_events.len(), 1 + pieces + 3, "{plain}");

        // CRLF line endings and keep-alive comments, coalesced.
        mock.set_stream_style(
            "sk-styled",
            StreamStyle {
                line_ending: LineEnding::CrLf,
                keep_alive: true,
                writes: Writes::Coalesced,
                ..StreamStyle::default()
            },
        );
        let text = text_body(streamed("sk-styled").await).await;
        let expected: String = plain_events
            .iter()
            .flat_map(|event| [": keep-alive\n\n", event])
            .collect();
        assert_eq!(normalize_call_ids(&text.replace("\r\n", "\n")), expected);

        // An error event after two chunks.
        mock.set_stream_style(
            "sk-fail",
            StreamStyle {
                error_after: Some(2),
                ..StreamStyle::default()
            },
        );
        let text = normalize_call_ids(&text_body(streamed("sk-fail").await).await);
        let events: Vec<&str> = text.split_inclusive("\n\n").collect();
        assert_eq!(events.len(), 3, "{text}");
        assert_eq!(events[..2], plain_events[..2]);
        assert!(events[2].starts_with("data: {\"error\":"), "{text}");

        // A cut stream: two chunks, then the connection drops.
        mock.set_fault("sk-cut", Fault::CutStreamAfter { chunks: 2 });
        let response = streamed("sk-cut").await;
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_some(), "the body ended cleanly: {text}");
        let text = normalize_call_ids(&text);
        let events: Vec<&str> = text.split_inclusive("\n\n").collect();
        assert_eq!(events, plain_events[..2]);

        // Cut past the content: every chunk but the finish chunk.
        mock.set_fault("sk-cut", Fault::CutStreamAfter { chunks: 100 });
        let response = streamed("sk-cut").await;
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_some(), "the body ended cleanly: {text}");
        let text = normalize_call_ids(&text);
        let events: Vec<&str> = text.split_inclusive("\n\n").collect();
        assert_eq!(events, plain_events[..1 + pieces]);
    }

    /// Sends a chat completion request with key `key` on a plain TCP connection and returns
    /// every byte the mock writes until it closes the connection.
    async fn raw_exchange(mock: &MockProvider, key: &str) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = stream_request(false).to_string();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut stream = guard(TcpStream::connect(mock.addr()))
            .await
            .expect("connect");
        guard(stream.write_all(request.as_bytes()))
            .await
            .expect("write");
        let mut received = Vec::new();
        guard(stream.read_to_end(&mut received))
            .await
            .expect("read");
        received
    }

    #[tokio::test]
    async fn raw_faults_write_their_bytes_then_close() {
        let mock = MockProvider::start().await;
        mock.set_fault(
            "sk-short",
            Fault::ShortBody {
                declared: 1_000,
                sent: 10,
            },
        );
        let received = raw_exchange(&mock, "sk-short").await;
        let text = String::from_utf8(received).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-length: 1000"), "{head}");
        assert_eq!(body, r#"{"id":"cha"#);

        const HUGE: usize = 1024 * 1024;
        mock.set_fault("sk-huge", Fault::HugeHeader { bytes: HUGE });
        let received = raw_exchange(&mock, "sk-huge").await;
        let text = String::from_utf8(received).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        let huge = head
            .split("\r\n")
            .find_map(|line| line.strip_prefix("x-huge: "))
            .expect("x-huge");
        assert_eq!(huge.len(), HUGE);
        assert!(huge.bytes().all(|b| b == b'a'));
        assert_eq!(body, r#"{"ok":true}"#);

        // The same connections serve other keys as before: the switch is per response.
        let client = client();
        for _ in 0..2 {
            let completion = json_body(chat(&client, &mock, "sk-plain", json!({})).await).await;
            assert_eq!(completion["object"], "chat.completion");
        }
        let response = chat(&client, &mock, "sk-short", json!({})).await;
        let (_, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_some(), "a short body ended cleanly");
        let completion = json_body(chat(&client, &mock, "sk-plain", json!({})).await).await;
        assert_eq!(completion["object"], "chat.completion");
    }

    #[tokio::test]
    async fn invalid_utf8_and_truncated_json_faults() {
        let mock = MockProvider::start().await;
        let client = client();
        mock.set_fault("sk-utf8", Fault::InvalidUtf8Stream);
        let response = chat(&client, &mock, "sk-utf8", stream_request(false)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
        let (frames, error) = read_frames(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(frames.len(), 4);
        assert!(frames
            .iter()
            .all(|frame| frame.starts_with(b"data: ") && frame.ends_with(b"\n\n")));
        assert!(std::str::from_utf8(&frames[1]).is_err());
        let expected = [br#"{"content":""#.as_slice(), INVALID_UTF8_CONTENT, b"\"}"].concat();
        assert!(frames[1]
            .windows(expected.len())
            .any(|window| window == expected.as_slice()));
        assert_eq!(&frames[3][..], b"data: [DONE]\n\n");
        for frame in &frames[..3] {
            // Valid JSON once the invalid bytes are replaced.
            let text = String::from_utf8_lossy(&frame[6..]);
            let chunk: Value = serde_json::from_str(text.trim_end()).expect("a JSON chunk");
            assert_eq!(chunk["object"], "chat.completion.chunk");
        }

        mock.set_fault("sk-cut-json", Fault::TruncatedJson);
        let response = chat(&client, &mock, "sk-cut-json", json!({})).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(text, r#"{"choices": ["#);
    }
}
