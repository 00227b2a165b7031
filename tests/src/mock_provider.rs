//! An OpenAI-compatible mock provider, used as the upstream of the gateway in
//! end-to-end tests and as the target of load benchmarks.
//!
//! It serves `POST /v1/chat/completions` (plain and SSE streaming) and
//! `GET /v1/models`, records every request it receives, and behaves like a
//! real provider in the ways a gateway has to cope with:
//!
//! - every response to a request carrying a provider key reports that key's
//!   rate limits in OpenAI's `x-ratelimit-*` headers, from a one-minute window
//!   per key (see [`KeyLimits`]; the mock reports, it never enforces);
//! - requests carrying a given key can be made to misbehave (see [`Fault`]):
//!   429s in each of the forms OpenAI sends, 401s, 5xx with JSON or with a
//!   CDN's HTML page, slow heads and slow bodies, streams that are cut or held;
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
use std::time::{Duration, Instant};

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Sleep;

/// Reply text of successful completions until [`MockProvider::set_reply`] is called.
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

/// How a [`MockProvider`] is started.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Keep every request for [`MockProvider::requests`]. Turn it off for load
    /// runs so that memory stays flat.
    pub record: bool,
    /// Where to listen; the default, `127.0.0.1:0`, picks a free port.
    pub listen: SocketAddr,
    /// Send OpenAI's `x-ratelimit-*` headers on every response to a request
    /// carrying a provider key (see [`KeyLimits`]). On by default, since real
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
/// A chat completion uses one request and, from its arrival, the total tokens
/// of the reply's usage (see [`MockProvider::set_reply`]), whatever its
/// outcome; other endpoints use one request and no tokens. The mock only
/// reports: it answers normally past the limits (use [`Fault`] for 429s).
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

    /// The OpenAI base URL of this provider: `http://127.0.0.1:PORT/v1`.
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
    /// on. Defaults: [`DEFAULT_CONTENT`] and [`DEFAULT_USAGE`].
    pub fn set_reply(&self, content: &str, usage: MockUsage) {
        let reply = Arc::new(Reply::new(content, usage));
        *self
            .state
            .reply
            .write()
            .unwrap_or_else(PoisonError::into_inner) = reply;
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

/// How to misbehave for requests carrying a given provider key. Faults apply
/// to every endpoint; the request is recorded (and counted in the key's
/// rate-limit window) first either way.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 with OpenAI's body for a requests-per-minute limit, type
    /// `requests`, code `rate_limit_exceeded`, saying to try again in
    /// `retry_after_secs` (in OpenAI's duration format, e.g. `20s`, `1m30s`;
    /// `1s` when `None`), and `x-ratelimit-remaining-requests: 0`. With
    /// `Some(n)`, also `retry-after: n`; with `None` no `retry-after`, as
    /// OpenAI often does.
    TooManyRequests { retry_after_secs: Option<u64> },
    /// 429 with OpenAI's body for an exhausted quota (type and code
    /// `insufficient_quota`), no `retry-after`: retrying will not help.
    QuotaExhausted,
    /// 429 with OpenAI's body for a request larger than the tokens-per-minute
    /// limit (type `tokens`, code `rate_limit_exceeded`), no `retry-after`:
    /// this request will never fit.
    RequestTooLarge { limit: u64, requested: u64 },
    /// 401 with an OpenAI-shaped `invalid_api_key` error body.
    Unauthorized,
    /// That status (meant for 5xx) with an OpenAI-shaped `server_error` body;
    /// a number that is not an HTTP status becomes 500.
    ServerError { status: u16 },
    /// That status with `content-type: text/html` and a CDN edge's error page
    /// as the body, as when Cloudflare answers instead of the provider; a
    /// number that is not an HTTP status becomes 500.
    HtmlError { status: u16 },
    /// Wait `delay_ms` before answering headers, then answer normally, but
    /// wait `gap_ms` before every SSE event after the first of a stream, and
    /// send a non-streamed completion's body in 4 frames with `gap_ms` before
    /// each after the first. Other bodies are sent at once.
    Slow { delay_ms: u64, gap_ms: u64 },
    /// Streaming: send this many SSE events (the role chunk counts as the
    /// first), then abort the connection, so the body ends in an error rather
    /// than cleanly. The finish chunk, usage chunk and `[DONE]` are never sent,
    /// so a count past the content events just sends all of those.
    /// Anything else: send the response headers, then abort.
    CutStreamAfter { chunks: usize },
    /// Streaming: send the first SSE event (the role chunk), then wait for
    /// `release` before sending the rest. `notify_one` and `notify_waiters`
    /// both work once the first event has reached the client; `notify_one`
    /// also works before that, since it stores a permit.
    /// Anything else: wait for `release` before answering at all (use
    /// `notify_one` there, as nothing tells the client when the wait began).
    HoldStream { release: Arc<Notify> },
}

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

    /// Counts a request arriving `now` that uses `tokens`, and returns the
    /// key's state for its headers.
    fn charge(&mut self, now: Instant, tokens: u64) -> RateLimit {
        let mut window = match self.window {
            Some(window) if now.saturating_duration_since(window.started) < RATE_WINDOW => window,
            _ => Window {
                started: now,
                requests: 0,
                tokens: 0,
            },
        };
        window.requests = window.requests.saturating_add(1);
        window.tokens = window.tokens.saturating_add(tokens);
        self.window = Some(window);
        RateLimit {
            limits: self.limits.unwrap_or_default(),
            requests: window.requests,
            tokens: window.tokens,
            reset: RATE_WINDOW.saturating_sub(now.saturating_duration_since(window.started)),
        }
    }
}

/// What one key used in its current rate-limit window.
#[derive(Clone, Copy)]
struct Window {
    started: Instant,
    requests: u64,
    tokens: u64,
}

/// A key's rate-limit state as one response reports it.
struct RateLimit {
    limits: KeyLimits,
    requests: u64,
    tokens: u64,
    /// Until the window restarts.
    reset: Duration,
}

impl RateLimit {
    /// Adds the `x-ratelimit-*` headers, except those the response already
    /// has (a fault's own).
    fn add_to(&self, headers: &mut HeaderMap) {
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
                HeaderValue::from(limits.tokens_per_minute.saturating_sub(self.tokens)),
            ),
            ("x-ratelimit-reset-requests", reset.clone()),
            ("x-ratelimit-reset-tokens", reset),
        ];
        for (name, value) in values {
            headers.entry(name).or_insert(value);
        }
    }
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

    /// A request carrying `key` and using `tokens` arrived: counts it in the
    /// key's window (with rate-limit headers on), and returns the behaviour
    /// configured for the key and the state of its window.
    fn arrive(&self, key: &str, tokens: u64) -> (Option<KeyBehaviour>, Option<RateLimit>) {
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
            Some(entry) => (entry.configured(), Some(entry.charge(now, tokens))),
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
}

/// Locks `mutex`, ignoring poisoning: the data behind it stays consistent
/// even if a holder panicked, and the server must not panic in turn.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reply of successful completions, serialized as far as possible ahead
/// of time so that each request only splices in its id and model.
struct Reply {
    /// Everything after `"model":…,` in a `chat.completion` object.
    completion_tail: String,
    /// The `choices` arrays of the streamed chunks, in order: the role chunk,
    /// one chunk per word, the finish chunk.
    chunk_choices: Vec<String>,
    /// The `usage` object.
    usage: String,
    /// What a completion uses of its key's tokens-per-minute limit.
    total_tokens: u64,
}

impl Reply {
    fn new(content: &str, usage: MockUsage) -> Reply {
        let total_tokens = usage.total_tokens();
        let usage = format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{total_tokens}}}"#,
            usage.prompt_tokens, usage.completion_tokens,
        );
        let content_json = json_string(content);
        let completion_tail = format!(
            r#""choices":[{{"index":0,"message":{{"role":"assistant","content":{content_json},"refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{usage}}}"#
        );

        let chunk = |delta: &str, finish_reason: &str| {
            format!(
                r#"[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish_reason}}}]"#
            )
        };
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
            usage,
            total_tokens,
        }
    }

    /// The leading SSE events that carry content (the role chunk and the
    /// words); the rest only terminate the stream.
    fn content_events(&self) -> usize {
        self.chunk_choices.len() - 1
    }

    fn completion(&self, id: u64, model: &str) -> Bytes {
        let model = json_string(model);
        let tail = &self.completion_tail;
        Bytes::from(format!(
            r#"{{"id":"chatcmpl-mock-{id}","object":"chat.completion","created":{CREATED},"model":{model},{tail}"#
        ))
    }

    /// The data events of a streamed reply in `style` (`[DONE]` and the
    /// error event included, keep-alive comments not).
    fn stream_events(
        &self,
        id: u64,
        model: &str,
        include_usage: bool,
        style: &StreamStyle,
    ) -> Vec<Bytes> {
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
            let sent = after.min(self.content_events());
            let mut events: Vec<Bytes> = self.chunk_choices[..sent].iter().map(chunk).collect();
            events.push(Bytes::from([STREAM_ERROR_DATA, end].concat()));
            return events;
        }
        let mut events: Vec<Bytes> = self.chunk_choices.iter().map(chunk).collect();
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
        events
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
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(&state, request).await) }
    });
    // Errors here are clients going away or deliberate cuts: nothing to do.
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
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

async fn handle(state: &State, request: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = request.into_parts();
    let reply = state.reply();
    let key = provider_key(&parts.headers);
    // Charged on arrival, before the body is read, as a real provider counts
    // a request against its limits whatever becomes of it.
    let (behaviour, rate_limit) = match key {
        Some(key) => {
            let is_chat = parts.method == Method::POST && parts.uri.path() == CHAT_COMPLETIONS;
            state.arrive(key, if is_chat { reply.total_tokens } else { 0 })
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

    let mut response = match body.collect().await {
        Ok(collected) => {
            let body = collected.to_bytes();
            if state.record {
                state.record(&parts, &body, key);
            }
            respond(state, &reply, &parts, &body, fault, stream_style).await
        }
        Err(_) => error_response(
            StatusCode::BAD_REQUEST,
            "Could not read the request body.",
            "invalid_request_error",
            None,
        ),
    };

    let headers = response.headers_mut();
    if let Some(rate_limit) = rate_limit {
        rate_limit.add_to(headers);
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
        Some(Fault::HtmlError { status }) => return html_error(status),
        Some(Fault::Slow { delay_ms, gap_ms }) => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            (gap_ms > 0).then(|| BodyFault::Gap(Duration::from_millis(gap_ms)))
        }
        Some(Fault::CutStreamAfter { chunks }) => Some(BodyFault::Cut { chunks }),
        Some(Fault::HoldStream { release }) => Some(BodyFault::Hold { release }),
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

/// [`Fault::HtmlError`]'s response: a page like those of Cloudflare's edge.
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
struct ChatRequest {
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
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

    if !request.stream.unwrap_or(false) {
        let completion = reply.completion(id, model);
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
    let stream = StreamPlan {
        events: reply.stream_events(id, model, include_usage, &style),
        content_events: reply.content_events(),
        keep_alive: style.keep_alive.then(|| {
            Bytes::from_static(match style.line_ending {
                LineEnding::Lf => b": keep-alive\n\n",
                LineEnding::CrLf => b": keep-alive\r\n\r\n",
            })
        }),
        writes: style.writes,
    };
    let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CAPACITY);
    tokio::spawn(produce_stream(tx, stream, body_fault));

    let flush_each = matches!(style.writes, Writes::Split { .. });
    let mut response = Response::new(MockBody::channel(rx, flush_each));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One streamed reply, ready to send.
struct StreamPlan {
    /// The data events, in order.
    events: Vec<Bytes>,
    /// See [`Reply::content_events`].
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
}
