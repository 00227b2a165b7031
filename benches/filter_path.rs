//! The filter's whole per-request path as Envoy drives it — the gateway role's request
//! headers, body, response headers, body and log, and one key-role attempt — run natively on a
//! fake proxy-wasm host (`host` below), for `valgrind --tool=callgrind` to count instructions
//! and to show where they go (`callgrind_annotate`). It also counts the host calls one
//! request makes, by kind: each crosses Envoy's wasm boundary, and their price in Envoy is
//! measured by the load bench's `envoy-floor+<call>*<n>` targets (docs/benchmarks.md).
//!
//! `filter_path N [chat|stream] [chain]`: N requests on the load bench's config (auth, an RPM and a
//! TPM limit, a pool of two keys; `chain`: a fallback model), answered as OpenAI answers. `make bench-instructions`
//! runs it twice (N and 0 requests) and prints instructions per request.

// A host implements the ABI's C functions on raw pointers the SDK hands it.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use proxy_wasm::types::{Action, BufferType, LogLevel, MapType, MetricType, Status};

mod fixtures;

// The filter's entry points, as the module exports them to Envoy.
extern "C" {
    fn _initialize();
    fn proxy_on_context_create(context_id: u32, root_context_id: u32);
    fn proxy_on_vm_start(context_id: u32, vm_configuration_size: usize) -> bool;
    fn proxy_on_configure(context_id: u32, plugin_configuration_size: usize) -> bool;
    fn proxy_on_request_headers(context_id: u32, headers: usize, end_of_stream: bool) -> Action;
    fn proxy_on_request_body(context_id: u32, body_size: usize, end_of_stream: bool) -> Action;
    fn proxy_on_response_headers(context_id: u32, headers: usize, end_of_stream: bool) -> Action;
    fn proxy_on_response_body(context_id: u32, body_size: usize, end_of_stream: bool) -> Action;
    fn proxy_on_log(context_id: u32);
    fn proxy_on_done(context_id: u32) -> bool;
    fn proxy_on_delete(context_id: u32);
}

// Keeps the filter crate (and with it the SDK's exports) linked in.
use tollgate_filter as _;

/// What the fake host holds: one request at a time (the driver runs them in turn), the VM's
/// shared data and stats, and the host calls made.
#[derive(Default)]
struct Host {
    root_id: String,
    plugin_configuration: String,
    request_headers: Vec<(String, Vec<u8>)>,
    response_headers: Vec<(String, Vec<u8>)>,
    request_body: Vec<u8>,
    response_body: Vec<u8>,
    /// Filter state and the attempt's cluster, by property path.
    properties: HashMap<Vec<u8>, Vec<u8>>,
    shared: HashMap<String, (Vec<u8>, u32)>,
    metrics: Vec<u64>,
    now_ns: u64,
    calls: BTreeMap<&'static str, u64>,
    counting: bool,
    local_replies: u64,
}

thread_local! {
    static HOST: RefCell<Host> = RefCell::new(Host::default());
}

fn with<T>(call: &'static str, f: impl FnOnce(&mut Host) -> T) -> T {
    HOST.with(|h| {
        let mut h = h.borrow_mut();
        if h.counting {
            *h.calls.entry(call).or_default() += 1;
        }
        f(&mut h)
    })
}

/// Hands `bytes` to the module as the SDK expects: allocated with its allocator, exactly
/// `len` long (it takes them back with `Vec::from_raw_parts(ptr, len, len)`).
///
/// # Safety
/// The out-pointers are the SDK's.
unsafe fn give(bytes: &[u8], data: *mut *mut u8, size: *mut usize) {
    let boxed: Box<[u8]> = bytes.into();
    *size = boxed.len();
    *data = Box::into_raw(boxed).cast::<u8>();
}

/// `give`s what was found; `NotFound` otherwise.
///
/// # Safety
/// As `give`.
unsafe fn give_found(found: Option<&[u8]>, data: *mut *mut u8, size: *mut usize) -> Status {
    match found {
        Some(bytes) => {
            give(bytes, data, size);
            Status::Ok
        }
        None => Status::NotFound,
    }
}

/// # Safety
/// `ptr` and `len` describe memory the SDK owns for the call.
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

fn map(h: &mut Host, map: MapType) -> &mut Vec<(String, Vec<u8>)> {
    match map {
        MapType::HttpResponseHeaders => &mut h.response_headers,
        _ => &mut h.request_headers,
    }
}

fn serialize(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// The proxy-wasm ABI, as far as the filter uses it on this path.
mod abi {
    use super::*;

    #[no_mangle]
    extern "C" fn proxy_log(_level: LogLevel, _data: *const u8, _size: usize) -> Status {
        with("log", |_| Status::Ok)
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_get_log_level(level: *mut LogLevel) -> Status {
        with("get_log_level", |_| *level = LogLevel::Error);
        Status::Ok
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_get_current_time_nanoseconds(time: *mut u64) -> Status {
        *time = with("get_current_time", |h| h.now_ns);
        Status::Ok
    }

    #[no_mangle]
    extern "C" fn proxy_set_tick_period_milliseconds(_period: u32) -> Status {
        Status::Ok
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_get_buffer_bytes(
        buffer: BufferType,
        start: usize,
        max_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> Status {
        with("get_buffer_bytes", |h| {
            let whole: &[u8] = match buffer {
                BufferType::HttpRequestBody => &h.request_body,
                BufferType::HttpResponseBody => &h.response_body,
                BufferType::PluginConfiguration => h.plugin_configuration.as_bytes(),
                _ => return Status::NotFound,
            };
            let end = start.saturating_add(max_size).min(whole.len());
            give(&whole[start.min(end)..end], data, size);
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_set_buffer_bytes(
        buffer: BufferType,
        start: usize,
        len: usize,
        value: *const u8,
        value_size: usize,
    ) -> Status {
        with("set_buffer_bytes", |h| {
            let whole = match buffer {
                BufferType::HttpRequestBody => &mut h.request_body,
                BufferType::HttpResponseBody => &mut h.response_body,
                _ => return Status::NotFound,
            };
            let end = start.saturating_add(len).min(whole.len());
            whole.splice(
                start.min(end)..end,
                bytes(value, value_size).iter().copied(),
            );
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_get_header_map_pairs(
        which: MapType,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> Status {
        with("get_header_map_pairs", |h| {
            give(&serialize(map(h, which)), data, size);
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_get_header_map_value(
        which: MapType,
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> Status {
        let key = bytes(key, key_size);
        with("get_header_map_value", |h| {
            let found = map(h, which).iter().find(|(k, _)| k.as_bytes() == key);
            give_found(found.map(|(_, v)| v.as_slice()), data, size)
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_replace_header_map_value(
        which: MapType,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> Status {
        let key = String::from_utf8_lossy(bytes(key, key_size)).into_owned();
        let value = bytes(value, value_size).to_vec();
        with("replace_header_map_value", |h| {
            let headers = map(h, which);
            headers.retain(|(k, _)| *k != key);
            headers.push((key, value));
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_add_header_map_value(
        which: MapType,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> Status {
        let key = String::from_utf8_lossy(bytes(key, key_size)).into_owned();
        let value = bytes(value, value_size).to_vec();
        with("add_header_map_value", |h| {
            map(h, which).push((key, value));
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_remove_header_map_value(
        which: MapType,
        key: *const u8,
        key_size: usize,
    ) -> Status {
        let key = bytes(key, key_size);
        with("remove_header_map_value", |h| {
            map(h, which).retain(|(k, _)| k.as_bytes() != key);
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> Status {
        let path = bytes(path, path_size);
        with("get_property", |h| {
            let value = if path == b"plugin_root_id" {
                Some(h.root_id.as_bytes())
            } else {
                h.properties.get(path).map(Vec::as_slice)
            };
            give_found(value, data, size)
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_set_property(
        path: *const u8,
        path_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> Status {
        let (path, value) = (
            bytes(path, path_size).to_vec(),
            bytes(value, value_size).to_vec(),
        );
        with("set_property", |h| {
            h.properties.insert(path, value);
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> Status {
        let key = String::from_utf8_lossy(bytes(key, key_size)).into_owned();
        with("get_shared_data", |h| {
            let found = h.shared.get(&key);
            if let Some((_, version)) = found {
                *cas = *version;
            }
            give_found(found.map(|(value, _)| value.as_slice()), data, size)
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status {
        let key = String::from_utf8_lossy(bytes(key, key_size)).into_owned();
        let value = bytes(value, value_size).to_vec();
        with("set_shared_data", |h| {
            let entry = h.shared.entry(key).or_insert((Vec::new(), 0));
            if cas != 0 && cas != entry.1 {
                return Status::CasMismatch;
            }
            *entry = (value, entry.1.wrapping_add(1).max(1));
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_define_metric(
        _kind: MetricType,
        _name: *const u8,
        _name_size: usize,
        id: *mut u32,
    ) -> Status {
        *id = with("define_metric", |h| {
            h.metrics.push(0);
            h.metrics.len() as u32 - 1
        });
        Status::Ok
    }

    #[no_mangle]
    extern "C" fn proxy_increment_metric(id: u32, offset: i64) -> Status {
        with("increment_metric", |h| {
            if let Some(m) = h.metrics.get_mut(id as usize) {
                *m = m.wrapping_add_signed(offset);
            }
            Status::Ok
        })
    }

    #[no_mangle]
    extern "C" fn proxy_record_metric(id: u32, value: u64) -> Status {
        with("record_metric", |h| {
            if let Some(m) = h.metrics.get_mut(id as usize) {
                *m = value;
            }
            Status::Ok
        })
    }

    #[no_mangle]
    unsafe extern "C" fn proxy_get_metric(id: u32, value: *mut u64) -> Status {
        *value = with("get_metric", |h| {
            h.metrics.get(id as usize).copied().unwrap_or(0)
        });
        Status::Ok
    }

    #[no_mangle]
    extern "C" fn proxy_send_local_response(
        _status: u32,
        _details: *const u8,
        _details_size: usize,
        _body: *const u8,
        _body_size: usize,
        _headers: *const u8,
        _headers_size: usize,
        _grpc_status: i32,
    ) -> Status {
        with("send_local_response", |h| h.local_replies += 1);
        Status::Ok
    }

    #[no_mangle]
    extern "C" fn proxy_continue_stream(_stream: u32) -> Status {
        with("continue_stream", |_| Status::Ok)
    }

    #[no_mangle]
    extern "C" fn proxy_set_effective_context(_context_id: u32) -> Status {
        Status::Ok
    }

    #[no_mangle]
    extern "C" fn proxy_done() -> Status {
        Status::Ok
    }

    /// Calls the SDK links but this path never makes (the request is never paused for an
    /// HTTP call on the in-memory store): calling one aborts the bench.
    macro_rules! absent {
        ($($name:ident),*) => {$(
            #[no_mangle]
            extern "C" fn $name() -> Status {
                panic!(concat!(stringify!($name), ": not on the path this bench drives"))
            }
        )*};
    }
    absent!(
        proxy_call_foreign_function,
        proxy_close_stream,
        proxy_dequeue_shared_queue,
        proxy_enqueue_shared_queue,
        proxy_get_status,
        proxy_grpc_call,
        proxy_grpc_cancel,
        proxy_grpc_close,
        proxy_grpc_send,
        proxy_grpc_stream,
        proxy_http_call,
        proxy_register_shared_queue,
        proxy_resolve_shared_queue,
        proxy_set_header_map_pairs
    );
}

const GATEWAY_ROOT: u32 = 1;
const KEY_ROOT: u32 = 2;

/// The load bench's tollgate config (benches/load.py), its client key the fixtures' own;
/// with `chain`, the model has a fallback on an Anthropic provider that these requests never
/// reach (as the load bench's `-chain` targets).
fn config(chain: bool) -> String {
    let (provider, fallbacks, model) = if chain {
        (
            "  - name: claude\n    kind: anthropic\n    base_url: http://127.0.0.1:9\n    \
             keys: [{ id: c1, secret_env: BENCH_KEY_1 }]\n",
            ", fallbacks: [claude-fallback]",
            "  - { name: claude-fallback, provider: claude }\n",
        )
    } else {
        ("", "", "")
    };
    format!(
        "consumers:\n  - name: bench\n    keys: [{{ sha256: {} }}]\n    models: [\"*\"]\n    \
         limits: {{ requests_per_minute: 1000000000, tokens_per_minute: 1000000000000 }}\n\
         providers:\n  - name: upstream\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n    \
         keys:\n      - {{ id: k1, secret_env: BENCH_KEY_1 }}\n      - {{ id: k2, secret_env: BENCH_KEY_2 }}\n\
         {provider}models:\n  - {{ name: gpt-4o-mini, provider: upstream{fallbacks} }}\n{model}",
        tollgate_core::auth::KeyHash::of(fixtures::KEY).to_hex()
    )
}

fn configure(root: u32, root_id: &str, config: &str) {
    HOST.with(|h| {
        let mut h = h.borrow_mut();
        h.root_id = root_id.to_string();
        h.plugin_configuration = config.to_string();
    });
    // SAFETY: the SDK's exports, called as Envoy calls them.
    unsafe {
        proxy_on_context_create(root, 0);
        assert!(proxy_on_vm_start(root, 0));
        assert!(
            proxy_on_configure(root, config.len()),
            "{root_id}: config refused"
        );
    }
}

/// What OpenAI sends with a chat completion (the headers its API answers with).
fn answer_headers(stream: bool) -> Vec<(String, Vec<u8>)> {
    let content_type = if stream {
        "text/event-stream; charset=utf-8"
    } else {
        "application/json"
    };
    [
        (":status", "200"),
        ("date", "Mon, 30 Nov 2026 21:00:00 GMT"),
        ("content-type", content_type),
        ("access-control-expose-headers", "X-Request-ID"),
        ("openai-organization", "org-bench"),
        ("openai-processing-ms", "312"),
        ("openai-version", "2020-10-01"),
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-limit-tokens", "30000000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-remaining-tokens", "29999990"),
        ("x-ratelimit-reset-requests", "6ms"),
        ("x-ratelimit-reset-tokens", "0s"),
        ("x-request-id", "req_0123456789abcdef"),
        (
            "strict-transport-security",
            "max-age=31536000; includeSubDomains; preload",
        ),
        ("server", "cloudflare"),
        ("cf-ray", "8e0123456789abcd-FRA"),
        ("alt-svc", "h3=\":443\"; ma=86400"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect()
}

const CHAT_ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"The text asks for a summary. It repeats one instruction many times.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":231,"completion_tokens":16,"total_tokens":247,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_bench"}"#;

/// A streamed answer: one body callback per event, as a provider flushes them.
fn stream_events() -> Vec<String> {
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_bench\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}],\"usage\":null}}\n\n"
        )
    };
    let mut events = vec![chunk(r#"{"role":"assistant","content":""}"#, "null")];
    for word in ["The", " text", " asks", " for", " a", " summary", "."] {
        events.push(chunk(&format!("{{\"content\":\"{word}\"}}"), "null"));
    }
    events.push(chunk("{}", "\"stop\""));
    events.push("data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_bench\",\"choices\":[],\"usage\":{\"prompt_tokens\":231,\"completion_tokens\":8,\"total_tokens\":239}}\n\n".to_string());
    events.push("data: [DONE]\n\n".to_string());
    events
}

/// One request through both roles, as Envoy calls them; `id` is free for two contexts.
fn request(id: u32, stream: bool, body: &[u8]) {
    let (gateway, key) = (id, id + 1);
    HOST.with(|h| {
        let mut h = h.borrow_mut();
        h.now_ns += 1_000_000;
        let mut headers: Vec<(String, Vec<u8>)> = fixtures::headers()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        headers.push((":authority".into(), b"gateway.internal".to_vec()));
        headers.push(("content-length".into(), body.len().to_string().into_bytes()));
        h.request_headers = headers;
        h.request_body = body.to_vec();
        h.response_headers.clear();
        h.response_body.clear();
        h.properties.clear();
        h.properties.insert(
            b"xds\0cluster_name".to_vec(),
            b"tollgate_provider_upstream".to_vec(),
        );
    });
    let len = body.len();
    // SAFETY: the SDK's exports, called in the order Envoy calls them.
    unsafe {
        proxy_on_context_create(gateway, GATEWAY_ROOT);
        let n = HOST.with(|h| h.borrow().request_headers.len());
        assert_eq!(proxy_on_request_headers(gateway, n, false), Action::Pause);
        assert_eq!(
            proxy_on_request_body(gateway, len, true),
            Action::Continue,
            "not forwarded"
        );
        // The router's attempt, through the provider cluster's upstream filters.
        proxy_on_context_create(key, KEY_ROOT);
        let n = HOST.with(|h| h.borrow().request_headers.len());
        assert_eq!(proxy_on_request_headers(key, n, false), Action::Continue);
        let len = HOST.with(|h| h.borrow().request_body.len());
        assert_eq!(proxy_on_request_body(key, len, true), Action::Continue);
        HOST.with(|h| h.borrow_mut().response_headers = answer_headers(stream));
        let n = HOST.with(|h| h.borrow().response_headers.len());
        assert_eq!(proxy_on_response_headers(key, n, false), Action::Continue);
        assert_eq!(
            proxy_on_response_headers(gateway, n, false),
            Action::Continue
        );
        let events = if stream {
            stream_events()
        } else {
            vec![CHAT_ANSWER.to_string()]
        };
        let last = events.len() - 1;
        for (i, event) in events.into_iter().enumerate() {
            HOST.with(|h| h.borrow_mut().response_body = event.into_bytes());
            let size = HOST.with(|h| h.borrow().response_body.len());
            proxy_on_response_body(key, size, i == last);
            let size = HOST.with(|h| h.borrow().response_body.len());
            proxy_on_response_body(gateway, size, i == last);
        }
        proxy_on_log(key);
        proxy_on_done(key);
        proxy_on_delete(key);
        proxy_on_log(gateway);
        proxy_on_done(gateway);
        proxy_on_delete(gateway);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let stream = args.next().as_deref() == Some("stream");
    let chain = args.next().as_deref() == Some("chain");
    // The filter reads key secrets from its environment, as in Envoy.
    for (name, value) in [("BENCH_KEY_1", "sk-bench-1"), ("BENCH_KEY_2", "sk-bench-2")] {
        std::env::set_var(name, value);
    }
    let config = config(chain);
    // SAFETY: the module's start function, once, before any context.
    unsafe { _initialize() };
    configure(GATEWAY_ROOT, tollgate_core::roles::GATEWAY_ROOT_ID, &config);
    configure(KEY_ROOT, tollgate_core::roles::KEY_ROOT_ID, &config);
    let mut body = fixtures::chat_body("gpt-4o-mini");
    if stream {
        let at = body.len() - 1;
        body.splice(at..at, br#","stream":true"#.iter().copied());
    }
    // A first request outside the count defines the stats and creates what is created once.
    request(10, stream, &body);
    HOST.with(|h| h.borrow_mut().counting = true);
    for i in 0..n {
        request(100 + 2 * i, stream, &body);
    }
    let (calls, replies) = HOST.with(|h| {
        let h = h.borrow();
        (h.calls.clone(), h.local_replies)
    });
    assert_eq!(
        replies, 0,
        "a request was answered by the gateway, not forwarded"
    );
    if n > 0 {
        let total: u64 = calls.values().sum();
        eprintln!(
            "host calls per request: {:.1} ({})",
            total as f64 / f64::from(n),
            calls
                .iter()
                .map(|(k, v)| format!("{k} {:.1}", *v as f64 / f64::from(n)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
