//! The end-to-end scenarios of the request path, each run against both hosts: the native
//! binary, and real Envoy (2 workers) loading the freshly built filter. Each scenario starts
//! its own mock provider and gateway, and stops both, also when it fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::{Gateway, Host};
use tollgate_e2e::mock_provider::{
    Fault, LineEnding, MockProvider, StreamStyle, Writes, DEFAULT_CONTENT, DEFAULT_USAGE,
};
use tollgate_e2e::scenario::{
    assert_error, closed_port, fresh_client, run_sdk_script, sha256_hex, sse_data, stream_text,
    user, Stack,
};

const APP_KEY: &str = "tg-test-app-key";
const LIMITED_KEY: &str = "tg-test-limited-key";
const KEY_A: &str = "sk-test-provider-aaaa";
const KEY_B: &str = "sk-test-provider-bbbb";
const ADMIN_KEY: &str = "tg-test-admin-key";
const MAX_BODY: usize = 65_536;
/// Long enough never to fire on a loaded CI machine, short enough for the timeout scenario.
const UPSTREAM_TIMEOUT_MS: u64 = 3_000;

fn config_with_timeout(mock: &MockProvider, upstream_timeout_ms: u64) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
  max_body_bytes: {MAX_BODY}
  upstream_timeout_ms: {upstream_timeout_ms}
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [gpt-4o-mini, fast, mock-gpt, unreachable, ordered-gpt]
  - name: limited
    keys: [{{ sha256: {limited} }}]
    models: [mock-gpt, hasty-gpt]
providers:
  - name: upstream
    kind: openai
    base_url: {base}
    retry: {{ attempts: 3, backoff_ms: 20, max_backoff_ms: 100 }}
    keys:
      - {{ id: key-a, secret_env: TG_TEST_KEY_A }}
      - {{ id: key-b, secret_env: TG_TEST_KEY_B }}
  - name: ordered
    kind: openai
    base_url: {base}
    strategy: priority
    retry: {{ attempts: 2, backoff_ms: 20, max_backoff_ms: 100 }}
    keys:
      - {{ id: first, secret_env: TG_TEST_KEY_A }}
      - {{ id: second, secret_env: TG_TEST_KEY_B }}
  - name: hasty
    kind: openai
    base_url: {base}
    retry: {{ attempts: 3, budget_ms: 1, backoff_ms: 20, max_backoff_ms: 100 }}
    keys: [{{ id: hasty-1, secret_env: TG_TEST_KEY_A }}]
  - name: dead
    kind: openai
    base_url: http://127.0.0.1:{dead}/v1
    retry: {{ attempts: 2, backoff_ms: 20, max_backoff_ms: 100 }}
    keys: [{{ id: dead-1, secret_env: TG_TEST_KEY_A }}]
  - name: mock
    kind: mock
models:
  - {{ name: gpt-4o-mini, provider: upstream }}
  - {{ name: fast, provider: upstream, upstream_model: gpt-4o-mini-2024-07-18, keys: [key-b] }}
  - {{ name: ordered-gpt, provider: ordered }}
  - {{ name: hasty-gpt, provider: hasty }}
  - {{ name: mock-gpt, provider: mock }}
  - {{ name: unreachable, provider: dead }}
"#,
        app = sha256_hex(APP_KEY),
        limited = sha256_hex(LIMITED_KEY),
        base = mock.base_url(),
        dead = closed_port(),
    )
}

struct Fixture(Stack);

impl std::ops::Deref for Fixture {
    type Target = Stack;
    fn deref(&self) -> &Stack {
        &self.0
    }
}

impl Fixture {
    async fn start(host: Host) -> Fixture {
        Self::start_with_timeout(host, UPSTREAM_TIMEOUT_MS).await
    }

    /// With the provider's silence bounded by `upstream_timeout_ms` instead.
    async fn start_with_timeout(host: Host, upstream_timeout_ms: u64) -> Fixture {
        let env = vec![
            ("TG_TEST_KEY_A", KEY_A),
            ("TG_TEST_KEY_B", KEY_B),
            ("TOLLGATE_ADMIN_KEY", ADMIN_KEY),
        ];
        let config = move |mock: &MockProvider| config_with_timeout(mock, upstream_timeout_ms);
        Fixture(Stack::start(host, config, env).await)
    }

    fn fault_all_keys(&self, fault: Fault) {
        for key in [KEY_A, KEY_B] {
            self.mock.set_fault(key, fault.clone());
        }
    }

    /// Makes the provider answer `key` with 429 and `retry-after: secs`.
    fn rate_limit(&self, key: &str, secs: u64) {
        self.mock.set_fault(
            key,
            Fault::TooManyRequests {
                retry_after_secs: Some(secs),
            },
        );
    }

    fn clear_all_faults(&self) {
        for key in [KEY_A, KEY_B] {
            self.mock.clear_fault(key);
        }
    }

    /// Opens a stream that the mock holds after its first event until `release` is notified.
    async fn held_stream(&self) -> (Arc<tokio::sync::Notify>, reqwest::Response) {
        let release = Arc::new(tokio::sync::Notify::new());
        self.fault_all_keys(Fault::HoldStream {
            release: Arc::clone(&release),
        });
        let r = self
            .post(json!({ "model": "gpt-4o-mini", "stream": true, "messages": user("hi") }))
            .await;
        (release, r)
    }

    /// The plainest chat request to the upstream provider, as `app`: status and body.
    async fn ask(&self) -> (u16, Value) {
        self.chat(
            APP_KEY,
            json!({ "model": "gpt-4o-mini", "messages": user("hi") }),
        )
        .await
    }

    /// Sends `n` plain requests, each of which must succeed; the provider keys they
    /// reached, in order.
    async fn keys_of_next(&self, n: usize) -> Vec<String> {
        let before = keys_used(self).len();
        for _ in 0..n {
            let (status, v) = self.ask().await;
            assert_eq!(status, 200, "{v}");
        }
        keys_used(self).split_off(before)
    }

    /// Like `keys_of_next`, through `client` (e.g. one that opens a connection per request).
    async fn keys_of_next_with(&self, client: &reqwest::Client, n: usize) -> Vec<String> {
        let before = keys_used(self).len();
        for _ in 0..n {
            let r = client
                .post(self.url("/v1/chat/completions"))
                .bearer_auth(APP_KEY)
                .json(&json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
                .send()
                .await
                .unwrap();
            let status = r.status();
            assert_eq!(status, 200, "{}", r.text().await.unwrap());
        }
        keys_used(self).split_off(before)
    }

    /// Sends at least `n` plain requests, each on a connection of its own, until every Envoy
    /// worker has served at least one of them (the kernel spreads connections over workers
    /// by a hash, so a few may all land on one); the provider keys they reached, in order.
    async fn keys_on_every_worker(&self, n: usize) -> Vec<String> {
        let fresh = fresh_client();
        let before = self.gateway.envoy_worker_connections();
        let mut keys = self.keys_of_next_with(&fresh, n).await;
        let every_worker_served = || match (&before, self.gateway.envoy_worker_connections()) {
            (Some(before), Some(now)) => now.iter().zip(before).all(|(now, then)| now > then),
            _ => true,
        };
        for _ in 0..64 {
            if every_worker_served() {
                return keys;
            }
            keys.extend(self.keys_of_next_with(&fresh, 1).await);
        }
        panic!(
            "not every Envoy worker served: {:?} then {:?}",
            before,
            self.gateway.envoy_worker_connections()
        );
    }

    /// Sends plain requests through `client`, each of which must succeed, until one has met
    /// key A (and so was retried on key B, if A is faulty); the number sent.
    async fn ask_until_key_a_met(&self, client: &reqwest::Client) -> usize {
        for sent in 1..=4 {
            self.keys_of_next_with(client, 1).await;
            if keys_used(self).iter().any(|k| k == KEY_A) {
                return sent;
            }
        }
        panic!("key A was never tried: {:?}", keys_used(self));
    }

    /// Opens a stream whose events the provider sends `gap_ms` apart; when it was opened.
    async fn stream_with_gaps(&self, gap_ms: u64) -> (std::time::Instant, reqwest::Response) {
        self.fault_all_keys(Fault::Slow {
            delay_ms: 0,
            gap_ms,
        });
        let started = std::time::Instant::now();
        let r = self
            .post(json!({ "model": "gpt-4o-mini", "stream": true, "messages": user("hi") }))
            .await;
        assert_eq!(r.status(), 200);
        (started, r)
    }

    /// A plain streamed request, which must be answered 200: the whole stream's text.
    async fn stream(&self) -> String {
        let r = self
            .post(json!({ "model": "gpt-4o-mini", "stream": true, "messages": user("hi") }))
            .await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// Sends a chat request as the `app` consumer.
    async fn post(&self, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(APP_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn chat(&self, key: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
        (status, v)
    }

    /// Checks that no secret reached the gateway's own log.
    fn assert_no_secrets_logged(&self) {
        let logs = self.gateway.logs();
        for secret in [APP_KEY, LIMITED_KEY, KEY_A, KEY_B, ADMIN_KEY] {
            assert!(!logs.contains(secret), "a secret reached the log:\n{logs}");
        }
    }
}

// ---- scenarios ------------------------------------------------------------------------------

async fn mock_kind_completion(host: Host) {
    let f = Fixture::start(host).await;
    let (status, v) = f
        .chat(
            APP_KEY,
            json!({ "model": "mock-gpt", "messages": user("hello there") }),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "You said: hello there"
    );
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"],
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(
        f.mock.requests().is_empty(),
        "the mock kind must not go upstream"
    );
    f.assert_no_secrets_logged();
}

async fn mock_kind_stream(host: Host) {
    let f = Fixture::start(host).await;
    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .header("x-api-key", APP_KEY)
        .json(&json!({ "model": "mock-gpt", "stream": true, "stream_options": { "include_usage": true }, "messages": user("one two three") }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let events = sse_data(&r.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(stream_text(&events), "You said: one two three");
    assert!(
        events.iter().any(|e| e.contains("\"usage\"")),
        "usage chunk asked for"
    );
}

async fn upstream_completion_with_model_rewrite(host: Host) {
    let f = Fixture::start(host).await;
    let (status, v) = f
        .chat(
            APP_KEY,
            json!({ "model": "fast", "messages": user("hi"), "temperature": 0.5 }),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], DEFAULT_CONTENT);
    let seen = f.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    let body = seen[0].json();
    assert_eq!(
        body["model"], "gpt-4o-mini-2024-07-18",
        "upstream name sent upstream"
    );
    assert_eq!(body["temperature"], 0.5, "other fields pass through");
}

async fn upstream_stream_is_not_buffered(host: Host) {
    let f = Fixture::start(host).await;
    let (release, mut r) = f.held_stream().await;
    assert_eq!(r.status(), 200);
    // The mock holds the rest of the stream until released: the first event can only arrive
    // if the gateway forwards it without waiting for the end.
    let first = tokio::time::timeout(Duration::from_secs(10), r.chunk())
        .await
        .expect("the first event did not arrive before the stream ended: the gateway buffers")
        .unwrap()
        .unwrap();
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    assert!(text.starts_with("data: "), "{text:?}");
    assert!(!text.contains("[DONE]"));
    release.notify_one();
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(stream_text(&events), DEFAULT_CONTENT);
}

/// A provider that drops the connection mid-stream: the client sees the stream end without
/// `[DONE]` (an error, not a clean end), and the gateway keeps serving.
async fn stream_cut_by_the_provider_reaches_the_client_as_an_error(host: Host) {
    let f = Fixture::start(host).await;
    f.fault_all_keys(Fault::CutStreamAfter { chunks: 2 });
    let mut r = f
        .post(json!({ "model": "gpt-4o-mini", "stream": true, "messages": user("hi") }))
        .await;
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let ended = loop {
        match r.chunk().await {
            Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
            Ok(None) => break "clean end",
            Err(_) => break "error",
        }
    };
    assert_eq!(
        ended, "error",
        "a cut stream must not look complete: {text:?}"
    );
    assert!(!text.contains("[DONE]"));
    // What the provider sent before the cut is relayed (the last event may be lost with the
    // connection, as it is between any proxy and its client).
    assert!((1..=2).contains(&sse_data(&text).len()), "{text:?}");
    assert_eq!(
        f.mock.requests().len(),
        1,
        "a stream is never retried after its first byte reached the client"
    );
    f.clear_all_faults();
    let (status, v) = f.ask().await;
    assert_eq!(status, 200, "{v}");
}

async fn provider_key_injected_and_consumer_key_stripped(host: Host) {
    let f = Fixture::start(host).await;
    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {APP_KEY}"))
        .header("x-api-key", APP_KEY)
        .header("api-key", APP_KEY)
        // A client must not be able to pick the provider route itself, nor the account that
        // pays for the gateway's key.
        .header("x-tollgate-provider", "dead")
        .header("openai-organization", "org-client-choice")
        .header("openai-project", "proj-client-choice")
        .json(&json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = f.mock.requests();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    let auth = req.header("authorization").unwrap();
    assert!(
        auth == format!("Bearer {KEY_A}") || auth == format!("Bearer {KEY_B}"),
        "{auth}"
    );
    assert_eq!(req.header("x-api-key"), None);
    assert_eq!(req.header("api-key"), None);
    assert_eq!(
        req.header("x-tollgate-provider"),
        None,
        "internal header leaked upstream"
    );
    for (name, value) in &req.headers {
        assert!(
            !value.contains(APP_KEY),
            "consumer key reached upstream in {name}"
        );
    }
    assert!(!String::from_utf8_lossy(&req.body).contains(APP_KEY));
    f.assert_no_secrets_logged();
}

async fn keys_rotate_across_the_pool(host: Host) {
    let f = Fixture::start(host).await;
    for _ in 0..6 {
        let (status, v) = f.ask().await;
        assert_eq!(status, 200, "{v}");
    }
    let mut used: HashMap<String, usize> = HashMap::new();
    for r in f.mock.requests() {
        *used.entry(r.key.unwrap()).or_default() += 1;
    }
    assert_eq!(used.get(KEY_A), Some(&3), "{used:?}");
    assert_eq!(used.get(KEY_B), Some(&3), "{used:?}");
}

async fn unknown_or_missing_consumer_key_is_401(host: Host) {
    let f = Fixture::start(host).await;
    let (status, v) = f
        .chat(
            "tg-wrong",
            json!({ "model": "mock-gpt", "messages": user("hi") }),
        )
        .await;
    assert_error(status, &v, 401, "invalid_api_key");
    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .json(&json!({ "model": "mock-gpt", "messages": user("hi") }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.unwrap(), 401, "missing_api_key");
    assert!(f.mock.requests().is_empty());
}

async fn forbidden_model_is_403(host: Host) {
    let f = Fixture::start(host).await;
    let (status, v) = f
        .chat(
            LIMITED_KEY,
            json!({ "model": "gpt-4o-mini", "messages": user("hi") }),
        )
        .await;
    assert_error(status, &v, 403, "model_not_allowed");
    let (status, v) = f
        .chat(
            LIMITED_KEY,
            json!({ "model": "no-such-model", "messages": user("hi") }),
        )
        .await;
    assert_error(status, &v, 404, "model_not_found");
    assert!(f.mock.requests().is_empty());
}

async fn malformed_body_is_400(host: Host) {
    let f = Fixture::start(host).await;
    for body in ["{not json", "[]", r#"{"model":"gpt-4o-mini"}"#, ""] {
        let r = f
            .http
            .post(f.url("/v1/chat/completions"))
            .bearer_auth(APP_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_error(
            status,
            &r.json().await.unwrap(),
            400,
            "invalid_request_body",
        );
    }
    assert!(f.mock.requests().is_empty());
}

async fn oversized_body_is_413(host: Host) {
    let f = Fixture::start(host).await;
    let big = "x".repeat(MAX_BODY + 1);
    let (status, v) = f
        .chat(
            APP_KEY,
            json!({ "model": "gpt-4o-mini", "messages": user(&big) }),
        )
        .await;
    assert_error(status, &v, 413, "request_too_large");
    assert!(f.mock.requests().is_empty());
}

async fn models_lists_exactly_the_allowed_models(host: Host) {
    let f = Fixture::start(host).await;
    for (key, want) in [
        (
            APP_KEY,
            vec![
                "gpt-4o-mini",
                "fast",
                "ordered-gpt",
                "mock-gpt",
                "unreachable",
            ],
        ),
        (LIMITED_KEY, vec!["hasty-gpt", "mock-gpt"]),
    ] {
        let r = f
            .http
            .get(f.url("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "list");
        let ids: Vec<_> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, want);
    }
    let r = f
        .http
        .get(f.url("/v1/models"))
        .bearer_auth("tg-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

async fn unknown_path_is_404(host: Host) {
    let f = Fixture::start(host).await;
    let r = f
        .http
        .post(f.url("/v1/embeddings"))
        .bearer_auth(APP_KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.unwrap(), 404, "not_found");
}

async fn unreachable_provider_is_502(host: Host) {
    let f = Fixture::start(host).await;
    let (status, v) = f
        .chat(
            APP_KEY,
            json!({ "model": "unreachable", "messages": user("hi") }),
        )
        .await;
    assert_error(status, &v, 502, "upstream_unavailable");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`dead`"),
        "{v}"
    );
    f.assert_no_secrets_logged();
}

async fn silent_provider_is_504(host: Host) {
    let f = Fixture::start(host).await;
    f.fault_all_keys(Fault::Slow {
        delay_ms: UPSTREAM_TIMEOUT_MS + 3_000,
        gap_ms: 0,
    });
    let (status, v) = f.ask().await;
    assert_error(status, &v, 504, "upstream_timeout");
}

/// `upstream_timeout_ms` bounds the provider's silence, not the stream: a stream whose every
/// gap is well under it lives on for longer than it, in full.
async fn a_long_stream_with_short_gaps_outlives_the_idle_timeout(host: Host) {
    let f = Fixture::start_with_timeout(host, 2_000).await;
    // Eight events, 500 ms apart: 3.5 s in all.
    let (started, r) = f.stream_with_gaps(500).await;
    let text = r.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert_eq!(stream_text(&events), DEFAULT_CONTENT);
    assert!(started.elapsed() > Duration::from_millis(3_000));
}

/// A provider that goes silent mid-stream for longer than `upstream_timeout_ms` is cut off:
/// the client gets what was sent, then the end of a stream that did not complete, and the
/// gateway keeps serving.
async fn a_provider_silent_mid_stream_is_cut_at_the_idle_timeout(host: Host) {
    let f = Fixture::start_with_timeout(host, 1_000).await;
    let (started, mut r) = f.stream_with_gaps(30_000).await;
    let mut text = String::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the stream was not cut at the idle timeout"
    );
    let events = sse_data(&text);
    assert_eq!(
        events.len(),
        1,
        "only the role chunk came before the silence: {text}"
    );
    assert!(!text.contains("[DONE]"));
    f.clear_all_faults();
    let (status, v) = f.ask().await;
    assert_eq!(status, 200, "{v}");
}

/// Header values that are not UTF-8, or that put a multi-byte character where `Bearer `
/// ends, are refused or ignored, and the gateway keeps serving.
async fn hostile_headers_do_not_break_the_gateway(host: Host) {
    use reqwest::header::HeaderValue;
    let f = Fixture::start(host).await;
    let body = json!({ "model": "mock-gpt", "messages": user("hi") });
    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .header(
            "x-junk",
            HeaderValue::from_bytes(b"\xff\xfe not utf-8").unwrap(),
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for auth in [
        &b"Bearer\xc3\xa9tg-test-app-key"[..],
        b"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9",
        b"Bearer \xff",
    ] {
        let r = f
            .http
            .post(f.url("/v1/chat/completions"))
            .header("authorization", HeaderValue::from_bytes(auth).unwrap())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
    }
    let (status, v) = f.chat(APP_KEY, body).await;
    assert_eq!(status, 200, "the gateway stopped serving: {v}");
}

/// Clients cannot make Envoy retry or re-time a request with `x-envoy-*` headers.
async fn router_control_headers_from_clients_are_ignored(host: Host) {
    let f = Fixture::start(host).await;
    f.fault_all_keys(Fault::ServerError { status: 503 });
    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .header("x-envoy-retry-on", "5xx")
        .header("x-envoy-max-retries", "3")
        .header("x-forwarded-for", "10.0.0.1")
        .json(&json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        f.mock.requests().len(),
        3,
        "the gateway's own 3 attempts, not the client's 1 + 3"
    );
    assert!(f.mock.requests()[0]
        .headers
        .iter()
        .all(|(k, _)| !k.starts_with("x-envoy-retry")));
}

/// A provider refusing the gateway's key is the gateway's problem, not the client's: the
/// request tries the other key, and when the provider refuses every key the client gets 503
/// naming the provider, with nothing of the provider's message (which may quote the key).
async fn provider_refusing_every_key_is_503(host: Host) {
    let f = Fixture::start(host).await;
    f.fault_all_keys(Fault::Unauthorized);
    let (status, v) = f.ask().await;
    assert_error(status, &v, 503, "provider_keys_revoked");
    let text = v.to_string();
    assert!(text.contains("`upstream`"), "{text}");
    assert!(
        !text.contains("sk-test") && !text.contains("Incorrect"),
        "{text}"
    );
    assert_eq!(f.mock.requests().len(), 2, "each key tried once");
    f.assert_no_secrets_logged();
}

/// A provider's own error (a 503 after every key was tried) reaches the client as the
/// provider sent it: status, message, type and code.
async fn provider_errors_pass_through(host: Host) {
    let f = Fixture::start(host).await;
    f.fault_all_keys(Fault::ServerError { status: 503 });
    let (status, v) = f.ask().await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(
        v,
        json!({ "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": null,
            "code": null,
        }})
    );
    assert_eq!(
        f.mock.requests().len(),
        3,
        "every attempt the policy allows"
    );
}

/// An error page from the provider's edge (HTML, not JSON) is retried like any server error;
/// when every attempt gets one, the client gets the provider's status with an OpenAI-shaped
/// error it can parse, never the HTML.
async fn provider_error_pages_that_are_not_json_become_openai_errors(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(KEY_A, Fault::HtmlError { status: 503 });
    for _ in 0..2 {
        let (status, v) = f.ask().await;
        assert_eq!(status, 200, "not retried on key B: {v}");
    }
    f.fault_all_keys(Fault::HtmlError { status: 502 });
    let r = f
        .post(json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
        .await;
    let status = r.status().as_u16();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("application/json"),
        "{:?}",
        r.headers()
    );
    let text = r.text().await.unwrap();
    assert!(!text.contains("<html"), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_error(status, &v, 502, "upstream_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`upstream`"),
        "{v}"
    );
}

/// The 429s a provider sends without a time to come back (a plain rate limit without
/// `retry-after`, an exhausted quota) are retried on another key like any 429.
async fn a_429_without_retry_after_is_retried_on_another_key(host: Host) {
    for fault in [
        Fault::TooManyRequests {
            retry_after_secs: None,
        },
        Fault::QuotaExhausted,
    ] {
        let f = Fixture::start(host).await;
        f.mock.set_fault(KEY_A, fault.clone());
        f.ask_until_key_a_met(&f.http).await;
        let used = keys_used(&f);
        assert_eq!(
            used.last().map(String::as_str),
            Some(KEY_B),
            "{fault:?}: the retry after A's 429 went to B: {used:?}"
        );
    }
}

/// Streams as real servers frame them — CRLF line ends, keep-alive comments, several events
/// in one read or one event split over many reads, no `[DONE]` — reach the client with the
/// same events, the usage chunk hidden from a client that did not ask for it and kept for
/// one that did.
async fn streams_in_any_framing_reach_the_client_intact(host: Host) {
    let f = Fixture::start(host).await;
    for style in messy_styles() {
        for key in [KEY_A, KEY_B] {
            f.mock.set_stream_style(key, style);
        }
        for include_usage in [false, true] {
            let r = f
                .post(json!({
                    "model": "gpt-4o-mini", "stream": true, "messages": user("hi"),
                    "stream_options": { "include_usage": include_usage },
                }))
                .await;
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            let events = sse_data(&text);
            assert_eq!(stream_text(&events), DEFAULT_CONTENT, "{style:?}: {text:?}");
            let usage: Vec<&String> = events
                .iter()
                .filter(|e| e.contains("\"usage\":{"))
                .collect();
            assert_eq!(
                usage.len(),
                usize::from(include_usage),
                "{style:?}: {text:?}"
            );
            assert_eq!(
                events.last().is_some_and(|e| e == "[DONE]"),
                style.done,
                "{style:?}: {text:?}"
            );
            if style.keep_alive {
                assert!(text.contains(": keep-alive"), "comments pass: {text:?}");
            }
        }
    }
}

/// The framings `streams_in_any_framing_reach_the_client_intact` sends.
fn messy_styles() -> Vec<StreamStyle> {
    let crlf = StreamStyle {
        line_ending: LineEnding::CrLf,
        ..StreamStyle::default()
    };
    vec![
        StreamStyle::default(),
        crlf,
        StreamStyle {
            keep_alive: true,
            writes: Writes::Coalesced,
            ..crlf
        },
        StreamStyle {
            writes: Writes::Split { bytes: 7 },
            keep_alive: true,
            ..StreamStyle::default()
        },
        StreamStyle {
            writes: Writes::Split { bytes: 1 },
            ..crlf
        },
        StreamStyle {
            done: false,
            ..StreamStyle::default()
        },
    ]
}

/// A provider's error event in the middle of a stream reaches the client as the provider
/// sent it, after what came before, and the stream ends there.
async fn a_mid_stream_error_event_reaches_the_client(host: Host) {
    let f = Fixture::start(host).await;
    for key in [KEY_A, KEY_B] {
        f.mock.set_stream_style(
            key,
            StreamStyle {
                error_after: Some(3),
                ..StreamStyle::default()
            },
        );
    }
    let text = f.stream().await;
    let events = sse_data(&text);
    assert_eq!(events.len(), 4, "{text}");
    let error: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(error["error"]["type"], "server_error", "{text}");
    assert_eq!(stream_text(&events[..3]), "Hello from");
    assert_eq!(
        f.mock.requests().len(),
        1,
        "not retried after the first byte"
    );
}

fn keys_used(f: &Fixture) -> Vec<String> {
    f.mock
        .requests()
        .into_iter()
        .filter_map(|r| r.key)
        .collect()
}

/// Key A answers 429 with `retry-after: 30`: the request that met it succeeds on key B, and
/// every worker then skips A (each request on a connection of its own, so that both Envoy
/// workers serve some).
async fn a_429_is_retried_on_another_key_which_then_takes_the_traffic(host: Host) {
    let f = Fixture::start(host).await;
    f.rate_limit(KEY_A, 30);
    let fresh = fresh_client();
    f.ask_until_key_a_met(&fresh).await;
    let used = keys_used(&f);
    assert_eq!(
        used.last().map(String::as_str),
        Some(KEY_B),
        "the retry after A's 429 went to B: {used:?}"
    );
    let after = f.keys_on_every_worker(8).await;
    assert!(
        after.iter().all(|k| k == KEY_B),
        "a cooling key was used: {after:?}"
    );
}

/// A key cools only as long as the provider said: after `retry-after: 1`, every worker uses
/// it again. (Waiting longer than needed is never wrong, so this holds on a slow machine.)
async fn a_cooled_key_is_used_again_after_the_providers_time(host: Host) {
    let f = Fixture::start(host).await;
    f.rate_limit(KEY_A, 1);
    let fresh = fresh_client();
    f.ask_until_key_a_met(&fresh).await;
    let met = std::time::Instant::now();
    f.mock.clear_fault(KEY_A);
    tokio::time::sleep(Duration::from_millis(1_200).saturating_sub(met.elapsed())).await;
    let after = f.keys_on_every_worker(8).await;
    assert!(
        after.iter().filter(|k| *k == KEY_A).count() >= 2,
        "key A was not used again: {after:?}"
    );
}

/// A key the provider refuses (401) is revoked: no worker uses it again until its re-probe.
async fn a_refused_key_is_not_used_again(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(KEY_A, Fault::Unauthorized);
    let fresh = fresh_client();
    f.ask_until_key_a_met(&fresh).await;
    let after = f.keys_on_every_worker(8).await;
    assert!(
        after.iter().all(|k| k == KEY_B),
        "a revoked key was used: {after:?}"
    );
}

/// When every key is cooling, the client gets 429 at once, with the earliest retry time,
/// and the provider sees no call.
async fn when_every_key_cools_the_client_gets_429_at_once(host: Host) {
    let f = Fixture::start(host).await;
    for key in [KEY_A, KEY_B] {
        f.rate_limit(key, 30);
    }
    for _ in 0..2 {
        let (status, _) = f.ask().await;
        assert_eq!(status, 429);
    }
    assert_eq!(f.mock.requests().len(), 2);
    let r = f
        .post(json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
        .await;
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").cloned();
    let body: Value = r.json().await.unwrap();
    assert_error(status, &body, 429, "provider_keys_cooling");
    let retry: u64 = retry.unwrap().to_str().unwrap().parse().unwrap();
    assert!((25..=30).contains(&retry), "retry-after {retry}");
    assert_eq!(f.mock.requests().len(), 2, "no blind call upstream");
}

/// The provider's remaining-capacity headers steer traffic to the key with more headroom.
async fn remaining_capacity_steers_traffic_to_the_key_with_more_headroom(host: Host) {
    let f = Fixture::start(host).await;
    let room = |tokens: &str| {
        vec![
            (
                "x-ratelimit-remaining-tokens".to_string(),
                tokens.to_string(),
            ),
            ("x-ratelimit-reset-tokens".to_string(), "1m0s".to_string()),
        ]
    };
    f.mock.set_key_headers(KEY_A, room("300"));
    f.mock.set_key_headers(KEY_B, room("90000"));
    // Two requests learn both keys (round-robin while nothing is known)...
    for _ in 0..2 {
        let (status, v) = f.ask().await;
        assert_eq!(status, 200, "{v}");
    }
    // ...then the roomier key takes the traffic.
    let after = f.keys_of_next(6).await;
    assert!(after.iter().all(|k| k == KEY_B), "{after:?}");
    // The provider's own headers never reach the client.
    let r = f
        .post(json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
        .await;
    assert!(r.headers().get("x-ratelimit-remaining-tokens").is_none());
}

/// A stream whose attempt fails before its first byte (here a 500) is retried on another
/// key, and the client sees one clean stream.
async fn a_stream_failing_before_its_first_byte_is_retried(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(KEY_A, Fault::ServerError { status: 500 });
    for _ in 0..4 {
        let text = f.stream().await;
        let events = sse_data(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        assert_eq!(stream_text(&events), DEFAULT_CONTENT);
        if keys_used(&f).iter().any(|k| k == KEY_A) {
            break;
        }
    }
    let used = keys_used(&f);
    let a = used
        .iter()
        .position(|k| k == KEY_A)
        .expect("never reached key A");
    assert_eq!(used.get(a + 1).map(String::as_str), Some(KEY_B), "{used:?}");
}

/// A model with its own pool (`keys: [key-b]`) only ever uses those keys.
async fn a_model_with_its_own_pool_uses_only_its_keys(host: Host) {
    let f = Fixture::start(host).await;
    for _ in 0..4 {
        let (status, v) = f
            .chat(APP_KEY, json!({ "model": "fast", "messages": user("hi") }))
            .await;
        assert_eq!(status, 200, "{v}");
    }
    let used = keys_used(&f);
    assert_eq!(used, [KEY_B, KEY_B, KEY_B, KEY_B]);
}

/// The `priority` strategy sends everything to the first key, and fails over to the next
/// one, within the same request, when the first fails.
async fn a_priority_pool_fails_over_in_order(host: Host) {
    let f = Fixture::start(host).await;
    let ask = || {
        f.chat(
            APP_KEY,
            json!({ "model": "ordered-gpt", "messages": user("hi") }),
        )
    };
    for _ in 0..3 {
        assert_eq!(ask().await.0, 200);
    }
    assert_eq!(keys_used(&f), [KEY_A, KEY_A, KEY_A]);
    f.mock.set_fault(KEY_A, Fault::ServerError { status: 502 });
    let (status, v) = ask().await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(keys_used(&f).split_off(3), [KEY_A, KEY_B]);
    f.mock.clear_fault(KEY_A);
    assert_eq!(ask().await.0, 200);
    assert_eq!(keys_used(&f).last().map(String::as_str), Some(KEY_A));
}

/// The pools as an operator sees them: `GET /admin/keys` on the native host (admin key
/// only), Envoy stats in Envoy. Ids, states and counters; never a secret.
async fn key_pool_figures_are_visible_to_operators(host: Host) {
    let f = Fixture::start(host).await;
    f.rate_limit(KEY_A, 30);
    let asked = f.ask_until_key_a_met(&f.http).await as u64;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let admin = |key: Option<&str>| {
        let mut r = f.http.get(f.url("/admin/keys"));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        r.send()
    };
    match host {
        Host::Native => {
            assert_eq!(admin(None).await.unwrap().status(), 401);
            assert_eq!(admin(Some(APP_KEY)).await.unwrap().status(), 401);
            let r = admin(Some(ADMIN_KEY)).await.unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            assert!(!text.contains(KEY_A) && !text.contains(KEY_B), "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            let pool = v["providers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["provider"] == "upstream")
                .unwrap()
                .clone();
            assert_eq!(pool["strategy"], "most-headroom");
            let a = &pool["keys"][0];
            assert_eq!(a["id"], "key-a");
            assert_eq!(a["state"], "cooling", "{pool}");
            assert!(a["until_ms"].as_u64().unwrap() > v["now_ms"].as_u64().unwrap() + 20_000);
            assert_eq!(a["counters"]["rate_limited"], 1, "{pool}");
            assert_eq!(a["counters"]["succeeded"], 0, "{pool}");
            let b = &pool["keys"][1];
            assert_eq!(b["state"], "healthy");
            // Every request ended on B: those before A's turn, and A's retry.
            assert_eq!(b["counters"]["succeeded"], asked, "{pool}");
            assert_eq!(b["counters"]["rate_limited"], 0, "{pool}");
        }
        Host::Envoy { .. } => {
            // Not served by Envoy: its figures are in its metrics.
            assert_eq!(admin(Some(ADMIN_KEY)).await.unwrap().status(), 404);
            // `<key>.<figure>` from the metrics Envoy exports.
            let stat = |name: &str| -> Option<u64> {
                let (key, figure) = name.split_once('.')?;
                let at = [("provider", "upstream"), ("key", key)];
                let v = match figure {
                    "state" => f.gateway.metric("tollgate_key_state", &at)?,
                    "until_ms" => f.gateway.metric("tollgate_key_until_seconds", &at)? * 1_000.0,
                    outcome => f.gateway.metric(
                        "tollgate_key_attempts_total",
                        &[("provider", "upstream"), ("key", key), ("outcome", outcome)],
                    )?,
                };
                Some(v as u64)
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            // Gauges are published every second.
            while stat("key-a.state") != Some(1) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(stat("key-a.state"), Some(1), "key A is cooling");
            // Cooling for the provider's 30 s from when it said so.
            let until = stat("key-a.until_ms").unwrap();
            assert!(
                (now_ms + 20_000..=now_ms + 31_000).contains(&until),
                "{until} vs now {now_ms}"
            );
            assert_eq!(stat("key-a.rate_limited"), Some(1));
            assert_eq!(stat("key-a.succeeded").unwrap_or(0), 0);
            assert_eq!(stat("key-b.succeeded"), Some(asked));
            assert_eq!(stat("key-b.state"), Some(0));
        }
    }
    f.assert_no_secrets_logged();
}

/// No attempt starts past the retry budget, and the client gets the provider's last answer
/// as it was (in Envoy the key role keeps the router from retrying an answer that came
/// after the budget).
async fn no_attempt_starts_past_the_retry_budget(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(KEY_A, Fault::ServerError { status: 500 });
    let (status, v) = f
        .chat(
            LIMITED_KEY,
            json!({ "model": "hasty-gpt", "messages": user("hi") }),
        )
        .await;
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    assert_eq!(f.mock.requests().len(), 1, "one attempt only");
}

/// Headers a provider sends that look like the gateway's internal markers have no effect
/// and never reach the client: a failure is not turned into a success, nothing is settled
/// on the provider's say-so.
async fn forged_gateway_headers_from_a_provider_have_no_effect(host: Host) {
    let f = Fixture::start(host).await;
    let forge = |marker: &str| {
        for key in [KEY_A, KEY_B] {
            f.mock
                .set_key_headers(key, vec![("x-tollgate-local-reply".into(), marker.into())]);
        }
    };
    forge("key 200");
    for key in [KEY_A, KEY_B] {
        f.mock.set_key_headers(
            key,
            vec![
                ("x-tollgate-local-reply".into(), "key 200".into()),
                ("x-tollgate-model".into(), "forged".into()),
            ],
        );
    }
    let r = f
        .post(json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
        .await;
    assert_eq!(r.status(), 200);
    // The gateway's own `x-tollgate-model` only, naming the model that served.
    assert!(
        r.headers()
            .keys()
            .all(|k| !k.as_str().starts_with("x-tollgate") || k == "x-tollgate-model"),
        "{:?}",
        r.headers()
    );
    let models: Vec<_> = r.headers().get_all("x-tollgate-model").iter().collect();
    assert_eq!(models, ["gpt-4o-mini"], "{:?}", r.headers());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], DEFAULT_CONTENT);
    f.fault_all_keys(Fault::ServerError { status: 503 });
    for marker in ["key 200", "final 200"] {
        forge(marker);
        let (status, v) = f.ask().await;
        assert_eq!(status, 503, "{marker}: {v}");
    }
}

/// The official `openai` Python SDK works against the gateway, streaming and not.
async fn openai_python_sdk(host: Host) {
    let f = Fixture::start(host).await;
    for (model, want) in [
        ("mock-gpt", "You said: Hello from the SDK"),
        ("gpt-4o-mini", DEFAULT_CONTENT),
    ] {
        let base = format!("{}/v1", f.gateway.base_url());
        let v = run_sdk_script("openai_chat.py", &[&base, APP_KEY, model]).await;
        assert_eq!(v["content"], want, "{v}");
        assert_eq!(v["streamed"], want, "{v}");
        // Asked for with `include_usage`: exactly one usage chunk, neither stripped nor
        // doubled by the gateway's own request for it.
        assert_eq!(v["usage_chunks"], 1, "{v}");
        if model == "gpt-4o-mini" {
            assert_eq!(v["total_tokens"], DEFAULT_USAGE.total_tokens(), "{v}");
        } else {
            assert!(v["total_tokens"].as_u64().unwrap() > 0, "{v}");
        }
        assert_eq!(
            v["models"],
            json!([
                "gpt-4o-mini",
                "fast",
                "ordered-gpt",
                "mock-gpt",
                "unreachable"
            ])
        );
    }
}

/// SIGTERM stops accepting, lets the stream in flight finish, then exits cleanly.
async fn graceful_shutdown_finishes_requests_in_flight(host: Host) {
    // The stream is held for as long as the shutdown takes: no idle timeout may cut it.
    let f = Fixture::start_with_timeout(host, 120_000).await;
    let (release, mut r) = f.held_stream().await;
    let first = r.chunk().await.unwrap().unwrap();
    let Fixture(Stack {
        mock,
        gateway,
        http,
    }) = f;
    let url = format!("{}/healthz", gateway.base_url());
    let stopped = tokio::task::spawn_blocking(move || gateway.terminate());
    // Once the listener is closed, new connections are refused.
    let mut refused = false;
    for _ in 0..200 {
        if http
            .get(&url)
            .header("connection", "close")
            .send()
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused, "the gateway kept accepting after SIGTERM");
    release.notify_one();
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert_eq!(
        sse_data(&text).last().map(String::as_str),
        Some("[DONE]"),
        "the stream was cut"
    );
    assert!(stopped.await.unwrap(), "no clean exit after SIGTERM");
    drop(mock);
}

/// Envoy refuses a filter config with errors, and its log says which, with paths.
async fn envoy_rejects_an_invalid_config(host: Host) {
    // `tollgate envoy-bootstrap` refuses a config it can see is wrong; secrets it cannot see,
    // as they are read inside Envoy.
    let config = "providers:\n  - { name: openai, kind: openai, base_url: 'http://127.0.0.1:9/v1', keys: [{ id: k, secret_env: TG_TEST_NEVER_SET }, { id: k2, secret_env: TG_TEST_NEVER_SET_2 }] }\n";
    let result = tokio::task::spawn_blocking(move || Gateway::try_start(host, config, &[]))
        .await
        .unwrap();
    let Err(why) = result else {
        panic!("Envoy accepted an invalid config")
    };
    assert!(
        why.contains("providers[0].keys[0].secret_env: env var TG_TEST_NEVER_SET is not set"),
        "{why}"
    );
    assert!(
        why.contains("providers[0].keys[1].secret_env: env var TG_TEST_NEVER_SET_2 is not set"),
        "{why}"
    );
}

// ---- both hosts -----------------------------------------------------------------------------

both_hosts!(
    mock_kind_completion,
    mock_kind_stream,
    upstream_completion_with_model_rewrite,
    upstream_stream_is_not_buffered,
    stream_cut_by_the_provider_reaches_the_client_as_an_error,
    provider_key_injected_and_consumer_key_stripped,
    keys_rotate_across_the_pool,
    unknown_or_missing_consumer_key_is_401,
    forbidden_model_is_403,
    malformed_body_is_400,
    oversized_body_is_413,
    models_lists_exactly_the_allowed_models,
    unknown_path_is_404,
    unreachable_provider_is_502,
    silent_provider_is_504,
    a_long_stream_with_short_gaps_outlives_the_idle_timeout,
    a_provider_silent_mid_stream_is_cut_at_the_idle_timeout,
    provider_errors_pass_through,
    provider_error_pages_that_are_not_json_become_openai_errors,
    a_429_without_retry_after_is_retried_on_another_key,
    streams_in_any_framing_reach_the_client_intact,
    a_mid_stream_error_event_reaches_the_client,
    hostile_headers_do_not_break_the_gateway,
    router_control_headers_from_clients_are_ignored,
    provider_refusing_every_key_is_503,
    openai_python_sdk,
    a_429_is_retried_on_another_key_which_then_takes_the_traffic,
    a_cooled_key_is_used_again_after_the_providers_time,
    a_refused_key_is_not_used_again,
    when_every_key_cools_the_client_gets_429_at_once,
    remaining_capacity_steers_traffic_to_the_key_with_more_headroom,
    a_stream_failing_before_its_first_byte_is_retried,
    a_model_with_its_own_pool_uses_only_its_keys,
    a_priority_pool_fails_over_in_order,
    key_pool_figures_are_visible_to_operators,
    no_attempt_starts_past_the_retry_budget,
    forged_gateway_headers_from_a_provider_have_no_effect,
);

mod native_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn graceful_shutdown_finishes_requests_in_flight() {
        super::graceful_shutdown_finishes_requests_in_flight(Host::Native).await;
    }
}

mod envoy_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn envoy_rejects_an_invalid_config() {
        super::envoy_rejects_an_invalid_config(Host::Envoy { workers: 2 }).await;
    }
}
