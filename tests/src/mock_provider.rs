//! An OpenAI-compatible mock provider, used as the upstream of the gateway in
//! end-to-end tests and as the target of load benchmarks.
//!
//! It serves `POST /v1/chat/completions` (plain and SSE streaming) and
//! `GET /v1/models`, records every request it receives, and can be told to
//! misbehave for requests carrying a given provider key (see [`Fault`]).
//!
//! The ordinary path is kept cheap because benchmarks hammer it: the only
//! shared state it touches is an atomic counter, an uncontended read lock on
//! the reply template and, when recording, one short mutex push. The per-key
//! table is skipped entirely while it is empty.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

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
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};

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

/// How a [`MockProvider`] is started.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Keep every request for [`MockProvider::requests`]. Turn it off for load
    /// runs so that memory stays flat.
    pub record: bool,
    /// Where to listen; the default, `127.0.0.1:0`, picks a free port.
    pub listen: SocketAddr,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            record: true,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
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
        let state = Arc::new(State::new(options.record));
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
            .update_key(key, |behaviour| behaviour.fault = Some(fault));
    }

    /// Lets requests carrying `key` be answered normally again.
    pub fn clear_fault(&self, key: &str) {
        self.state
            .update_key(key, |behaviour| behaviour.fault = None);
    }

    /// Adds these headers to every response (faulty or not) to a request
    /// carrying `key`, replacing headers of the same names. An empty list
    /// removes them.
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
            .update_key(key, |behaviour| behaviour.headers = headers);
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
/// to every endpoint; the request is recorded first either way.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 429 with `retry-after: N` and an OpenAI-shaped rate-limit error body.
    TooManyRequests { retry_after_secs: u64 },
    /// 401 with an OpenAI-shaped `invalid_api_key` error body.
    Unauthorized,
    /// That status (meant for 5xx) with an OpenAI-shaped `server_error` body;
    /// a number that is not an HTTP status becomes 500.
    ServerError { status: u16 },
    /// Wait this long before answering headers, then answer normally.
    Slow { delay_ms: u64 },
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

/// What is configured for one provider key.
#[derive(Clone, Default)]
struct KeyBehaviour {
    fault: Option<Fault>,
    headers: Arc<[(HeaderName, HeaderValue)]>,
}

struct State {
    record: bool,
    requests: Mutex<Vec<RecordedRequest>>,
    /// False while `keys` is empty, so ordinary requests never lock it.
    any_keyed: AtomicBool,
    keys: Mutex<HashMap<String, KeyBehaviour>>,
    reply: RwLock<Arc<Reply>>,
    next_id: AtomicU64,
}

impl State {
    fn new(record: bool) -> State {
        State {
            record,
            requests: Mutex::new(Vec::new()),
            any_keyed: AtomicBool::new(false),
            keys: Mutex::new(HashMap::new()),
            reply: RwLock::new(Arc::new(Reply::new(DEFAULT_CONTENT, DEFAULT_USAGE))),
            next_id: AtomicU64::new(1),
        }
    }

    fn update_key(&self, key: &str, update: impl FnOnce(&mut KeyBehaviour)) {
        let mut keys = lock(&self.keys);
        let behaviour = keys.entry(key.to_owned()).or_default();
        update(behaviour);
        if behaviour.fault.is_none() && behaviour.headers.is_empty() {
            keys.remove(key);
        }
        self.any_keyed.store(!keys.is_empty(), Ordering::Release);
    }

    fn key_behaviour(&self, key: &str) -> Option<KeyBehaviour> {
        if !self.any_keyed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.keys).get(key).cloned()
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
}

impl Reply {
    fn new(content: &str, usage: MockUsage) -> Reply {
        let usage = format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens()
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

    /// All SSE events of a streamed reply, `[DONE]` included.
    fn stream_events(&self, id: u64, model: &str, include_usage: bool) -> Vec<Bytes> {
        let model = json_string(model);
        let head = format!(
            r#"data: {{"id":"chatcmpl-mock-{id}","object":"chat.completion.chunk","created":{CREATED},"model":{model},"choices":"#
        );
        // Like OpenAI: once usage is requested, every other chunk says
        // `"usage":null`.
        let tail = if include_usage {
            ",\"usage\":null}\n\n"
        } else {
            "}\n\n"
        };
        let mut events: Vec<Bytes> = self
            .chunk_choices
            .iter()
            .map(|choices| Bytes::from([head.as_str(), choices, tail].concat()))
            .collect();
        if include_usage {
            let usage = &self.usage;
            events.push(Bytes::from(format!("{head}[],\"usage\":{usage}}}\n\n")));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
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
    Cut { chunks: usize },
    Hold { release: Arc<Notify> },
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "Could not read the request body.",
                "invalid_request_error",
                None,
            )
        }
    };
    let key = provider_key(&parts.headers);
    if state.record {
        state.record(&parts, &body, key);
    }
    let behaviour = key.and_then(|key| state.key_behaviour(key));
    let (fault, extra_headers) = match behaviour {
        Some(behaviour) => (behaviour.fault, Some(behaviour.headers)),
        None => (None, None),
    };

    let mut response = respond(state, &parts, &body, fault).await;

    if let Some(extra) = extra_headers {
        let headers = response.headers_mut();
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
    parts: &request::Parts,
    body: &Bytes,
    fault: Option<Fault>,
) -> Response<MockBody> {
    let body_fault = match fault {
        None => None,
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            let message = format!(
                "Rate limit reached for requests. Limit 1, Used 1, Requested 1. \
                 Please try again in {retry_after_secs}s."
            );
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                &message,
                "requests",
                Some("rate_limit_exceeded"),
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
            return response;
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
        Some(Fault::Slow { delay_ms }) => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            None
        }
        Some(Fault::CutStreamAfter { chunks }) => Some(BodyFault::Cut { chunks }),
        Some(Fault::HoldStream { release }) => Some(BodyFault::Hold { release }),
    };

    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/chat/completions") => chat_completions(state, body, body_fault).await,
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
    body: &Bytes,
    body_fault: Option<BodyFault>,
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
    let reply = state.reply();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let model = request.model.as_deref().unwrap_or(DEFAULT_MODEL);

    if !request.stream.unwrap_or(false) {
        let completion = json_response(StatusCode::OK, reply.completion(id, model));
        return deliver(completion, body_fault).await;
    }

    let include_usage = request
        .stream_options
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    let events = reply.stream_events(id, model, include_usage);
    let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CAPACITY);
    tokio::spawn(produce_stream(
        tx,
        events,
        reply.content_events(),
        body_fault,
    ));

    let mut response = Response::new(MockBody::channel(rx));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Feeds the SSE `events` of one streamed reply to its body, one frame each,
/// misbehaving as `fault` says. Dropping `tx` at the end ends the body
/// cleanly.
async fn produce_stream(
    tx: mpsc::Sender<StreamItem>,
    events: Vec<Bytes>,
    content_events: usize,
    fault: Option<BodyFault>,
) {
    match fault {
        None => {
            send_events(&tx, events).await;
        }
        Some(BodyFault::Cut { chunks }) => {
            let sent = events.into_iter().take(chunks.min(content_events));
            if send_events(&tx, sent).await {
                let _ = tx.send(StreamItem::Abort).await;
            }
        }
        Some(BodyFault::Hold { release }) => {
            // Start listening before the first event goes out: a client that
            // reacts to it with `notify_waiters` must find us already waiting.
            let mut released = pin!(release.notified());
            released.as_mut().enable();
            let mut events = events.into_iter();
            if !send_events(&tx, events.next()).await {
                return;
            }
            tokio::select! {
                () = released => {}
                // The client went away: do not wait for a release forever.
                () = tx.closed() => return,
            }
            send_events(&tx, events).await;
        }
    }
}

/// Sends each event as its own item; false once the body has gone away.
async fn send_events(
    tx: &mpsc::Sender<StreamItem>,
    events: impl IntoIterator<Item = Bytes>,
) -> bool {
    for event in events {
        if tx.send(StreamItem::Data(event)).await.is_err() {
            return false;
        }
    }
    true
}

/// Applies a body fault to a response that is not streamed.
async fn deliver(response: Response<MockBody>, fault: Option<BodyFault>) -> Response<MockBody> {
    match fault {
        None => response,
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

/// An error response with OpenAI's error body shape.
fn error_response(
    status: StatusCode,
    message: &str,
    error_type: &str,
    code: Option<&str>,
) -> Response<MockBody> {
    let body = json!({
        "error": { "message": message, "type": error_type, "param": null, "code": code }
    });
    json_response(status, Bytes::from(body.to_string()))
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

/// A response body: either complete up front, or fed frame by frame from a
/// channel.
struct MockBody {
    state: BodyState,
}

enum BodyState {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<StreamItem>),
    /// Return `Pending` once before failing. hyper writes frames into a buffer
    /// and flushes it when the body is pending; failing straight away would
    /// drop the frames (and headers) still buffered instead of sending them.
    AbortAfterFlush,
    Abort,
    Done,
}

impl MockBody {
    fn full(bytes: Bytes) -> MockBody {
        MockBody {
            state: BodyState::Full(Some(bytes)),
        }
    }

    fn channel(rx: mpsc::Receiver<StreamItem>) -> MockBody {
        MockBody {
            state: BodyState::Channel(rx),
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
            BodyState::Channel(rx) => match ready!(rx.poll_recv(cx)) {
                Some(StreamItem::Data(bytes)) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Some(StreamItem::Abort) => {
                    this.state = BodyState::Abort;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => {
                    this.state = BodyState::Done;
                    Poll::Ready(None)
                }
            },
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
        matches!(self.state, BodyState::Full(None) | BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            BodyState::Full(None) | BodyState::Done => SizeHint::with_exact(0),
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
    use serde_json::Value;

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
                retry_after_secs: 7,
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
        assert!(other
            .headers()
            .get("x-ratelimit-remaining-tokens")
            .is_none());
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
        mock.set_fault("sk-slow", Fault::Slow { delay_ms: 20 });
        let response = chat(&client, &mock, "sk-slow", stream_request(false)).await;
        let (text, error) = read_body(&mut response.into_body()).await;
        assert!(error.is_none(), "{error:?}");
        check_stream(&text, DEFAULT_CONTENT, None);
    }
}
