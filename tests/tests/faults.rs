//! Broken providers, in both hosts: whatever a provider sends, the gateway relays or refuses
//! it without holding it whole, frees every concurrency slot, and keeps serving.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{Fault, MockProvider, MockUsage, INVALID_UTF8_CONTENT};
use tollgate_e2e::scenario::{away_from_utc_midnight, sha256_hex, user, Stack};

const APP_KEY: &str = "tg-faults-app-key";
const KEY: &str = "sk-faults-provider";
/// A single never-ending event: 32 MiB of one line.
const ENDLESS: u64 = 32 * 1024 * 1024;

/// The daily token allowance of `start_with_tokens`: far more than the scenarios use.
const DAILY_TOKENS: u64 = 1_000_000;

fn config(mock: &MockProvider) -> String {
    config_with_limits(mock, "{ concurrency: 1 }")
}

fn config_with_limits(mock: &MockProvider, limits: &str) -> String {
    format!(
        r#"
server:
  upstream_timeout_ms: 30000
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [gpt-4o-mini]
    limits: {limits}
providers:
  - name: upstream
    kind: openai
    base_url: {base}
    retry: {{ attempts: 1 }}
    keys: [{{ id: only, secret_env: TG_FAULTS_KEY }}]
models:
  - {{ name: gpt-4o-mini, provider: upstream }}
"#,
        app = sha256_hex(APP_KEY),
        base = mock.base_url(),
    )
}

/// Like `start`, with a daily token allowance besides the concurrency limit.
async fn start_with_tokens(host: Host) -> Stack {
    let limits = format!("{{ concurrency: 1, daily_tokens: {DAILY_TOKENS} }}");
    let config = move |mock: &MockProvider| config_with_limits(mock, &limits);
    Stack::start(host, config, vec![("TG_FAULTS_KEY", KEY)]).await
}

async fn start(host: Host) -> Stack {
    Stack::start(host, config, vec![("TG_FAULTS_KEY", KEY)]).await
}

async fn post(f: &Stack, body: Value) -> reqwest::Response {
    f.http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A provider streaming one event that never ends: the client gets the bytes as they come
/// (relayed, not collected), the request's concurrency slot is free afterwards, and the
/// gateway still serves. Whether or not the client asked for the usage chunk (which decides
/// whether the gateway strips the stream).
async fn a_never_ending_event_is_relayed_not_held(host: Host) {
    let f = start(host).await;
    for include_usage in [false, true] {
        f.mock
            .set_fault(KEY, Fault::EndlessEvent { bytes: ENDLESS });
        let mut r = post(
            &f,
            json!({ "model": "gpt-4o-mini", "stream": true, "messages": user("hi"),
                    "stream_options": { "include_usage": include_usage } }),
        )
        .await;
        assert_eq!(r.status(), 200);
        let mut received = 0u64;
        while let Ok(Some(chunk)) = r.chunk().await {
            received += chunk.len() as u64;
        }
        assert!(
            received >= ENDLESS,
            "usage {include_usage}: {received} of {ENDLESS} bytes relayed"
        );
        f.mock.clear_fault(KEY);
        // Concurrency 1: admitted only if the stream's slot was given back.
        let r = post(
            &f,
            json!({ "model": "gpt-4o-mini", "messages": user("hi") }),
        )
        .await;
        assert_eq!(
            r.status(),
            200,
            "usage {include_usage}: the slot stayed taken"
        );
    }
}

fn chat() -> Value {
    json!({ "model": "gpt-4o-mini", "max_tokens": 10, "messages": user("hi") })
}

fn stream(include_usage: bool) -> Value {
    json!({ "model": "gpt-4o-mini", "stream": true, "max_tokens": 10, "messages": user("hi"),
            "stream_options": { "include_usage": include_usage } })
}

/// Asserts that a plain request is served: with concurrency 1, that no slot is left taken.
async fn assert_serves(f: &Stack, context: &str) {
    let r = post(f, chat()).await;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(
        status, 200,
        "{context}: the gateway no longer serves: {body}"
    );
}

/// Whether `haystack` holds `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A provider streaming bytes that are not UTF-8 (`0xff 0xfe`) inside a content delta's
/// JSON: the client gets the stream with those bytes as sent (relayed, not re-encoded),
/// whether or not the gateway strips the usage chunk; the slot is free afterwards and the
/// gateway still serves.
async fn invalid_utf8_in_a_stream_is_relayed(host: Host) {
    let f = start(host).await;
    for include_usage in [false, true] {
        f.mock.set_fault(KEY, Fault::InvalidUtf8Stream);
        let r = post(&f, stream(include_usage)).await;
        assert_eq!(r.status(), 200, "usage {include_usage}");
        let body = r.bytes().await.expect("the stream's body");
        assert!(
            contains(&body, INVALID_UTF8_CONTENT),
            "usage {include_usage}: the bytes were not relayed as sent: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            contains(&body, b"data: [DONE]"),
            "usage {include_usage}: {}",
            String::from_utf8_lossy(&body)
        );
        f.mock.clear_fault(KEY);
        assert_serves(&f, &format!("usage {include_usage}")).await;
    }
}

/// What the next request will have left, from a request the provider charges nothing for
/// (its settlement gives back all it reserved).
async fn tokens_left(f: &Stack) -> u64 {
    let r = post(f, chat()).await;
    assert_eq!(r.status(), 200);
    r.headers()
        .get("x-ratelimit-remaining-tokens")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("x-ratelimit-remaining-tokens")
}

/// A provider answering 200 `application/json` with a body that is not JSON (`{"choices": [`):
/// the client gets that body or a JSON error, the request is charged what it reserved (there
/// is no usage to settle it at), and the gateway still serves, its slot free.
async fn a_200_that_is_not_json_is_charged_its_reservation(host: Host) {
    away_from_utc_midnight().await;
    let f = start_with_tokens(host).await;
    f.mock.set_reply(
        "free",
        MockUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
        },
    );
    let before = tokens_left(&f).await;
    let reserved = DAILY_TOKENS - before;
    assert!(reserved > 0, "nothing reserved");
    f.mock.set_fault(KEY, Fault::TruncatedJson);
    let r = post(&f, chat()).await;
    let status = r.status().as_u16();
    let body = r.bytes().await.expect("a body");
    if status == 200 {
        assert_eq!(&body[..], b"{\"choices\": [", "relayed, but not as sent");
    } else {
        assert!((500..600).contains(&status), "{status}");
        let error: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{status}: not a JSON error ({e}): {body:?}"));
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    f.mock.clear_fault(KEY);
    let after = tokens_left(&f).await;
    assert_eq!(
        before - after,
        reserved,
        "charged other than the reservation ({status}): {before} then {after}"
    );
}

/// A provider declaring a `content-length` of 1,000 and sending 10 bytes before closing:
/// the client sees an error or a short body, never 1,000 bytes; the slot is free afterwards
/// and the gateway still serves. Streamed or not.
async fn a_body_shorter_than_its_length_fails_cleanly(host: Host) {
    let f = start(host).await;
    for body in [chat(), stream(false)] {
        f.mock.set_fault(
            KEY,
            Fault::ShortBody {
                declared: 1_000,
                sent: 10,
            },
        );
        let r = post(&f, body.clone()).await;
        let status = r.status().as_u16();
        match r.bytes().await {
            Ok(bytes) => assert!(
                status >= 500 || bytes.len() < 1_000,
                "{body}: {status} with {} bytes",
                bytes.len()
            ),
            Err(_) => assert_eq!(status, 200, "{body}: a failed body after {status}"),
        }
        f.mock.clear_fault(KEY);
        assert_serves(&f, &body.to_string()).await;
    }
}

/// A provider sending 10 MB of response headers (one header's value): the gateway answers
/// a 5xx (with a JSON error from the native host), frees the slot, and still serves.
async fn ten_megabytes_of_headers_are_refused(host: Host) {
    let f = start(host).await;
    f.mock.set_fault(
        KEY,
        Fault::HugeHeader {
            bytes: 10 * 1024 * 1024,
        },
    );
    let r = post(&f, chat()).await;
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap_or_default();
    assert!(
        (500..600).contains(&status),
        "{status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    let error: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{status}: not a JSON error ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )
    });
    // The provider answered, unreadably: not "unreachable", nor its own error page.
    assert_eq!(status, 502, "{error}");
    assert_eq!(error["error"]["code"], "upstream_invalid_answer", "{error}");
    f.mock.clear_fault(KEY);
    assert_serves(&f, "after the huge headers").await;
}

/// Sends `body` until the concurrency limit admits it (a 429 meaning a slot is still
/// taken), within 15 s.
async fn post_when_admitted(f: &Stack, body: Value, context: &str) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = post(f, body.clone()).await;
        if r.status() != 429 {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: a slot stayed taken: {}",
            r.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients that go away at different points of slow streams (after the headers, after one
/// to four chunks), 30 in turn: each one's slot is given back (the next is admitted under
/// `concurrency: 1` within a bound), and the gateway serves afterwards.
async fn clients_aborting_streams_free_their_slots(host: Host) {
    let f = start(host).await;
    f.mock.set_fault(
        KEY,
        Fault::Slow {
            delay_ms: 0,
            gap_ms: 20,
        },
    );
    for i in 0..30 {
        let k = i % 5;
        let context = format!("request {i}, dropped after {k} chunks");
        let mut r = post_when_admitted(&f, stream(i % 2 == 0), &context).await;
        assert_eq!(r.status(), 200, "{context}");
        for _ in 0..k {
            if r.chunk().await.expect(&context).is_none() {
                break;
            }
        }
        drop(r);
    }
    f.mock.clear_fault(KEY);
    let r = post_when_admitted(&f, chat(), "after the aborted streams").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

both_hosts!(
    a_never_ending_event_is_relayed_not_held,
    invalid_utf8_in_a_stream_is_relayed,
    a_200_that_is_not_json_is_charged_its_reservation,
    a_body_shorter_than_its_length_fails_cleanly,
    ten_megabytes_of_headers_are_refused,
    clients_aborting_streams_free_their_slots,
);
